/**
 * The faulting thread of the backend floor (backend-floor.ts): attaches to
 * guest memory through the memory backend, binds itself as a faulting
 * thread, and on `go` reads word 0 of every page in order, timing each read
 * of a missing page from just before the load to just after it: on uffd
 * the load sleeps in the kernel's handle_userfault until the resolver's
 * UFFDIO_COPY wakes it. Posts the latencies (ns, a Float64Array) and the
 * word 0 of each page (to check the COPY put the right page there).
 */
import { parentPort, workerData } from 'node:worker_threads';
import { BACKEND_BY_NAME, type BackendHandle, type MemoryBackendName } from '@postcopy/dest-host';

export interface FloorThreadData {
  backend: MemoryBackendName;
  handle: BackendHandle;
  pages: number;
}

export type FloorThreadMessage = { type: 'ready'; tid: number } | { type: 'done'; latenciesNs: Float64Array; firstWords: Int32Array; elapsedMs: number };

const port = parentPort;
if (port === null) throw new Error('backend-floor-thread: expected to run in a worker thread');
const data = workerData as FloorThreadData;
const memory = BACKEND_BY_NAME[data.backend].attach(data.handle);
const thread = memory.bindThread(0);
port.once('message', () => {
  const latenciesNs = new Float64Array(data.pages);
  const firstWords = new Int32Array(data.pages);
  const started = performance.now();
  for (let page = 0; page < data.pages; page++) {
    const t0 = performance.now();
    firstWords[page] = thread.load(page, 0);
    latenciesNs[page] = (performance.now() - t0) * 1e6;
  }
  const elapsedMs = performance.now() - started;
  memory.dispose();
  const done: FloorThreadMessage = { type: 'done', latenciesNs, firstWords, elapsedMs };
  port.postMessage(done, [latenciesNs.buffer, firstWords.buffer]);
});
const ready: FloorThreadMessage = { type: 'ready', tid: thread.tid };
port.postMessage(ready);
