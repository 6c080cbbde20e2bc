import { describe, expect, it } from 'vitest';
import { digestPages, makeLayout } from '@postcopy/shared';
import { GuestImage } from './image.js';

describe('GuestImage.build (worker threads)', () => {
  it('gives the same bytes, zero pages and digest as the image built on one thread', { timeout: 30_000 }, async () => {
    const layout = makeLayout(8 * 1024 * 1024, 4096);
    const spec = { seed: 7, zeroFraction: 0.2 };
    const one = new GuestImage(layout, spec);
    // 8 segments of 1 MiB over 3 threads: segments finish out of order, the hash takes them in page order.
    const many = await GuestImage.build(layout, spec, { threads: 3, segmentBytes: 1024 * 1024, minBytes: 0 });
    expect(many.digest).toBe(one.digest);
    expect(many.zeroPages).toBe(one.zeroPages);
    expect(many.zeroPages).toBeGreaterThan(0);
    for (let page = 0; page < layout.totalPages; page++) {
      expect(many.isZero(page)).toBe(one.isZero(page));
    }
    expect(Buffer.compare(Buffer.from(many.pagesBytes(0, layout.totalPages)), Buffer.from(one.pagesBytes(0, layout.totalPages)))).toBe(0);
    // The digest is the pages' in order, as the destination computes it.
    expect(digestPages(many, layout.totalPages)).toBe(many.digest);
  });

  it('builds a small guest on the calling thread, and refuses a segment size that does not divide 1 GiB', async () => {
    const layout = makeLayout(1024 * 1024, 4096);
    const spec = { seed: 1, zeroFraction: 0 };
    expect((await GuestImage.build(layout, spec)).digest).toBe(new GuestImage(layout, spec).digest);
    await expect(GuestImage.build(layout, spec, { minBytes: 0, segmentBytes: 3 * 4096 })).rejects.toThrow(/divides 1 GiB/);
  });
});
