/**
 * The memory digest (digest.ts) hashed by several threads at once: the
 * calling thread and helper threads take segments from one shared counter,
 * each writes its segment's hash into one shared buffer, and the calling
 * thread combines them in segment order. Any split gives the same digest as
 * digestPages on one thread; a helper that fails to start or dies leaves its
 * segments to the calling thread, so a failure costs time, never a segment.
 */
import { availableParallelism } from 'node:os';
import type { Worker } from 'node:worker_threads';
import { DIGEST_SEGMENT_BYTES, SEGMENT_HASH_BYTES, combineSegmentHashes, digestPages, digestSegmentCount, hashSegment, type DigestLayout, type PageSource } from './digest.js';

/** Below this much guest, a helper thread's start-up costs more than it saves: one thread hashes it. */
export const PARALLEL_DIGEST_MIN_BYTES = 256 * 1024 ** 2;

/** Fields of {@link DigestWork.state} (Int32 indices). */
export const DIGEST_STATE = {
  /** The next segment to take (Atomics.add: each segment is taken once). */
  NEXT: 0,
  /** From here on, one word a segment: 1 once its hash is in `hashes`. */
  DONE: 1,
} as const;

/** What the threads of one digest share (structured-cloneable: a helper gets it in its workerData). */
export interface DigestWork {
  layout: DigestLayout;
  segmentBytes: number;
  segments: number;
  /** Int32 words: {@link DIGEST_STATE}. */
  state: SharedArrayBuffer;
  /** {@link SEGMENT_HASH_BYTES} a segment, in segment order. */
  hashes: SharedArrayBuffer;
}

export function digestWork(layout: DigestLayout, segmentBytes = DIGEST_SEGMENT_BYTES): DigestWork {
  const segments = digestSegmentCount(layout, segmentBytes);
  return {
    layout: { totalPages: layout.totalPages, pageSize: layout.pageSize },
    segmentBytes,
    segments,
    state: new SharedArrayBuffer((DIGEST_STATE.DONE + segments) * 4),
    hashes: new SharedArrayBuffer(segments * SEGMENT_HASH_BYTES),
  };
}

/**
 * Takes segments until none is left and hashes each (a helper thread's
 * body, and the calling thread's share). `each` runs before a segment is
 * hashed (the source's image build fills it there). Returns how many it
 * hashed.
 *
 * A segment's hash is written before its DONE word is set (Atomics.store),
 * and the combining thread reads the hashes only after every helper exited
 * (or after its own Atomics.load of DONE), so it never reads half a hash.
 */
export function hashSegmentsFrom(work: DigestWork, source: PageSource, include?: (page: number) => boolean, each?: (segment: number) => void): number {
  const state = new Int32Array(work.state);
  const hashes = new Uint8Array(work.hashes);
  let n = 0;
  for (;;) {
    const segment = Atomics.add(state, DIGEST_STATE.NEXT, 1);
    if (segment >= work.segments) return n;
    each?.(segment);
    hashSegment(source, work.layout, segment, hashes, segment * SEGMENT_HASH_BYTES, include, work.segmentBytes);
    Atomics.store(state, DIGEST_STATE.DONE + segment, 1);
    n++;
  }
}

export interface ParallelDigestOptions {
  /** Threads in all, this one included (default: one a core, at most 8). */
  threads?: number;
  /** Smaller guests are hashed on this thread alone (default {@link PARALLEL_DIGEST_MIN_BYTES}). */
  minBytes?: number;
  segmentBytes?: number;
}

/**
 * Runs `work` on this thread and on `threads - 1` helpers that `startHelper`
 * starts (each must call {@link hashSegmentsFrom} with its own view of the
 * same memory and the same selection, then exit). Resolves once every helper
 * has exited and every segment is hashed: segments a failed helper took are
 * hashed here. `each` as in hashSegmentsFrom, on this thread and for the
 * segments it hashes again.
 */
export async function runDigestWork(
  work: DigestWork,
  source: PageSource,
  startHelper: (work: DigestWork) => Worker,
  threads: number,
  include?: (page: number) => boolean,
  each?: (segment: number) => void,
): Promise<string> {
  const helpers: Promise<void>[] = [];
  for (let i = 1; i < Math.min(threads, work.segments); i++) {
    let worker: Worker;
    try {
      worker = startHelper(work);
    } catch {
      break; // This thread does their share.
    }
    helpers.push(
      new Promise<void>((resolve) => {
        // Its error is not the digest's: what it left undone is hashed below.
        worker.on('error', () => {});
        worker.once('exit', () => resolve());
      }),
    );
  }
  hashSegmentsFrom(work, source, include, each);
  await Promise.all(helpers);
  const state = new Int32Array(work.state);
  for (let segment = 0; segment < work.segments; segment++) {
    if (Atomics.load(state, DIGEST_STATE.DONE + segment) === 1) continue;
    each?.(segment);
    hashSegment(source, work.layout, segment, new Uint8Array(work.hashes), segment * SEGMENT_HASH_BYTES, include, work.segmentBytes);
    Atomics.store(state, DIGEST_STATE.DONE + segment, 1);
  }
  return combineSegmentHashes(new Uint8Array(work.hashes));
}

/** How many threads a parallel digest uses by default. */
export function digestThreads(): number {
  return Math.min(8, availableParallelism());
}

/**
 * The digest of the selected pages, hashed in parallel when the guest is
 * large (see {@link runDigestWork}); the same value as digestPages.
 */
export async function digestPagesParallel(
  source: PageSource,
  layout: DigestLayout,
  startHelper: (work: DigestWork) => Worker,
  include?: (page: number) => boolean,
  options: ParallelDigestOptions = {},
): Promise<string> {
  const threads = options.threads ?? digestThreads();
  const segmentBytes = options.segmentBytes ?? DIGEST_SEGMENT_BYTES;
  if (threads <= 1 || layout.totalPages * layout.pageSize < (options.minBytes ?? PARALLEL_DIGEST_MIN_BYTES)) return digestPages(source, layout, include, segmentBytes);
  return runDigestWork(digestWork(layout, segmentBytes), source, startHelper, threads, include);
}
