import { createHash } from 'node:crypto';
import { fillPage, type GuestLayout, type ImageSpec, type PageSource } from '@postcopy/shared';

/** Largest single buffer the image uses; bigger guests are several chunks. */
const CHUNK_BYTES = 1024 ** 3;

/**
 * The guest image on the source: the guest's memory as it was when the
 * destination took over, built from the seeded generator. Zero pages are
 * found by looking at the content (QEMU's buffer_is_zero), not taken from the
 * generator, so the source sends what it has.
 */
export class GuestImage implements PageSource {
  readonly layout: GuestLayout;
  readonly spec: ImageSpec;
  readonly digest: string;
  private readonly chunks: Buffer[] = [];
  private readonly pagesPerChunk: number;
  private readonly zero: Uint8Array;
  readonly zeroPages: number;

  constructor(layout: GuestLayout, spec: ImageSpec) {
    this.layout = layout;
    this.spec = spec;
    this.pagesPerChunk = Math.max(1, Math.floor(CHUNK_BYTES / layout.pageSize));
    const words = layout.pageSize >>> 2;
    this.zero = new Uint8Array(layout.totalPages);
    const hash = createHash('sha256');
    let zeroPages = 0;
    for (let first = 0; first < layout.totalPages; first += this.pagesPerChunk) {
      const pages = Math.min(this.pagesPerChunk, layout.totalPages - first);
      const chunk = Buffer.allocUnsafeSlow(pages * layout.pageSize);
      for (let i = 0; i < pages; i++) {
        const view = new Uint32Array(chunk.buffer, chunk.byteOffset + i * layout.pageSize, words);
        fillPage(spec, first + i, view);
        if (isAllZero(view)) {
          this.zero[first + i] = 1;
          zeroPages++;
        }
      }
      hash.update(chunk);
      this.chunks.push(chunk);
    }
    this.zeroPages = zeroPages;
    this.digest = hash.digest('hex');
  }

  pageBytes(page: number): Uint8Array {
    const chunk = Math.floor(page / this.pagesPerChunk);
    const offset = (page - chunk * this.pagesPerChunk) * this.layout.pageSize;
    return this.chunks[chunk]!.subarray(offset, offset + this.layout.pageSize);
  }

  /** `count` consecutive pages from `first` as one view (they must lie in one chunk: see {@link sameChunk}). */
  pagesBytes(first: number, count: number): Uint8Array {
    const chunk = Math.floor(first / this.pagesPerChunk);
    const offset = (first - chunk * this.pagesPerChunk) * this.layout.pageSize;
    return this.chunks[chunk]!.subarray(offset, offset + count * this.layout.pageSize);
  }

  /** Whether two pages lie in the same chunk (so a run between them is contiguous). */
  sameChunk(a: number, b: number): boolean {
    return Math.floor(a / this.pagesPerChunk) === Math.floor(b / this.pagesPerChunk);
  }

  isZero(page: number): boolean {
    return this.zero[page] === 1;
  }
}

function isAllZero(words: Uint32Array): boolean {
  for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
  return true;
}
