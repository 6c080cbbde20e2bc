import { bitmapBytes, bitmapSet } from '@postcopy/shared';
import { describe, expect, it } from 'vitest';
import { Sentmap } from './sentmap.js';

function bitmapOf(totalPages: number, pages: Iterable<number>): Uint8Array {
  const map = new Uint8Array(bitmapBytes(totalPages));
  for (const page of pages) bitmapSet(map, page);
  return map;
}

const range = (from: number, to: number): number[] => Array.from({ length: to - from }, (_, i) => from + i);

describe('Sentmap.reset (recovery: the receivedmap is the truth)', () => {
  it('makes exactly the received pages sent and returns the pages sent but lost on the way', () => {
    const map = new Sentmap(20);
    for (const page of range(0, 10)) map.mark(page);
    // Received: 0..7 (sent), 12 and 13 (never sent here: a restarted source, or sent by a predecessor).
    const lost = map.reset(bitmapOf(20, [...range(0, 8), 12, 13]));
    expect(lost).toBe(2); // pages 8 and 9
    expect(map.sent).toBe(10);
    for (let page = 0; page < 20; page++) {
      expect(map.isSent(page), `page ${page}`).toBe(page < 8 || page === 12 || page === 13);
    }
    expect(map.complete).toBe(false);
    expect(map.pagesSentTwice).toBe(0);
  });

  it('does not count a page sent again after it was marked unsent as sent twice', () => {
    const map = new Sentmap(16);
    for (const page of range(0, 16)) map.mark(page);
    expect(map.reset(bitmapOf(16, range(0, 12)))).toBe(4);
    for (const page of range(12, 16)) map.mark(page);
    expect(map.pagesSentTwice).toBe(0);
    expect(map.sent).toBe(16);
    expect(map.complete).toBe(true);
    // A page received and sent again is a second send.
    map.mark(3);
    expect(map.pagesSentTwice).toBe(1);
  });

  it('keeps the history of pages sent twice, and counts a received page sent again as twice', () => {
    const map = new Sentmap(8);
    map.mark(1);
    map.mark(1);
    expect(map.pagesSentTwice).toBe(1);
    expect(map.reset(bitmapOf(8, [1, 2]))).toBe(0);
    expect(map.pagesSentTwice).toBe(1);
    map.mark(2);
    expect(map.pagesSentTwice).toBe(2);
    // Page 1 counts once again (as received), so one more send is one more page sent twice.
    map.mark(1);
    expect(map.pagesSentTwice).toBe(3);
    expect(map.sent).toBe(2);
  });

  it('ignores bits past the last page, and an empty or full receivedmap', () => {
    const map = new Sentmap(10);
    map.mark(9);
    const full = new Uint8Array(bitmapBytes(10)).fill(0xff);
    expect(map.reset(full)).toBe(0);
    expect(map.sent).toBe(10);
    expect(map.complete).toBe(true);
    expect(map.reset(new Uint8Array(bitmapBytes(10)))).toBe(10);
    expect(map.sent).toBe(0);
  });

  it('refuses a receivedmap too short for the guest', () => {
    const map = new Sentmap(17);
    expect(() => map.reset(new Uint8Array(2))).toThrow('expected a receivedmap of 3 bytes (17 pages), got 2 bytes');
  });
});
