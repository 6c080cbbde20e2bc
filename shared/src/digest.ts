import { createHash } from 'node:crypto';

/**
 * Memory digest: SHA-256 over the pages a bitmap selects, in page order. Both
 * hosts compute it the same way, the source over its image and the destination
 * over guest memory, so equal digests mean equal memory.
 */
export interface PageSource {
  /** Bytes of page `page` (a view, not a copy). */
  pageBytes(page: number): Uint8Array;
}

export function digestPages(source: PageSource, totalPages: number, include?: (page: number) => boolean): string {
  const hash = createHash('sha256');
  for (let page = 0; page < totalPages; page++) {
    if (include && !include(page)) continue;
    hash.update(source.pageBytes(page));
  }
  return hash.digest('hex');
}

/** A bitmap of pages, one bit a page, as it travels in `finish`. */
export function bitmapBytes(totalPages: number): number {
  return Math.ceil(totalPages / 8);
}

export function bitmapHas(bitmap: Uint8Array, page: number): boolean {
  return (bitmap[page >>> 3]! & (1 << (page & 7))) !== 0;
}

export function bitmapSet(bitmap: Uint8Array, page: number): void {
  bitmap[page >>> 3] = bitmap[page >>> 3]! | (1 << (page & 7));
}

export function bitmapCount(bitmap: Uint8Array): number {
  let count = 0;
  for (let i = 0; i < bitmap.length; i++) {
    let b = bitmap[i]!;
    while (b) {
      b &= b - 1;
      count++;
    }
  }
  return count;
}
