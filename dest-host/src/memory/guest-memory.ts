import type { PageSource } from '@postcopy/shared';
import { makeMemslotLayout, type GuestLayout, type MemslotLayout } from '@postcopy/shared/core';

/** What a thread needs to attach to guest memory created elsewhere. */
export interface GuestMemoryBuffers {
  layout: GuestLayout;
  memslots: MemslotLayout;
  buffers: SharedArrayBuffer[];
}

/** The part of the WebAssembly global used here (the project's libs leave out the DOM's, which declare it). */
declare const WebAssembly: { Memory: new (descriptor: { initial: number; maximum: number; shared: boolean }) => { buffer: ArrayBufferLike } };

/** WebAssembly's page: a wasm memory's size is a multiple of it. */
const WASM_PAGE_BYTES = 65536;
/** The most a wasm32 memory holds in V8 (4 GiB). */
const MAX_WASM_PAGES = 65536;

/**
 * A memslot's memory, page-aligned as the host's mapping of guest RAM is
 * (QEMU's memory backends mmap it). `new SharedArrayBuffer(n)` comes from
 * calloc (node's ArrayBuffer allocator), and glibc serves a large calloc
 * from an mmap of its own behind a 16-byte chunk header: in /proc/self/maps
 * a 128 MiB SharedArrayBuffer is a mapping of 128 MiB + 4 KiB, its bytes
 * starting 16 bytes into it. Every 4 KiB guest page then straddles two of
 * the kernel's pages: installing one writes the first 16 bytes of the next,
 * and the content check reading a zero page (which nothing wrote, as the
 * kernel's zero page) faults the next one in as the kernel's zero page, so
 * its install takes a copy-on-write fault and a TLB shootdown (IPIs to the
 * other cores) where the kernel's UFFDIO_COPY takes one fault. A shared
 * WebAssembly.Memory's buffer is a SharedArrayBuffer that V8 maps itself,
 * page-aligned; sizes it cannot take (not a multiple of 64 KiB, over 4 GiB)
 * or a reservation it refuses keep the calloc'd kind.
 */
export function allocateMemslot(bytes: number): SharedArrayBuffer {
  const wasmPages = bytes / WASM_PAGE_BYTES;
  if (Number.isInteger(wasmPages) && wasmPages > 0 && wasmPages <= MAX_WASM_PAGES) {
    try {
      return new WebAssembly.Memory({ initial: wasmPages, maximum: wasmPages, shared: true }).buffer as SharedArrayBuffer;
    } catch {
      // Out of address space for wasm memories: the calloc'd kind below.
    }
  }
  return new SharedArrayBuffer(bytes);
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
      buffers.push(allocateMemslot(pages * layout.pageSize));
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

  /** Copies the page at `src[srcOffset..]` into memory at page `page`. */
  writePage(page: number, src: Uint8Array, srcOffset: number): void {
    const slot = this.memslotOf(page);
    const offset = (page - slot * this.memslots.pagesPerMemslot) * this.layout.pageSize;
    const size = this.layout.pageSize;
    copyIntoShared(this.bytes[slot]!, offset, srcOffset === 0 && src.length === size ? src : src.subarray(srcOffset, srcOffset + size));
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

/** Scratch for {@link copyIntoShared}, one per thread (the copy is synchronous), grown to the largest copy. */
let alignedScratch = new Uint8Array(0);

/**
 * `target.set(src, offset)`, for a `target` over a SharedArrayBuffer above all. V8
 * copies into shared memory with relaxed atomics (`relaxed_memmove`, src/base/
 * atomicops.h): 8 bytes at a time when source and destination are both 8-byte
 * aligned, otherwise one byte at a time for the whole length. A page in a reply
 * lies wherever its frame put it (19 bytes into a WebSocket reply: the frame's
 * 4-byte header and msgpack's 15), so it would be copied bytewise: 1.56 µs a 4
 * KiB page against 0.24 aligned, on the development VM. Such a source is copied
 * into an aligned scratch buffer first (an ordinary memcpy between unshared
 * buffers), then from there: 0.24 µs for both copies.
 */
export function copyIntoShared(target: Uint8Array, offset: number, src: Uint8Array): void {
  // Unshared memory (the uffd backend's mapping, which precopy rewrites reach too) is copied with memmove.
  if (!(target.buffer instanceof SharedArrayBuffer) || ((src.byteOffset | (target.byteOffset + offset)) & 7) === 0) {
    target.set(src, offset);
    return;
  }
  if (alignedScratch.length < src.length) alignedScratch = new Uint8Array(src.length);
  const scratch = src.length === alignedScratch.length ? alignedScratch : alignedScratch.subarray(0, src.length);
  scratch.set(src);
  target.set(scratch, offset);
}
