import { createRequire } from 'node:module';
import type * as HdrHistogram from 'hdr-histogram-js';

/**
 * hdr-histogram-js, loaded on first use: it (and pako under it) costs a
 * process about 40 ms of CPU to load, and the launcher and the source import
 * this index without ever making a histogram (their start-up is on the path
 * of every run; issue: `largeWallOverElapsed`). It is CommonJS, so a
 * synchronous require loads it where it is first needed.
 */
let hdrLibrary: typeof HdrHistogram | undefined;
function hdr(): typeof HdrHistogram {
  return (hdrLibrary ??= createRequire(import.meta.url)('hdr-histogram-js') as typeof HdrHistogram);
}

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

export type Histogram = ReturnType<typeof HdrHistogram.build>;

/** A histogram of fault latencies recorded in nanoseconds (1 ns to 1 hour, 3 significant digits). */
export function createLatencyHistogram(): Histogram {
  return hdr().build({
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
  // A percentile is reported as the highest value equivalent to its bucket,
  // which can exceed the largest value recorded: clamp so p99.9 <= max.
  const at = (p: number): number => us(Math.min(histogram.getValueAtPercentile(p), histogram.maxValue));
  return {
    count,
    p50: at(50),
    p90: at(90),
    p99: at(99),
    p999: at(99.9),
    max: us(histogram.maxValue),
    mean: us(histogramMean(histogram)),
  };
}

/** What {@link histogramMean} reads of hdr-histogram-js's JsHistogram (the class every histogram here is: no WebAssembly). */
interface CountsArray {
  countsArrayLength: number;
  totalCount: number;
  getCountAtIndex(index: number): number;
  valueFromIndex(index: number): number;
  medianEquivalentValue(value: number): number;
}

/**
 * `histogram.mean`, the same value computed the same way (each bucket's
 * median equivalent value times its count, summed in bucket order, over the
 * total count) in one plain pass over the counts: the library's getter walks
 * a recorded-values iterator that costs about 10 ms a histogram, and a
 * 32-vCPU report summarizes 35 of them after the run (issue:
 * `largeWallOverElapsed`).
 */
export function histogramMean(histogram: Histogram): number {
  const h = histogram as unknown as Partial<CountsArray>;
  if (typeof h.countsArrayLength !== 'number' || typeof h.getCountAtIndex !== 'function' || typeof h.valueFromIndex !== 'function' || typeof h.medianEquivalentValue !== 'function') {
    return histogram.mean;
  }
  const counts = h as CountsArray;
  const total = counts.totalCount;
  if (total === 0) return 0;
  let seen = 0;
  let totalValue = 0;
  for (let i = 0; i < counts.countsArrayLength && seen < total; i++) {
    const count = counts.getCountAtIndex(i);
    if (count === 0) continue;
    seen += count;
    totalValue += counts.medianEquivalentValue(counts.valueFromIndex(i)) * count;
  }
  return totalValue / total;
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
    // Merge this vCPU's own intervals first: if they overlapped, a plain depth
    // count would let one vCPU stand in for another that is not blocked.
    const own: [number, number][] = [];
    for (let i = 0; i + 1 < list.length; i += 2) {
      const start = list[i]!;
      const end = list[i + 1]!;
      if (end > start) own.push([start, end]);
    }
    own.sort((a, b) => a[0] - b[0]);
    let current: [number, number] | undefined;
    for (const interval of own) {
      if (current && interval[0] < current[1]) {
        current[1] = Math.max(current[1], interval[1]);
      } else {
        if (current) events.push({ t: current[0], d: +1 }, { t: current[1], d: -1 });
        current = [interval[0], interval[1]];
      }
    }
    if (current) events.push({ t: current[0], d: +1 }, { t: current[1], d: -1 });
  }
  // Ends before starts at equal times: touching intervals do not overlap.
  events.sort((a, b) => a.t - b.t || a.d - b.d);
  // Each vCPU now contributes at most 1 to the depth at any time, so depth ===
  // vcpus exactly when every vCPU is blocked.
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
