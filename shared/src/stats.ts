import hdr from 'hdr-histogram-js';

/** Latency percentiles in microseconds, as the report prints them. */
export interface LatencySummary {
  count: number;
  p50: number;
  p90: number;
  p99: number;
  p999: number;
  max: number;
  mean: number;
}

export type Histogram = ReturnType<typeof hdr.build>;

/** A histogram of fault latencies recorded in nanoseconds (1 ns to 1 hour, 3 significant digits). */
export function createLatencyHistogram(): Histogram {
  return hdr.build({
    bitBucketSize: 64,
    lowestDiscernibleValue: 1,
    highestTrackableValue: 3_600_000_000_000,
    numberOfSignificantValueDigits: 3,
    useWebAssembly: false,
  });
}

export function recordNs(histogram: Histogram, latencyNs: number): void {
  histogram.recordValue(Math.max(1, Math.round(latencyNs)));
}

const round3 = (x: number): number => Math.round(x * 1000) / 1000;

export function summarize(histogram: Histogram): LatencySummary {
  const count = histogram.totalCount;
  if (count === 0) return { count: 0, p50: 0, p90: 0, p99: 0, p999: 0, max: 0, mean: 0 };
  const us = (ns: number): number => round3(ns / 1000);
  return {
    count,
    p50: us(histogram.getValueAtPercentile(50)),
    p90: us(histogram.getValueAtPercentile(90)),
    p99: us(histogram.getValueAtPercentile(99)),
    p999: us(histogram.getValueAtPercentile(99.9)),
    max: us(histogram.maxValue),
    mean: us(histogram.mean),
  };
}

/**
 * QEMU's `postcopy-latency-dist`: 24 buckets, bucket N counts faults with
 * latency in [2^N µs, 2^(N+1) µs); bucket 0 also takes everything below 1 µs
 * and the last bucket everything above (QEMU migration/postcopy-ram.c,
 * `blocktime_latency_dist`).
 */
export const LATENCY_DIST_BUCKETS = 24;

export function latencyBucket(latencyNs: number): number {
  const us = latencyNs / 1000;
  if (us < 2) return 0;
  return Math.min(LATENCY_DIST_BUCKETS - 1, Math.floor(Math.log2(us)));
}

/**
 * Total blocktime in QEMU's sense: the time during which every vCPU was
 * blocked on a fault at once. `intervals[v]` holds vCPU v's blocked intervals
 * as [start, end, start, end, ...] (ms, one clock). Overlaps within one vCPU
 * are merged first, so time is counted once.
 */
export function allBlockedMs(intervals: readonly Float64Array[]): number {
  const vcpus = intervals.length;
  if (vcpus === 0) return 0;
  const events: { t: number; d: number }[] = [];
  for (const list of intervals) {
    for (let i = 0; i + 1 < list.length; i += 2) {
      const start = list[i]!;
      const end = list[i + 1]!;
      if (end > start) {
        events.push({ t: start, d: +1 }, { t: end, d: -1 });
      }
    }
  }
  // Ends before starts at equal times: touching intervals do not overlap.
  events.sort((a, b) => a.t - b.t || a.d - b.d);
  // Per-vCPU overlap would double-count; vCPUs block on one fault at a time, so
  // their own intervals never overlap and a plain depth count is exact.
  let depth = 0;
  let since = 0;
  let total = 0;
  for (const e of events) {
    if (e.d > 0) {
      depth++;
      if (depth === vcpus) since = e.t;
    } else {
      if (depth === vcpus) total += e.t - since;
      depth--;
    }
  }
  return total;
}

/** Sum of one vCPU's blocked intervals (ms). */
export function blockedMs(list: Float64Array): number {
  let total = 0;
  for (let i = 0; i + 1 < list.length; i += 2) total += list[i + 1]! - list[i]!;
  return total;
}
