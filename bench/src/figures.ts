/** The bench's results: figures (medians of the repeats), the ratios, and the targets they are held to. */

export const BENCH_STRATEGIES = ['shared-uffd', 'per-thread-uffd', 'kvm-exit'] as const;
export type BenchStrategy = (typeof BENCH_STRATEGIES)[number];

export interface P50P99 {
  p50: number;
  p99: number;
}

export interface Ratios {
  kvmExitP50OverFloor: number;
  perThreadP50OverFloor: number;
  sharedUffdP50OverFloor: number;
  urgentUnderPushPreemptOverIdle: number;
  urgentUnderCappedPushPreemptOverIdle: number;
  pushOverBulk: number;
  destRssOverBudget: number;
  sourceRssOverBudget: number;
  tlsFaultP50OverPlain: number;
  tlsPushOverPlain: number;
  precopyRoundOverPush: number;
  precopyDowntimeOverLimit: number;
}

export type RatioName = keyof Ratios;

export const RATIO_NAMES = [
  'kvmExitP50OverFloor',
  'perThreadP50OverFloor',
  'sharedUffdP50OverFloor',
  'urgentUnderPushPreemptOverIdle',
  'urgentUnderCappedPushPreemptOverIdle',
  'pushOverBulk',
  'destRssOverBudget',
  'sourceRssOverBudget',
  'tlsFaultP50OverPlain',
  'tlsPushOverPlain',
  'precopyRoundOverPush',
  'precopyDowntimeOverLimit',
] as const satisfies readonly RatioName[];

export interface Target {
  /** `max`: the ratio must be at most `value`; `min`: at least. */
  kind: 'max' | 'min';
  value: number;
  /** What the ratio compares, in words. */
  meaning: string;
}

/** The targets of issue 3 (shared-uffd has none: it is the baseline). */
export const TARGETS: Partial<Record<RatioName, Target>> = {
  kvmExitP50OverFloor: { kind: 'max', value: 1.5, meaning: 'kvm-exit fault p50 / floor round-trip p50' },
  perThreadP50OverFloor: { kind: 'max', value: 2.5, meaning: 'per-thread-uffd fault p50 / floor round-trip p50' },
  urgentUnderPushPreemptOverIdle: { kind: 'max', value: 2, meaning: 'urgent fault p50 under push with preempt / urgent p50 with push off' },
  pushOverBulk: { kind: 'min', value: 0.6, meaning: 'push throughput / raw bulk throughput' },
  destRssOverBudget: { kind: 'max', value: 1, meaning: 'destination peak RSS / (1.15 x large guest + 256 MiB)' },
  sourceRssOverBudget: { kind: 'max', value: 1, meaning: 'source peak RSS / (1.15 x large guest + 256 MiB)' },
  tlsFaultP50OverPlain: { kind: 'max', value: 1.2, meaning: 'kvm-exit fault p50 over TLS / the same over plain ws://' },
  tlsPushOverPlain: { kind: 'min', value: 0.7, meaning: 'push throughput over TLS / over plain ws://' },
  precopyRoundOverPush: { kind: 'min', value: 0.8, meaning: "precopy's first round (every page) MiB/s / the push throughput of the same bench" },
  precopyDowntimeOverLimit: { kind: 'max', value: 1, meaning: 'measured downtime of a converging precopy / its --downtime-limit' },
};

export const RATIO_MEANINGS: Record<RatioName, string> = {
  kvmExitP50OverFloor: TARGETS.kvmExitP50OverFloor!.meaning,
  perThreadP50OverFloor: TARGETS.perThreadP50OverFloor!.meaning,
  sharedUffdP50OverFloor: 'shared-uffd fault p50 / floor round-trip p50',
  urgentUnderPushPreemptOverIdle: TARGETS.urgentUnderPushPreemptOverIdle!.meaning,
  urgentUnderCappedPushPreemptOverIdle: 'the same with the push capped at 400mbit (--max-postcopy-bandwidth), no target',
  pushOverBulk: TARGETS.pushOverBulk!.meaning,
  destRssOverBudget: TARGETS.destRssOverBudget!.meaning,
  sourceRssOverBudget: TARGETS.sourceRssOverBudget!.meaning,
  tlsFaultP50OverPlain: TARGETS.tlsFaultP50OverPlain!.meaning,
  tlsPushOverPlain: TARGETS.tlsPushOverPlain!.meaning,
  precopyRoundOverPush: TARGETS.precopyRoundOverPush!.meaning,
  precopyDowntimeOverLimit: TARGETS.precopyDowntimeOverLimit!.meaning,
};

export interface TargetResult extends Target {
  ratio: number;
  met: boolean;
}

export interface BenchFigures {
  floor: { roundTripUs: P50P99; bulkMiBs: number };
  /** Fault latency per strategy (µs): 1 vCPU, sequential, push off, --preempt. */
  strategies: Record<BenchStrategy, P50P99>;
  /** Urgent fault latency p50 (µs): kvm-exit, 1 vCPU, random workload. */
  urgent: { pushOff: { p50: number }; pushOn: { p50: number }; pushOnPreempt: { p50: number }; pushCappedPreempt: { p50: number } };
  pushThroughputMiBs: number;
  /** Precopy (phases.ts): its first round's throughput (MiB/s), its downtime and limit (ms). */
  precopy: { roundMiBs: number; downtimeMs: number; downtimeLimitMs: number };
  /** Over TLS (`--tls`): kvm-exit's fault latency (µs) and the push throughput (MiB/s), runs otherwise like the plain ones. */
  tls: { fault: P50P99; pushThroughputMiBs: number };
  /**
   * Postcopy recovery (no target): kvm-exit, 1 vCPU, random workload, push capped
   * at 400mbit, one fault at a quarter of the guest's pages. `pausedMs` is per
   * pause (pause to resume), `elapsedMs` the whole run.
   */
  recovery: { drop: RecoveryFigures; killSource: RecoveryFigures };
  /** One run of a large guest: both hosts' peak RSS. */
  large: { guestBytes: number; vcpus: number; elapsedMs: number; destPeakRssBytes: number; sourcePeakRssBytes: number };
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

/** Ratios of the medians. */
export function ratios(f: BenchFigures): Ratios {
  const floor = f.floor.roundTripUs.p50;
  return {
    kvmExitP50OverFloor: sig4(f.strategies['kvm-exit'].p50 / floor),
    perThreadP50OverFloor: sig4(f.strategies['per-thread-uffd'].p50 / floor),
    sharedUffdP50OverFloor: sig4(f.strategies['shared-uffd'].p50 / floor),
    urgentUnderPushPreemptOverIdle: sig4(f.urgent.pushOnPreempt.p50 / f.urgent.pushOff.p50),
    urgentUnderCappedPushPreemptOverIdle: sig4(f.urgent.pushCappedPreempt.p50 / f.urgent.pushOff.p50),
    pushOverBulk: sig4(f.pushThroughputMiBs / f.floor.bulkMiBs),
    destRssOverBudget: sig4(f.large.destPeakRssBytes / rssBudget(f.large.guestBytes)),
    sourceRssOverBudget: sig4(f.large.sourcePeakRssBytes / rssBudget(f.large.guestBytes)),
    tlsFaultP50OverPlain: sig4(f.tls.fault.p50 / f.strategies['kvm-exit'].p50),
    tlsPushOverPlain: sig4(f.tls.pushThroughputMiBs / f.pushThroughputMiBs),
    precopyRoundOverPush: sig4(f.precopy.roundMiBs / f.pushThroughputMiBs),
    precopyDowntimeOverLimit: sig4(f.precopy.downtimeMs / f.precopy.downtimeLimitMs),
  };
}

export function checkTargets(r: Ratios): Partial<Record<RatioName, TargetResult>> {
  const out: Partial<Record<RatioName, TargetResult>> = {};
  for (const name of RATIO_NAMES) {
    const target = TARGETS[name];
    if (!target) continue;
    const ratio = r[name];
    out[name] = { ...target, ratio, met: target.kind === 'max' ? ratio <= target.value : ratio >= target.value };
  }
  return out;
}
