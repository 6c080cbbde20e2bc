import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { makeLayout } from '@postcopy/shared/core';
import { GuestMemory, allocateMemslot, copyIntoShared } from './guest-memory.js';

/** How many of this process's mappings (/proc/self/maps) are `bytes` long. */
function mappingsOfSize(bytes: number): number {
  return readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((line) => line.length > 0)
    .filter((line) => {
      const [start, end] = line.split(' ')[0]!.split('-');
      return Number(BigInt(`0x${end}`) - BigInt(`0x${start}`)) === bytes;
    }).length;
}

describe('allocateMemslot', () => {
  it('maps a memslot of a multiple of 64 KiB on its own, page-aligned: a mapping of exactly its size, not a calloc chunk one page larger', () => {
    // An odd size no other mapping of the test process is likely to have.
    const bytes = 37 * 65536;
    const before = mappingsOfSize(bytes);
    const beforeCalloc = mappingsOfSize(bytes + 4096);
    const slot = allocateMemslot(bytes);
    expect(slot).toBeInstanceOf(SharedArrayBuffer);
    expect(slot.byteLength).toBe(bytes);
    expect(mappingsOfSize(bytes)).toBe(before + 1);
    expect(mappingsOfSize(bytes + 4096)).toBe(beforeCalloc);
    // Zeroed, writable, and shared like any SharedArrayBuffer.
    const words = new Int32Array(slot);
    expect(words.every((w) => w === 0)).toBe(true);
    Atomics.store(words, 5, 42);
    expect(Atomics.load(new Int32Array(slot), 5)).toBe(42);
  });

  it('keeps the calloc kind for a size a wasm memory cannot take', () => {
    const slot = allocateMemslot(4096 * 3);
    expect(slot).toBeInstanceOf(SharedArrayBuffer);
    expect(slot.byteLength).toBe(4096 * 3);
  });

  it('is what GuestMemory.create gives every memslot', () => {
    const bytes = 21 * 65536;
    const before = mappingsOfSize(bytes);
    const memory = GuestMemory.create(makeLayout(3 * bytes, 4096), bytes);
    expect(memory.buffers.map((b) => b.byteLength)).toEqual([bytes, bytes, bytes]);
    expect(mappingsOfSize(bytes)).toBe(before + 3);
  });
});

describe('copyIntoShared', () => {
  const page = 4096;
  const source = (length: number): Uint8Array => Uint8Array.from({ length }, (_, i) => (i * 7 + 3) & 0xff);

  it.each([0, 1, 3, 8, 19])('copies a page whose bytes start %i bytes into their buffer, into an aligned and a misaligned place', (skew) => {
    const src = source(page + 64).subarray(skew, skew + page);
    for (const at of [0, page, page + 16, page + 5]) {
      const target = new Uint8Array(new SharedArrayBuffer(3 * page));
      copyIntoShared(target, at, src);
      expect(Buffer.compare(target.subarray(at, at + page), src)).toBe(0);
      expect(target.subarray(0, at).every((b) => b === 0)).toBe(true);
      expect(target.subarray(at + page).every((b) => b === 0)).toBe(true);
    }
  });

  it('copies runs of other lengths too (a larger copy after a smaller one, and the reverse)', () => {
    const target = new Uint8Array(new SharedArrayBuffer(8 * page));
    const big = source(4 * page + 3).subarray(3);
    copyIntoShared(target, 0, big);
    expect(Buffer.compare(target.subarray(0, 4 * page), big)).toBe(0);
    const small = source(101).subarray(1);
    copyIntoShared(target, 5 * page, small);
    expect(Buffer.compare(target.subarray(5 * page, 5 * page + 100), small)).toBe(0);
    expect(target[5 * page + 100]).toBe(0);
  });

  it('writePage installs a page read out of the middle of a frame', () => {
    const memory = GuestMemory.create(makeLayout(1024 * 1024, page), 1024 * 1024);
    const frame = source(page + 19);
    memory.writePage(7, frame, 19);
    expect(Buffer.compare(memory.pageBytes(7), frame.subarray(19))).toBe(0);
    expect(memory.pageBytes(6).every((b) => b === 0)).toBe(true);
    expect(memory.pageBytes(8).every((b) => b === 0)).toBe(true);
  });
});
