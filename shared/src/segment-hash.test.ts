import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { SEGMENT_HASH_BYTES, SEGMENT_HASH_STRIPE, SegmentHasher } from './segment-hash.js';

function hashOf(...runs: Uint8Array[]): string {
  const h = new SegmentHasher();
  for (const run of runs) h.update(run);
  const out = new Uint8Array(SEGMENT_HASH_BYTES);
  h.digestInto(out, 0);
  return Buffer.from(out).toString('hex');
}

/** Bytes at a 4-byte aligned offset of their own buffer (randomBytes may hand out pooled, unaligned views). */
function aligned(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(bytes);
}

describe('SegmentHasher', () => {
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
    const h = new SegmentHasher();
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
    const h = new SegmentHasher();
    expect(() => h.update(new Uint8Array(SEGMENT_HASH_STRIPE + 4))).toThrow(`expected a run of a multiple of ${SEGMENT_HASH_STRIPE} bytes, got ${SEGMENT_HASH_STRIPE + 4}`);
    expect(() => h.update(new Uint8Array(new ArrayBuffer(SEGMENT_HASH_STRIPE + 2), 2, SEGMENT_HASH_STRIPE))).toThrow('expected a run at a 4-byte aligned offset, got 2');
  });
});

// Both values checked against an independent implementation of the description in segment-hash.ts (Python, not kept).
const EMPTY = '055dcc0258953644a90b5dd06ec47f25166f26323b99d32ed18ea62fc50f9a7f';
const FIXED = 'b0fe424cd6ae8a84441a5d204132fc07e792ae266ef6eea3ff0a95e26bf3ea9d';
