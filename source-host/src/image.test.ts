import { describe, expect, it } from 'vitest';
import { bitmapBytes, bitmapHas, bitmapSet, digestPages, makeLayout } from '@postcopy/shared';
import { GuestImage } from './image.js';

describe('GuestImage.build (worker threads)', () => {
  it('gives the same bytes, zero pages and digest as the image built on one thread', { timeout: 30_000 }, async () => {
    const layout = makeLayout(8 * 1024 * 1024, 4096);
    const spec = { seed: 7, zeroFraction: 0.2 };
    const one = new GuestImage(layout, spec);
    // 8 digest segments of 1 MiB over 3 threads: each fills and hashes whole segments, in any order.
    const many = await GuestImage.build(layout, spec, { threads: 3, segmentBytes: 1024 * 1024, minBytes: 0 });
    expect(many.digest).toBe(digestPages(one, layout, undefined, 1024 * 1024));
    expect(many.zeroPages).toBe(one.zeroPages);
    expect(many.zeroPages).toBeGreaterThan(0);
    for (let page = 0; page < layout.totalPages; page++) {
      expect(many.isZero(page)).toBe(one.isZero(page));
    }
    expect(Buffer.compare(Buffer.from(many.pagesBytes(0, layout.totalPages)), Buffer.from(one.pagesBytes(0, layout.totalPages)))).toBe(0);
    // With the protocol's segments: the digest the destination computes over the same pages.
    const protocol = await GuestImage.build(layout, spec, { threads: 2, minBytes: 0 });
    expect(protocol.digest).toBe(one.digest);
    expect(digestPages(protocol, layout)).toBe(protocol.digest);
  });

  it('builds a small guest on the calling thread, and refuses a testing segment size there', async () => {
    const layout = makeLayout(1024 * 1024, 4096);
    const spec = { seed: 1, zeroFraction: 0 };
    expect((await GuestImage.build(layout, spec)).digest).toBe(new GuestImage(layout, spec).digest);
    await expect(GuestImage.build(layout, spec, { segmentBytes: 3 * 4096 })).rejects.toThrow(/digest segment/);
  });
});

describe('GuestImage.digestOf', () => {
  it('hashes the received pages on helper threads as on one, and a changed byte changes it', { timeout: 30_000 }, async () => {
    const layout = makeLayout(8 * 1024 * 1024, 4096);
    const image = new GuestImage(layout, { seed: 3, zeroFraction: 0.1 });
    await expect(image.digestOf(undefined, { threads: 3, minBytes: 0 })).resolves.toBe(image.digest);
    const receivedmap = new Uint8Array(bitmapBytes(layout.totalPages));
    for (let page = 0; page < layout.totalPages; page++) if (page % 7 !== 0) bitmapSet(receivedmap, page);
    const serial = digestPages(image, layout, (page) => bitmapHas(receivedmap, page));
    await expect(image.digestOf(receivedmap, { threads: 3, minBytes: 0 })).resolves.toBe(serial);
    await expect(image.digestOf(receivedmap, { threads: 1 })).resolves.toBe(serial);
    image.pageBytes(100)[5]! ^= 1;
    await expect(image.digestOf(receivedmap, { threads: 3, minBytes: 0 })).resolves.not.toBe(serial);
  });
});
