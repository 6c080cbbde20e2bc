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

/**
 * A 32-bit FNV-1a hash of every page (over its 32-bit words), 4 bytes a page,
 * little-endian: cheap enough for both hosts to compute over the whole guest
 * when their digests differ, to name the pages that do.
 */
export function pageHashes(source: PageSource, totalPages: number): Uint8Array {
  const out = new Uint8Array(totalPages * 4);
  const view = new DataView(out.buffer);
  for (let page = 0; page < totalPages; page++) view.setUint32(page * 4, pageHash(source.pageBytes(page)), true);
  return out;
}

/** FNV-1a over the page's 32-bit words (the page is 4-byte aligned). */
export function pageHash(bytes: Uint8Array): number {
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 2);
  let h = 0x811c9dc5;
  for (let i = 0; i < words.length; i++) h = Math.imul(h ^ words[i]!, 0x01000193);
  return h >>> 0;
}

/** The first pages (at most `limit`) whose hashes differ between `a` and `b`, ascending. */
export function differingPages(a: Uint8Array, b: Uint8Array, limit: number, include?: (page: number) => boolean): number[] {
  const pages: number[] = [];
  const n = Math.min(a.length, b.length) >>> 2;
  for (let page = 0; page < n && pages.length < limit; page++) {
    if (include && !include(page)) continue;
    const i = page * 4;
    if (a[i] !== b[i] || a[i + 1] !== b[i + 1] || a[i + 2] !== b[i + 2] || a[i + 3] !== b[i + 3]) pages.push(page);
  }
  return pages;
}
