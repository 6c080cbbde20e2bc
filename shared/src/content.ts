/**
 * The seeded page-content generator both hosts share. The source builds its
 * image with it; the destination uses it only to verify what it received.
 * Content is a pure function of (seed, page index, page size), so nothing about
 * it needs to cross the wire.
 */

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
 * Writes page `page`'s content into `out` (pageSize bytes starting at a
 * 4-byte-aligned offset of a view). Never allocates.
 */
export function fillPage(spec: ImageSpec, page: number, out: Uint32Array): void {
  if (isZeroPage(spec, page)) {
    out.fill(0);
    return;
  }
  // xorshift32; a zero state would stick, so force a bit.
  let x = mix(spec.seed, page) | 1;
  for (let i = 0; i < out.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x;
  }
  // The first word names the page: a page installed at the wrong index is caught at once.
  out[0] = page;
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
  if (data[0] !== page && ignoreWord !== 0) return 0;
  let x = mix(spec.seed, page) | 1;
  for (let i = 0; i < data.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    if (i > 0 && i !== ignoreWord && data[i] !== x >>> 0) return i;
  }
  return -1;
}
