import { describe, expect, it } from 'vitest';
import { loadUffdNative } from '../memory/uffd-native.js';
import { ATOMICS_FUTEX, FUTEX_SLICE_MS, futexOfKind, loadNativeFutex } from './futex.js';

const load = loadUffdNative();
const EAGAIN = 11;
const ETIMEDOUT = 110;

describe.runIf(load.ok)("futex(2) through the uffd addon (what the emulated userfaultfd's threads sleep on)", () => {
  const native = load.ok ? load.native : undefined!;

  it('does not sleep when the word is not the value given (EAGAIN), and wakes nobody when nobody sleeps', () => {
    const words = new Int32Array(new SharedArrayBuffer(8));
    words[1] = 5;
    expect(native.futexWait(words, 1, 4, 1000)).toBe(-EAGAIN);
    expect(native.futexWake(words, 1, 1)).toBe(0);
  });

  it('sleeps until its timeout when nobody wakes it (ETIMEDOUT)', () => {
    const words = new Int32Array(new SharedArrayBuffer(4));
    const t0 = performance.now();
    expect(native.futexWait(words, 0, 0, 20)).toBe(-ETIMEDOUT);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(15);
  });

  it('refuses what is not an Int32Array, and an index outside it', () => {
    const words = new Int32Array(new SharedArrayBuffer(8));
    expect(() => native.futexWait(new Uint32Array(2) as unknown as Int32Array, 0, 0, 1)).toThrow(TypeError);
    expect(() => native.futexWake(words, 2, 1)).toThrow(RangeError);
    expect(() => native.futexWait(words, -1, 0, 1)).toThrow(RangeError);
  });

  it("sleeps in slices: one wait of the 'futex' kind lasts at most FUTEX_SLICE_MS, so a terminating worker leaves", () => {
    const futex = loadNativeFutex()!;
    expect(futex.kind).toBe('futex');
    const words = new Int32Array(new SharedArrayBuffer(4));
    const t0 = performance.now();
    futex.wait(words, 0, 0, Infinity);
    const took = performance.now() - t0;
    expect(took).toBeGreaterThanOrEqual(FUTEX_SLICE_MS * 0.8);
    expect(took).toBeLessThan(FUTEX_SLICE_MS * 20);
  });
});

describe('the sleep mechanisms by name', () => {
  it("gives V8's Atomics for 'atomics', and the addon's futex for 'futex' where it loads (an error where it does not)", () => {
    expect(futexOfKind('atomics')).toBe(ATOMICS_FUTEX);
    if (load.ok) expect(futexOfKind('futex').kind).toBe('futex');
    else expect(() => futexOfKind('futex')).toThrow(/futexWait/);
  });
});
