import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { loadAddon } from './addon.js';
import { SEGMENT_HASH_BYTES, SEGMENT_HASH_STRIPE, SegmentHasher, type SegmentHashCode } from './segment-hash.js';

function hashWith(code: SegmentHashCode, ...runs: Uint8Array[]): string {
  const h = new SegmentHasher(code);
  for (const run of runs) h.update(run);
  const out = new Uint8Array(SEGMENT_HASH_BYTES);
  h.digestInto(out, 0);
  return Buffer.from(out).toString('hex');
}

/** Bytes at a 4-byte aligned offset of their own buffer (randomBytes may hand out pooled, unaligned views). */
function aligned(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(bytes);
}

// Every test runs on both: the addon's lanes (where it is built: on Linux
// with a compiler, as in CI) and the TypeScript loop (a host without it).
describe.each(['auto', 'js'] as const)('SegmentHasher (%s)', (code) => {
  const hashOf = (...runs: Uint8Array[]): string => hashWith(code, ...runs);
  const SegmentHasherOf = (): SegmentHasher => new SegmentHasher(code);

  it('gives the protocol\u2019s hash (version 9): both hosts must agree on these bytes', () => {
    // A fixed input whose hash pins the algorithm: lanes, primes, seeds, the
    // rounds folded in, the avalanche and the byte order. A change here is a
    // protocol change (PROTOCOL_VERSION).
    const words = new Uint32Array(64);
    for (let i = 0; i < words.length; i++) words[i] = Math.imul(i + 1, 0x01000193) >>> 0;
    const bytes = new Uint8Array(words.buffer);
    expect(hashOf()).toBe(EMPTY);
    expect(hashOf(bytes)).toBe(FIXED);
  });

  it('gives the same hash for the same bytes in any split into stripes', () => {
    const bytes = aligned(randomBytes(64 * SEGMENT_HASH_STRIPE));
    const whole = hashOf(bytes);
    expect(hashOf(bytes.subarray(0, SEGMENT_HASH_STRIPE), bytes.subarray(SEGMENT_HASH_STRIPE))).toBe(whole);
    expect(hashOf(bytes.subarray(0, 40 * SEGMENT_HASH_STRIPE), bytes.subarray(40 * SEGMENT_HASH_STRIPE, 41 * SEGMENT_HASH_STRIPE), bytes.subarray(41 * SEGMENT_HASH_STRIPE))).toBe(whole);
    const h = SegmentHasherOf();
    h.update(aligned(randomBytes(SEGMENT_HASH_STRIPE)));
    h.reset();
    h.update(bytes);
    const out = new Uint8Array(SEGMENT_HASH_BYTES + 8);
    h.digestInto(out, 8);
    expect(Buffer.from(out.subarray(8)).toString('hex')).toBe(whole);
  });

  it('changes with any one word changed, with the length, and with the order of the stripes', () => {
    const bytes = aligned(randomBytes(32 * SEGMENT_HASH_STRIPE));
    const whole = hashOf(bytes);
    const words = new Uint32Array(bytes.buffer);
    for (let w = 0; w < words.length; w++) {
      const copy = new Uint32Array(words);
      copy[w] = (copy[w]! + 1) >>> 0;
      expect(hashOf(new Uint8Array(copy.buffer)), `word ${w}`).not.toBe(whole);
    }
    // All zeros of two lengths (zero pages): the number of rounds tells them apart.
    expect(hashOf(new Uint8Array(SEGMENT_HASH_STRIPE))).not.toBe(hashOf(new Uint8Array(2 * SEGMENT_HASH_STRIPE)));
    const swapped = new Uint8Array(bytes.length);
    swapped.set(bytes.subarray(SEGMENT_HASH_STRIPE), 0);
    swapped.set(bytes.subarray(0, SEGMENT_HASH_STRIPE), bytes.length - SEGMENT_HASH_STRIPE);
    expect(hashOf(swapped)).not.toBe(whole);
  });

  it('refuses runs that are not whole stripes at aligned offsets', () => {
    const h = SegmentHasherOf();
    expect(() => h.update(new Uint8Array(SEGMENT_HASH_STRIPE + 4))).toThrow(`expected a run of a multiple of ${SEGMENT_HASH_STRIPE} bytes, got ${SEGMENT_HASH_STRIPE + 4}`);
    expect(() => h.update(new Uint8Array(new ArrayBuffer(SEGMENT_HASH_STRIPE + 2), 2, SEGMENT_HASH_STRIPE))).toThrow('expected a run at a 4-byte aligned offset, got 2');
  });
});

describe('SegmentHasher on the addon', () => {
  const addon = loadAddon<{ hashLanes(lanes: Int32Array, data: Uint8Array, forceScalar?: boolean): string }>();

  it('runs the addon\u2019s lanes wherever the addon is built, and the loop with `js`', () => {
    // The root build builds the addon on Linux with a compiler; a test run without it is a build that failed.
    expect(addon.ok, addon.ok ? '' : addon.reason).toBe(process.platform === 'linux');
    expect(new SegmentHasher().isNative).toBe(addon.ok);
    expect(new SegmentHasher('js').isNative).toBe(false);
  });

  it('gives the loop\u2019s hash, word for word, over runs of every size and split, on shared memory too', () => {
    // Lengths from one stripe to 1 MiB and one more stripe, as whole runs and
    // as two runs split anywhere on a stripe; the bytes on a SharedArrayBuffer
    // (guest memory and the source's image are) at an offset.
    for (const stripes of [1, 2, 7, 8, 9, 127, 4096, 32769]) {
      const sab = new SharedArrayBuffer(stripes * SEGMENT_HASH_STRIPE + 64);
      const bytes = new Uint8Array(sab, 64, stripes * SEGMENT_HASH_STRIPE);
      bytes.set(randomBytes(bytes.length));
      const loop = hashWith('js', bytes);
      expect(hashWith('auto', bytes), `${stripes} stripes`).toBe(loop);
      const cut = Math.floor(stripes / 3) * SEGMENT_HASH_STRIPE;
      expect(hashWith('auto', bytes.subarray(0, cut), bytes.subarray(cut)), `${stripes} stripes cut at ${cut}`).toBe(loop);
    }
  });

  it.runIf(addon.ok)('gives the same lanes from its AVX2 register and its scalar chains', () => {
    if (!addon.ok) return;
    const bytes = new Uint8Array(randomBytes(4096 * SEGMENT_HASH_STRIPE));
    const fast = new Int32Array(8).fill(7);
    const scalar = new Int32Array(8).fill(7);
    const code = addon.native.hashLanes(fast, bytes);
    expect(addon.native.hashLanes(scalar, bytes, true)).toBe('scalar');
    expect(['avx2', 'scalar']).toContain(code);
    expect(Array.from(fast)).toEqual(Array.from(scalar));
    expect(Array.from(fast)).not.toEqual(new Array(8).fill(7));
  });

  it.runIf(addon.ok)('refuses, natively too, runs that are not whole stripes or not aligned', () => {
    if (!addon.ok) return;
    const lanes = new Int32Array(8);
    expect(() => addon.native.hashLanes(lanes, new Uint8Array(SEGMENT_HASH_STRIPE + 4))).toThrow('expected a 4-byte aligned run of a multiple of 32 bytes');
    expect(() => addon.native.hashLanes(lanes, new Uint8Array(new ArrayBuffer(SEGMENT_HASH_STRIPE + 2), 2, SEGMENT_HASH_STRIPE))).toThrow('expected a 4-byte aligned run');
    expect(() => addon.native.hashLanes(new Int32Array(4), new Uint8Array(SEGMENT_HASH_STRIPE))).toThrow(TypeError);
    expect(lanes.every((l) => l === 0)).toBe(true);
  });
});

// Both values checked against an independent implementation of the description in segment-hash.ts (Python, not kept).
const EMPTY = '055dcc0258953644a90b5dd06ec47f25166f26323b99d32ed18ea62fc50f9a7f';
const FIXED = 'b0fe424cd6ae8a84441a5d204132fc07e792ae266ef6eea3ff0a95e26bf3ea9d';
