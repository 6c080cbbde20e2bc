import type { Worker } from 'node:worker_threads';
import type { WorkerReport } from '../workers/protocol.js';

/** A failure that stops the run: the first one wins. */
export class Abort {
  error: Error | undefined;
  readonly promise: Promise<never>;
  private rejectFn!: (err: Error) => void;
  constructor() {
    this.promise = new Promise<never>((_, reject) => (this.rejectFn = reject));
    this.promise.catch(() => {});
  }
  fail(err: Error): void {
    if (this.error) return;
    this.error = err;
    this.rejectFn(err);
  }
  /** Waits for `p` unless the run fails first. */
  race<T>(p: Promise<T>): Promise<T> {
    return Promise.race([p, this.promise]);
  }
}

/**
 * Waits for one report of a given type from a worker (fails the run if the
 * worker exits first); with `warmUp`, one of its warm-up's reports.
 */
export function expectReport<T extends WorkerReport['type']>(worker: Worker, type: T, label: string, abort: Abort, warmUp = false): Promise<Extract<WorkerReport, { type: T }>> {
  return abort.race(
    new Promise((resolve) => {
      const onMessage = (report: WorkerReport): void => {
        const m = warmUp ? (report.type === 'warm-up' ? report.report : undefined) : report;
        if (m?.type !== type) return;
        worker.off('message', onMessage);
        worker.off('exit', onExit);
        resolve(m as Extract<WorkerReport, { type: T }>);
      };
      const onExit = (code: number): void => abort.fail(new Error(`${label} exited (code ${code}) before reporting ${type}`));
      worker.on('message', onMessage);
      worker.on('exit', onExit);
    }),
  );
}

/** A promise with its resolve at hand. */
export interface Deferred<T> {
  promise: Promise<T>;
  resolve: (value: T) => void;
}

export function deferred<T>(): Deferred<T> {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}
