import { parentPort } from 'node:worker_threads';
import type { BackendMemory } from '../memory/backend.js';
import { BACKEND_BY_NAME } from '../memory/backends.js';
import { Session } from '../net/session.js';
import type { SessionFollowing } from '../net/page-client.js';
import { VmmState } from '../vmm/state.js';
import type { SharedState, SourceEndpoint, WorkerCommand, WorkerReport } from './protocol.js';

export interface Attached {
  /** This thread's view of guest memory and of every context, through the run's memory backend. */
  memory: BackendMemory;
  vmm: VmmState;
  /** ms to add to performance.now() for ms since the main thread's epoch. */
  clockOffset: number;
}

/** Attaches this worker to the destination's guest memory (either backend) and shared state. */
export function attach(state: SharedState): Attached {
  return {
    memory: BACKEND_BY_NAME[state.memory.backend].attach(state.memory),
    vmm: new VmmState(state.vmm),
    clockOffset: performance.timeOrigin - state.epochOrigin,
  };
}

/** How a worker's fault channel follows the destination's session (recovery); a loss goes out through `say`. */
export function followSession(vmm: VmmState, source: SourceEndpoint, say: Report = report): SessionFollowing {
  return {
    session: new Session(vmm.counters),
    reconnectTimeoutMs: source.reconnectTimeoutMs,
    onLost: (err, epoch) => say({ type: 'channel-lost', epoch, message: err.message }),
  };
}

/** How a worker tells the main thread: {@link report}, or a warm-up's wrapping of it. */
export type Report = (message: WorkerReport, transfer?: ArrayBuffer[]) => void;

export function report(message: WorkerReport, transfer: ArrayBuffer[] = []): void {
  parentPort!.postMessage(message, transfer);
}

/**
 * A warm-up's report, wrapped. Copied, never transferred: a transfer
 * detaches its ArrayBuffers, and the first detach in an isolate
 * invalidates V8's ArrayBuffer-detaching protector, which throws away all
 * the code optimized on typed arrays so far, the warm-up's whole point.
 */
export function warmUpReport(message: WorkerReport): void {
  parentPort!.postMessage({ type: 'warm-up', report: message } satisfies WorkerReport);
}

/**
 * A worker's body with a warm-up: each of `rounds` (none without a warm-up)
 * runs this thread's fault path on scratch memory, so that its isolate has
 * compiled it before the guest runs; a failure there says it was the
 * warm-up's. Then `run`, the run itself.
 */
export async function warmUpThenRun(rounds: readonly (() => Promise<void>)[], run: () => Promise<void>): Promise<void> {
  for (const round of rounds) {
    try {
      await round();
    } catch (err) {
      throw new Error(`warm-up: ${(err as Error).message}`, { cause: err });
    }
  }
  await run();
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
