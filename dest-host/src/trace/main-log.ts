/**
 * What the destination's main thread records for the timeline while tracing
 * (--trace): its installs of what came on the main channel (pushed runs,
 * zero-page notices, requested pages sent there without preempt), samples
 * of the page counters for the counter tracks, and the run's phases.
 * Recovery's pauses come from Recovery itself (it keeps them anyway).
 *
 * Times are ms on the main thread's performance.now(), the run's epoch.
 */
import { COUNTER, type VmmState } from '../vmm/state.js';

/** What a main-channel slice installed. */
export const MAIN_KIND = {
  /** Pushed pages with data (one run of consecutive pages). */
  PUSHED: 0,
  /** Zero-page notices of the push. */
  PUSHED_ZERO: 1,
  /** A requested page the source sent on the main channel (no preempt). */
  REQUESTED: 2,
} as const;

export const MAIN_KIND_NAMES = ['pushed', 'pushed zero pages', 'requested page on main'] as const;

/**
 * Installs closer than this to the previous one, of the same kind and
 * continuing its pages, extend its slice rather than open one: a push batch
 * is several frames handled in one turn, and zero-page notices come one page
 * a message, so a slice per message would make a 4 GiB run's trace mostly
 * zero pages.
 */
const MERGE_GAP_MS = 0.05;

/** How often the page counters are sampled (the counter tracks' resolution). */
export const SAMPLE_EVERY_MS = 10;

/** One counter sample: pages installed (all ways), pushed with data, demand-fetched. */
export interface CounterSample {
  atMs: number;
  installed: number;
  pushedData: number;
  demand: number;
}

export interface MainSlice {
  kind: number;
  page: number;
  count: number;
  startMs: number;
  endMs: number;
}

export interface Phase {
  name: string;
  startMs: number;
  endMs: number;
}

export class MainLog {
  readonly slices: MainSlice[] = [];
  readonly samples: CounterSample[] = [];
  readonly phases: Phase[] = [];
  private timer: NodeJS.Timeout | undefined;
  private last: MainSlice | undefined;

  /** The main thread installed `count` pages from `page` (a MAIN_KIND) between the two times. */
  install(kind: number, page: number, count: number, startMs: number, endMs: number): void {
    const last = this.last;
    if (last !== undefined && last.kind === kind && last.page + last.count === page && startMs - last.endMs < MERGE_GAP_MS) {
      last.count += count;
      last.endMs = endMs;
      return;
    }
    this.last = { kind, page, count, startMs, endMs };
    this.slices.push(this.last);
  }

  phase(name: string, startMs: number, endMs: number): void {
    this.phases.push({ name, startMs, endMs });
  }

  /** Samples the counters now, and every SAMPLE_EVERY_MS until stopSampling. */
  startSampling(vmm: VmmState): void {
    this.sample(vmm);
    this.timer = setInterval(() => this.sample(vmm), SAMPLE_EVERY_MS);
    this.timer.unref();
  }

  /** A last sample, and no more. */
  stopSampling(vmm: VmmState): void {
    if (this.timer === undefined) return;
    clearInterval(this.timer);
    this.timer = undefined;
    this.sample(vmm);
  }

  private sample(vmm: VmmState): void {
    this.samples.push({
      atMs: performance.now(),
      installed: vmm.counter(COUNTER.INSTALLED),
      pushedData: vmm.counter(COUNTER.PAGES_PUSHED) - vmm.counter(COUNTER.PUSHED_ZERO),
      demand: vmm.counter(COUNTER.PAGES_DEMAND),
    });
  }
}
