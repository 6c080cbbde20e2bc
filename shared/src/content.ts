/**
 * The seeded page-content generator both hosts share. The source builds its
 * image with it; the destination uses it only to verify what it received.
 * Content is a pure function of (seed, page index, page size), so nothing about
 * it needs to cross the wire.
 */

import { addonWith } from './addon.js';

export interface ImageSpec {
  readonly seed: number;
  /** Share of pages that are all zero (sent as zero-page notices). */
  readonly zeroFraction: number;
}

/** splitmix32-style avalanche of (seed, page): decorrelates neighbouring pages. */
function mix(seed: number, page: number): number {
  let h = (seed ^ Math.imul(page + 0x9e3779b9, 0x85ebca6b)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x7feb352d);
  h = Math.imul(h ^ (h >>> 15), 0x846ca68b);
  return (h ^ (h >>> 16)) >>> 0;
}

export function isZeroPage(spec: ImageSpec, page: number): boolean {
  if (spec.zeroFraction <= 0) return false;
  return mix(spec.seed ^ 0x5a5a5a5a, page) / 4294967296 < spec.zeroFraction;
}

/**
 * One xorshift32 step (13, 17, 5), which TurboFan inlines: with the four
 * lanes kept in locals and stepped through it, fillPage and verifyPage ran
 * within a few percent of the same loops with the steps written out (1 MiB
 * in cache, three interleaved runs: fill 1.42, 2.64, 2.59 GiB/s against
 * 1.50, 2.75, 2.67; verify 1.24, 2.25, 2.22 against 1.19, 2.18, 2.13).
 */
function xorshift32(x: number): number {
  x ^= x << 13;
  x ^= x >>> 17;
  return x ^ (x << 5);
}

/** Seeds of the lanes after the first (the first is the page's own mix of the seed). */
const LANE_1 = 0x243f6a88;
const LANE_2 = 0x85a308d3;
const LANE_3 = 0x13198a2e;

/**
 * Writes page `page`'s content into `out` (pageSize bytes starting at a
 * 4-byte-aligned offset of a view). Never allocates.
 *
 * Four xorshift32 lanes, each seeded from (seed, page) on its own: word i
 * is lane i mod 4's next. One lane's words each wait for the one before
 * (three shifts and three xors in a chain); four independent chains let
 * the CPU run them side by side. Measured on the 2-core development VM,
 * one lane and four interleaved in one process, two runs (medians): a
 * 64 MiB buffer filled at 1.44 and 2.01 GiB/s against 1.22 and 1.32, and
 * verified at 1.27 and 1.74 against 1.02 and 1.32; 1 MiB in cache, as a
 * page just installed is, filled at 1.67 and 2.19 against 1.28 and 1.45,
 * verified at 1.36 and 1.76 against 0.98 and 1.21. It runs in the
 * source's image build and at every first touch on the destination
 * (protocol version 10: the content of version 9 was one lane's).
 */
export function fillPage(spec: ImageSpec, page: number, out: Uint32Array): void {
  if (isZeroPage(spec, page)) {
    out.fill(0);
    return;
  }
  // A zero xorshift state would stick: force a bit in each lane.
  let a = mix(spec.seed, page) | 1;
  let b = mix(spec.seed ^ LANE_1, page) | 1;
  let c = mix(spec.seed ^ LANE_2, page) | 1;
  let d = mix(spec.seed ^ LANE_3, page) | 1;
  const n = out.length;
  const body = n & ~3;
  let i = 0;
  for (; i < body; i += 4) {
    a = xorshift32(a);
    b = xorshift32(b);
    c = xorshift32(c);
    d = xorshift32(d);
    out[i] = a;
    out[i + 1] = b;
    out[i + 2] = c;
    out[i + 3] = d;
  }
  // A length not a multiple of four words (a device state's chunk may be): the lanes go on in order.
  if (i < n) out[i] = xorshift32(a);
  if (i + 1 < n) out[i + 1] = xorshift32(b);
  if (i + 2 < n) out[i + 2] = xorshift32(c);
  // The first word names the page: a page installed at the wrong index is caught at once.
  if (n > 0) out[0] = page;
}

/** What fillPages takes from the addon (fillPages in dest-host/native/uffd/uffd.c). */
interface ContentNative {
  fillPages(seed: number, zeroFraction: number, firstPage: number, pageWords: number, out: Uint32Array): number;
}

/** How fillPages runs: the addon's generator where it loads (`auto`), or fillPage's loop. */
export type ContentCode = 'auto' | 'js';

/**
 * Pages firstPage, firstPage + 1, ... into `out`, a whole number of pages of
 * `pageWords` words each: what fillPage gives page by page. Where the addon
 * loads its generator does it (the same function word for word,
 * content.test.ts compares them), which the source's image build uses:
 * GuestImage.build of 4 GiB took 1.52-1.55 s against 1.82-1.85 with this
 * file's loop (user time 1.9-2.0 CPU-seconds against 2.4-2.5; see the
 * README's bench section).
 */
export function fillPages(spec: ImageSpec, firstPage: number, out: Uint32Array, pageWords: number, code: ContentCode = 'auto'): void {
  if (pageWords <= 0 || out.length % pageWords !== 0) throw new RangeError(`expected whole pages of ${pageWords} words, got ${out.length} words`);
  const pages = out.length / pageWords;
  const addon = code === 'auto' && firstPage + pages <= 2 ** 32 ? addonWith<ContentNative>('fillPages') : undefined;
  if (addon !== undefined) {
    addon.fillPages(spec.seed >>> 0, spec.zeroFraction, firstPage, pageWords, out);
    return;
  }
  for (let k = 0; k < pages; k++) fillPage(spec, firstPage + k, out.subarray(k * pageWords, (k + 1) * pageWords));
}

/**
 * Compares a page of memory against the generator without allocating. Returns
 * the index of the first differing 32-bit word, or -1 when the page is right.
 * `ignoreWord` (>= 0) is a word not compared: the counter a guest that ran on
 * the source before the switchover changes (see counterWord in precopy.ts);
 * that page is compared whole with the source's own at the end instead.
 */
export function verifyPage(spec: ImageSpec, page: number, data: Uint32Array, ignoreWord = -1): number {
  if (isZeroPage(spec, page)) {
    for (let i = 0; i < data.length; i++) if (data[i] !== 0 && i !== ignoreWord) return i;
    return -1;
  }
  if (data.length > 0 && data[0] !== page && ignoreWord !== 0) return 0;
  let a = mix(spec.seed, page) | 1;
  let b = mix(spec.seed ^ LANE_1, page) | 1;
  let c = mix(spec.seed ^ LANE_2, page) | 1;
  let d = mix(spec.seed ^ LANE_3, page) | 1;
  const n = data.length;
  const body = n & ~3;
  let i = 0;
  for (; i < body; i += 4) {
    a = xorshift32(a);
    b = xorshift32(b);
    c = xorshift32(c);
    d = xorshift32(d);
    // One branch for four words; which of them differs (word 0 and the ignored word aside) only once one does.
    if (((data[i]! ^ a) | (data[i + 1]! ^ b) | (data[i + 2]! ^ c) | (data[i + 3]! ^ d)) !== 0) {
      const bad = firstBad(data, i, a, b, c, d, ignoreWord);
      if (bad !== -1) return bad;
    }
  }
  // A length not a multiple of four words: the lanes go on in order, as in fillPage.
  return i < n ? firstBad(data, i, xorshift32(a), xorshift32(b), xorshift32(c), d, ignoreWord) : -1;
}

/** The first of the (up to) four words from `i` that differs from its lane's, skipping word 0 and `ignoreWord`; -1 when none does. */
function firstBad(data: Uint32Array, i: number, a: number, b: number, c: number, d: number, ignoreWord: number): number {
  if (badWord(data, i, a, ignoreWord)) return i;
  if (badWord(data, i + 1, b, ignoreWord)) return i + 1;
  if (badWord(data, i + 2, c, ignoreWord)) return i + 2;
  if (badWord(data, i + 3, d, ignoreWord)) return i + 3;
  return -1;
}

function badWord(data: Uint32Array, w: number, expected: number, ignoreWord: number): boolean {
  return w < data.length && w !== 0 && w !== ignoreWord && data[w] !== expected >>> 0;
}
