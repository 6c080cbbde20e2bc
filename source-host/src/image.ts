import { createHash } from 'node:crypto';
import { fillPage, type GuestLayout, type ImageSpec, type PageSource } from '@postcopy/shared';

/** Largest single buffer the image uses; bigger guests are several chunks. */
const CHUNK_BYTES = 1024 ** 3;

/** What a source vCPU thread needs to map the guest's memory (structured-cloned into it). */
export interface GuestImageBuffers {
  layout: GuestLayout;
  pagesPerChunk: number;
  chunks: SharedArrayBuffer[];
  /** One byte a page: 1 while the page is all zeros. */
  zero: SharedArrayBuffer;
}

/**
 * The guest's memory on the source, built from the seeded generator. In
 * postcopy mode it is the memory as it was when the destination took over and
 * never changes; in the precopy modes the source's vCPUs run and change it
 * (shared memory: they are worker threads), and {@link markChanged} says so.
 *
 * Zero pages are found by looking at the content (QEMU's buffer_is_zero), not
 * taken from the generator, so the source sends what it has. Writers keep the
 * zero map true: a vCPU that writes a page clears its flag before it marks the
 * page dirty, so a sender that read the flag as set either sent before the
 * write (and the dirty bit makes it send again) or sees it cleared.
 */
export class GuestImage implements PageSource {
  readonly layout: GuestLayout;
  readonly spec: ImageSpec;
  /** SHA-256 of the image as built (the generator's image; a restarted source rebuilds the same). */
  readonly digest: string;
  private readonly chunks: Buffer[] = [];
  private readonly sharedChunks: SharedArrayBuffer[] = [];
  private readonly pagesPerChunk: number;
  private readonly zeroBuffer: SharedArrayBuffer;
  private readonly zero: Uint8Array;
  readonly zeroPages: number;
  private changedSinceBuilt = false;

  constructor(layout: GuestLayout, spec: ImageSpec) {
    this.layout = layout;
    this.spec = spec;
    this.pagesPerChunk = Math.max(1, Math.floor(CHUNK_BYTES / layout.pageSize));
    const words = layout.pageSize >>> 2;
    this.zeroBuffer = new SharedArrayBuffer(layout.totalPages);
    this.zero = new Uint8Array(this.zeroBuffer);
    const hash = createHash('sha256');
    let zeroPages = 0;
    for (let first = 0; first < layout.totalPages; first += this.pagesPerChunk) {
      const pages = Math.min(this.pagesPerChunk, layout.totalPages - first);
      const shared = new SharedArrayBuffer(pages * layout.pageSize);
      const chunk = Buffer.from(shared);
      for (let i = 0; i < pages; i++) {
        const view = new Uint32Array(shared, i * layout.pageSize, words);
        fillPage(spec, first + i, view);
        if (isAllZero(view)) {
          this.zero[first + i] = 1;
          zeroPages++;
        }
      }
      hash.update(chunk);
      this.chunks.push(chunk);
      this.sharedChunks.push(shared);
    }
    this.zeroPages = zeroPages;
    this.digest = hash.digest('hex');
  }

  /** For the source's vCPU threads. */
  toBuffers(): GuestImageBuffers {
    return { layout: this.layout, pagesPerChunk: this.pagesPerChunk, chunks: this.sharedChunks, zero: this.zeroBuffer };
  }

  /** The guest ran on the source: its memory is no longer the image as built. */
  markChanged(): void {
    this.changedSinceBuilt = true;
  }

  get changed(): boolean {
    return this.changedSinceBuilt;
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
    return Atomics.load(this.zero, page) === 1;
  }
}

function isAllZero(words: Uint32Array): boolean {
  for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
  return true;
}
