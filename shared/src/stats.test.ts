import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  LATENCY_DIST_BUCKETS,
  allBlockedMs,
  blockedMs,
  createLatencyHistogram,
  histogramMean,
  latencyBucket,
  recordNs,
  summarize,
} from './stats.js';

const iv = (...times: number[]): Float64Array => Float64Array.from(times);

describe('allBlockedMs (total blocktime: every vCPU blocked at once)', () => {
  it('is 0 without vCPUs or without intervals', () => {
    expect(allBlockedMs([])).toBe(0);
    expect(allBlockedMs([iv()])).toBe(0);
    expect(allBlockedMs([iv(), iv()])).toBe(0);
  });

  it('one vCPU: the sum of its intervals', () => {
    expect(allBlockedMs([iv(0, 1, 3, 7, 10, 10.5)])).toBe(5.5);
    expect(allBlockedMs([iv(2, 5)])).toBe(3);
  });

  it('two vCPUs with partial overlap count only the overlap', () => {
    // vCPU0 blocked 0..10, vCPU1 blocked 6..15: both blocked 6..10.
    expect(allBlockedMs([iv(0, 10), iv(6, 15)])).toBe(4);
    // Two overlaps: [0,4]∩[2,3] = 1, [10,20]∩[15,25] = 5.
    expect(allBlockedMs([iv(0, 4, 10, 20), iv(2, 3, 15, 25)])).toBe(6);
  });

  it('three vCPUs where only two overlap: 0', () => {
    expect(allBlockedMs([iv(0, 10), iv(5, 15), iv(20, 30)])).toBe(0);
    // The third vCPU is never blocked.
    expect(allBlockedMs([iv(0, 10), iv(0, 10), iv()])).toBe(0);
  });

  it('touching intervals on different vCPUs do not overlap', () => {
    expect(allBlockedMs([iv(0, 1), iv(1, 2)])).toBe(0);
    expect(allBlockedMs([iv(1, 2), iv(0, 1)])).toBe(0);
  });

  it('counts all-blocked time once however many vCPUs overlap', () => {
    // Four vCPUs all blocked 0..10: 10 ms, not 40.
    expect(allBlockedMs([iv(0, 10), iv(0, 10), iv(0, 10), iv(0, 10)])).toBe(10);
    // Staggered: all four blocked from 3 (last start) to 7 (first end).
    expect(allBlockedMs([iv(0, 10), iv(1, 9), iv(2, 8), iv(3, 7)])).toBe(4);
    // Two separate all-blocked windows.
    expect(allBlockedMs([iv(0, 5, 20, 30), iv(2, 6, 25, 40), iv(1, 3, 10, 28)])).toBe(1 + 3);
  });

  it('ignores empty and reversed intervals and a dangling start', () => {
    // vCPU0: [0,10] and an empty [12,12]; vCPU1: empty [5,5], reversed [9,4], and [6,9].
    expect(allBlockedMs([iv(0, 10, 12, 12), iv(5, 5, 9, 4, 6, 9)])).toBe(3);
    expect(allBlockedMs([iv(0, 10, 11), iv(2, 4)])).toBe(2);
  });

  it("merges one vCPU's own overlapping intervals, so they never stand in for another vCPU", () => {
    // vCPU0 reports overlapping intervals; vCPU1 is never blocked: no all-blocked time.
    expect(allBlockedMs([iv(0, 10, 5, 15), iv()])).toBe(0);
    expect(allBlockedMs([iv(0, 10, 0, 10), iv(20, 30)])).toBe(0);
    // vCPU0 blocked 0..15 (union), vCPU1 blocked 12..20: overlap 12..15.
    expect(allBlockedMs([iv(0, 10, 5, 15), iv(12, 20)])).toBe(3);
    // Touching intervals of one vCPU: blocked throughout, as is vCPU1.
    expect(allBlockedMs([iv(0, 1, 1, 2), iv(0, 2)])).toBe(2);
    // One vCPU: the union, not the sum.
    expect(allBlockedMs([iv(0, 10, 5, 15)])).toBe(15);
  });
});

describe('blockedMs', () => {
  it('sums one vCPU’s intervals', () => {
    expect(blockedMs(iv())).toBe(0);
    expect(blockedMs(iv(0, 1, 3, 7, 10, 10.5))).toBe(5.5);
    expect(blockedMs(iv(100, 250))).toBe(150);
  });

  it('ignores a dangling start', () => {
    expect(blockedMs(iv(0, 2, 5))).toBe(2);
  });
});

describe('latencyBucket (postcopy-latency-dist, input in ns)', () => {
  const us = 1000;
  it.each([
    [0, 0],
    [0.5 * us, 0],
    [1 * us, 0],
    [1.999 * us, 0],
    [2 * us, 1],
    [3 * us, 1],
    [4 * us, 2],
    [7.9 * us, 2],
    [8 * us, 3],
    [1023 * us, 9],
    [1024 * us, 10],
    [2 ** 22 * us, 22],
    [2 ** 23 * us - 1, 22],
    [2 ** 23 * us, 23],
    [3_600_000_000_000, 23],
    [Number.MAX_SAFE_INTEGER, 23],
  ])('%d ns → bucket %d', (ns, bucket) => {
    expect(latencyBucket(ns)).toBe(bucket);
  });

  it('every power of two µs starts its own bucket', () => {
    for (let n = 1; n < LATENCY_DIST_BUCKETS; n++) {
      expect(latencyBucket(2 ** n * us)).toBe(n);
      expect(latencyBucket(2 ** n * us - 1)).toBe(n - 1);
    }
    expect(LATENCY_DIST_BUCKETS).toBe(24);
  });
});

describe('summarize', () => {
  /** HdrHistogram with 3 significant digits: values are exact to 0.1%. */
  const within = (actual: number, expected: number): void => {
    expect(Math.abs(actual - expected)).toBeLessThanOrEqual(expected * 0.001);
  };

  it('percentiles of 1..1000 µs', () => {
    const histogram = createLatencyHistogram();
    for (let us = 1; us <= 1000; us++) recordNs(histogram, us * 1000);
    const s = summarize(histogram);
    expect(s.count).toBe(1000);
    within(s.p50, 500);
    within(s.p90, 900);
    within(s.p99, 990);
    within(s.p999, 999);
    within(s.max, 1000);
    within(s.mean, 500.5);
    expect(s.p50).toBeLessThan(s.p90);
    expect(s.p90).toBeLessThan(s.p99);
    expect(s.p99).toBeLessThanOrEqual(s.p999);
    expect(s.p999).toBeLessThanOrEqual(s.max);
  });

  it('is all zeros for an empty histogram', () => {
    expect(summarize(createLatencyHistogram())).toEqual({ count: 0, p50: 0, p90: 0, p99: 0, p999: 0, max: 0, mean: 0 });
  });

  it('records sub-nanosecond and fractional latencies as at least 1 ns', () => {
    const histogram = createLatencyHistogram();
    recordNs(histogram, 0);
    recordNs(histogram, 0.2);
    recordNs(histogram, 2.6);
    const s = summarize(histogram);
    expect(s.count).toBe(3);
    expect(s.max).toBe(0.003);
  });
});

describe('histogramMean', () => {
  it("equals hdr-histogram-js's own mean, to the last bit", () => {
    fc.assert(
      fc.property(fc.array(fc.oneof(fc.integer({ min: 0, max: 5000 }), fc.double({ min: 0, max: 3.6e12, noNaN: true })), { maxLength: 400 }), (values) => {
        const histogram = createLatencyHistogram();
        for (const ns of values) recordNs(histogram, ns);
        expect(histogramMean(histogram)).toBe(histogram.mean);
      }),
      { numRuns: 200 },
    );
  });
});
