/**
 * readAsync with an AbortSignal, on both memory backends: how a resolver
 * stops reading before the main thread closes its context (an install on a
 * closed context is EBADF on the kernel). An abort ends the pending read
 * with EINTR and takes no message: a fault after it is read by the next
 * read. On Linux the uffd backend must run (no skip).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { Harness, PAGE, pageData } from '../conformance/harness.js';
import { ERRNO, MEMORY_BACKENDS, type FaultMessage } from './backend.js';
import { BACKEND_BY_NAME } from './backends.js';

const backends = process.platform === 'linux' ? MEMORY_BACKENDS : MEMORY_BACKENDS.filter((b) => b !== 'uffd');
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

let harness: Harness | undefined;
afterEach(async () => {
  await harness?.dispose();
  harness = undefined;
});

describe.each(backends)('readAsync with an abort signal (%s)', (name) => {
  it('an abort ends a pending read with EINTR; the fault that follows goes to the next read', async () => {
    const h = (harness = Harness.create(BACKEND_BY_NAME[name]));
    const ctx = h.openAll();
    const stop = new AbortController();
    const msg: FaultMessage = { address: 0, flags: 0, tid: 0 };
    const pending = h.memory.readAsync(ctx, msg, stop.signal);
    await sleep(50);
    stop.abort();
    expect(await pending).toBe(-ERRNO.EINTR);
    // Already aborted: no read at all.
    expect(await h.memory.readAsync(ctx, msg, stop.signal)).toBe(-ERRNO.EINTR);

    const a = await h.thread('a');
    h.touch(a, 2);
    expect(await h.readAsync(ctx)).toBe('page 2, read, from a');
    expect(h.memory.copy(ctx, 2 * PAGE, pageData(2), PAGE)).toBe(PAGE);
    expect(await h.resumed(a)).toBe('resumed: data 2');
  });

  it('a signal that never aborts changes nothing: the read takes the message', async () => {
    const h = (harness = Harness.create(BACKEND_BY_NAME[name]));
    const ctx = h.openAll();
    const stop = new AbortController();
    const msg: FaultMessage = { address: 0, flags: 0, tid: 0 };
    const pending = h.memory.readAsync(ctx, msg, stop.signal);
    const a = await h.thread('a');
    h.touch(a, 5, true);
    expect(await pending).toBe(0);
    expect(msg.address).toBe(5 * PAGE);
    expect(msg.tid).toBe(a.tid);
    expect(h.memory.copy(ctx, 5 * PAGE, pageData(5), PAGE)).toBe(PAGE);
    expect(await h.resumed(a)).toBe('resumed: data 5');
  });
});
