import { describe, expect, it } from 'vitest';
import { warmUpRoundSizes } from './v8-tiering.js';

describe("the warm-ups' rounds", () => {
  it('with a share of a half are two halves, the larger first, a single unit one round, nothing none', () => {
    expect(warmUpRoundSizes(1024, 0.5)).toEqual([512, 512]);
    expect(warmUpRoundSizes(65, 0.5)).toEqual([33, 32]);
    expect(warmUpRoundSizes(2, 0.5)).toEqual([1, 1]);
    expect(warmUpRoundSizes(1, 0.5)).toEqual([1]);
    expect(warmUpRoundSizes(0, 0.5)).toEqual([]);
    expect(warmUpRoundSizes(-3, 0.5)).toEqual([]);
  });

  it("give the first round the share asked for, at least one unit, and the second the rest", () => {
    expect(warmUpRoundSizes(1024, 0.25)).toEqual([256, 768]);
    expect(warmUpRoundSizes(65, 0.25)).toEqual([17, 48]);
    expect(warmUpRoundSizes(3, 0.25)).toEqual([1, 2]);
    expect(warmUpRoundSizes(2, 0.25)).toEqual([1, 1]);
    expect(warmUpRoundSizes(2, 0.9)).toEqual([1, 1]);
    expect(warmUpRoundSizes(1, 0.25)).toEqual([1]);
    expect(() => warmUpRoundSizes(1024, 0)).toThrow(RangeError);
    expect(() => warmUpRoundSizes(1024, 1)).toThrow(RangeError);
  });
});
