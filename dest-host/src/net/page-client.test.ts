/**
 * A fault channel that follows the destination's session (recovery): against
 * a small in-test source, a pause cuts the socket and keeps the pending
 * requests, a resume reconnects and replays them with their ids, a reply from
 * an ended session is dropped (and its request replayed), and a connection
 * lost while the session is current is reported.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { ChannelRole, type Reply } from '@postcopy/shared';
import { COUNTER, VmmState } from '../vmm/state.js';
import { PageClient, type SessionFollowing } from './page-client.js';
import { FakeSource, SECRET, layout } from './fixtures/fake-source.js';
import { Session } from './session.js';

let source: FakeSource | undefined;
const clients: PageClient[] = [];
afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await source?.close();
  source = undefined;
});

/** A fault channel to the fake source, following `following` if given. */
async function connect(channel: string, following?: SessionFollowing): Promise<PageClient> {
  const client = await PageClient.connect({
    url: source!.url,
    token: 't',
    role: ChannelRole.Fault,
    channel,
    guestBytes: layout.guestBytes,
    pageSize: layout.pageSize,
    secret: SECRET,
    ...(following ? { following } : {}),
  });
  clients.push(client);
  return client;
}

async function setup(reconnectTimeoutMs = 5000): Promise<{ client: PageClient; session: Session; vmm: VmmState; lost: Error[] }> {
  source = await FakeSource.start();
  const vmm = VmmState.create(layout.totalPages, 1);
  const session = new Session(vmm.counters);
  const lost: Error[] = [];
  const client = await connect('resolver0', { session, reconnectTimeoutMs, onLost: (err) => void lost.push(err) });
  return { client, session, vmm, lost };
}

describe('PageClient following the session (recovery)', () => {
  it('a pause cuts the socket and keeps the request; a resume replays it with its id and the reply resolves it', { timeout: 10_000 }, async () => {
    const { client, session, vmm } = await setup();
    const src = source!;
    const reply = client.request(7);
    await FakeSource.until(() => src.requests.length === 1);
    const first = src.requests[0]!;
    expect(first).toMatchObject({ conn: 0, page: 7 });

    session.pause();
    await FakeSource.until(() => !src.open(0));
    expect(client.pendingRequests).toBe(1);
    // Asked while paused: held, sent after the resume (not counted as a replay).
    const second = client.request(9);
    await new Promise((resolve) => setTimeout(resolve, 30));
    expect(src.connections).toHaveLength(1);

    session.resume();
    await FakeSource.until(() => src.requests.length === 3);
    expect(src.requests.slice(1).map((r) => ({ conn: r.conn, id: r.id, page: r.page }))).toEqual([
      { conn: 1, id: first.id, page: 7 },
      { conn: 1, id: first.id + 1, page: 9 },
    ]);
    expect(vmm.counter(COUNTER.REPLAYED)).toBe(1);
    src.reply(1, { type: 'zero-page', id: first.id, page: 7 });
    src.reply(1, { type: 'already-sent', id: first.id + 1, page: 9 });
    await expect(reply).resolves.toMatchObject({ type: 'zero-page', page: 7 });
    await expect(second).resolves.toMatchObject({ type: 'already-sent', page: 9 });
    expect(client.pendingRequests).toBe(0);
  });

  it('a reply read after the session paused is dropped, and its request is replayed after the resume', { timeout: 10_000 }, async () => {
    const { client, session, vmm } = await setup();
    const src = source!;
    let settled: Reply | undefined;
    void client.request(3).then((r) => (settled = r));
    await FakeSource.until(() => src.requests.length === 1);
    const id = src.requests[0]!.id;
    // The pause and the reply race; the session word decides: the reply is
    // read in a session that has ended, so it must not resolve the request.
    session.pause();
    src.reply(0, { type: 'zero-page', id, page: 3 });
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(settled).toBeUndefined();
    expect(client.pendingRequests).toBe(1);

    session.resume();
    await FakeSource.until(() => src.requests.length === 2);
    expect(src.requests[1]).toMatchObject({ conn: 1, id, page: 3 });
    src.reply(1, { type: 'zero-page', id, page: 3 });
    await FakeSource.until(() => settled !== undefined);
    expect(settled).toMatchObject({ type: 'zero-page', page: 3 });
    expect(vmm.counter(COUNTER.REPLAYED)).toBe(1);
    // Dropped either when it arrived (session ended) or not at all (the socket was cut first).
    expect(vmm.counter(COUNTER.REPLIES_DROPPED)).toBeLessThanOrEqual(1);
  });

  it('a connection lost while the session is current is reported once, and the request survives', { timeout: 10_000 }, async () => {
    const { client, session, lost } = await setup();
    const src = source!;
    const reply = client.request(5);
    await FakeSource.until(() => src.requests.length === 1);
    src.connections[0]!.terminate();
    await FakeSource.until(() => lost.length === 1);
    expect(lost[0]!.message).toMatch(/connection to the source/);
    expect(client.pendingRequests).toBe(1);
    // What the main thread does on that report: pause, then resume once the source is back.
    session.pause();
    session.resume();
    await FakeSource.until(() => src.requests.length === 2);
    src.reply(1, { type: 'zero-page', id: src.requests[1]!.id, page: 5 });
    await expect(reply).resolves.toMatchObject({ type: 'zero-page', page: 5 });
    expect(lost).toHaveLength(1);
  });

  it('requests of one turn leave in one write; a batch cut by a drop is replayed whole, each request answered once', { timeout: 10_000 }, async () => {
    const { client, session, lost } = await setup();
    const src = source!;
    const readsBefore = src.reads[0]!;
    // The source reads the batch, then the connection dies before any answer.
    src.onRequest = () => {
      src.onRequest = undefined;
      src.connections[0]!.terminate();
    };
    const replies = [4, 5, 6].map((page) => client.request(page));
    await FakeSource.until(() => lost.length === 1);
    // One turn, one write: the three requests came in one read.
    expect(src.reads[0]! - readsBefore).toBe(1);
    expect(src.requests.filter((r) => r.conn === 0).map((r) => r.page)).toEqual([4, 5, 6]);
    expect(client.pendingRequests).toBe(3);
    session.pause();
    session.resume();
    await FakeSource.until(() => src.requests.filter((r) => r.conn === 1).length === 3);
    const replayed = src.requests.filter((r) => r.conn === 1);
    // Replayed with their ids, and again in one write.
    expect(replayed.map((r) => ({ id: r.id, page: r.page }))).toEqual(src.requests.filter((r) => r.conn === 0).map((r) => ({ id: r.id, page: r.page })));
    expect(src.reads[1]).toBe(2); // the hello, then the whole replay
    for (const r of replayed) src.reply(1, { type: 'zero-page', id: r.id, page: r.page });
    await expect(Promise.all(replies)).resolves.toMatchObject([{ page: 4 }, { page: 5 }, { page: 6 }]);
    expect(client.pendingRequests).toBe(0);
  });

  it('gives up when it cannot reconnect within its timeout: pending requests fail with a clear error', { timeout: 10_000 }, async () => {
    const { client, session } = await setup(300);
    const reply = client.request(1);
    await source!.close();
    source = undefined;
    session.pause();
    session.resume();
    await expect(reply).rejects.toThrow(/resolver0: could not reconnect to the source at ws:\/\/127\.0\.0\.1:\d+ within 300 ms/);
  });

  it('without following, a lost connection fails the pending requests (as before recovery)', { timeout: 10_000 }, async () => {
    source = await FakeSource.start();
    const client = await connect('vcpu0');
    const reply = client.request(1);
    const src = source;
    await FakeSource.until(() => src.requests.length === 1);
    src.connections[0]!.terminate();
    await expect(reply).rejects.toThrow(/connection to the source/);
  });
});

describe('Session', () => {
  it('pause and resume move the epoch: even connected, odd paused', () => {
    const session = new Session(VmmState.create(8, 1).counters);
    expect(session.epoch).toBe(0);
    expect(session.pause()).toBe(1);
    expect(session.pause()).toBe(1);
    expect(Session.isPaused(session.epoch)).toBe(true);
    expect(session.resume()).toBe(2);
    expect(session.resume()).toBe(2);
  });

  it('an install entered in a current session holds the pause back; after the pause none may enter', () => {
    const session = new Session(VmmState.create(8, 1).counters);
    expect(session.enterInstall(0)).toBe(true);
    session.pause();
    // Still inside: the pause cannot take its snapshot yet.
    expect(() => session.quiesce(20)).toThrow(/1 reply install\(s\) still running/);
    session.leaveInstall();
    expect(() => session.quiesce(20)).not.toThrow();
    expect(session.enterInstall(0)).toBe(false);
    session.resume();
    expect(session.enterInstall(2)).toBe(true);
    session.leaveInstall();
  });
});
