import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { bitmapBytes, bitmapHas, bitmapSet, digestPages, digestSegmentCount, type PageSource } from './digest.js';
import { SEGMENT_HASH_BYTES, SegmentHasher } from './segment-hash.js';
import { DIGEST_STATE, digestPagesParallel, digestWork, runDigestWork } from './parallel-digest.js';
import { startWorker } from './worker.js';

const PAGE = 4096;
/** Small segments, so that a few MiB are many segments (both sides of each comparison use the same). */
const SEGMENT = 64 * 1024;

function guest(pages: number, seed: number): { memory: SharedArrayBuffer; source: PageSource } {
  const memory = new SharedArrayBuffer(pages * PAGE);
  const words = new Uint32Array(memory);
  let x = seed | 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x;
  }
  const bytes = new Uint8Array(memory);
  return { memory, source: { pageBytes: (page) => bytes.subarray(page * PAGE, (page + 1) * PAGE) } };
}

const helper = (memory: SharedArrayBuffer, extra: { include?: Uint8Array; die?: boolean } = {}) => (work: ReturnType<typeof digestWork>) =>
  startWorker(import.meta.url, 'fixtures/digest-helper', { workerData: { work, memory, ...extra } });

describe('the memory digest', () => {
  it('is SHA-256 over the segment hash of each segment of the selected pages, in order', () => {
    const layout = { totalPages: 40, pageSize: PAGE };
    const { source } = guest(layout.totalPages, 5);
    const include = (page: number): boolean => page % 3 !== 0;
    const per = SEGMENT / PAGE;
    const segments: Uint8Array[] = [];
    const h = new SegmentHasher();
    for (let first = 0; first < layout.totalPages; first += per) {
      h.reset();
      for (let page = first; page < Math.min(layout.totalPages, first + per); page++) if (include(page)) h.update(source.pageBytes(page));
      const out = new Uint8Array(SEGMENT_HASH_BYTES);
      h.digestInto(out, 0);
      segments.push(out);
    }
    expect(segments).toHaveLength(digestSegmentCount(layout, SEGMENT));
    expect(digestPages(source, layout, include, SEGMENT)).toBe(createHash('sha256').update(Buffer.concat(segments)).digest('hex'));
  });

  it('tells memories apart that differ in one word of one page', () => {
    const layout = { totalPages: 40, pageSize: PAGE };
    const { memory, source } = guest(layout.totalPages, 5);
    const before = digestPages(source, layout, undefined, SEGMENT);
    const words = new Uint32Array(memory);
    words[17 * (PAGE / 4) + 301] = (words[17 * (PAGE / 4) + 301]! ^ 1) >>> 0;
    expect(digestPages(source, layout, undefined, SEGMENT)).not.toBe(before);
  });

  it('hashes runs of adjacent pages as the pages one by one, and pages of separate buffers too', () => {
    const layout = { totalPages: 64, pageSize: PAGE };
    const { source } = guest(layout.totalPages, 9);
    // The same bytes, each page in a buffer of its own (as memslots or image chunks are).
    const copies = Array.from({ length: layout.totalPages }, (_, p) => Uint8Array.from(source.pageBytes(p)));
    const scattered: PageSource = { pageBytes: (page) => copies[page]! };
    expect(digestPages(scattered, layout, undefined, SEGMENT)).toBe(digestPages(source, layout, undefined, SEGMENT));
    expect(digestPages(scattered, layout, (p) => p !== 7, SEGMENT)).toBe(digestPages(source, layout, (p) => p !== 7, SEGMENT));
    expect(digestPages(source, layout, (p) => p !== 7, SEGMENT)).not.toBe(digestPages(source, layout, undefined, SEGMENT));
  });
});

describe('digestPagesParallel', () => {
  const layout = { totalPages: 1024, pageSize: PAGE }; // 4 MiB, 64 segments

  it('equals the digest on one thread, with helper threads, for all pages and for a selection', { timeout: 30_000 }, async () => {
    const { memory, source } = guest(layout.totalPages, 11);
    const serial = digestPages(source, layout, undefined, SEGMENT);
    await expect(digestPagesParallel(source, layout, helper(memory), undefined, { threads: 3, minBytes: 0, segmentBytes: SEGMENT })).resolves.toBe(serial);
    const bitmap = new Uint8Array(bitmapBytes(layout.totalPages));
    for (let page = 0; page < layout.totalPages; page++) if (page % 5 !== 2) bitmapSet(bitmap, page);
    const include = (page: number): boolean => bitmapHas(bitmap, page);
    await expect(digestPagesParallel(source, layout, helper(memory, { include: bitmap }), include, { threads: 4, minBytes: 0, segmentBytes: SEGMENT })).resolves.toBe(
      digestPages(source, layout, include, SEGMENT),
    );
    // This thread slowed down (20 ms a segment): the helpers hash some segments, and the digest is the same.
    const nap = new Int32Array(new SharedArrayBuffer(4));
    const slow: PageSource = { pageBytes: (page) => (page % (SEGMENT / PAGE) === 0 && Atomics.wait(nap, 0, 0, 20), source.pageBytes(page)) };
    let here = 0;
    const work = digestWork(layout, SEGMENT);
    await expect(runDigestWork(work, slow, helper(memory), 3, undefined, () => here++)).resolves.toBe(serial);
    expect(here).toBeLessThan(work.segments);
    // A small guest is hashed on this thread alone (no helper is started).
    await expect(digestPagesParallel(source, layout, () => expect.unreachable('a helper for a small guest') as never, undefined, { threads: 4, segmentBytes: SEGMENT })).resolves.toBe(serial);
  });

  it('still fails the comparison for one wrong byte, wherever a thread hashed it', { timeout: 30_000 }, async () => {
    const a = guest(layout.totalPages, 13);
    const b = guest(layout.totalPages, 13);
    const good = await digestPagesParallel(a.source, layout, helper(a.memory), undefined, { threads: 3, minBytes: 0, segmentBytes: SEGMENT });
    for (const offset of [0, 1000 * PAGE + 17, layout.totalPages * PAGE - 1]) {
      const bytes = new Uint8Array(b.memory);
      bytes[offset] = bytes[offset]! ^ 1;
      await expect(digestPagesParallel(b.source, layout, helper(b.memory), undefined, { threads: 3, minBytes: 0, segmentBytes: SEGMENT })).resolves.not.toBe(good);
      bytes[offset] = bytes[offset]! ^ 1;
    }
    await expect(digestPagesParallel(b.source, layout, helper(b.memory), undefined, { threads: 3, minBytes: 0, segmentBytes: SEGMENT })).resolves.toBe(good);
  });

  it('hashes here what a helper took and left undone (it died), and goes on when a helper cannot start', { timeout: 30_000 }, async () => {
    const { memory, source } = guest(layout.totalPages, 17);
    const serial = digestPages(source, layout, undefined, SEGMENT);
    // The helper takes segment 0 and exits without hashing it, before this thread starts.
    const work = digestWork(layout, SEGMENT);
    const dying = helper(memory, { die: true })(work);
    await new Promise((resolve) => dying.once('exit', resolve));
    expect(Atomics.load(new Int32Array(work.state), DIGEST_STATE.NEXT)).toBe(1);
    await expect(runDigestWork(work, source, helper(memory), 1)).resolves.toBe(serial);
    // And one dying while the others run.
    await expect(runDigestWork(digestWork(layout, SEGMENT), source, helper(memory, { die: true }), 3)).resolves.toBe(serial);
    const refuse = (): never => {
      throw new Error('no threads here');
    };
    await expect(runDigestWork(digestWork(layout, SEGMENT), source, refuse, 4)).resolves.toBe(serial);
  });
});
