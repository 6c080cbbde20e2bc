/**
 * The warm-up's peer answers the destination's own fault channel clients as
 * the source does: the generator's pages (that the first-touch check
 * passes), zero pages as zero-page notices, and nothing for a hello that
 * lacks its token and secret.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { ChannelRole, isZeroPage, makeLayout, verifyPage, type ImageSpec } from '@postcopy/shared';
import { PageClient } from '../net/page-client.js';
import { WarmUpPeer } from './peer.js';

const layout = makeLayout(64 * 4096, 4096);
const image: ImageSpec = { seed: 7, zeroFraction: 0.25 };

let peer: WarmUpPeer | undefined;
const clients: PageClient[] = [];
afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await peer?.close();
  peer = undefined;
});

function connect(p: WarmUpPeer, over: { token?: string; secret?: string; guestBytes?: number } = {}): Promise<PageClient> {
  return PageClient.connect({
    url: p.url,
    token: over.token ?? p.token,
    secret: over.secret ?? p.secret,
    role: ChannelRole.Fault,
    channel: 'vcpu0',
    guestBytes: over.guestBytes ?? layout.guestBytes,
    pageSize: layout.pageSize,
    connectTimeoutMs: 5000,
  }).then((c) => {
    clients.push(c);
    return c;
  });
}

describe('the warm-up peer', () => {
  it('answers every page of the scratch guest with the generator content, zero pages as zero-page', async () => {
    peer = await WarmUpPeer.start(layout, image);
    const client = await connect(peer);
    expect(client.welcome.totalPages).toBe(layout.totalPages);
    expect(client.welcome.imageSeed).toBe(image.seed);
    let zero = 0;
    for (let page = 0; page < layout.totalPages; page++) {
      const reply = await client.request(page);
      if (isZeroPage(image, page)) {
        zero++;
        expect(reply.type).toBe('zero-page');
        continue;
      }
      expect(reply.type).toBe('page');
      if (reply.type !== 'page') continue;
      expect(reply.page).toBe(page);
      const words = new Uint32Array(reply.data.buffer.slice(reply.data.byteOffset, reply.data.byteOffset + reply.data.byteLength));
      expect(verifyPage(image, page, words)).toBe(-1);
    }
    expect(zero).toBeGreaterThan(0);
    expect(peer.answered).toBe(layout.totalPages);
  });

  it('refuses a hello without its own token and secret, or for another layout, and answers nothing', async () => {
    peer = await WarmUpPeer.start(layout, image);
    await expect(connect(peer, { secret: 'ab'.repeat(32) })).rejects.toThrow(/warm-up peer: expected the warm-up peer's own token and secret/);
    await expect(connect(peer, { token: 'not-it' })).rejects.toThrow(/own token and secret/);
    await expect(connect(peer, { guestBytes: 2 * layout.guestBytes })).rejects.toThrow(/scratch guest's layout/);
    expect(peer.answered).toBe(0);
  });
});
