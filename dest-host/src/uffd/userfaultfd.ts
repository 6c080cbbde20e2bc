/**
 * An emulated userfaultfd in shared memory, faithful to the Linux semantics
 * listed in DESIGN.md ("Emulated userfaultfd: the semantics to match"). Every
 * thread (vCPU, I/O thread, resolver, test thread) attaches to the same
 * buffers; faulting threads block on their own wait word and are woken on
 * it, with the kernel's futex(2) through the uffd addon or with V8's
 * Atomics.wait/notify (futex.ts: the creator's choice), so a blocked vCPU is
 * really a blocked thread.
 *
 * The API follows the ioctls: open (userfaultfd(2) + UFFDIO_API), register
 * (UFFDIO_REGISTER, missing mode), unregister (UFFDIO_UNREGISTER), read
 * (read(2) of struct uffd_msg), copy (UFFDIO_COPY), zeropage
 * (UFFDIO_ZEROPAGE), wake (UFFDIO_WAKE), close (close(2)), and discard
 * (madvise(MADV_DONTNEED)). Results are errno-style: what the kernel writes to
 * `uffdio_copy.copy` — bytes copied, or a negated errno when nothing was copied.
 *
 * Memory no open context registers behaves as plain anonymous memory: a
 * touch of a missing page there installs a zero-filled page, as the kernel's
 * do_anonymous_page does once a userfaultfd is closed or unregistered.
 *
 * The conformance suite (dest-host/src/conformance) runs the same cases on
 * this and on the kernel's userfaultfd and expects the same results.
 *
 * References: Linux fs/userfaultfd.c (handle_userfault, userfaultfd_must_wait,
 * __wake_userfault, userfaultfd_register, userfaultfd_unregister,
 * userfaultfd_release) and mm/userfaultfd.c (mfill_atomic, find_dst_vma).
 */
import { futexOfKind, loadNativeFutex, type Futex } from './futex.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import {
  CONTEXT,
  ERRNO,
  HEADER,
  MAX_RANGES,
  MODE_DONTWAKE,
  MODE_WP,
  MSG,
  PTE,
  QUEUE_CAPACITY,
  THREAD,
  UFFD_PAGEFAULT_FLAG_WRITE,
  contextBase,
  controlLength,
  threadBase,
} from './layout.js';

export { ERRNO, MODE_DONTWAKE, MODE_WP, UFFD_PAGEFAULT_FLAG_WRITE } from './layout.js';

/** struct uffd_msg (UFFD_EVENT_PAGEFAULT): filled in place by read, never allocated per read. */
export class UffdMessage {
  /** Page-aligned fault address (no UFFD_FEATURE_EXACT_ADDRESS). */
  address = 0;
  /** UFFD_PAGEFAULT_FLAG_WRITE or 0. */
  flags = 0;
  /** Faulting thread's id (UFFD_FEATURE_THREAD_ID). */
  tid = 0;
}

export interface UffdBuffers {
  control: SharedArrayBuffer;
  ptes: SharedArrayBuffer;
}

export interface UffdCounters {
  faults: number;
  copies: number;
  zeropages: number;
  eexist: number;
  wakeCalls: number;
  threadsWoken: number;
  discards: number;
}

export class Userfaultfd {
  readonly memory: GuestMemory;
  private readonly ctl: Int32Array;
  /** Page table: one entry a page (PTE.NONE / INSTALLING / PRESENT). */
  readonly ptes: Int32Array;
  private readonly maxThreads: number;
  private readonly maxContexts: number;
  private readonly pageSize: number;
  private readonly totalPages: number;
  /** How threads sleep on SEQ and EVENTS words, and are woken (futex.ts). */
  private readonly futex: Futex;

  /**
   * Creates the shared state ("the kernel") for `maxThreads` faulting threads
   * and `maxContexts` contexts. Its threads sleep and wake through `sleep`
   * (futex.ts): by default the kernel's futex(2) where the uffd addon loads,
   * else V8's Atomics.
   */
  static create(memory: GuestMemory, maxThreads: number, maxContexts: number, sleep: Futex['kind'] = loadNativeFutex()?.kind ?? 'atomics'): Userfaultfd {
    const control = new SharedArrayBuffer(controlLength(maxThreads, maxContexts) * 4);
    const ptes = new SharedArrayBuffer(memory.layout.totalPages * 4);
    const ctl = new Int32Array(control);
    ctl[HEADER.MAX_THREADS] = maxThreads;
    ctl[HEADER.MAX_CONTEXTS] = maxContexts;
    ctl[HEADER.PAGE_SIZE] = memory.layout.pageSize;
    ctl[HEADER.TOTAL_PAGES] = memory.layout.totalPages;
    ctl[HEADER.FUTEX] = sleep === 'futex' ? 1 : 0;
    for (let tid = 0; tid < maxThreads; tid++) ctl[threadBase(tid) + THREAD.BOUND_CTX] = -1;
    return new Userfaultfd({ control, ptes }, memory);
  }

  /** Attaches to state created by {@link create} (in a worker). */
  constructor(buffers: UffdBuffers, memory: GuestMemory) {
    this.memory = memory;
    this.ctl = new Int32Array(buffers.control);
    this.ptes = new Int32Array(buffers.ptes);
    this.maxThreads = this.ctl[HEADER.MAX_THREADS]!;
    this.maxContexts = this.ctl[HEADER.MAX_CONTEXTS]!;
    this.pageSize = this.ctl[HEADER.PAGE_SIZE]!;
    this.totalPages = this.ctl[HEADER.TOTAL_PAGES]!;
    this.futex = futexOfKind(this.ctl[HEADER.FUTEX] === 1 ? 'futex' : 'atomics');
  }

  /** How this emulation's threads sleep and wake (the creator's choice, the same in every thread). */
  get sleepKind(): Futex['kind'] {
    return this.futex.kind;
  }

  toBuffers(): UffdBuffers {
    return { control: this.ctl.buffer as SharedArrayBuffer, ptes: this.ptes.buffer as SharedArrayBuffer };
  }

  // ---------------------------------------------------------------- contexts

  /**
   * userfaultfd(2): a new context. With `thread`, the context is that thread's
   * own (the proposed per-thread userfaultfd): faults of that thread in ranges
   * the context registers go to it; everyone else's go to a process-wide one.
   */
  open(thread?: number): number {
    if (thread !== undefined) this.checkThread(thread);
    const ctx = Atomics.add(this.ctl, HEADER.CONTEXTS_OPEN, 1);
    if (ctx >= this.maxContexts) throw new RangeError(`expected at most ${this.maxContexts} userfaultfd contexts, got ${ctx + 1}`);
    const base = contextBase(this.maxThreads, ctx);
    this.ctl[base + CONTEXT.BOUND_TID] = thread ?? -1;
    if (thread !== undefined) {
      Atomics.store(this.ctl, threadBase(thread) + THREAD.BOUND_CTX, ctx);
    }
    Atomics.store(this.ctl, base + CONTEXT.OPEN, 1);
    return ctx;
  }

  /**
   * UFFDIO_REGISTER (UFFDIO_REGISTER_MODE_MISSING). Returns 0, -EINVAL
   * (misaligned, outside the guest, out of range entries) or -EBUSY.
   *
   * EBUSY: the kernel lets one userfaultfd own a vma, "or we wouldn't know
   * which one to deliver the userfaults to" (fs/userfaultfd.c,
   * userfaultfd_register), so a process-wide context cannot register pages
   * another open process-wide context has. Per-thread contexts (the proposal
   * the emulation models) are exempt: several of them cover the same pages.
   * Registering pages this context already has changes nothing (the
   * kernel's "Nothing to do: this vma is already registered").
   */
  register(ctx: number, start: number, len: number): number {
    if (!this.aligned(start, len)) return -ERRNO.EINVAL;
    const base = this.contextBaseChecked(ctx);
    const first = start / this.pageSize;
    const end = first + len / this.pageSize;
    if (end > this.totalPages) return -ERRNO.EINVAL;
    if (this.ctl[base + CONTEXT.BOUND_TID] === -1 && this.busy(ctx, first, end)) return -ERRNO.EBUSY;
    if (this.covers(ctx, first, end)) return 0;
    return this.addRange(base, first, end) ? 0 : -ERRNO.EINVAL;
  }

  /**
   * UFFDIO_UNREGISTER: pages [start, start+len) are no longer this context's.
   * Its threads blocked there are woken (userfaultfd_unregister wakes "any
   * concurrent pending userfault while we unregister, so they will not hang
   * permanently"); their retry finds the page unregistered and reads a zero
   * page. Returns 0, -EINVAL, or -ENOMEM when the range entries run out.
   *
   * Pages another open process-wide context registers cannot be unregistered
   * through this one: EINVAL, and nothing changes (Linux 6.18 refuses it, as
   * the conformance case unregister-other-context shows). Pages nobody
   * registers are skipped, as the kernel skips vmas with no userfaultfd.
   */
  unregister(ctx: number, start: number, len: number): number {
    if (!this.aligned(start, len)) return -ERRNO.EINVAL;
    const base = this.contextBaseChecked(ctx);
    const first = start / this.pageSize;
    const end = first + len / this.pageSize;
    if (end > this.totalPages) return -ERRNO.EINVAL;
    if (this.ctl[base + CONTEXT.BOUND_TID] === -1 && this.busy(ctx, first, end)) return -ERRNO.EINVAL;
    const ctl = this.ctl;
    const n = Atomics.load(ctl, base + CONTEXT.RANGE_COUNT);
    for (let i = 0; i < n; i++) {
      const at = base + CONTEXT.RANGES + 2 * i;
      const s = ctl[at]!;
      const e = Atomics.load(ctl, at + 1);
      if (e <= first || s >= end) continue;
      // What is left of the entry goes in new entries first, then the entry
      // is emptied (end = start; start never changes): a scan of the ranges
      // at any moment sees each page that stays registered as registered.
      if (s < first && !this.addRange(base, s, first)) return -ERRNO.ENOMEM;
      if (e > end && !this.addRange(base, end, e)) return -ERRNO.ENOMEM;
      Atomics.store(ctl, at + 1, s);
    }
    // A faulting thread stores its odd SEQ before it checks that its context
    // still covers the page (handleFault); we emptied the entries before this
    // scan: either it sees the page gone and leaves, or we see it and wake it.
    this.wakeRange(ctx, first, end);
    return 0;
  }

  /**
   * close(2) of the context: readers get end-of-file, and every thread blocked
   * on it is woken (userfaultfd_release wakes the whole range).
   */
  close(ctx: number): void {
    const base = this.contextBaseChecked(ctx);
    Atomics.store(this.ctl, base + CONTEXT.OPEN, 0);
    // Readers sleep on EVENTS: bumping it means a reader that saw OPEN = 1
    // just before this cannot go to sleep on a value that will never change.
    Atomics.add(this.ctl, base + CONTEXT.EVENTS, 1);
    this.wakeReaders(base);
    // Producers waiting for room in a full queue give up on a closed context.
    Atomics.notify(this.ctl, base + CONTEXT.COUNT);
    this.wakeRange(ctx, 0, this.totalPages);
  }

  isOpen(ctx: number): boolean {
    return Atomics.load(this.ctl, this.contextBaseChecked(ctx) + CONTEXT.OPEN) === 1;
  }

  // ---------------------------------------------------------------- reading

  /**
   * Non-blocking read(2): fills `msg` and returns true, or returns false
   * (EAGAIN) when nothing is pending. A message whose thread has already left
   * the fault (woken, or the page appeared before it slept) is not delivered:
   * in the kernel the message is the thread's wait-queue entry, and the thread
   * removes it on its way out of handle_userfault().
   */
  tryRead(ctx: number, msg: UffdMessage): boolean {
    const base = this.contextBaseChecked(ctx);
    const ctl = this.ctl;
    for (;;) {
      if (Atomics.load(ctl, base + CONTEXT.COUNT) === 0) return false;
      this.lock(base);
      const count = ctl[base + CONTEXT.COUNT]!;
      if (count === 0) {
        this.unlock(base);
        return false;
      }
      const head = ctl[base + CONTEXT.HEAD]!;
      const slot = base + CONTEXT.RING + head * MSG.STRIDE;
      const lo = ctl[slot + MSG.ADDRESS_LO]! >>> 0;
      const hi = ctl[slot + MSG.ADDRESS_HI]!;
      const flags = ctl[slot + MSG.FLAGS]!;
      const tid = ctl[slot + MSG.TID]!;
      const seq = ctl[slot + MSG.SEQ]!;
      ctl[base + CONTEXT.HEAD] = (head + 1) % QUEUE_CAPACITY;
      Atomics.store(ctl, base + CONTEXT.COUNT, count - 1);
      this.unlock(base);
      // Room for a producer that waited on a full queue.
      if (count === QUEUE_CAPACITY) Atomics.notify(ctl, base + CONTEXT.COUNT);
      if (Atomics.load(ctl, threadBase(tid) + THREAD.SEQ) !== seq) continue; // withdrawn
      msg.address = hi * 4294967296 + lo;
      msg.flags = flags;
      msg.tid = tid;
      return true;
    }
  }

  /** Blocking read(2). Returns false at end-of-file (context closed) or after `timeoutMs`. */
  read(ctx: number, msg: UffdMessage, timeoutMs = Infinity): boolean {
    const base = this.contextBaseChecked(ctx);
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      // Load the poll word first: an enqueue or close after this load changes it.
      const events = Atomics.load(this.ctl, base + CONTEXT.EVENTS);
      if (this.tryRead(ctx, msg)) return true;
      if (Atomics.load(this.ctl, base + CONTEXT.OPEN) === 0) return false;
      const left = deadline - performance.now();
      if (left <= 0) return false;
      this.futex.wait(this.ctl, base + CONTEXT.EVENTS, events, left);
    }
  }

  /**
   * read(2) from an event loop (poll + read): resolves true with `msg`
   * filled, false at end-of-file, or false once `signal` aborts (the caller
   * tells the two apart by `signal.aborted`). An abort takes no message: the
   * read only happens on this thread, after a wake-up, and an aborted call
   * does not look again.
   */
  async readAsync(ctx: number, msg: UffdMessage, signal?: AbortSignal): Promise<boolean> {
    const base = this.contextBaseChecked(ctx);
    if (signal?.aborted) return false;
    let onAbort: (() => void) | undefined;
    const aborted = signal === undefined ? undefined : new Promise<void>((resolve) => signal.addEventListener('abort', (onAbort = () => resolve()), { once: true }));
    try {
      for (;;) {
        const events = Atomics.load(this.ctl, base + CONTEXT.EVENTS);
        if (this.tryRead(ctx, msg)) return true;
        if (Atomics.load(this.ctl, base + CONTEXT.OPEN) === 0) return false;
        const wait = Atomics.waitAsync(this.ctl, base + CONTEXT.EVENTS, events);
        // An abandoned waitAsync keeps nothing alive (nodejs/node#44729) and takes no message.
        if (wait.async) await (aborted === undefined ? wait.value : Promise.race([wait.value, aborted]));
        if (signal?.aborted) return false;
      }
    } finally {
      if (onAbort !== undefined) signal!.removeEventListener('abort', onAbort);
    }
  }

  // ---------------------------------------------------------------- ioctls

  /**
   * UFFDIO_COPY: installs `len` bytes from `src` at `dst`, page by page.
   * - into a missing page: copies, then wakes this context's waiters on the
   *   copied range (unless MODE_DONTWAKE);
   * - into an installed page: nothing copied, -EEXIST, nobody woken;
   * - stopping at an installed page after copying some: returns the bytes
   *   copied (the kernel fails with EAGAIN and sets copy to them) and wakes
   *   the copied range;
   * - outside every open context's registered ranges (or across two
   *   contexts' ranges): -ENOENT; into another context's range: copies, and
   *   wakes only this context's waiters (who have none there);
   * - misaligned, or a mode other than DONTWAKE: -EINVAL.
   */
  copy(ctx: number, dst: number, src: Uint8Array, len: number, mode = 0): number {
    return this.fill(ctx, dst, src, len, mode, false);
  }

  /**
   * UFFDIO_ZEROPAGE: like COPY with zeros. hugetlb has no zero page, so on
   * huge-page memory it fails with -EINVAL (mm/userfaultfd.c,
   * mfill_atomic_hugetlb); callers COPY a zeroed page there, as QEMU does.
   */
  zeropage(ctx: number, dst: number, len: number, mode = 0): number {
    if (this.pageSize !== 4096) return -ERRNO.EINVAL;
    // userfaultfd_zeropage: DONTWAKE is its only mode bit.
    if (this.aligned(dst, len) && (mode & ~MODE_DONTWAKE) !== 0) return -ERRNO.EINVAL;
    return this.fill(ctx, dst, undefined, len, mode, true);
  }

  /**
   * UFFDIO_WAKE: wakes this context's threads blocked on [start, start+len).
   * Succeeds (0) even when nobody waits; -EINVAL when misaligned.
   */
  wake(ctx: number, start: number, len: number): number {
    if (!this.aligned(start, len)) return -ERRNO.EINVAL;
    this.contextBaseChecked(ctx);
    Atomics.add(this.ctl, HEADER.WAKE_CALLS, 1);
    const first = start / this.pageSize;
    this.wakeRange(ctx, first, first + len / this.pageSize);
    return 0;
  }

  private fill(ctx: number, dst: number, src: Uint8Array | undefined, len: number, mode: number, zero: boolean): number {
    if (!this.aligned(dst, len)) return -ERRNO.EINVAL;
    // userfaultfd_copy: mode bits other than DONTWAKE and WP are EINVAL at once.
    if ((mode & ~(MODE_DONTWAKE | MODE_WP)) !== 0) return -ERRNO.EINVAL;
    this.contextBaseChecked(ctx);
    const first = dst / this.pageSize;
    const end = first + len / this.pageSize;
    // mm/userfaultfd.c find_dst_vma: the range must lie in one vma registered
    // with *a* userfaultfd, not necessarily the one the ioctl is issued on.
    // Which context the COPY is issued on only decides whom it wakes.
    if (end > this.totalPages || !this.registered(first, end)) return -ERRNO.ENOENT;
    // mfill_atomic: WP needs a range registered in WP mode, and none is.
    if ((mode & MODE_WP) !== 0) return -ERRNO.EINVAL;
    if (src !== undefined && src.length < len) return -ERRNO.EFAULT;
    let page = first;
    for (; page < end; page++) {
      // The page table lock: only one installer can move a pte off NONE.
      // INSTALLING still reads as missing to faulting threads, which block;
      // they are woken below once the data is in and the pte PRESENT.
      if (Atomics.compareExchange(this.ptes, page, PTE.NONE, PTE.INSTALLING) !== PTE.NONE) break;
      // A missing page's bytes are zero already (PTE.NONE): a ZEROPAGE, like
      // the kernel's mapping of its zero page, writes nothing.
      if (!zero) this.memory.writePage(page, src!, (page - first) * this.pageSize);
      // Seq-cst store: whoever sees PRESENT also sees the data written above.
      Atomics.store(this.ptes, page, PTE.PRESENT);
    }
    const copiedPages = page - first;
    if (copiedPages > 0) {
      Atomics.add(this.ctl, zero ? HEADER.ZEROPAGES : HEADER.COPIES, copiedPages);
      if ((mode & MODE_DONTWAKE) === 0) this.wakeRange(ctx, first, page);
    }
    if (copiedPages === 0) {
      Atomics.add(this.ctl, HEADER.EEXIST, 1);
      return -ERRNO.EEXIST;
    }
    return copiedPages * this.pageSize;
  }

  /**
   * The first half of a COPY whose bytes arrive later, straight into guest
   * memory (a push channel reading into it: vmm/push-placement.ts): takes
   * up to `count` missing pages from `first` off NONE (INSTALLING, as COPY
   * does while it copies), stopping at the first page that is not missing.
   * Returns how many were taken (0: `first` is installed or being
   * installed, the COPY's EEXIST), or -ENOENT outside the registered
   * ranges. Taken pages must end in {@link copyPublish} or
   * {@link copyRelease}. While a page is INSTALLING faulting threads block
   * on it as on a missing page, and no other COPY can take it, so the bytes
   * written into it meanwhile are nobody's to see, and nobody else's to write.
   */
  copyClaim(first: number, count: number): number {
    const end = first + count;
    if (end > this.totalPages || !this.registered(first, end)) return -ERRNO.ENOENT;
    let page = first;
    for (; page < end; page++) {
      if (Atomics.compareExchange(this.ptes, page, PTE.NONE, PTE.INSTALLING) !== PTE.NONE) break;
    }
    if (page === first) Atomics.add(this.ctl, HEADER.EEXIST, 1);
    return page - first;
  }

  /**
   * The second half: the bytes of `count` pages taken by copyClaim are in
   * memory. Makes them present and wakes this context's waiters on them
   * (unless MODE_DONTWAKE), as a COPY of them would. Returns the bytes installed.
   */
  copyPublish(ctx: number, first: number, count: number, mode = 0): number {
    this.contextBaseChecked(ctx);
    const end = first + count;
    // Seq-cst stores: whoever sees PRESENT also sees the bytes the socket wrote before.
    for (let page = first; page < end; page++) Atomics.store(this.ptes, page, PTE.PRESENT);
    Atomics.add(this.ctl, HEADER.COPIES, count);
    if ((mode & MODE_DONTWAKE) === 0) this.wakeRange(ctx, first, end);
    return count * this.pageSize;
  }

  /**
   * Gives back pages taken by copyClaim whose bytes will not come (their
   * stream was cut): missing again. Threads that faulted on them meanwhile
   * stay blocked until a later COPY of the page wakes them, as after any
   * fault whose page has not come yet.
   */
  copyRelease(first: number, count: number): void {
    for (let page = first; page < first + count; page++) {
      // Still INSTALLING: the stream may have written part of it; a missing page holds zeros (PTE.NONE).
      this.memory.zeroPage(page);
      Atomics.store(this.ptes, page, PTE.NONE);
    }
  }

  // ---------------------------------------------------------------- faulting side

  isPresent(page: number): boolean {
    return Atomics.load(this.ptes, page) === PTE.PRESENT;
  }

  /**
   * handle_userfault() for thread `tid` touching `page`: queues a message on
   * the context that covers the page for this thread and blocks until a COPY,
   * ZEROPAGE or WAKE on this context wakes it. Returns when woken; the caller
   * retries the access and faults again if the page is still missing (which
   * delivers a new message), exactly as the kernel's retry does.
   *
   * When no open context registers the page (never registered, unregistered,
   * or its context closed), the fault is an ordinary one: the page is
   * installed zero-filled and no message is queued.
   */
  handleFault(tid: number, page: number, write: boolean): void {
    const ctl = this.ctl;
    const tb = threadBase(tid);
    const ctx = this.route(tid, page);
    if (ctx < 0) {
      this.faultUnregistered(page);
      return;
    }
    const seq = Atomics.load(ctl, tb + THREAD.SEQ);
    const waiting = seq + 1;
    Atomics.store(ctl, tb + THREAD.WAIT_CTX, ctx);
    Atomics.store(ctl, tb + THREAD.WAIT_PAGE, page);
    // Publishing the odd sequence number puts the thread on the wait queue.
    // A waker that loads it odd reads WAIT_CTX/WAIT_PAGE stored before it.
    Atomics.store(ctl, tb + THREAD.SEQ, waiting);
    this.enqueue(ctx, page * this.pageSize, write ? UFFD_PAGEFAULT_FLAG_WRITE : 0, tid, waiting);
    Atomics.add(ctl, HEADER.FAULTS, 1);
    // userfaultfd_must_wait(): after queueing, look at the pte again. An
    // installer stores PRESENT before it scans for waiters, and we stored our
    // odd SEQ before this load, so (all seq-cst) either we see PRESENT here
    // or the installer sees us waiting and wakes us: no lost wake-up.
    // The same goes for close (the kernel's ctx->released check after
    // queueing): close stores OPEN = 0 before it scans, so either we see the
    // context closed here, or close sees us waiting and wakes us. And for
    // unregister, which empties the range entries before it scans.
    if (Atomics.load(this.ptes, page) === PTE.PRESENT || !this.isOpenRaw(ctx) || !this.covers(ctx, page, page + 1)) {
      Atomics.compareExchange(ctl, tb + THREAD.SEQ, waiting, waiting + 1);
      return;
    }
    while (Atomics.load(ctl, tb + THREAD.SEQ) === waiting) {
      this.futex.wait(ctl, tb + THREAD.SEQ, waiting, Infinity);
    }
  }

  /**
   * Drops pages [start, start+len) so they are missing again: zeroed, pte
   * NONE; the next touch faults (madvise(MADV_DONTNEED) on the real thing,
   * QEMU's ram_discard_range at the switch to postcopy). Nobody is woken.
   * Returns 0 or -EINVAL (misaligned, outside the guest).
   *
   * A page a COPY holds (INSTALLING) is discarded once the COPY is done: in
   * the kernel both take the page table lock, so one of them goes first. A
   * thread reading the page while it is discarded may see it half zeroed:
   * discard before the threads that use the pages run.
   */
  discard(start: number, len: number): number {
    if (!this.aligned(start, len)) return -ERRNO.EINVAL;
    const first = start / this.pageSize;
    const end = first + len / this.pageSize;
    if (end > this.totalPages) return -ERRNO.EINVAL;
    let dropped = 0;
    for (let page = first; page < end; page++) {
      for (;;) {
        // Hold the page as an installer does, so no COPY can fill it while
        // it is being zeroed; faults see it missing throughout.
        const was = Atomics.compareExchange(this.ptes, page, PTE.PRESENT, PTE.INSTALLING);
        if (was === PTE.PRESENT) {
          this.memory.zeroPage(page);
          Atomics.store(this.ptes, page, PTE.NONE);
          dropped++;
          break;
        }
        if (was === PTE.NONE) break;
        Atomics.wait(this.ptes, page, PTE.INSTALLING, 1);
      }
    }
    if (dropped > 0) Atomics.add(this.ctl, HEADER.DISCARDS, dropped);
    return 0;
  }

  /** Whether thread `tid` is blocked in a fault now, and on which page (diagnostics, watchdog). */
  blockedPage(tid: number): number {
    const tb = threadBase(tid);
    return (Atomics.load(this.ctl, tb + THREAD.SEQ) & 1) === 1 ? Atomics.load(this.ctl, tb + THREAD.WAIT_PAGE) : -1;
  }

  counters(): UffdCounters {
    const c = this.ctl;
    return {
      faults: Atomics.load(c, HEADER.FAULTS),
      copies: Atomics.load(c, HEADER.COPIES),
      zeropages: Atomics.load(c, HEADER.ZEROPAGES),
      eexist: Atomics.load(c, HEADER.EEXIST),
      wakeCalls: Atomics.load(c, HEADER.WAKE_CALLS),
      threadsWoken: Atomics.load(c, HEADER.THREADS_WOKEN),
      discards: Atomics.load(c, HEADER.DISCARDS),
    };
  }

  // ---------------------------------------------------------------- internals

  private aligned(start: number, len: number): boolean {
    return Number.isSafeInteger(start) && Number.isSafeInteger(len) && start >= 0 && len > 0 && start % this.pageSize === 0 && len % this.pageSize === 0;
  }

  private checkThread(tid: number): void {
    if (!Number.isInteger(tid) || tid < 0 || tid >= this.maxThreads) {
      throw new RangeError(`expected a thread id from 0 to ${this.maxThreads - 1}, got ${tid}`);
    }
  }

  private contextBaseChecked(ctx: number): number {
    if (!Number.isInteger(ctx) || ctx < 0 || ctx >= Math.min(this.maxContexts, Atomics.load(this.ctl, HEADER.CONTEXTS_OPEN))) {
      throw new RangeError(`expected an open userfaultfd context, got ${ctx}`);
    }
    return contextBase(this.maxThreads, ctx);
  }

  /**
   * Whether `ctx` registers every page of [first, end). Ranges of one
   * context that touch count as one, as the kernel merges the vmas of one
   * userfaultfd registered twice side by side.
   */
  private covers(ctx: number, first: number, end: number): boolean {
    const base = contextBase(this.maxThreads, ctx);
    const n = Atomics.load(this.ctl, base + CONTEXT.RANGE_COUNT);
    let at = first;
    // Each pass moves `at` past one entry that contains it; n passes at most.
    for (let pass = 0; pass < n && at < end; pass++) {
      let moved = false;
      for (let i = 0; i < n; i++) {
        const s = this.ctl[base + CONTEXT.RANGES + 2 * i]!;
        const e = Atomics.load(this.ctl, base + CONTEXT.RANGES + 2 * i + 1);
        if (s <= at && at < e) {
          at = e;
          moved = true;
        }
      }
      if (!moved) return false;
    }
    return at >= end;
  }

  /** Whether one open context registers all of [first, end) (a COPY's "single registered vma"). */
  private registered(first: number, end: number): boolean {
    const open = Math.min(this.maxContexts, Atomics.load(this.ctl, HEADER.CONTEXTS_OPEN));
    for (let ctx = 0; ctx < open; ctx++) {
      if (this.isOpenRaw(ctx) && this.covers(ctx, first, end)) return true;
    }
    return false;
  }

  /** Whether an open process-wide context other than `ctx` registers any page of [first, end). */
  private busy(ctx: number, first: number, end: number): boolean {
    const open = Math.min(this.maxContexts, Atomics.load(this.ctl, HEADER.CONTEXTS_OPEN));
    for (let other = 0; other < open; other++) {
      if (other === ctx || !this.isOpenRaw(other)) continue;
      const base = contextBase(this.maxThreads, other);
      if (this.ctl[base + CONTEXT.BOUND_TID] !== -1) continue;
      const n = Atomics.load(this.ctl, base + CONTEXT.RANGE_COUNT);
      for (let i = 0; i < n; i++) {
        const s = this.ctl[base + CONTEXT.RANGES + 2 * i]!;
        const e = Atomics.load(this.ctl, base + CONTEXT.RANGES + 2 * i + 1);
        if (s < end && first < e) return true;
      }
    }
    return false;
  }

  /** Appends range entry [first, end) to the context at `base`; false when the entries ran out. */
  private addRange(base: number, first: number, end: number): boolean {
    const n = this.ctl[base + CONTEXT.RANGE_COUNT]!;
    if (n >= MAX_RANGES) return false;
    this.ctl[base + CONTEXT.RANGES + 2 * n] = first;
    Atomics.store(this.ctl, base + CONTEXT.RANGES + 2 * n + 1, end);
    // Publishing the count makes the entry visible to scans, which load it first.
    Atomics.store(this.ctl, base + CONTEXT.RANGE_COUNT, n + 1);
    return true;
  }

  /**
   * A fault no context takes: do_anonymous_page() installs a zero-filled
   * page. A missing page's bytes are zero already (PTE.NONE), so whoever
   * moves the pte off NONE only makes it present; a thread finding it held
   * (INSTALLING) waits a moment and the caller's retry looks again.
   */
  private faultUnregistered(page: number): void {
    if (Atomics.compareExchange(this.ptes, page, PTE.NONE, PTE.INSTALLING) === PTE.NONE) {
      Atomics.store(this.ptes, page, PTE.PRESENT);
      return;
    }
    Atomics.wait(this.ptes, page, PTE.INSTALLING, 1);
  }

  /** Which context a fault of `tid` on `page` goes to: its own, else a process-wide one; -1 if none. */
  private route(tid: number, page: number): number {
    const bound = Atomics.load(this.ctl, threadBase(tid) + THREAD.BOUND_CTX);
    if (bound >= 0 && this.isOpenRaw(bound) && this.covers(bound, page, page + 1)) return bound;
    const open = Math.min(this.maxContexts, Atomics.load(this.ctl, HEADER.CONTEXTS_OPEN));
    for (let ctx = 0; ctx < open; ctx++) {
      const base = contextBase(this.maxThreads, ctx);
      if (this.ctl[base + CONTEXT.BOUND_TID] !== -1) continue;
      if (this.isOpenRaw(ctx) && this.covers(ctx, page, page + 1)) return ctx;
    }
    return -1;
  }

  private isOpenRaw(ctx: number): boolean {
    return Atomics.load(this.ctl, contextBase(this.maxThreads, ctx) + CONTEXT.OPEN) === 1;
  }

  /** __wake_userfault(): wakes `ctx`'s threads blocked on pages [first, end). */
  private wakeRange(ctx: number, first: number, end: number): void {
    const ctl = this.ctl;
    let woken = 0;
    for (let tid = 0; tid < this.maxThreads; tid++) {
      const tb = threadBase(tid);
      const seq = Atomics.load(ctl, tb + THREAD.SEQ);
      if ((seq & 1) === 0) continue;
      if (Atomics.load(ctl, tb + THREAD.WAIT_CTX) !== ctx) continue;
      const page = Atomics.load(ctl, tb + THREAD.WAIT_PAGE);
      if (page < first || page >= end) continue;
      // If the thread moved on since we loaded `seq`, the CAS fails and we
      // leave its newer fault alone.
      if (Atomics.compareExchange(ctl, tb + THREAD.SEQ, seq, seq + 1) === seq) {
        this.futex.wake(ctl, tb + THREAD.SEQ);
        woken++;
      }
    }
    if (woken > 0) Atomics.add(ctl, HEADER.THREADS_WOKEN, woken);
  }

  /**
   * Wakes every reader sleeping on the context's EVENTS word: read()'s on
   * this.futex, readAsync()'s on Atomics.waitAsync (which only Atomics.notify
   * reaches).
   */
  private wakeReaders(base: number): void {
    this.futex.wake(this.ctl, base + CONTEXT.EVENTS);
    if (this.futex.kind !== 'atomics') Atomics.notify(this.ctl, base + CONTEXT.EVENTS);
  }

  private enqueue(ctx: number, address: number, flags: number, tid: number, seq: number): void {
    const ctl = this.ctl;
    const base = contextBase(this.maxThreads, ctx);
    for (;;) {
      this.lock(base);
      const count = ctl[base + CONTEXT.COUNT]!;
      if (count < QUEUE_CAPACITY) {
        const tail = ctl[base + CONTEXT.TAIL]!;
        const slot = base + CONTEXT.RING + tail * MSG.STRIDE;
        ctl[slot + MSG.ADDRESS_LO] = address % 4294967296 | 0;
        ctl[slot + MSG.ADDRESS_HI] = Math.floor(address / 4294967296);
        ctl[slot + MSG.FLAGS] = flags;
        ctl[slot + MSG.TID] = tid;
        ctl[slot + MSG.SEQ] = seq;
        ctl[base + CONTEXT.TAIL] = (tail + 1) % QUEUE_CAPACITY;
        Atomics.store(ctl, base + CONTEXT.COUNT, count + 1);
        this.unlock(base);
        // wake_up_poll(&ctx->fd_wqh, EPOLLIN): every reader polling wakes.
        Atomics.add(ctl, base + CONTEXT.EVENTS, 1);
        this.wakeReaders(base);
        return;
      }
      this.unlock(base);
      // Closed while full: nobody will read; the caller sees the context
      // closed after queueing and leaves the fault.
      if (Atomics.load(ctl, base + CONTEXT.OPEN) === 0) return;
      // Full: wait for a reader to make room.
      Atomics.wait(ctl, base + CONTEXT.COUNT, QUEUE_CAPACITY, 10);
    }
  }

  private lock(base: number): void {
    const ctl = this.ctl;
    let spins = 0;
    while (Atomics.compareExchange(ctl, base + CONTEXT.LOCK, 0, 1) !== 0) {
      if (++spins > 64) Atomics.wait(ctl, base + CONTEXT.LOCK, 1, 1);
    }
  }

  private unlock(base: number): void {
    Atomics.store(this.ctl, base + CONTEXT.LOCK, 0);
    Atomics.notify(this.ctl, base + CONTEXT.LOCK, 1);
  }
}
