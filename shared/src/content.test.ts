import { describe, expect, it } from 'vitest';
import { loadAddon } from './addon.js';
import { fillPage, fillPages, isZeroPage, verifyPage, type ImageSpec } from './content.js';
import { UsageError } from './errors.js';
import { makeLayout, makeMemslotLayout } from './layout.js';
import { formatBytes, parseSize } from './sizes.js';

const WORDS = 4096 / 4;
const spec: ImageSpec = { seed: 42, zeroFraction: 0 };
/** Page 5's first words at seed 42 (word 0 is the page index), as protocol version 10 makes them. */
const PINNED = [5, 129370192, 2623236585, 432206770, 2525449881, 288426702];

function page(s: ImageSpec, index: number, words = WORDS): Uint32Array {
  const out = new Uint32Array(words);
  fillPage(s, index, out);
  return out;
}

const same = (a: Uint32Array, b: Uint32Array): boolean => Buffer.compare(Buffer.from(a.buffer), Buffer.from(b.buffer)) === 0;

describe('fillPage / verifyPage', () => {
  it('is deterministic', () => {
    for (const index of [0, 1, 7, 4095, 1_000_000]) {
      expect(same(page(spec, index), page(spec, index))).toBe(true);
    }
  });

  it('differs between pages and between seeds', () => {
    const a = page(spec, 5);
    expect(same(a, page(spec, 6))).toBe(false);
    expect(same(a, page({ seed: 43, zeroFraction: 0 }, 5))).toBe(false);
    // Not just the first word: the bodies differ too.
    expect(same(a.subarray(1), page(spec, 6).subarray(1))).toBe(false);
    expect(same(a.subarray(1), page({ seed: 43, zeroFraction: 0 }, 5).subarray(1))).toBe(false);
  });

  it('is not a trivial pattern (words vary within a page)', () => {
    const words = new Set(page(spec, 9));
    expect(words.size).toBeGreaterThan(WORDS * 0.99);
  });

  it('writes the page index in the first word', () => {
    for (const index of [0, 1, 2, 1234, 2 ** 31 - 2]) expect(page(spec, index)[0]).toBe(index);
  });

  it('fills a view into a larger buffer without touching its neighbours', () => {
    const buffer = new Uint32Array(3 * WORDS).fill(0xdeadbeef);
    fillPage(spec, 11, buffer.subarray(WORDS, 2 * WORDS));
    expect(buffer[WORDS - 1]).toBe(0xdeadbeef);
    expect(buffer[2 * WORDS]).toBe(0xdeadbeef);
    expect(same(buffer.slice(WORDS, 2 * WORDS), page(spec, 11))).toBe(true);
  });

  it('verifyPage returns -1 for a right page', () => {
    for (const index of [0, 3, 100]) expect(verifyPage(spec, index, page(spec, index))).toBe(-1);
    const zeros: ImageSpec = { seed: 3, zeroFraction: 1 };
    expect(verifyPage(zeros, 5, page(zeros, 5))).toBe(-1);
  });

  it('verifyPage returns the index of a flipped word', () => {
    for (const word of [0, 1, 2, 511, WORDS - 1]) {
      const data = page(spec, 17);
      data[word] = data[word]! ^ 0x10;
      expect(verifyPage(spec, 17, data)).toBe(word);
    }
    // The first of several flipped words.
    const data = page(spec, 17);
    data[700] = data[700]! ^ 1;
    data[900] = data[900]! ^ 1;
    expect(verifyPage(spec, 17, data)).toBe(700);
    // A page installed at the wrong index fails at word 0.
    expect(verifyPage(spec, 18, page(spec, 17))).toBe(0);
    // A zero page with a stray bit.
    const zeros: ImageSpec = { seed: 3, zeroFraction: 1 };
    const z = page(zeros, 5);
    z[33] = 1;
    expect(verifyPage(zeros, 5, z)).toBe(33);
    // A zero page where content was expected.
    expect(verifyPage(spec, 17, new Uint32Array(WORDS))).toBe(0);
  });
});

describe('the generator\'s four lanes', () => {
  const xorshift = (x: number): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };

  it('word i + 4 is xorshift32 of word i: four independent lanes', () => {
    for (const index of [3, 77, 65_535]) {
      const p = page(spec, index);
      for (let i = 1; i + 4 < WORDS; i++) expect(p[i + 4]).toBe(xorshift(p[i]!));
      // The lanes are not one sequence: the next word is not the xorshift of the one before.
      expect(p[2]).not.toBe(xorshift(p[1]!));
    }
  });

  it('a length that is not a multiple of four words is the same words as a page\'s first ones, and verifies', () => {
    const whole = page(spec, 21);
    for (let n = 1; n <= 13; n++) {
      const short = page(spec, 21, n);
      expect(Array.from(short)).toEqual(Array.from(whole.subarray(0, n)));
      expect(verifyPage(spec, 21, short)).toBe(-1);
      for (let w = 1; w < n; w++) {
        const bad = short.slice();
        bad[w] = bad[w]! ^ 0x80000000;
        expect(verifyPage(spec, 21, bad)).toBe(w);
        // The ignored word is the one word not compared.
        expect(verifyPage(spec, 21, bad, w)).toBe(-1);
      }
    }
  });

  it('verifyPage names the first bad word of four checked at once, past the ignored one', () => {
    const data = page(spec, 33);
    data[602] = data[602]! ^ 4;
    data[601] = data[601]! ^ 4;
    expect(verifyPage(spec, 33, data)).toBe(601);
    expect(verifyPage(spec, 33, data, 601)).toBe(602);
    data[602] = data[602]! ^ 4;
    expect(verifyPage(spec, 33, data, 601)).toBe(-1);
  });

  it('is pinned: the content of protocol version 10 (a change to it needs a new version)', () => {
    expect(Array.from(page(spec, 5).subarray(0, 6))).toEqual(PINNED);
  });
});

describe('zero fraction', () => {
  const PAGES = 4096;
  const countZero = (s: ImageSpec): number => {
    let zero = 0;
    for (let i = 0; i < PAGES; i++) if (isZeroPage(s, i)) zero++;
    return zero;
  };

  it('0 gives no zero pages', () => {
    expect(countZero({ seed: 1, zeroFraction: 0 })).toBe(0);
    for (let i = 0; i < 64; i++) expect(page({ seed: 1, zeroFraction: 0 }, i).some((w, k) => k > 0 && w !== 0)).toBe(true);
  });

  it('1 gives all zero pages, filled with zeros', () => {
    const s: ImageSpec = { seed: 1, zeroFraction: 1 };
    expect(countZero(s)).toBe(PAGES);
    const out = new Uint32Array(WORDS).fill(7);
    fillPage(s, 123, out);
    expect(out.every((w) => w === 0)).toBe(true);
  });

  it('0.25 gives roughly a quarter, and those pages are all zeros', () => {
    for (const seed of [1, 2, 99]) {
      const s: ImageSpec = { seed, zeroFraction: 0.25 };
      const zero = countZero(s);
      expect(Math.abs(zero / PAGES - 0.25)).toBeLessThanOrEqual(0.05);
      for (let i = 0; i < 256; i++) {
        const p = page(s, i);
        expect(p.every((w) => w === 0)).toBe(isZeroPage(s, i));
      }
    }
  });

  it('the zero pages depend on the seed', () => {
    const a: boolean[] = [];
    const b: boolean[] = [];
    for (let i = 0; i < 256; i++) {
      a.push(isZeroPage({ seed: 1, zeroFraction: 0.5 }, i));
      b.push(isZeroPage({ seed: 2, zeroFraction: 0.5 }, i));
    }
    expect(a).not.toEqual(b);
  });
});

/** Runs `fn`, expecting a UsageError; returns its message. */
function usageError(fn: () => unknown): string {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(UsageError);
  expect((caught as UsageError).code).toBe('ERR_POSTCOPY_USAGE');
  return (caught as UsageError).message;
}

describe('parseSize', () => {
  it.each([
    ['4096', 4096],
    ['4KiB', 4096],
    ['4kib', 4096],
    ['64MiB', 64 * 1024 ** 2],
    ['2M', 2 * 1024 ** 2],
    ['1GiB', 1024 ** 3],
    ['1G', 1024 ** 3],
    ['512B', 512],
    ['1.5KiB', 1536],
    ['2MB', 2_000_000],
    [' 8 KiB ', 8192],
  ])('%j → %d', (text, bytes) => {
    expect(parseSize('--memory', text)).toBe(bytes);
  });

  it.each(['12XB', '', '-1', '1.5B', '0', 'KiB', '4 K i B', '1e3'])('rejects %j, listing the accepted units', (text) => {
    const message = usageError(() => parseSize('--memory', text));
    expect(message.startsWith('--memory: expected')).toBe(true);
    expect(message).toContain(JSON.stringify(text));
    for (const unit of ['KiB', 'MiB', 'GiB']) expect(message).toContain(unit);
  });

  it('formatBytes prints whole units', () => {
    expect(formatBytes(4096)).toBe('4KiB');
    expect(formatBytes(8192)).toBe('8KiB');
    expect(formatBytes(2 * 1024 ** 2)).toBe('2MiB');
    expect(formatBytes(1024 ** 3)).toBe('1GiB');
    expect(formatBytes(4097)).toBe('4097B');
  });
});

describe('makeLayout', () => {
  it('accepts 4KiB and 2MiB pages', () => {
    expect(makeLayout(64 * 4096, 4096)).toEqual({ guestBytes: 64 * 4096, pageSize: 4096, totalPages: 64 });
    expect(makeLayout(4 * 2 * 1024 ** 2, 2 * 1024 ** 2)).toEqual({ guestBytes: 8 * 1024 ** 2, pageSize: 2 * 1024 ** 2, totalPages: 4 });
  });

  it('rejects a page size of 8KiB', () => {
    const message = usageError(() => makeLayout(64 * 8192, 8192));
    expect(message).toBe('--page-size: expected one of 4KiB, 2MiB, got 8KiB');
  });

  it('rejects a memory size that is not a multiple of the page size', () => {
    const message = usageError(() => makeLayout(10 * 4096 + 1, 4096));
    expect(message).toContain('--memory: expected a whole number of 4KiB pages');
    expect(message).toContain(String(10 * 4096 + 1));
    usageError(() => makeLayout(3 * 1024 ** 2, 2 * 1024 ** 2));
    usageError(() => makeLayout(0, 4096));
  });
});

describe('makeMemslotLayout', () => {
  it('splits 10 pages with 4-page memslots into 3 memslots', () => {
    const layout = makeLayout(10 * 4096, 4096);
    expect(makeMemslotLayout(layout, 4 * 4096)).toEqual({ memslotBytes: 4 * 4096, pagesPerMemslot: 4, count: 3 });
  });

  it('uses one memslot when the request is larger than the guest', () => {
    const layout = makeLayout(10 * 4096, 4096);
    expect(makeMemslotLayout(layout, 1024 ** 3)).toEqual({ memslotBytes: 10 * 4096, pagesPerMemslot: 10, count: 1 });
  });

  it('rejects memslots that are not whole pages or larger than 1GiB', () => {
    const layout = makeLayout(10 * 4096, 4096);
    expect(usageError(() => makeMemslotLayout(layout, 4096 + 1))).toContain('--memslot-size: expected a multiple of the page size 4KiB');
    const big = makeLayout(2 * 1024 ** 3, 4096);
    expect(usageError(() => makeMemslotLayout(big, 2 * 1024 ** 3))).toContain('--memslot-size: expected at most 1GiB, got 2GiB');
  });
});

describe('fillPages', () => {
  const addon = loadAddon<{ fillPages(seed: number, zeroFraction: number, firstPage: number, pageWords: number, out: Uint32Array): number }>();

  it('gives what fillPage gives page by page, natively as in the loop, over seeds, zero fractions, page sizes and indices', () => {
    const cases: Array<{ seed: number; zeroFraction: number; first: number; words: number; pages: number }> = [
      { seed: 42, zeroFraction: 0, first: 0, words: WORDS, pages: 64 },
      { seed: 1, zeroFraction: 0.1, first: 1000, words: WORDS, pages: 256 },
      { seed: 0xffffffff, zeroFraction: 0.5, first: 2 ** 31 - 3, words: WORDS, pages: 8 },
      { seed: 0x80000001, zeroFraction: 1, first: 7, words: WORDS, pages: 4 },
      { seed: 7, zeroFraction: 0.25, first: 2 ** 32 - 5, words: 6, pages: 5 },
      { seed: 9, zeroFraction: 0, first: 3, words: 1, pages: 9 },
      { seed: 9, zeroFraction: 0, first: 3, words: 7, pages: 9 },
      { seed: 123, zeroFraction: 0, first: 5, words: 2 * 1024 * 1024 / 4, pages: 2 },
    ];
    for (const c of cases) {
      const s: ImageSpec = { seed: c.seed, zeroFraction: c.zeroFraction };
      const expected = new Uint32Array(c.words * c.pages);
      for (let k = 0; k < c.pages; k++) fillPage(s, c.first + k, expected.subarray(k * c.words, (k + 1) * c.words));
      for (const code of ['auto', 'js'] as const) {
        const out = new Uint32Array(c.words * c.pages).fill(0xdeadbeef);
        fillPages(s, c.first, out, c.words, code);
        expect(same(out, expected), `${code} ${JSON.stringify(c)}`).toBe(true);
      }
      if (addon.ok) {
        // The addon itself, not a path that might fall back to the loop.
        const out = new Uint32Array(new SharedArrayBuffer(c.words * c.pages * 4));
        expect(addon.native.fillPages(c.seed >>> 0, c.zeroFraction, c.first, c.words, out)).toBe(c.pages);
        expect(same(out, expected), `addon ${JSON.stringify(c)}`).toBe(true);
      }
    }
  });

  it('runs the addon\u2019s generator wherever the addon is built', () => {
    expect(addon.ok, addon.ok ? '' : addon.reason).toBe(process.platform === 'linux');
  });

  it('refuses what is not whole pages, in the loop and natively', () => {
    expect(() => fillPages(spec, 0, new Uint32Array(10), 4)).toThrow('expected whole pages of 4 words, got 10 words');
    expect(() => fillPages(spec, 0, new Uint32Array(10), 0)).toThrow(RangeError);
    if (!addon.ok) return;
    expect(() => addon.native.fillPages(1, 0, 0, 4, new Uint32Array(10))).toThrow('fillPages: expected whole pages');
    expect(() => addon.native.fillPages(1, 0, 2 ** 32 - 1, 4, new Uint32Array(8))).toThrow('at page indices below 2^32');
    expect(() => addon.native.fillPages(1, 0, 0, 4, new Int32Array(8) as unknown as Uint32Array)).toThrow('expected a Uint32Array');
  });
});
