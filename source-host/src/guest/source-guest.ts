import type { Worker } from 'node:worker_threads';
import { startWorker } from '@postcopy/shared';
import type { DirtyLog } from '../dirty-log.js';
import type { GuestImage } from '../image.js';
import { CONTROL, controlLength, type SourceVcpuData } from './control.js';

export interface SourceGuestOptions {
  /** vCPU threads (at least 1). */
  vcpus: number;
  /** Pages per second each vCPU writes; 0 = as fast as it can. */
  dirtyRate: number;
  /** The hot memory the vCPUs write: the first `dirtySetPages` pages, shared out among them. */
  dirtySetPages: number;
}

/**
 * The guest running on the source (precopy): `vcpus` worker threads that
 * write its memory (see guest/vcpu-worker.ts), a throttle for auto-converge,
 * and the stop at switchover, which completes only once every vCPU has
 * finished its last write.
 */
export class SourceGuest {
  private readonly ctl: Int32Array;
  private readonly workers: Worker[] = [];
  private running = false;
  private stoppedAt: number | undefined;
  private failure: Error | undefined;

  constructor(
    private readonly image: GuestImage,
    private readonly dirtyLog: DirtyLog,
    readonly options: SourceGuestOptions,
  ) {
    if (options.vcpus < 1) throw new RangeError(`expected at least 1 source vCPU, got ${options.vcpus}`);
    this.ctl = new Int32Array(new SharedArrayBuffer(controlLength(options.vcpus) * 4));
  }

  get vcpus(): number {
    return this.options.vcpus;
  }

  /** Starts the vCPUs; resolves once every one of them runs. */
  async start(onError: (err: Error) => void): Promise<void> {
    const { vcpus, dirtyRate } = this.options;
    const pages = Math.max(1, Math.min(this.options.dirtySetPages, this.image.layout.totalPages));
    Atomics.store(this.ctl, CONTROL.RUN, 1);
    this.image.markChanged();
    const ready: Promise<void>[] = [];
    for (let v = 0; v < vcpus; v++) {
      const data: SourceVcpuData = {
        index: v,
        control: this.ctl.buffer as SharedArrayBuffer,
        image: this.image.toBuffers(),
        dirtyLog: this.dirtyLog.buffer,
        dirtySetPages: pages,
        vcpus,
        dirtyRate,
      };
      const worker = startWorker(import.meta.url, 'vcpu-worker', { workerData: data });
      this.workers.push(worker);
      ready.push(
        new Promise<void>((resolve, reject) => {
          worker.on('message', (m: { type: string; message?: string }) => {
            if (m.type === 'ready') {
              worker.postMessage('go');
              resolve();
            } else if (m.type === 'error') {
              const err = new Error(`source vCPU ${v}: ${m.message}`);
              this.failure ??= err;
              onError(err);
            }
          });
          worker.once('error', (err) => {
            const e = new Error(`source vCPU ${v}: ${err.message}`);
            this.failure ??= e;
            reject(e);
            onError(e);
          });
        }),
      );
    }
    await Promise.all(ready);
    // Every vCPU in its run loop: the guest runs (rounds that begin now see its writes).
    await this.untilCount(CONTROL.STARTED, vcpus);
    this.running = true;
  }

  /** Total pages written so far by all vCPUs (modulo 2^32 per vCPU, read as unsigned). */
  writes(): number {
    let total = 0;
    for (let v = 0; v < this.options.vcpus; v++) total += Atomics.load(this.ctl, CONTROL.WRITES + v) >>> 0;
    return total;
  }

  get throttlePercent(): number {
    return Atomics.load(this.ctl, CONTROL.THROTTLE);
  }

  /** Auto-converge: each vCPU sleeps pct / (100 - pct) of a timeslice after each one it runs (0 to 99). */
  setThrottle(percent: number): void {
    if (!Number.isInteger(percent) || percent < 0 || percent > 99) throw new RangeError(`expected a throttle from 0 to 99 percent, got ${percent}`);
    Atomics.store(this.ctl, CONTROL.THROTTLE, percent);
  }

  /**
   * Stops the guest (switchover): resolves once every vCPU has finished its
   * last write, with the time the stop was asked for (the downtime's start).
   */
  async stop(): Promise<number> {
    if (this.stoppedAt !== undefined) return this.stoppedAt;
    const at = performance.now();
    this.stoppedAt = at;
    if (!this.running) return at;
    Atomics.store(this.ctl, CONTROL.RUN, 0);
    Atomics.notify(this.ctl, CONTROL.RUN);
    await this.untilCount(CONTROL.STOPPED, this.options.vcpus);
    this.running = false;
    return at;
  }

  /** Waits until the control counter at `index` reaches `n` (the vCPUs notify it); a vCPU's failure ends the wait. */
  private async untilCount(index: number, n: number): Promise<void> {
    for (;;) {
      const now = Atomics.load(this.ctl, index);
      if (now >= n) return;
      if (this.failure) throw this.failure;
      const wait = Atomics.waitAsync(this.ctl, index, now, 100);
      if (wait.async) await wait.value;
    }
  }

  get stopped(): boolean {
    return this.stoppedAt !== undefined;
  }

  async close(): Promise<void> {
    Atomics.store(this.ctl, CONTROL.RUN, 0);
    Atomics.notify(this.ctl, CONTROL.RUN);
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
