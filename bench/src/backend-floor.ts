/**
 * The local floor of a memory backend (issue 12, part 8): what one fault
 * costs with no network and no protocol at all, measured through the same
 * backend interface the tool uses (on uffd, the addon's ioctls on a real
 * userfaultfd). One faulting thread (backend-floor-thread.ts) reads every
 * page of a fresh guest in order; this thread is the resolver: a blocking
 * read(2) of the userfaultfd's message, then UFFDIO_COPY of the page from
 * memory, which installs it and wakes the faulting thread. Each fault is
 * timed by the faulting thread, from before its load to after it (the
 * kernel's fault path, the message, the copy and the wake-up), as the
 * tool's own fault latency is; the rate is pages / the thread's walk.
 *
 * The kernel's own counterpart is tools/testing/selftests/mm/uffd-common.c
 * (a reader that copies from a source area, one thread faulting).
 */
import { Worker } from 'node:worker_threads';
import { createLatencyHistogram, makeLayout, recordNs, startWorker, summarize } from '@postcopy/shared';
import { BACKEND_BY_NAME, type FaultMessage, type MemoryBackendName } from '@postcopy/dest-host';
import type { FloorThreadData, FloorThreadMessage } from './backend-floor-thread.js';

export interface BackendFloorResult {
  backend: MemoryBackendName;
  pages: number;
  /** Per fault, load to resume (µs). */
  latencyUs: { p50: number; p99: number; mean: number };
  /** Faults resolved per second of the faulting thread's walk. */
  pagesPerSec: number;
}

const PAGE = 4096;
const READ_TIMEOUT_MS = 5000;

/** Word 0 of page `page` in the floor's source area: the page's number, so a COPY to the wrong page shows. */
function sourcePage(page: number, into: Uint8Array): Uint8Array {
  new DataView(into.buffer, into.byteOffset, 4).setInt32(0, page + 1, true);
  return into;
}

function once<T>(worker: Worker, what: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const onExit = (code: number): void => reject(new Error(`the backend floor's faulting thread exited (code ${code}) before ${what}`));
    worker.once('message', (m: T) => {
      worker.off('exit', onExit);
      resolve(m);
    });
    worker.once('error', reject);
    worker.once('exit', onExit);
  });
}

/**
 * One run of the floor on `backend` over `pages` pages of 4 KiB. Throws
 * BackendUnavailableError where the backend cannot run, and an Error if a
 * page came out wrong or a message did not come.
 */
export async function measureBackendFloor(backend: MemoryBackendName, pages: number): Promise<BackendFloorResult> {
  const layout = makeLayout(pages * PAGE, PAGE);
  const memory = BACKEND_BY_NAME[backend].create({ layout, memslotBytes: layout.guestBytes, maxThreads: 1, maxContexts: 1 });
  let ctx = -1;
  let worker: Worker | undefined;
  try {
    ctx = memory.open();
    const r = memory.register(ctx, 0, layout.guestBytes);
    if (r !== 0) throw new Error(`expected UFFDIO_REGISTER of the floor's guest to succeed, got errno ${-r}`);
    const data: FloorThreadData = { backend, handle: memory.handle, pages };
    worker = startWorker(import.meta.url, 'backend-floor-thread', { workerData: data });
    await once<FloorThreadMessage>(worker, 'it was ready');
    const done = once<FloorThreadMessage>(worker, 'it was done');
    worker.postMessage('go');
    const msg: FaultMessage = { address: 0, flags: 0, tid: 0 };
    const src = new Uint8Array(PAGE).fill(0x5a);
    for (let resolved = 0; resolved < pages; resolved++) {
      const got = memory.read(ctx, msg, READ_TIMEOUT_MS);
      if (got !== 0) throw new Error(`expected a fault message within ${READ_TIMEOUT_MS} ms (fault ${resolved + 1} of ${pages}), got errno ${-got}`);
      const page = msg.address / PAGE;
      const copied = memory.copy(ctx, msg.address, sourcePage(page, src), PAGE);
      if (copied !== PAGE) throw new Error(`expected UFFDIO_COPY of page ${page} to copy ${PAGE} bytes, got ${copied}`);
    }
    const result = (await done) as Extract<FloorThreadMessage, { type: 'done' }>;
    for (let page = 0; page < pages; page++) {
      if (result.firstWords[page] !== page + 1) throw new Error(`expected word 0 of page ${page} to be ${page + 1} after its COPY, got ${result.firstWords[page]}`);
    }
    const histogram = createLatencyHistogram();
    for (const ns of result.latenciesNs) recordNs(histogram, ns);
    const s = summarize(histogram);
    return { backend, pages, latencyUs: { p50: s.p50, p99: s.p99, mean: s.mean }, pagesPerSec: Math.round(pages / (result.elapsedMs / 1000)) };
  } finally {
    // A faulting thread still blocked (a failure above) wakes when the context closes.
    if (ctx >= 0) memory.close(ctx);
    await worker?.terminate();
    memory.dispose();
  }
}
