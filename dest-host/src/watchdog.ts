import { WatchdogError } from '@postcopy/shared';
import type { BackendMemory } from './memory/backend.js';
import { COUNTER, NO_TID, type VmmState } from './vmm/state.js';

export interface WatchedThread {
  /** Thread slot: its fault queue. */
  slot: number;
  /** `vCPU 3`, `I/O thread 0`. */
  name: string;
}

/**
 * Stops a run that no longer moves: when no guest access completes and no page
 * is installed for `timeoutMs`, it fails the run and names every blocked
 * thread and the page it waits for: the page from the thread's fault queue
 * (the destination's own bookkeeping), and whether the thread sleeps in a
 * userfault right now from the backend (the emulation's wait slot, or the
 * kernel's wchan, handle_userfault, on uffd).
 *
 * It only reads: it cannot wake a thread blocked in a real fault (nothing
 * can but the context's COPY, ZEROPAGE, WAKE or close). The run it fails
 * closes the contexts on its way out, which wakes those threads on zeros,
 * so that run must not, and does not, report anything verified.
 */
export class Watchdog {
  private timer: NodeJS.Timeout | undefined;
  private lastProgress = -1;
  private lastChange = 0;

  constructor(
    private readonly vmm: VmmState,
    private readonly memory: BackendMemory,
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
      const faults = this.vmm.outstanding(t.slot);
      if (faults.length === 0) continue;
      const tid = this.vmm.tidOf(t.slot);
      const inKernel = tid !== NO_TID && this.memory.isBlockedInFault(tid);
      for (const f of faults) {
        lines.push(`${t.name} on page ${f.page} for ${Math.round(now - f.startMs)} ms${inKernel ? ' (blocked in userfaultfd)' : ''}`);
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
