import { WatchdogError } from '@postcopy/shared';
import type { Userfaultfd } from './uffd/userfaultfd.js';
import { COUNTER, type VmmState } from './vmm/state.js';

export interface WatchedThread {
  tid: number;
  /** `vCPU 3`, `I/O thread 0`. */
  name: string;
}

/**
 * Stops a run that no longer moves: when no guest access completes and no page
 * is installed for `timeoutMs`, it fails the run and names every blocked
 * thread and the page it waits for (from its fault queue and the emulated
 * kernel's wait slot).
 */
export class Watchdog {
  private timer: NodeJS.Timeout | undefined;
  private lastProgress = -1;
  private lastChange = 0;

  constructor(
    private readonly vmm: VmmState,
    private readonly uffd: Userfaultfd,
    private readonly threads: readonly WatchedThread[],
    private readonly timeoutMs: number,
    private readonly epochNow: () => number,
    private readonly onStall: (err: WatchdogError) => void,
  ) {}

  start(): void {
    this.lastChange = this.epochNow();
    this.timer = setInterval(() => this.check(), Math.min(250, Math.max(20, this.timeoutMs / 10)));
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  /** Threads blocked on a fault right now, as `vCPU 1 on page 123 for 5012 ms`. */
  blocked(): string[] {
    const now = this.epochNow();
    const lines: string[] = [];
    for (const t of this.threads) {
      const faults = this.vmm.outstanding(t.tid);
      const kernelPage = this.uffd.blockedPage(t.tid);
      for (const f of faults) {
        lines.push(`${t.name} on page ${f.page} for ${Math.round(now - f.startMs)} ms${kernelPage === f.page ? ' (blocked in userfaultfd)' : ''}`);
      }
    }
    return lines;
  }

  private check(): void {
    const progress = this.vmm.counter(COUNTER.ACCESSES) + this.vmm.counter(COUNTER.INSTALLED);
    const now = this.epochNow();
    if (progress !== this.lastProgress) {
      this.lastProgress = progress;
      this.lastChange = now;
      return;
    }
    if (now - this.lastChange < this.timeoutMs) return;
    this.stop();
    const blocked = this.blocked();
    this.onStall(
      new WatchdogError(
        blocked.length > 0
          ? `watchdog: no progress for ${Math.round(now - this.lastChange)} ms; blocked: ${blocked.join('; ')}`
          : `watchdog: no progress for ${Math.round(now - this.lastChange)} ms and no thread blocked on a fault`,
      ),
    );
  }
}
