/**
 * The image's memory as its threads see it (the page chunks and the zero
 * marks) and the filling of its pages from the generator: light, for the
 * image's worker threads (image-worker.ts), which import nothing else.
 */
import { fillPage, type GuestLayout, type ImageSpec } from '@postcopy/shared/core';
import type { PageSource } from '@postcopy/shared/digest';

/**
 * Fills pages [first, end) of the image with the generator's content and marks
 * the zero ones (by their content, as QEMU's buffer_is_zero). Returns how many
 * were zero.
 */
export function fillImagePages(layout: GuestLayout, spec: ImageSpec, chunks: readonly Uint8Array[], zero: Uint8Array, pagesPerChunk: number, first: number, end: number): number {
  const words = layout.pageSize >>> 2;
  let zeroPages = 0;
  for (let page = first; page < end; page++) {
    const chunk = chunks[Math.floor(page / pagesPerChunk)]!;
    const view = new Uint32Array(chunk.buffer, chunk.byteOffset + (page % pagesPerChunk) * layout.pageSize, words);
    fillPage(spec, page, view);
    if (isAllZero(view)) {
      zero[page] = 1;
      zeroPages++;
    }
  }
  return zeroPages;
}

function isAllZero(words: Uint32Array): boolean {
  for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
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
