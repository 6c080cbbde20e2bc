/**
 * The blocking fault channel (a kvm-exit vCPU's, net/blocking-page-channel.ts)
 * against a real `ws` server: its WebSocket framing (the upgrade, masked
 * requests, pings answered, server frames checked), the fault-channel
 * contract it shares with PageClient (each reply matched to its request,
 * recovery: a lost connection reported, a pause cutting the socket, the
 * request replayed with its id after the resume, a reply of an ended session
 * dropped), and its refusals. The channel blocks its thread, so it runs in a
 * worker (fixtures/blocking-channel-thread.ts) beside the in-test source.
 */
import { createServer, type Server } from 'node:http';
import type { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';
import { startWorker, type Reply } from '@postcopy/shared';
import { loadUffdNative } from '../memory/uffd-native.js';
import { faultChannelOf } from '../run/destination-run.js';
import { COUNTER, VmmState } from '../vmm/state.js';
import { BlockingPageChannel } from './blocking-page-channel.js';
import type { BlockingThreadData } from './fixtures/blocking-channel-thread.js';
import { FakeSource, SECRET, layout } from './fixtures/fake-source.js';
import { Session } from './session.js';

type Posted =
  | { type: 'connected' | 'done' }
  | { type: 'reply'; reply: Pick<Reply, 'type' | 'id' | 'page'> & { first?: number; bytes?: number }; epoch: number }
  | { type: 'lost'; message: string; epoch: number }
  | { type: 'error'; message: string };

const native = loadUffdNative();
const workers: Worker[] = [];
const servers: Server[] = [];
let source: FakeSource | undefined;
afterEach(async () => {
  await Promise.all(workers.splice(0).map((w) => w.terminate()));
  for (const s of servers.splice(0)) s.closeAllConnections(), s.close();
  await source?.close();
  source = undefined;
});

/** Starts the channel's thread: it connects to `url` and requests `pages` in order. */
function channelThread(url: string, pages: number[], vmm: VmmState, reconnectTimeoutMs?: number): Posted[] {
  const posted: Posted[] = [];
  const data: BlockingThreadData = { url, secret: SECRET, guestBytes: layout.guestBytes, pageSize: layout.pageSize, counters: vmm.counters, pages, ...(reconnectTimeoutMs !== undefined ? { reconnectTimeoutMs } : {}) };
  const worker = startWorker(import.meta.url, 'fixtures/blocking-channel-thread', { workerData: data });
  worker.on('message', (m: Posted) => posted.push(m));
  worker.on('error', (err) => posted.push({ type: 'error', message: `worker: ${err.message}` }));
  workers.push(worker);
  return posted;
}

const until = FakeSource.until;
const replies = (posted: Posted[]) => posted.filter((m): m is Extract<Posted, { type: 'reply' }> => m.type === 'reply');
const errorOf = (posted: Posted[]) => posted.find((m): m is Extract<Posted, { type: 'error' }> => m.type === 'error');

describe.runIf(native.ok)('BlockingPageChannel', () => {
  it('fetches a page, a zero page and an already-sent reply, answering a ping on the way; says hello as a fault channel with the secret', { timeout: 10_000 }, async () => {
    const src = (source = await FakeSource.start());
    const vmm = VmmState.create(layout.totalPages, 1);
    const posted = channelThread(src.url, [3, 5, 7], vmm);
    await until(() => src.requests.length === 1);
    expect(src.hellos[0]).toMatchObject({ role: 1, channel: 'vcpu0', secret: SECRET, guestBytes: layout.guestBytes, pageSize: layout.pageSize });
    // A ping while the request is out: the thread answers it before the reply comes.
    let pongs = 0;
    src.connections[0]!.on('pong', () => pongs++);
    src.connections[0]!.ping(Buffer.from('hi'));
    await until(() => pongs === 1);
    const first = src.requests[0]!;
    src.reply(0, { type: 'page', id: first.id, page: 3, data: new Uint8Array(layout.pageSize).fill(0xab) });
    await until(() => src.requests.length === 2);
    src.reply(0, { type: 'zero-page', id: src.requests[1]!.id, page: 5 });
    await until(() => src.requests.length === 3);
    src.reply(0, { type: 'already-sent', id: src.requests[2]!.id, page: 7 });
    await until(() => posted.some((m) => m.type === 'done' || m.type === 'error'));
    expect(errorOf(posted)).toBeUndefined();
    expect(replies(posted).map((m) => m.reply)).toEqual([
      { type: 'page', id: first.id, page: 3, first: 0xab, bytes: layout.pageSize },
      { type: 'zero-page', id: first.id + 1, page: 5 },
      { type: 'already-sent', id: first.id + 2, page: 7 },
    ]);
    // The requests came whole and in order, each once, on one connection.
    expect(src.requests.map((r) => [r.conn, r.page])).toEqual([[0, 3], [0, 5], [0, 7]]);
  });

  it('a connection lost mid-request is reported; after the pause and resume the request goes out again with its id and is answered once', { timeout: 10_000 }, async () => {
    const src = (source = await FakeSource.start());
    const vmm = VmmState.create(layout.totalPages, 1);
    const session = new Session(vmm.counters);
    const posted = channelThread(src.url, [7], vmm, 5000);
    await until(() => src.requests.length === 1);
    const { id } = src.requests[0]!;
    src.connections[0]!.terminate();
    await until(() => posted.some((m) => m.type === 'lost'));
    expect(posted.find((m) => m.type === 'lost')).toMatchObject({ epoch: 0, message: expect.stringMatching(/connection to the source/) });
    // What the main thread does on that report: pause, then resume once the source is back.
    session.pause();
    session.resume();
    await until(() => src.requests.length === 2);
    expect(src.requests[1]).toMatchObject({ conn: 1, id, page: 7 });
    expect(vmm.counter(COUNTER.REPLAYED)).toBe(1);
    src.reply(1, { type: 'zero-page', id, page: 7 });
    await until(() => posted.some((m) => m.type === 'done' || m.type === 'error'));
    expect(replies(posted)).toEqual([{ type: 'reply', reply: { type: 'zero-page', id, page: 7 }, epoch: 2 }]);
    expect(posted.filter((m) => m.type === 'lost')).toHaveLength(1);
  });

  it('a pause from elsewhere cuts the socket; a reply of the ended session is not delivered, and the request is replayed after the resume', { timeout: 10_000 }, async () => {
    const src = (source = await FakeSource.start());
    const vmm = VmmState.create(layout.totalPages, 1);
    const session = new Session(vmm.counters);
    const posted = channelThread(src.url, [3], vmm, 5000);
    await until(() => src.requests.length === 1);
    const { id } = src.requests[0]!;
    session.pause();
    src.reply(0, { type: 'zero-page', id, page: 3 });
    await until(() => !src.open(0));
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(replies(posted)).toHaveLength(0);
    // Nobody reported a loss: the pause was not this channel's.
    expect(posted.some((m) => m.type === 'lost')).toBe(false);
    session.resume();
    await until(() => src.requests.length === 2);
    expect(src.requests[1]).toMatchObject({ conn: 1, id, page: 3 });
    src.reply(1, { type: 'zero-page', id, page: 3 });
    await until(() => posted.some((m) => m.type === 'done' || m.type === 'error'));
    expect(replies(posted)).toEqual([{ type: 'reply', reply: { type: 'zero-page', id, page: 3 }, epoch: 2 }]);
    expect(vmm.counter(COUNTER.REPLAYED)).toBe(1);
    // Dropped when it was read after the pause, or never read (the socket was cut first).
    expect(vmm.counter(COUNTER.REPLIES_DROPPED)).toBeLessThanOrEqual(1);
  });

  it('without recovery, a lost connection fails the request with a clear error', { timeout: 10_000 }, async () => {
    const src = (source = await FakeSource.start());
    const posted = channelThread(src.url, [1], VmmState.create(layout.totalPages, 1));
    await until(() => src.requests.length === 1);
    src.connections[0]!.terminate();
    await until(() => errorOf(posted) !== undefined);
    expect(errorOf(posted)!.message).toMatch(/connection to the source/);
  });

  it('gives up when it cannot reconnect within its timeout', { timeout: 10_000 }, async () => {
    const src = (source = await FakeSource.start());
    const vmm = VmmState.create(layout.totalPages, 1);
    const session = new Session(vmm.counters);
    const posted = channelThread(src.url, [1], vmm, 300);
    await until(() => src.requests.length === 1);
    await src.close();
    source = undefined;
    session.pause();
    session.resume();
    await until(() => errorOf(posted) !== undefined);
    expect(errorOf(posted)!.message).toMatch(/vcpu0: could not reconnect to the source at ws:\/\/127\.0\.0\.1:\d+ within 300 ms/);
  });

  it('a reply to a request it never sent, or for another page, is a protocol error', { timeout: 10_000 }, async () => {
    for (const wrong of ['id', 'page'] as const) {
      const src = (source = await FakeSource.start());
      const posted = channelThread(src.url, [2], VmmState.create(layout.totalPages, 1));
      await until(() => src.requests.length === 1);
      const { id } = src.requests[0]!;
      src.reply(0, wrong === 'id' ? { type: 'zero-page', id: id + 1, page: 2 } : { type: 'zero-page', id, page: 9 });
      await until(() => errorOf(posted) !== undefined);
      expect(errorOf(posted)!.message).toMatch(wrong === 'id' ? /never sent or already had answered/ : /expected page 2, got page 9/);
      await src.close();
      source = undefined;
    }
  });

  it('a message larger than a fault channel takes ends the connection with an error', { timeout: 10_000 }, async () => {
    const src = (source = await FakeSource.start());
    const posted = channelThread(src.url, [2], VmmState.create(layout.totalPages, 1));
    await until(() => src.requests.length === 1);
    src.connections[0]!.send(Buffer.alloc(2 * 1024 * 1024));
    await until(() => errorOf(posted) !== undefined);
    expect(errorOf(posted)!.message).toMatch(/a WebSocket message of 2097152 bytes, more than the \d+ a fault channel takes/);
  });

  it('an HTTP refusal instead of the upgrade is reported with its status and body', { timeout: 10_000 }, async () => {
    const server = createServer((_req, res) => res.writeHead(403, { 'content-type': 'text/plain' }).end('no client certificate\x1b[31m'));
    server.on('upgrade', (_req, socket) => socket.end('HTTP/1.1 403 Forbidden\r\nContent-Length: 21\r\nConnection: close\r\n\r\nno client certificate'));
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const posted = channelThread(`ws://127.0.0.1:${(server.address() as { port: number }).port}`, [1], VmmState.create(layout.totalPages, 1));
    await until(() => errorOf(posted) !== undefined);
    expect(errorOf(posted)!.message).toMatch(/refused this destination \(HTTP 403 Forbidden\): no client certificate$/);
  });

  it('an upgrade answer with the wrong Sec-WebSocket-Accept is refused', { timeout: 10_000 }, async () => {
    const server = createServer();
    server.on('upgrade', (_req, socket) => socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n'));
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const posted = channelThread(`ws://127.0.0.1:${(server.address() as { port: number }).port}`, [1], VmmState.create(layout.totalPages, 1));
    await until(() => errorOf(posted) !== undefined);
    expect(errorOf(posted)!.message).toMatch(/upgrade answer is not valid .*Sec-WebSocket-Accept wrong/);
  });

  it('nothing listening: a clear error', { timeout: 10_000 }, async () => {
    const src = await FakeSource.start();
    const url = src.url;
    await src.close();
    const posted = channelThread(url, [1], VmmState.create(layout.totalPages, 1));
    await until(() => errorOf(posted) !== undefined);
    expect(errorOf(posted)!.message).toMatch(/cannot reach the source at ws:\/\/127\.0\.0\.1:\d+\/: ECONNREFUSED/);
  });
});

describe('--fault-channel', () => {
  it('auto is blocking where the addon is built (over wss:// given a CA), event-loop otherwise; blocking where it cannot be is an error', () => {
    const blocking = native.ok ? 'blocking' : 'event-loop';
    expect(faultChannelOf({ source: 'wss://127.0.0.1:1', faultChannel: 'auto' })).toBe('event-loop');
    expect(faultChannelOf({ source: 'wss://127.0.0.1:1', faultChannel: 'auto', tls: { ca: 'PEM' } })).toBe(blocking);
    expect(faultChannelOf({ source: 'ws://127.0.0.1:1', faultChannel: 'event-loop' })).toBe('event-loop');
    expect(faultChannelOf({ source: 'ws://127.0.0.1:1', faultChannel: 'auto' })).toBe(blocking);
    expect(BlockingPageChannel.unavailable({ url: 'wss://127.0.0.1:1' })).toMatch(/system's CAs/);
    expect(() => faultChannelOf({ source: 'wss://127.0.0.1:1', faultChannel: 'blocking' })).toThrow(/--fault-channel blocking: a wss:\/\/ source verified against the system's CAs \(no --tls-ca\) is spoken by the event-loop client only/);
  });
});
