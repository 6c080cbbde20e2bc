import { createHash } from 'node:crypto';
import { SEGMENT_HASH_BYTES, SegmentHasher } from './segment-hash.js';

export { SEGMENT_HASH_BYTES } from './segment-hash.js';

/**
 * Memory digest: both hosts compute it the same way, the source over its
 * image and the destination over guest memory, so equal digests mean equal
 * memory (the pages a bitmap selects, or all of them).
 *
 * It is two-level (protocol version 9): the guest is cut into segments of
 * {@link DIGEST_SEGMENT_BYTES} (whole pages, in page order); each segment's
 * hash is the eight-lane hash of segment-hash.ts over its selected pages in
 * page order (an empty segment hashes nothing), and the digest is SHA-256
 * over the segment hashes in order. The segments can be hashed by several
 * threads at once (parallel-digest.ts), which on a 4 GiB guest is seconds
 * at each end of a run (issue 9: `largeWallOverElapsed`). Version 8 hashed
 * each segment with SHA-256, at half the speed; segment-hash.ts says what
 * the lanes catch.
 */
export interface PageSource {
  /** Bytes of page `page` (a view, not a copy). */
  pageBytes(page: number): Uint8Array;
}

/** What the digest needs of the guest's layout. */
export interface DigestLayout {
  totalPages: number;
  pageSize: number;
}

/** Guest bytes a digest segment covers (a protocol constant: both hosts must cut the same segments). */
export const DIGEST_SEGMENT_BYTES = 64 * 1024 ** 2;

/** Pages in one digest segment (at least one: a page larger than a segment is a segment). */
export function digestSegmentPages(pageSize: number, segmentBytes = DIGEST_SEGMENT_BYTES): number {
  return Math.max(1, Math.floor(segmentBytes / pageSize));
}

/** How many digest segments the guest has. */
export function digestSegmentCount(layout: DigestLayout, segmentBytes = DIGEST_SEGMENT_BYTES): number {
  return Math.ceil(layout.totalPages / digestSegmentPages(layout.pageSize, segmentBytes));
}

/** This thread's hasher: hashSegment runs start to end without yielding, so one serves every call. */
const hasher = new SegmentHasher();

/**
 * The segment hash (segment-hash.ts) of the selected pages of segment
 * `segment`, in page order, into `out` at `outOffset` ({@link
 * SEGMENT_HASH_BYTES} bytes). Pages that lie next to each other in one
 * buffer are hashed as one run (the same bytes in the same order).
 */
export function hashSegment(
  source: PageSource,
  layout: DigestLayout,
  segment: number,
  out: Uint8Array,
  outOffset: number,
  include?: (page: number) => boolean,
  segmentBytes = DIGEST_SEGMENT_BYTES,
): void {
  const per = digestSegmentPages(layout.pageSize, segmentBytes);
  const first = segment * per;
  const end = Math.min(layout.totalPages, first + per);
  hasher.reset();
  let run: Uint8Array | undefined;
  let runBytes = 0;
  for (let page = first; page < end; page++) {
    if (include && !include(page)) continue;
    const bytes = source.pageBytes(page);
    if (run !== undefined && bytes.buffer === run.buffer && bytes.byteOffset === run.byteOffset + runBytes) {
      runBytes += bytes.length;
      continue;
    }
    if (run !== undefined) hasher.update(new Uint8Array(run.buffer, run.byteOffset, runBytes));
    run = bytes;
    runBytes = bytes.length;
  }
  if (run !== undefined) hasher.update(new Uint8Array(run.buffer, run.byteOffset, runBytes));
  hasher.digestInto(out, outOffset);
}

/** The digest from every segment's hash, in segment order (32 bytes each). */
export function combineSegmentHashes(segmentHashes: Uint8Array): string {
  return createHash('sha256').update(segmentHashes).digest('hex');
}

/** The digest of the selected pages (all without `include`), on this thread. */
export function digestPages(source: PageSource, layout: DigestLayout, include?: (page: number) => boolean, segmentBytes = DIGEST_SEGMENT_BYTES): string {
  const segments = digestSegmentCount(layout, segmentBytes);
  const hashes = new Uint8Array(segments * SEGMENT_HASH_BYTES);
  for (let s = 0; s < segments; s++) hashSegment(source, layout, s, hashes, s * SEGMENT_HASH_BYTES, include, segmentBytes);
  return combineSegmentHashes(hashes);
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
