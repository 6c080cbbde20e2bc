/**
 * The run as a timeline (--trace): builds the trace-event document from what
 * the threads recorded, once the run is over (nothing here runs while the
 * guest does).
 *
 * Tracks of the destination process:
 * - one per vCPU and I/O thread: each fault a slice from its detection to
 *   the thread's resumption (the report's latency intervals, the very same
 *   numbers), named for how it was resolved (resolution.ts), with the page,
 *   read or write, who installed the page, who handled the fault and
 *   whether a WAKE was issued for it;
 * - the resolver threads (readers, per-thread resolvers, the I/O resolver):
 *   each fault message a slice from the read to the end of its resolution;
 *   a resolver handles many at once, so overlapping ones go to further
 *   lanes (tracks named `label #2`, ...), as slices of one track must nest;
 * - the main thread: the pushed runs, zero-page notices and requested pages
 *   it installed from the main channel;
 * - the run's phases, and recovery's pauses (postcopy-paused);
 * - counters: pages received (every way), pages demand-fetched, and the
 *   push throughput (page contents pushed per second over the last 100 ms),
 *   sampled by the main thread every 10 ms.
 */
import { Resolution } from '../vmm/page-installer.js';
import { ORIGIN } from '../vmm/state.js';
import type { GuestThreadResult } from '../workers/protocol.js';
import type { MainLog } from './main-log.js';
import { MAIN_KIND, MAIN_KIND_NAMES } from './main-log.js';
import { FAULT_RESOLUTIONS, ORIGIN_NAMES, faultResolution, ownRequest, wakeIssued, type FaultResolution } from './resolution.js';
import { FAULT_FLAG, type ResolverTrace } from './thread-logs.js';
import { counter, processName, slice, threadName, type TraceDocument, type TraceEvent } from './trace-event.js';

export interface TimelineThread {
  /** `vCPU 0`, `I/O thread 1`. */
  name: string;
  /** Its fault queue's slot: the slot resolvers record. */
  slot: number;
  result: GuestThreadResult;
}

export interface TimelineResolver {
  label: string;
  /** It WAKEs its context whenever it did not install the page itself (ResolverSpec.owesWake). */
  owesWake: boolean;
  trace: ResolverTrace;
}

export interface TimelinePause {
  startMs: number;
  endMs: number;
  reason: string;
}

export interface TimelineInputs {
  pid: number;
  /** The process track's name. */
  title: string;
  pageSize: number;
  /** vCPUs first, then I/O threads. */
  threads: TimelineThread[];
  resolvers: TimelineResolver[];
  /** Who installed each page (VmmState.origins). */
  origins: Uint8Array;
  main: MainLog;
  pauses: readonly TimelinePause[];
  /** Shown as the trace's metadata. */
  otherData: Record<string, string | number | boolean>;
}

export interface Timeline {
  doc: TraceDocument;
  /** Fault slices written: one per fault of every vCPU and I/O thread. */
  faultSlices: number;
  /** Fault slices by resolution. */
  resolutions: Record<FaultResolution, number>;
}

/** Fixed tracks; threads and resolver lanes follow from FIRST_THREAD_TID. */
export const TID = { MAIN: 1, PHASES: 2, RECOVERY: 3, FIRST_THREAD: 10 } as const;

/**
 * Counter tracks. Perfetto names a counter's track "name key" for each key
 * of its args, chrome://tracing shows the name with the keys as series, so
 * each reads well either way ("received pages", "push throughput MiB/s").
 */
export const COUNTER_NAME = { RECEIVED: 'received', DEMAND: 'demand-fetched', PUSH: 'push throughput' } as const;

/** Push throughput is the content pushed over this window, per second. */
const THROUGHPUT_WINDOW_MS = 100;

/** A resolver record: which resolver, which entry. */
interface RecordRef {
  resolver: number;
  index: number;
}

export function buildTimeline(inp: TimelineInputs): Timeline {
  const { pid, origins } = inp;
  const events: TraceEvent[] = [...processName(pid, inp.title, 0)];
  const resolutions = Object.fromEntries(FAULT_RESOLUTIONS.map((r) => [r, 0])) as Record<FaultResolution, number>;
  const slotName = new Map(inp.threads.map((t) => [t.slot, t.name]));
  const originName = (page: number): string => ORIGIN_NAMES[origins[page] ?? ORIGIN.NONE] ?? 'none';

  events.push(...threadName(pid, TID.MAIN, 'main thread: main channel (push, replies on main)', TID.MAIN));
  events.push(...threadName(pid, TID.PHASES, 'migration phases', TID.PHASES));
  events.push(...threadName(pid, TID.RECOVERY, 'recovery', TID.RECOVERY));
  let nextTid: number = TID.FIRST_THREAD;

  // Each (thread, page) fault's record among the resolvers': the one that says most (a request of its own first).
  const maxSlot = Math.max(0, ...inp.threads.map((t) => t.slot)) + 1;
  const key = (slot: number, page: number): number => page * maxSlot + slot;
  const handled = new Map<number, RecordRef>();
  inp.resolvers.forEach((r, resolver) => {
    for (let i = 0; i < r.trace.count; i++) {
      const k = key(r.trace.info[3 * i + 1]!, r.trace.info[3 * i]!);
      const seen = handled.get(k);
      if (seen === undefined || rank(r.trace.info[3 * i + 2]!) > rank(inp.resolvers[seen.resolver]!.trace.info[3 * seen.index + 2]!)) handled.set(k, { resolver, index: i });
    }
  });

  // Guest threads: a fault a slice.
  let faultSlices = 0;
  for (const t of inp.threads) {
    const tid = nextTid++;
    events.push(...threadName(pid, tid, t.name, tid));
    const { intervals, faults, trace } = t.result;
    if (trace === undefined) throw new Error(`expected ${t.name}'s fault log (the thread ran without --trace)`);
    for (let n = 0; n < faults; n++) {
      const page = trace.pages[n]!;
      const flags = trace.flags[n]!;
      let own = (flags >> FAULT_FLAG.OWN_SHIFT) - 1;
      let owesWake = false;
      let handledBy = t.name;
      if (own < 0) {
        const ref = handled.get(key(t.slot, page));
        if (ref !== undefined) {
          const r = inp.resolvers[ref.resolver]!;
          own = r.trace.info[3 * ref.index + 2]!;
          owesWake = r.owesWake;
          handledBy = r.label;
        } else {
          handledBy = 'nobody: woken by the install';
        }
      }
      const resolution = faultResolution(own, origins[page] ?? ORIGIN.NONE, owesWake);
      resolutions[resolution]++;
      events.push(
        slice(pid, tid, 'fault', resolution, intervals[2 * n]!, intervals[2 * n + 1]!, {
          page,
          access: flags & FAULT_FLAG.WRITE ? 'write' : 'read',
          resolution,
          installedBy: originName(page),
          handledBy,
          wake: wakeIssued(own, owesWake),
        }),
      );
      faultSlices++;
    }
  }

  // Resolvers: a message a slice, overlapping ones in further lanes.
  for (const r of inp.resolvers) {
    const order = Array.from({ length: r.trace.count }, (_, i) => i).sort((a, b) => r.trace.times[2 * a]! - r.trace.times[2 * b]!);
    const laneEnds: number[] = [];
    const laneTids: number[] = [];
    for (const i of order) {
      const start = r.trace.times[2 * i]!;
      const end = r.trace.times[2 * i + 1]!;
      let lane = laneEnds.findIndex((e) => e <= start);
      if (lane < 0) {
        lane = laneEnds.length;
        laneEnds.push(end);
        const tid = nextTid++;
        laneTids.push(tid);
        events.push(...threadName(pid, tid, lane === 0 ? r.label : `${r.label} #${lane + 1}`, tid));
      } else {
        laneEnds[lane] = end;
      }
      const page = r.trace.info[3 * i]!;
      const slot = r.trace.info[3 * i + 1]!;
      const own = r.trace.info[3 * i + 2]!;
      const resolution = faultResolution(own, origins[page] ?? ORIGIN.NONE, r.owesWake);
      events.push(
        slice(pid, laneTids[lane]!, 'resolver', resolution, start, end, {
          page,
          for: slotName.get(slot) ?? `thread slot ${slot}`,
          resolution,
          installedBy: originName(page),
          wake: wakeIssued(own, r.owesWake),
        }),
      );
    }
  }

  // The main thread's installs.
  for (const s of inp.main.slices) {
    events.push(slice(pid, TID.MAIN, s.kind === MAIN_KIND.REQUESTED ? 'main-channel' : 'push', MAIN_KIND_NAMES[s.kind]!, s.startMs, s.endMs, { firstPage: s.page, pages: s.count }));
  }
  for (const p of inp.main.phases) events.push(slice(pid, TID.PHASES, 'migration', p.name, p.startMs, p.endMs));
  for (const p of inp.pauses) events.push(slice(pid, TID.RECOVERY, 'recovery', 'postcopy-paused', p.startMs, p.endMs, { reason: p.reason }));

  // Counters.
  const samples = inp.main.samples;
  let from = 0;
  for (let i = 0; i < samples.length; i++) {
    const s = samples[i]!;
    events.push(counter(pid, 'pages', COUNTER_NAME.RECEIVED, s.atMs, { pages: s.installed }));
    events.push(counter(pid, 'pages', COUNTER_NAME.DEMAND, s.atMs, { pages: s.demand }));
    while (from < i - 1 && samples[from + 1]!.atMs <= s.atMs - THROUGHPUT_WINDOW_MS) from++;
    const base = samples[from]!;
    const dt = (s.atMs - base.atMs) / 1000;
    const mibs = i === 0 || dt <= 0 ? 0 : ((s.pushedData - base.pushedData) * inp.pageSize) / 1024 / 1024 / dt;
    events.push(counter(pid, 'push', COUNTER_NAME.PUSH, s.atMs, { 'MiB/s': Math.round(mibs * 10) / 10 }));
  }

  return {
    doc: { traceEvents: events, displayTimeUnit: 'ms', otherData: { ...inp.otherData, faultSlices } },
    faultSlices,
    resolutions,
  };
}

/** Which of two records of one fault to show: a request of the handler's own, then a suppressed duplicate, then a page found in. */
function rank(resolution: number): number {
  if (ownRequest(resolution)) return 2;
  return resolution === Resolution.ELSEWHERE ? 0 : 1;
}
