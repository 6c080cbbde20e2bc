import { parentPort } from 'node:worker_threads';
import { GuestMemory } from '../memory/guest-memory.js';
import { Userfaultfd } from '../uffd/userfaultfd.js';
import { VmmState } from '../vmm/state.js';
import type { SharedState, WorkerCommand, WorkerReport } from './protocol.js';

export interface Attached {
  memory: GuestMemory;
  uffd: Userfaultfd;
  vmm: VmmState;
  /** ms to add to performance.now() for ms since the main thread's epoch. */
  clockOffset: number;
}

/** Maps the destination's shared buffers into this worker. */
export function attach(state: SharedState): Attached {
  const memory = new GuestMemory(state.memory);
  return {
    memory,
    uffd: new Userfaultfd(state.uffd, memory),
    vmm: new VmmState(state.vmm),
    clockOffset: performance.timeOrigin - state.epochOrigin,
  };
}

export function report(message: WorkerReport, transfer: ArrayBuffer[] = []): void {
  parentPort!.postMessage(message, transfer);
}

export function nextCommand(): Promise<WorkerCommand> {
  return new Promise((resolve) => parentPort!.once('message', resolve));
}

/** Runs a worker body, reporting any failure to the main thread instead of dying silently. */
export function runWorker(body: () => Promise<void>): void {
  body().catch((err: unknown) => {
    const e = err as Error;
    report({ type: 'error', message: e.message, ...(e.stack ? { stack: e.stack } : {}) });
  });
}
