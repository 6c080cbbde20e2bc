/**
 * The destination's half of the final digest check: the digest (shared/
 * digest.ts) of every received page of guest memory, on this thread and
 * helper threads at once for a large guest (workers/digest-worker.ts, each
 * attached to the same memory through the run's backend). Received pages
 * only: on the kernel's userfaultfd a missing page would block the reader
 * in the kernel. Run once the guest has stopped and every install is done.
 */
import { digestPagesParallel, startWorker, type GuestLayout, type ParallelDigestOptions } from '@postcopy/shared';
import type { BackendMemory } from '../memory/backend.js';
import { GuestPages } from '../memory/pages.js';
import { PAGE, type VmmState } from '../vmm/state.js';
import type { DigestWorkerData } from '../workers/digest-worker.js';
import { WORKERS_CALLER } from './guest-threads.js';

/**
 * Resolves once every helper has exited (none still reads guest memory, so
 * it may be unmapped after this), with the digest of the received pages.
 */
export function digestReceived(memory: BackendMemory, vmm: VmmState, layout: GuestLayout, options: ParallelDigestOptions = {}): Promise<string> {
  return digestPagesParallel(
    new GuestPages(memory),
    layout,
    (work) => startWorker(WORKERS_CALLER, 'digest-worker', { workerData: { work, memory: memory.handle, vmm: vmm.buffers } satisfies DigestWorkerData }),
    (page) => Atomics.load(vmm.pageStatus, page) === PAGE.RECEIVED,
    options,
  );
}
