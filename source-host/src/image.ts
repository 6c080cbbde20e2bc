import { createHash } from 'node:crypto';
import { availableParallelism } from 'node:os';
import { fillPage, startWorker, type GuestLayout, type ImageSpec, type PageSource } from '@postcopy/shared';
import type { ImageWorkerData, ImageWorkerMessage } from './image-worker.js';

/** Largest single buffer the image uses; bigger guests are several chunks. */
const CHUNK_BYTES = 1024 ** 3;

/**
 * What the image's threads fill and hash in turn: a segment of pages. The
 * digest hashes segments in page order, so any segment size gives the same
 * digest; this one keeps every worker busy and the hashing right behind.
 */
export const IMAGE_SEGMENT_BYTES = 64 * 1024 ** 2;

/** Below this, building in worker threads costs more (their start-up) than it saves. */
export const PARALLEL_IMAGE_MIN_BYTES = 256 * 1024 ** 2;

/** How GuestImage.build spreads the work (defaults: a thread a core, at most 8; 64 MiB segments; threads from 256 MiB on). */
export interface BuildOptions {
  threads?: number;
  segmentBytes?: number;
  /** Smaller guests are built on the calling thread. */
  minBytes?: number;
}

/** What a source vCPU thread needs to map the guest's memory (structured-cloned into it). */
export interface GuestImageBuffers {
  layout: GuestLayout;
  pagesPerChunk: number;
  chunks: SharedArrayBuffer[];
  /** One byte a page: 1 while the page is all zeros. */
  zero: SharedArrayBuffer;
}

/** The image's memory, as threads share it: the page chunks and one zero mark a page. */
interface ImageMemory {
  chunks: Buffer[];
  zero: Uint8Array;
  pagesPerChunk: number;
}

/**
 * Shared memory always: the image's builder threads fill it, and in the
 * precopy modes the source's vCPU threads write it (guest/vcpu-worker.ts).
 */
function allocate(layout: GuestLayout): ImageMemory {
  const pagesPerChunk = Math.max(1, Math.floor(CHUNK_BYTES / layout.pageSize));
  const chunks: Buffer[] = [];
  for (let first = 0; first < layout.totalPages; first += pagesPerChunk) {
    const bytes = Math.min(pagesPerChunk, layout.totalPages - first) * layout.pageSize;
    chunks.push(Buffer.from(new SharedArrayBuffer(bytes)));
  }
  const zero = new Uint8Array(new SharedArrayBuffer(layout.totalPages));
  return { chunks, zero, pagesPerChunk };
}

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
 *
 * `new GuestImage` builds it on this thread; {@link GuestImage.build} builds a
 * large one in worker threads, the filling spread over the cores and the
 * digest hashed here right behind it (issue 9: the source needed 6 s for a
 * 4 GiB guest before it listened). Both give the same bytes and digest.
 */
export class GuestImage implements PageSource {
  readonly layout: GuestLayout;
  readonly spec: ImageSpec;
  /** SHA-256 of the image as built (the generator's image; a restarted source rebuilds the same). */
  readonly digest: string;
  private readonly chunks: Buffer[];
  private changedSinceBuilt = false;
  private readonly pagesPerChunk: number;
  private readonly zero: Uint8Array;
  readonly zeroPages: number;

  constructor(layout: GuestLayout, spec: ImageSpec, built?: { memory: ImageMemory; digest: string; zeroPages: number }) {
    this.layout = layout;
    this.spec = spec;
    if (built) {
      ({ chunks: this.chunks, zero: this.zero, pagesPerChunk: this.pagesPerChunk } = built.memory);
      this.digest = built.digest;
      this.zeroPages = built.zeroPages;
      return;
    }
    const memory = allocate(layout);
    ({ chunks: this.chunks, zero: this.zero, pagesPerChunk: this.pagesPerChunk } = memory);
    const hash = createHash('sha256');
    let zeroPages = 0;
    for (const [i, chunk] of this.chunks.entries()) {
      const first = i * this.pagesPerChunk;
      zeroPages += fillImagePages(layout, spec, this.chunks, this.zero, this.pagesPerChunk, first, first + chunk.length / layout.pageSize);
      hash.update(chunk);
    }
    this.zeroPages = zeroPages;
    this.digest = hash.digest('hex');
  }

  /**
   * Builds the image in worker threads (see {@link BuildOptions}), each
   * filling every n-th segment, while this thread hashes the segments in page
   * order as they are done. A small guest is built here instead.
   */
  static async build(layout: GuestLayout, spec: ImageSpec, options: BuildOptions = {}): Promise<GuestImage> {
    const threads = options.threads ?? Math.min(8, availableParallelism());
    if (layout.guestBytes < (options.minBytes ?? PARALLEL_IMAGE_MIN_BYTES) || threads < 1) return new GuestImage(layout, spec);
    const memory = allocate(layout);
    const segmentBytes = options.segmentBytes ?? IMAGE_SEGMENT_BYTES;
    if (CHUNK_BYTES % segmentBytes !== 0) throw new RangeError(`expected a segment size that divides 1 GiB, got ${segmentBytes} bytes`);
    const pagesPerSegment = Math.max(1, Math.floor(segmentBytes / layout.pageSize));
    const segments = Math.ceil(layout.totalPages / pagesPerSegment);
    const workerCount = Math.min(threads, segments);
    const done = new Array<boolean>(segments).fill(false);
    let zeroPages = 0;
    let hashed = 0;
    const hash = createHash('sha256');
    // Hashes every segment that is done and next in page order.
    const hashReady = (): void => {
      while (hashed < segments && done[hashed]) {
        const first = hashed * pagesPerSegment;
        const end = Math.min(layout.totalPages, first + pagesPerSegment);
        // A segment never straddles chunks: chunks are whole numbers of segments (1 GiB / 64 MiB).
        const chunk = memory.chunks[Math.floor(first / memory.pagesPerChunk)]!;
        const from = (first % memory.pagesPerChunk) * layout.pageSize;
        hash.update(chunk.subarray(from, from + (end - first) * layout.pageSize));
        hashed++;
      }
    };
    const workers = Array.from({ length: workerCount }, (_, index) => {
      const data: ImageWorkerData = {
        layout,
        spec,
        chunks: memory.chunks.map((c) => c.buffer as SharedArrayBuffer),
        zero: memory.zero.buffer as SharedArrayBuffer,
        pagesPerChunk: memory.pagesPerChunk,
        pagesPerSegment,
        firstSegment: index,
        stride: workerCount,
      };
      return startWorker(import.meta.url, 'image-worker', { workerData: data });
    });
    try {
      await Promise.all(
        workers.map(
          (worker) =>
            new Promise<void>((resolve, reject) => {
              worker.on('message', (m: ImageWorkerMessage) => {
                if (m.type === 'segment') {
                  done[m.segment] = true;
                  zeroPages += m.zeroPages;
                  hashReady();
                } else resolve();
              });
              worker.once('error', reject);
              worker.once('exit', (code) => reject(new Error(`an image worker exited (code ${code}) before it was done`)));
            }),
        ),
      );
    } finally {
      await Promise.all(workers.map((w) => w.terminate()));
    }
    hashReady();
    if (hashed !== segments) throw new Error(`expected all ${segments} image segments built, got ${hashed}`);
    return new GuestImage(layout, spec, { memory, digest: hash.digest('hex'), zeroPages });
  }

  /** For the source's vCPU threads. */
  toBuffers(): GuestImageBuffers {
    return { layout: this.layout, pagesPerChunk: this.pagesPerChunk, chunks: this.chunks.map((c) => c.buffer as SharedArrayBuffer), zero: this.zero.buffer as SharedArrayBuffer };
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
