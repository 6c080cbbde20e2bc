/**
 * A faulting thread of the conformance suite, for either memory backend.
 *
 * It attaches to guest memory through the backend interface, binds itself
 * as a faulting thread, says its id (the one fault messages carry), then
 * touches the pages it is told to, one command at a time. A touch of a
 * missing page blocks this thread: in Atomics.wait on the emulation, in the
 * kernel's handle_userfault on uffd, where nothing but a COPY, ZEROPAGE,
 * WAKE, UNREGISTER or close of the context can release it.
 *
 * Messages to the parent:
 *   { type: 'ready', tid }                    attached; tid as fault messages carry it
 *   { type: 'touching', page, write }         about to touch
 *   { type: 'resumed', page, value }          the touch completed; value is word 0 of the page
 *   { type: 'read-result', result, message }  a read of a context, blocking or async (the thread as a reader)
 */
import { parentPort, workerData } from 'node:worker_threads';
import type { BackendHandle, FaultMessage, MemoryBackendName } from '../memory/backend.js';
import { BACKEND_BY_NAME } from '../memory/backends.js';

export interface ConformanceThreadData {
  backend: MemoryBackendName;
  handle: BackendHandle;
  slot: number;
}

export type ConformanceThreadCommand =
  | { type: 'touch'; page: number; write: boolean }
  /** A blocking read(2) of `ctx` from this thread (contexts are numbers every thread can use). */
  | { type: 'read'; ctx: number; timeoutMs: number }
  /** The same through readAsync, this thread's event loop free meanwhile. */
  | { type: 'read-async'; ctx: number };

export type ConformanceThreadMessage =
  | { type: 'ready'; tid: number }
  | { type: 'touching'; page: number; write: boolean }
  | { type: 'resumed'; page: number; value: number }
  | { type: 'read-result'; result: number; message: FaultMessage };

/** A write stores this in the last word of the page (word 0 keeps the data's mark). */
export const WRITE_MARK = 0x77;

const port = parentPort;
if (port === null) throw new Error('conformance thread: expected to run in a worker thread');
const data = workerData as ConformanceThreadData;
const memory = BACKEND_BY_NAME[data.backend].attach(data.handle);
const thread = memory.bindThread(data.slot);
const lastWord = (memory.layout.pageSize >>> 2) - 1;
const post = (m: ConformanceThreadMessage): void => port.postMessage(m);

port.on('message', (cmd: ConformanceThreadCommand) => {
  if (cmd.type === 'read-async') {
    const message: FaultMessage = { address: 0, flags: 0, tid: 0 };
    void memory.readAsync(cmd.ctx, message).then((result) => post({ type: 'read-result', result, message }));
    return;
  }
  if (cmd.type === 'read') {
    const message: FaultMessage = { address: 0, flags: 0, tid: 0 };
    const result = memory.read(cmd.ctx, message, cmd.timeoutMs);
    post({ type: 'read-result', result, message });
    return;
  }
  post({ type: 'touching', page: cmd.page, write: cmd.write });
  // A write faults as a write (UFFD_PAGEFAULT_FLAG_WRITE): store first, then read the mark.
  if (cmd.write) thread.store(cmd.page, lastWord, WRITE_MARK);
  const value = thread.load(cmd.page, 0);
  post({ type: 'resumed', page: cmd.page, value });
});
post({ type: 'ready', tid: thread.tid });
