/**
 * A helper thread of the destination's final digest (shared/parallel-digest.ts):
 * attaches to guest memory through the run's backend, takes segments from the
 * shared counter until none is left, and hashes each one's received pages
 * (only those: on the kernel's userfaultfd a missing page would block this
 * thread in the kernel). Exits when there is nothing left to take.
 */
import { workerData } from 'node:worker_threads';
import { hashSegmentsFrom, type DigestWork } from '@postcopy/shared/digest';
import type { BackendHandle } from '../memory/backend.js';
import { BACKEND_BY_NAME } from '../memory/backends.js';
import { GuestPages } from '../memory/pages.js';
import { PAGE, VmmState, type VmmBuffers } from '../vmm/state.js';

export interface DigestWorkerData {
  work: DigestWork;
  memory: BackendHandle;
  vmm: VmmBuffers;
}

const data = workerData as DigestWorkerData;
const memory = BACKEND_BY_NAME[data.memory.backend].attach(data.memory);
const vmm = new VmmState(data.vmm);
hashSegmentsFrom(data.work, new GuestPages(memory), (page) => Atomics.load(vmm.pageStatus, page) === PAGE.RECEIVED);
