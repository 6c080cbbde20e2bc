import { DIGEST_SEGMENT_BYTES, PARALLEL_DIGEST_MIN_BYTES, bitmapHas, digestPages, digestSegmentPages, digestThreads, digestWork, runDigestWork, startWorker, type GuestLayout, type ImageSpec, type PageSource } from '@postcopy/shared';
import { ChunkPages, fillImagePages } from './image-fill.js';
import type { ImageWorkerData } from './image-worker.js';

export { fillImagePages } from './image-fill.js';

/** Largest single buffer the image uses; bigger guests are several chunks. */
const CHUNK_BYTES = 1024 ** 3;

/** Below this, building in worker threads costs more (their start-up) than it saves. */
export const PARALLEL_IMAGE_MIN_BYTES = PARALLEL_DIGEST_MIN_BYTES;

/**
 * How GuestImage.build spreads the work (defaults: a thread a core, this one
 * included, at most 8; threads from 256 MiB on).
 */
export interface BuildOptions {
  threads?: number;
  /** Smaller guests are built on the calling thread. */
  minBytes?: number;
  /** Testing only: the digest's segment size (the protocol's is DIGEST_SEGMENT_BYTES; both hosts must use the same). */
  segmentBytes?: number;
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
 * large one on every core, each thread filling and hashing whole digest
 * segments (issue 9: the source needed 6 s for a 4 GiB guest before it
 * listened; with one thread hashing behind the fillers, still 5-6 s). Both
 * give the same bytes and digest.
 */
export class GuestImage implements PageSource {
  readonly layout: GuestLayout;
  readonly spec: ImageSpec;
  /** The digest (shared/digest.ts) of the image as built (the generator's image; a restarted source rebuilds the same). */
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
    let zeroPages = 0;
    for (const [i, chunk] of this.chunks.entries()) {
      const first = i * this.pagesPerChunk;
      zeroPages += fillImagePages(layout, spec, this.chunks, this.zero, this.pagesPerChunk, first, first + chunk.length / layout.pageSize);
    }
    this.zeroPages = zeroPages;
    this.digest = digestPages(this, layout);
  }

  /**
   * Builds the image on this thread and helper threads at once: each takes
   * the next digest segment, fills it with the generator's content, marks its
   * zero pages and hashes it (shared/parallel-digest.ts), so the filling and
   * the hashing are spread over the cores together. A small guest is built
   * here alone. The same bytes and digest as `new GuestImage`.
   */
  static async build(layout: GuestLayout, spec: ImageSpec, options: BuildOptions = {}): Promise<GuestImage> {
    const threads = options.threads ?? digestThreads();
    const segmentBytes = options.segmentBytes ?? DIGEST_SEGMENT_BYTES;
    if (layout.guestBytes < (options.minBytes ?? PARALLEL_IMAGE_MIN_BYTES) || threads <= 1) {
      if (segmentBytes !== DIGEST_SEGMENT_BYTES) throw new RangeError(`expected the protocol's digest segment (${DIGEST_SEGMENT_BYTES} bytes) on one thread, got ${segmentBytes}`);
      return new GuestImage(layout, spec);
    }
    const memory = allocate(layout);
    const per = digestSegmentPages(layout.pageSize, segmentBytes);
    const work = digestWork(layout, segmentBytes);
    const data: ImageWorkerData = {
      work,
      layout,
      chunks: memory.chunks.map((c) => c.buffer as SharedArrayBuffer),
      pagesPerChunk: memory.pagesPerChunk,
      fill: { spec, zero: memory.zero.buffer as SharedArrayBuffer },
    };
    const digest = await runDigestWork(
      work,
      new ChunkPages(layout.pageSize, memory.chunks, memory.pagesPerChunk),
      () => startWorker(import.meta.url, 'image-worker', { workerData: data }),
      threads,
      undefined,
      (segment) => void fillImagePages(layout, spec, memory.chunks, memory.zero, memory.pagesPerChunk, segment * per, Math.min(layout.totalPages, (segment + 1) * per)),
    );
    let zeroPages = 0;
    for (let page = 0; page < layout.totalPages; page++) zeroPages += memory.zero[page]!;
    return new GuestImage(layout, spec, { memory, digest, zeroPages });
  }

  /**
   * The digest of the pages `receivedmap` selects (all without it), on this
   * thread and helpers (a large guest) or here alone: the summary's, once the
   * guest stopped changing the image.
   */
  async digestOf(receivedmap?: Uint8Array, options: { threads?: number; minBytes?: number } = {}): Promise<string> {
    const include = receivedmap ? (page: number) => bitmapHas(receivedmap, page) : undefined;
    const threads = options.threads ?? digestThreads();
    if (threads <= 1 || this.layout.guestBytes < (options.minBytes ?? PARALLEL_DIGEST_MIN_BYTES)) return digestPages(this, this.layout, include);
    const work = digestWork(this.layout);
    const data: ImageWorkerData = {
      work,
      layout: this.layout,
      chunks: this.chunks.map((c) => c.buffer as SharedArrayBuffer),
      pagesPerChunk: this.pagesPerChunk,
      ...(receivedmap ? { include: receivedmap } : {}),
    };
    return runDigestWork(work, this, () => startWorker(import.meta.url, 'image-worker', { workerData: data }), threads, include);
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
