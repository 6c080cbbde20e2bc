import { describe, expect, it } from 'vitest';
import { checkTargets, rankByRate, rankingInversions, ratioDefs } from '../src/figures.js';

const rates = (shared: number, perThread: number, kvmExit: number) => ({ 'shared-uffd': shared, 'per-thread-uffd': perThread, 'kvm-exit': kvmExit });

describe('the ranking of the strategies against the native floor', () => {
  it('counts the pairs ordered otherwise (0 = the same ranking, 3 = reversed)', () => {
    const native = rates(80, 100, 200);
    expect(rankingInversions(rates(8, 10, 20), native)).toBe(0);
    expect(rankingInversions(rates(10, 8, 20), native)).toBe(1);
    expect(rankingInversions(rates(21, 9, 12), native)).toBe(2);
    expect(rankingInversions(rates(21, 12, 9), native)).toBe(3);
  });

  it('a pair the native floor ties is no inversion; a tie of the tool where the native floor orders is one', () => {
    expect(rankingInversions(rates(10, 5, 20), rates(100, 100, 200))).toBe(0);
    expect(rankingInversions(rates(10, 10, 20), rates(80, 100, 200))).toBe(1);
  });

  it("a pair whose native runs overlap is a tie: the floor's own repeats order it both ways", () => {
    const native = rates(54.7, 55.4, 112);
    // The tool puts shared-uffd first; the native medians say per-region, by 1 %.
    expect(rankingInversions(rates(18, 17, 22), native)).toBe(1);
    // The floor's runs: shared 53-57 k, per-region 54-56 k: they overlap, no inversion.
    expect(rankingInversions(rates(18, 17, 22), native, { 'shared-uffd': [53, 57], 'per-thread-uffd': [54, 56], 'kvm-exit': [110, 114] })).toBe(0);
    // Apart (shared 50-53 k, per-region 54-56 k): the order counts again.
    expect(rankingInversions(rates(18, 17, 22), native, { 'shared-uffd': [50, 53], 'per-thread-uffd': [54, 56], 'kvm-exit': [110, 114] })).toBe(1);
    // A strategy whose floor ran once has no range: its pairs count by the medians.
    expect(rankingInversions(rates(18, 17, 22), native, { 'shared-uffd': undefined, 'per-thread-uffd': [54, 56], 'kvm-exit': [110, 114] })).toBe(1);
  });

  it('ranks from the highest rate', () => {
    expect(rankByRate(rates(21.8, 8.6, 12))).toEqual(['shared-uffd', 'kvm-exit', 'per-thread-uffd']);
  });
});

describe('ratios and targets', () => {
  it('names the rate ratios after the throughput runs\' vCPU counts', () => {
    const names = ratioDefs([8, 16], 32).map((d) => d.name);
    expect(names).toEqual(expect.arrayContaining(['sharedUffdRateOverNative8', 'perThreadRateOverNative16', 'kvmExitRateOverNative16', 'rankingInversions8', 'rankingInversions16']));
    expect(new Set(names).size).toBe(names.length);
  });

  it('holds each measured ratio to its target and skips those not measured', () => {
    const defs = ratioDefs([8], 32);
    const targets = checkTargets({ kvmExitP50OverFloor: 1.2, pushOverNetCeiling: 0.95, rankingInversions8: 0 }, defs);
    expect(targets.kvmExitP50OverFloor).toMatchObject({ kind: 'max', value: 1.1, met: false });
    expect(targets.pushOverNetCeiling).toMatchObject({ kind: 'min', value: 0.9, met: true });
    expect(targets.rankingInversions8).toMatchObject({ met: true });
    expect(targets.sharedUffdRateOverNative8).toBeUndefined();
  });
});
