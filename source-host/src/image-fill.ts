/**
 * The image's memory as its threads see it (the page chunks and the zero
 * marks) and the filling of its pages from the generator: light, for the
 * image's worker threads (image-worker.ts), which import nothing else.
 */
import { fillPages, type GuestLayout, type ImageSpec } from '@postcopy/shared/core';
import type { PageSource } from '@postcopy/shared/digest';

/**
 * Fills pages [first, end) of the image with the generator's content and marks
 * the zero ones (by their content, as QEMU's buffer_is_zero). Returns how many
 * were zero. Each chunk's share goes to the generator in one call (fillPages:
 * the addon's where it loads).
 */
export function fillImagePages(layout: GuestLayout, spec: ImageSpec, chunks: readonly Uint8Array[], zero: Uint8Array, pagesPerChunk: number, first: number, end: number): number {
  const words = layout.pageSize >>> 2;
  let zeroPages = 0;
  for (let page = first; page < end; ) {
    const c = Math.floor(page / pagesPerChunk);
    const chunk = chunks[c]!;
    const runEnd = Math.min(end, (c + 1) * pagesPerChunk);
    const view = new Uint32Array(chunk.buffer, chunk.byteOffset + (page - c * pagesPerChunk) * layout.pageSize, (runEnd - page) * words);
    fillPages(spec, page, view, words);
    for (let k = 0; page + k < runEnd; k++) {
      if (isAllZero(view, k * words, words)) {
        zero[page + k] = 1;
        zeroPages++;
      }
    }
    page = runEnd;
  }
  return zeroPages;
}

function isAllZero(words: Uint32Array, from: number, count: number): boolean {
  for (let i = from; i < from + count; i++) if (words[i] !== 0) return false;
  return true;
}

/** Pages of the image's chunks, for the digest. */
export class ChunkPages implements PageSource {
  constructor(
    private readonly pageSize: number,
    private readonly chunks: readonly Uint8Array[],
    private readonly pagesPerChunk: number,
  ) {}

  pageBytes(page: number): Uint8Array {
    const chunk = Math.floor(page / this.pagesPerChunk);
    const offset = (page - chunk * this.pagesPerChunk) * this.pageSize;
    return this.chunks[chunk]!.subarray(offset, offset + this.pageSize);
  }
}
