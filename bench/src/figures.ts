/** The bench's results: figures (medians of the repeats), the ratios, and the targets they are held to. */
// native-floor.ts imports median from here: use its values only inside functions (no cycle at load time).
import { NATIVE_COUNTERPART } from './native-floor.js';
import type { CpuGroup } from '@postcopy/shared';

export const BENCH_STRATEGIES = ['shared-uffd', 'per-thread-uffd', 'kvm-exit'] as const;
export type BenchStrategy = (typeof BENCH_STRATEGIES)[number];

/** How a strategy is spelled in ratio names (`perThreadP50OverFloor`, `kvmExitRateOverNative8`). */
export const STRATEGY_KEY: Record<BenchStrategy, string> = {
  'shared-uffd': 'sharedUffd',
  'per-thread-uffd': 'perThread',
  'kvm-exit': 'kvmExit',
};

export interface P50P99 {
  p50: number;
  p99: number;
}

/** Ratio names: the fixed ones, and those of each vCPU count of the throughput runs (see {@link ratioDefs}). */
export type RatioName = string;
export type Ratios = Record<RatioName, number>;

export interface Target {
  /** `max`: the ratio must be at most `value`; `min`: at least. */
  kind: 'max' | 'min';
  value: number;
}

/** One ratio the bench computes: its name, what it compares, and its target if it has one. */
export interface RatioDef {
  name: RatioName;
  meaning: string;
  target?: Target;
}

export interface TargetResult extends Target {
  ratio: number;
  met: boolean;
  meaning: string;
}

/** Demand paging rate (pages/s) and fault p50 (µs) of one throughput run. */
export interface RateFigures {
  pagesPerSec: number;
  p50Us: number;
  /** The native floor's runs: the lowest and highest rate of its repeats (its own spread, for ties). */
  pagesPerSecRange?: [number, number];
  /** The tool's runs: CPU µs per fault of each process and thread group (medians; null: unknown here). */
  cpuPerFaultUs?: Record<CpuGroup, number | null>;
}

/** The tool against the native floor: demand paging rates with many vCPUs (issue 9). */
export interface ThroughputFigures {
  /** vCPU counts, in the order run. */
  vcpus: number[];
  mibPerVcpu: number;
  /** Per strategy, per vCPU count (a string key: JSON has no number keys): with --preempt, as the floor. */
  tool: Record<BenchStrategy, Record<string, RateFigures>>;
  /** The same runs without --preempt (requested pages on the main channel): a figure, no target. */
  toolDefaults: Record<BenchStrategy, Record<string, RateFigures>>;
  /** The native floor's counterpart of each strategy (NATIVE_COUNTERPART), or why there is none on this machine. */
  native: Record<BenchStrategy, Record<string, RateFigures>> | { unavailable: string };
}

export interface BenchFigures {
  floor: { roundTripUs: P50P99; bulkMiBs: number };
  /**
   * The ceiling of Node's own sockets (net-ceiling.ts): a `net` stream between
   * two Node processes received into a SharedArrayBuffer, sent from memory of
   * the stream's size: with `onread` (the ceiling) and with `'data'` events
   * (what `ws` reads with; a figure); and with `onread` from the sender's 16
   * MiB image alone (a figure: only the receiver touches fresh memory).
   */
  netCeiling: { mib: number; onreadMiBs: number; dataMiBs: number; onreadImageMiBs: number };
  /** Fault latency per strategy (µs): 1 vCPU, sequential, push off, --preempt; with the run's CPU µs per fault. */
  strategies: Record<BenchStrategy, P50P99 & { cpuPerFaultUs: Record<CpuGroup, number | null> }>;
  throughput: ThroughputFigures;
  /** Urgent fault latency p50 (µs): kvm-exit, 1 vCPU, random workload. */
  urgent: { pushOff: { p50: number }; pushOn: { p50: number }; pushOnPreempt: { p50: number }; pushCappedPreempt: { p50: number } };
  /** The idle push: one vCPU touching one page of a `pushGuestBytes` guest (MiB/s). */
  pushThroughputMiBs: number;
  pushGuestBytes: number;
  /** Precopy (phases.ts): its first round's throughput (MiB/s), its downtime and limit (ms). */
  precopy: { roundMiBs: number; downtimeMs: number; downtimeLimitMs: number };
  /** Over TLS (`--tls`): kvm-exit's fault latency (µs) and the push throughput (MiB/s), runs otherwise like the plain ones. */
  tls: { fault: P50P99; pushThroughputMiBs: number };
  /** With `--trace`: kvm-exit's fault latency (µs), the push throughput (MiB/s), shared-uffd's demand paging rate at `rate.vcpus` (pages/s). */
  trace: { fault: P50P99; pushThroughputMiBs: number; rate: { vcpus: number; pagesPerSec: number } };
  /**
   * Postcopy recovery (no target): kvm-exit, 1 vCPU, random workload, push capped
   * at 400mbit, one fault at a quarter of the guest's pages. `pausedMs` is per
   * pause (pause to resume), `elapsedMs` the whole run.
   */
  recovery: { drop: RecoveryFigures; killSource: RecoveryFigures };
  /**
   * The large guest (`npm start -- --memory L --vcpus N`, defaults otherwise):
   * both hosts' peak RSS, its push throughput with N faulting vCPUs, the
   * migration's elapsed time and the whole launcher process's (start to exit).
   */
  large: {
    guestBytes: number;
    vcpus: number;
    elapsedMs: number;
    /** The `npm start` process (the launcher, without the build), from spawn to exit. */
    wallMs: number;
    pushThroughputMiBs: number;
    /** The idle push (one vCPU touching one page) of a guest of the same size (MiB/s). */
    idlePushThroughputMiBs: number;
    destPeakRssBytes: number;
    sourcePeakRssBytes: number;
  };
}

/** Medians of a recovery run's figures over the repeats. */
export interface RecoveryFigures {
  /** Time paused per pause (ms): from the pause to the source answering resume. */
  pausedMs: number;
  /** The run's time (ms). */
  elapsedMs: number;
  /** Pages lost in flight and sent again (a restarted source cannot know: 0 after kill-source). */
  pagesResent: number;
  /** Pending page requests the destination sent again after the resume. */
  requestsReplayed: number;
}

/** The memory budget of each host for a guest: 1.15 x guest + 256 MiB. */
export function rssBudget(guestBytes: number): number {
  return 1.15 * guestBytes + 256 * 1024 * 1024;
}

/** Median; with an even count, the mean of the two middle values. */
export function median(values: readonly number[]): number {
  if (values.length === 0) throw new Error('expected at least one value for a median, got none');
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** Four significant digits: readable, and never rounds a positive ratio to 0. */
export const sig4 = (x: number): number => Number(x.toPrecision(4));

/** Issue 9's target for each strategy's demand paging rate over its native counterpart. */
export const RATE_OVER_NATIVE_TARGET = 0.3;

export const rateRatioName = (s: BenchStrategy, vcpus: number): RatioName => `${STRATEGY_KEY[s]}RateOverNative${vcpus}`;
export const rankingRatioName = (vcpus: number): RatioName => `rankingInversions${vcpus}`;

/**
 * Every ratio of a bench whose throughput runs use `throughputVcpus` and
 * whose large guest has `largeVcpus`, in the order printed. Targets: issue 3
 * (latency, RSS, TLS), issue 10 (precopy), issue 9 (rates against the native floor, their
 * ranking, push against the net ceiling, the large guest; kvm-exit's p50 and
 * the urgent fault's, tightened).
 */
export function ratioDefs(throughputVcpus: readonly number[], largeVcpus: number): RatioDef[] {
  const defs: RatioDef[] = [
    { name: 'kvmExitP50OverFloor', meaning: 'kvm-exit fault p50 / floor round-trip p50', target: { kind: 'max', value: 1.1 } },
    { name: 'perThreadP50OverFloor', meaning: 'per-thread-uffd fault p50 / floor round-trip p50', target: { kind: 'max', value: 2.5 } },
    { name: 'sharedUffdP50OverFloor', meaning: 'shared-uffd fault p50 / floor round-trip p50' },
  ];
  for (const v of throughputVcpus) {
    for (const s of BENCH_STRATEGIES) {
      defs.push({
        name: rateRatioName(s, v),
        meaning: `${s} demand paging rate / native ${NATIVE_COUNTERPART[s]}, ${v} vCPUs`,
        target: { kind: 'min', value: RATE_OVER_NATIVE_TARGET },
      });
    }
    defs.push({
      name: rankingRatioName(v),
      meaning: `pairs of strategies ranked otherwise than the native floor ranks their counterparts, ${v} vCPUs (0 = same ranking)`,
      target: { kind: 'max', value: 0 },
    });
  }
  defs.push(
    { name: 'urgentUnderPushPreemptOverIdle', meaning: 'urgent fault p50 under push with preempt / urgent p50 with push off', target: { kind: 'max', value: 1.5 } },
    { name: 'urgentUnderCappedPushPreemptOverIdle', meaning: 'the same with the push capped at 400mbit (--max-postcopy-bandwidth), no target' },
    { name: 'pushOverNetCeiling', meaning: "idle push throughput (1 vCPU) / net ceiling (Node's net, onread, into a SharedArrayBuffer)", target: { kind: 'min', value: 0.9 } },
    { name: 'pushOverBulk', meaning: 'idle push throughput / ws bulk floor throughput', target: { kind: 'min', value: 0.6 } },
    {
      name: 'largePushOverIdlePush',
      meaning: `push throughput of the large guest with ${largeVcpus} faulting vCPUs / idle push throughput`,
      target: { kind: 'min', value: 0.6 },
    },
    {
      name: 'largePushOverLargeIdlePush',
      meaning: `the same / the idle push of a guest of the large guest's size: the faulting vCPUs' share apart from the size's, no target`,
    },
    { name: 'largeElapsedOverPushTime', meaning: 'large guest elapsed / (guest size / idle push throughput)', target: { kind: 'max', value: 1.3 } },
    { name: 'largeWallOverElapsed', meaning: 'large guest: whole npm start process (no build), start to exit / its elapsed', target: { kind: 'max', value: 1.3 } },
    { name: 'destRssOverBudget', meaning: 'destination peak RSS / (1.15 x large guest + 256 MiB)', target: { kind: 'max', value: 1 } },
    { name: 'sourceRssOverBudget', meaning: 'source peak RSS / (1.15 x large guest + 256 MiB)', target: { kind: 'max', value: 1 } },
    { name: 'tlsFaultP50OverPlain', meaning: 'kvm-exit fault p50 over TLS / the same over plain ws://', target: { kind: 'max', value: 1.2 } },
    { name: 'tlsPushOverPlain', meaning: 'push throughput over TLS / over plain ws://', target: { kind: 'min', value: 0.7 } },
    { name: 'traceFaultP50OverOff', meaning: 'kvm-exit fault p50 with --trace / without', target: { kind: 'max', value: 1.05 } },
    { name: 'tracePushOverOff', meaning: 'push throughput with --trace / without', target: { kind: 'min', value: 0.95 } },
    { name: 'traceRateOverOff', meaning: 'shared-uffd demand paging rate (the first --throughput-vcpus) with --trace / without', target: { kind: 'min', value: 0.95 } },
    { name: 'precopyRoundOverPush', meaning: "precopy's first round (every page) MiB/s / the push throughput of the same bench", target: { kind: 'min', value: 0.8 } },
    { name: 'precopyDowntimeOverLimit', meaning: 'measured downtime of a converging precopy / its --downtime-limit', target: { kind: 'max', value: 1 } },
  );
  return defs;
}

/** Strategies from the highest rate to the lowest (a tie keeps BENCH_STRATEGIES order). */
export function rankByRate(rates: Record<BenchStrategy, number>): BenchStrategy[] {
  return [...BENCH_STRATEGIES].sort((a, b) => rates[b] - rates[a]);
}

/**
 * Pairs of strategies the tool orders otherwise than the native floor orders
 * their counterparts (Kendall's distance: 0 = the same ranking, 3 = reversed).
 * A pair the native floor ties is no inversion whichever way the tool orders
 * it: equal rates, or, given the floor's `ranges` (the lowest and highest rate
 * of its repeats), ranges that overlap, as the floor's own runs then order
 * the pair both ways.
 */
export function rankingInversions(
  tool: Record<BenchStrategy, number>,
  native: Record<BenchStrategy, number>,
  ranges?: Record<BenchStrategy, [number, number] | undefined>,
): number {
  let inversions = 0;
  for (let i = 0; i < BENCH_STRATEGIES.length; i++) {
    for (let j = i + 1; j < BENCH_STRATEGIES.length; j++) {
      const a = BENCH_STRATEGIES[i]!;
      const b = BENCH_STRATEGIES[j]!;
      const ra = ranges?.[a];
      const rb = ranges?.[b];
      if (ra && rb && ra[0] <= rb[1] && rb[0] <= ra[1]) continue;
      const n = Math.sign(native[a] - native[b]);
      if (n !== 0 && Math.sign(tool[a] - tool[b]) !== n) inversions++;
    }
  }
  return inversions;
}

/** The native floor's spread at one vCPU count (undefined where it ran once). */
export function rangesAt(figures: Record<BenchStrategy, Record<string, RateFigures>>, vcpus: number): Record<BenchStrategy, [number, number] | undefined> {
  const out = {} as Record<BenchStrategy, [number, number] | undefined>;
  for (const s of BENCH_STRATEGIES) out[s] = figures[s][String(vcpus)]!.pagesPerSecRange;
  return out;
}

/** The rates of every strategy at one vCPU count. */
export function ratesAt(figures: Record<BenchStrategy, Record<string, RateFigures>>, vcpus: number): Record<BenchStrategy, number> {
  const out = {} as Record<BenchStrategy, number>;
  for (const s of BENCH_STRATEGIES) out[s] = figures[s][String(vcpus)]!.pagesPerSec;
  return out;
}

export function nativeAvailable(t: ThroughputFigures): t is ThroughputFigures & { native: Record<BenchStrategy, Record<string, RateFigures>> } {
  return !('unavailable' in t.native);
}

/** Ratios of the medians (those of the native floor only where it ran). */
export function ratios(f: BenchFigures): Ratios {
  const floor = f.floor.roundTripUs.p50;
  const r: Ratios = {
    kvmExitP50OverFloor: sig4(f.strategies['kvm-exit'].p50 / floor),
    perThreadP50OverFloor: sig4(f.strategies['per-thread-uffd'].p50 / floor),
    sharedUffdP50OverFloor: sig4(f.strategies['shared-uffd'].p50 / floor),
  };
  const t = f.throughput;
  if (nativeAvailable(t)) {
    for (const v of t.vcpus) {
      for (const s of BENCH_STRATEGIES) r[rateRatioName(s, v)] = sig4(t.tool[s][String(v)]!.pagesPerSec / t.native[s][String(v)]!.pagesPerSec);
      r[rankingRatioName(v)] = rankingInversions(ratesAt(t.tool, v), ratesAt(t.native, v), rangesAt(t.native, v));
    }
  }
  const pushTimeMs = (f.large.guestBytes / 1048576 / f.pushThroughputMiBs) * 1000;
  Object.assign(r, {
    urgentUnderPushPreemptOverIdle: sig4(f.urgent.pushOnPreempt.p50 / f.urgent.pushOff.p50),
    urgentUnderCappedPushPreemptOverIdle: sig4(f.urgent.pushCappedPreempt.p50 / f.urgent.pushOff.p50),
    pushOverNetCeiling: sig4(f.pushThroughputMiBs / f.netCeiling.onreadMiBs),
    pushOverBulk: sig4(f.pushThroughputMiBs / f.floor.bulkMiBs),
    largePushOverIdlePush: sig4(f.large.pushThroughputMiBs / f.pushThroughputMiBs),
    largePushOverLargeIdlePush: sig4(f.large.pushThroughputMiBs / f.large.idlePushThroughputMiBs),
    largeElapsedOverPushTime: sig4(f.large.elapsedMs / pushTimeMs),
    largeWallOverElapsed: sig4(f.large.wallMs / f.large.elapsedMs),
    destRssOverBudget: sig4(f.large.destPeakRssBytes / rssBudget(f.large.guestBytes)),
    sourceRssOverBudget: sig4(f.large.sourcePeakRssBytes / rssBudget(f.large.guestBytes)),
    tlsFaultP50OverPlain: sig4(f.tls.fault.p50 / f.strategies['kvm-exit'].p50),
    tlsPushOverPlain: sig4(f.tls.pushThroughputMiBs / f.pushThroughputMiBs),
    traceFaultP50OverOff: sig4(f.trace.fault.p50 / f.strategies['kvm-exit'].p50),
    tracePushOverOff: sig4(f.trace.pushThroughputMiBs / f.pushThroughputMiBs),
    traceRateOverOff: sig4(f.trace.rate.pagesPerSec / f.throughput.tool['shared-uffd'][String(f.trace.rate.vcpus)]!.pagesPerSec),
    precopyRoundOverPush: sig4(f.precopy.roundMiBs / f.pushThroughputMiBs),
    precopyDowntimeOverLimit: sig4(f.precopy.downtimeMs / f.precopy.downtimeLimitMs),
  });
  return r;
}

/** The verdict of every target whose ratio was measured. */
export function checkTargets(r: Ratios, defs: readonly RatioDef[]): Record<RatioName, TargetResult> {
  const out: Record<RatioName, TargetResult> = {};
  for (const def of defs) {
    const ratio = r[def.name];
    if (!def.target || ratio === undefined) continue;
    const t = def.target;
    out[def.name] = { ...t, meaning: def.meaning, ratio, met: t.kind === 'max' ? ratio <= t.value : ratio >= t.value };
  }
  return out;
}
