import { rng } from '../random.js';

/**
 * A device's DMA on the destination (after the switchover): `accesses` random
 * pages of its DMA ranges, as an I/O thread's pattern (guest/workloads.ts).
 * In a module of its own: the device's thread loads the light core.
 */
export function dmaPattern(ranges: readonly { first: number; count: number }[], seed: number, index: number, accesses: number): { readonly length: number; next(): number } {
  const total = ranges.reduce((n, r) => n + r.count, 0);
  const r = rng(seed * 7 + 0xd3a + index);
  return {
    length: accesses,
    next: () => {
      let k = Math.floor(r() * total);
      for (const range of ranges) {
        if (k < range.count) return range.first + k;
        k -= range.count;
      }
      return ranges[0]!.first;
    },
  };
}
