import type { PageSource } from '@postcopy/shared';
import { makeMemslotLayout, type GuestLayout, type MemslotLayout } from '@postcopy/shared/core';

/** What a thread needs to attach to guest memory created elsewhere. */
export interface GuestMemoryBuffers {
  layout: GuestLayout;
  memslots: MemslotLayout;
  buffers: SharedArrayBuffer[];
}

/**
 * Guest memory on the destination: one or more memslots, each a
 * SharedArrayBuffer every worker maps. Page p lives in memslot
 * floor(p / pagesPerMemslot); a page never straddles two memslots.
 */
export class GuestMemory implements PageSource {
  readonly layout: GuestLayout;
  readonly memslots: MemslotLayout;
  readonly buffers: SharedArrayBuffer[];
  private readonly bytes: Uint8Array[];
  private readonly words: Int32Array[];
  private readonly wordsPerPage: number;

  static create(layout: GuestLayout, memslotBytes: number): GuestMemory {
    const memslots = makeMemslotLayout(layout, memslotBytes);
    const buffers: SharedArrayBuffer[] = [];
    for (let i = 0; i < memslots.count; i++) {
      const pages = Math.min(memslots.pagesPerMemslot, layout.totalPages - i * memslots.pagesPerMemslot);
      buffers.push(new SharedArrayBuffer(pages * layout.pageSize));
    }
    return new GuestMemory({ layout, memslots, buffers });
  }

  constructor(attach: GuestMemoryBuffers) {
    this.layout = attach.layout;
    this.memslots = attach.memslots;
    this.buffers = attach.buffers;
    this.bytes = attach.buffers.map((b) => new Uint8Array(b));
    this.words = attach.buffers.map((b) => new Int32Array(b));
    this.wordsPerPage = attach.layout.pageSize >>> 2;
  }

  toBuffers(): GuestMemoryBuffers {
    return { layout: this.layout, memslots: this.memslots, buffers: this.buffers };
  }

  memslotOf(page: number): number {
    return Math.floor(page / this.memslots.pagesPerMemslot);
  }

  /** A view of page `page` (allocates a view: not for the per-access path). */
  pageBytes(page: number): Uint8Array {
    const slot = this.memslotOf(page);
    const offset = (page - slot * this.memslots.pagesPerMemslot) * this.layout.pageSize;
    return this.bytes[slot]!.subarray(offset, offset + this.layout.pageSize);
  }

  /** A view of `count` pages from `page`, which must lie in one memslot. */
  pagesBytes(page: number, count: number): Uint8Array {
    const slot = this.memslotOf(page);
    if (this.memslotOf(page + count - 1) !== slot) throw new RangeError(`expected pages ${page} to ${page + count - 1} in one memslot, got them across two`);
    const offset = (page - slot * this.memslots.pagesPerMemslot) * this.layout.pageSize;
    return this.bytes[slot]!.subarray(offset, offset + count * this.layout.pageSize);
  }

  pageWords(page: number): Uint32Array {
    const slot = this.memslotOf(page);
    const offset = (page - slot * this.memslots.pagesPerMemslot) * this.layout.pageSize;
    return new Uint32Array(this.buffers[slot]!, offset, this.wordsPerPage);
  }

  /** Copies `src` (one or more whole pages' worth) into memory at page `page`. */
  writePage(page: number, src: Uint8Array, srcOffset: number): void {
    const slot = this.memslotOf(page);
    const offset = (page - slot * this.memslots.pagesPerMemslot) * this.layout.pageSize;
    const size = this.layout.pageSize;
    const target = this.bytes[slot]!;
    if (srcOffset === 0 && src.length === size) target.set(src, offset);
    else target.set(src.subarray(srcOffset, srcOffset + size), offset);
  }

  zeroPage(page: number): void {
    const slot = this.memslotOf(page);
    const offset = (page - slot * this.memslots.pagesPerMemslot) * this.layout.pageSize;
    this.bytes[slot]!.fill(0, offset, offset + this.layout.pageSize);
  }

  /** Reads 32-bit word `word` of page `page`: the guest's load. Allocation-free. */
  load(page: number, word: number): number {
    const slot = this.memslotOf(page);
    return this.words[slot]![(page - slot * this.memslots.pagesPerMemslot) * this.wordsPerPage + word]!;
  }

  /** Stores to word `word` of page `page`: the guest's store. Allocation-free. */
  store(page: number, word: number, value: number): void {
    const slot = this.memslotOf(page);
    this.words[slot]![(page - slot * this.memslots.pagesPerMemslot) * this.wordsPerPage + word] = value;
  }
}
