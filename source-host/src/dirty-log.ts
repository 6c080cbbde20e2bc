/**
 * The source's dirty log: one bit a page, set by every guest write (KVM's
 * dirty bitmap, which KVM_MEM_LOG_DIRTY_PAGES keeps for a memslot), read and
 * cleared at each sync (KVM_GET_DIRTY_LOG then KVM_CLEAR_DIRTY_LOG).
 *
 * The bitmap is shared by the vCPU threads that write the guest and the
 * migration thread that syncs it, without a lock:
 * - a writer first stores to the page, then sets its bit with Atomics.or;
 * - a sync takes each 32-bit word with Atomics.exchange(word, 0), which reads
 *   and clears in one indivisible step.
 * So a bit set while a sync runs lands either before the exchange of its
 * word (this sync sees it) or after (the next one does): none is ever lost.
 * And because the store comes before the bit (all Atomics are sequentially
 * consistent, and a plain store before an Atomics.or in program order is
 * visible to whoever sees the bit), a sender that copies a page after the sync
 * that took its bit sees that write: a write the copy missed sets the bit
 * again after it, and the page goes in a later round. (KVM gets the same
 * from write protection: CLEAR_DIRTY_LOG write-protects the pages again, so
 * any write after it faults and sets the bit anew.)
 */

/** What a writer thread needs (structured-cloned into it). */
export type DirtyLogBuffer = SharedArrayBuffer;

export class DirtyLog {
  readonly words: Int32Array;
  private syncs = 0;
  /** Testing only: forget every Nth dirty bit found at a sync (0 = never). */
  private readonly loseEvery: number;
  private seen = 0;
  /** Bits forgotten on purpose ({@link loseEvery}). */
  lost = 0;

  constructor(
    readonly totalPages: number,
    buffer?: DirtyLogBuffer,
    options: { loseEvery?: number } = {},
  ) {
    this.words = new Int32Array(buffer ?? new SharedArrayBuffer(Math.ceil(totalPages / 32) * 4));
    this.loseEvery = options.loseEvery ?? 0;
  }

  get buffer(): DirtyLogBuffer {
    return this.words.buffer as SharedArrayBuffer;
  }

  /** A guest write to `page` (call after the store itself). */
  mark(page: number): void {
    Atomics.or(this.words, page >>> 5, 1 << (page & 31));
  }

  /** Dirty syncs so far (QEMU's dirty-sync-count). */
  get syncCount(): number {
    return this.syncs;
  }

  /**
   * Read-and-clear: ORs every dirty bit into `into` (a bitmap of Int32 words,
   * one bit a page, as this log's own) and clears it here. Returns how many
   * pages were dirty.
   */
  sync(into: Int32Array): number {
    if (into.length < this.words.length) throw new RangeError(`expected a bitmap of ${this.words.length} words, got ${into.length}`);
    this.syncs++;
    let dirty = 0;
    for (let i = 0; i < this.words.length; i++) {
      let w = Atomics.exchange(this.words, i, 0);
      if (w === 0) continue;
      if (this.loseEvery > 0) w = this.forget(w);
      into[i]! |= w;
      dirty += popcount(w);
    }
    return dirty;
  }

  /** Drops every loseEvery-th set bit of `w` (the testing-only fault that the content check must catch). */
  private forget(w: number): number {
    let kept = w;
    for (let bit = 0; bit < 32; bit++) {
      if ((w & (1 << bit)) === 0) continue;
      if (++this.seen % this.loseEvery === 0) {
        kept &= ~(1 << bit);
        this.lost++;
      }
    }
    return kept;
  }

  /** Clears the whole log (when logging starts: what was written before, the first round sends anyway). */
  clear(): void {
    for (let i = 0; i < this.words.length; i++) Atomics.store(this.words, i, 0);
  }
}

export function popcount(w: number): number {
  let v = w >>> 0;
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24) & 0xff;
}

/** Whether `page` is set in a bitmap of Int32 words. */
export function bitSet(bits: Int32Array, page: number): boolean {
  return (bits[page >>> 5]! & (1 << (page & 31))) !== 0;
}

export function setBit(bits: Int32Array, page: number): void {
  bits[page >>> 5]! |= 1 << (page & 31);
}

export function clearBit(bits: Int32Array, page: number): void {
  bits[page >>> 5]! &= ~(1 << (page & 31));
}
