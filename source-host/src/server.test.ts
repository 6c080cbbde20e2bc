import { afterEach, describe, expect, it } from 'vitest';
import { createConnection, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import WebSocket from 'ws';
import { ChannelRole, PROTOCOL_VERSION, PUSH_HEADER_BYTES, PUSH_RECORD, PUSH_UPGRADE, bitmapBytes, bitmapSet, decode, decodePushRecordHeader, encode, lengthPrefixed, makeLayout, type Message } from '@postcopy/shared';
import { within } from './fixtures/within.js';
import { GuestImage } from './image.js';
import { SourceServer, type SourceServerOptions } from './server.js';

const servers: SourceServer[] = [];
afterEach(async () => {
  while (servers.length) await servers.pop()!.close();
});

async function listen(handshakeTimeoutMs: number): Promise<SourceServer> {
  const image = new GuestImage(makeLayout(16 * 4096, 4096), { seed: 1, zeroFraction: 0 });
  const server = await SourceServer.listen(image, { host: '127.0.0.1', port: 0, token: 'secret', handshakeTimeoutMs });
  servers.push(server);
  return server;
}

/** Connects and collects what the server sends until it closes (or `timeoutMs`). */
function session(url: string, send: (ws: WebSocket) => void, timeoutMs = 5000): Promise<{ messages: Message[]; code: number }> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    const messages: Message[] = [];
    const timer = setTimeout(() => {
      ws.terminate();
      reject(new Error(`no close within ${timeoutMs} ms; got ${JSON.stringify(messages.map((m) => m.type))}`));
    }, timeoutMs);
    ws.on('open', () => send(ws));
    ws.on('message', (data: Buffer) => messages.push(decode(data, { layout: makeLayout(16 * 4096, 4096) })));
    ws.on('close', (code) => {
      clearTimeout(timer);
      resolve({ messages, code });
    });
  });
}

describe('source handshake timeout', () => {
  it('drops a peer that sends no hello, with an error saying so', async () => {
    const server = await listen(200);
    const started = performance.now();
    const { messages, code } = await session(server.url, () => {});
    expect(performance.now() - started).toBeGreaterThanOrEqual(190);
    expect(code).toBe(1008);
    expect(messages).toEqual([{ type: 'error', code: 'ERR_POSTCOPY_HANDSHAKE', message: 'expected hello within 200 ms, got none' }]);
  });

  it('leaves a peer that said hello in time alone', async () => {
    const server = await listen(200);
    const hello = encode({ type: 'hello', protocolVersion: PROTOCOL_VERSION, token: 'secret', role: ChannelRole.Main, guestBytes: 16 * 4096, pageSize: 4096, channel: 'main', secret: '' });
    const { messages } = await session(
      server.url,
      (ws) => {
        ws.send(hello);
        // Well past the timeout, ask for a page, then leave.
        setTimeout(() => ws.send(encode({ type: 'request', id: 1, page: 3 })), 400);
        setTimeout(() => ws.close(1000), 600);
      },
    );
    expect(messages.map((m) => m.type)).toEqual(['welcome', 'page']);
  });
});

// ---------------------------------------------------------------------------
// Recovery (postcopy-paused / postcopy-recover) and the connection limit.

const PAGES = 64;
const LAYOUT = makeLayout(PAGES * 4096, 4096);
const IMAGE = new GuestImage(LAYOUT, { seed: 5, zeroFraction: 0 });
const peers: Peer[] = [];
afterEach(() => {
  while (peers.length) peers.pop()!.ws.terminate();
});

async function listenWith(options: Partial<SourceServerOptions> = {}): Promise<SourceServer> {
  const server = await SourceServer.listen(IMAGE, { host: '127.0.0.1', port: 0, token: 'secret', ...options });
  servers.push(server);
  return server;
}

/** A client connection that decodes and keeps every frame the source sends. */
interface Peer {
  ws: WebSocket;
  messages: Message[];
  closed: Promise<{ code: number; reason: string }>;
  /** Resolves once a message of `type` has arrived (at or after index `from`), with it. */
  next<T extends Message['type']>(type: T, from?: number): Promise<Extract<Message, { type: T }>>;
}

async function connect(url: string): Promise<Peer> {
  const ws = new WebSocket(url, { perMessageDeflate: false });
  const messages: Message[] = [];
  const waiters = new Set<() => void>();
  ws.on('message', (data: Buffer) => {
    messages.push(decode(data, { layout: LAYOUT }));
    for (const w of waiters) w();
  });
  ws.on('error', () => {});
  const closed = new Promise<{ code: number; reason: string }>((resolve) => ws.once('close', (code: number, reason: Buffer) => resolve({ code, reason: reason.toString() })));
  const peer: Peer = {
    ws,
    messages,
    closed,
    next: (type, from = 0) =>
      new Promise((resolve, reject) => {
        const check = (): boolean => {
          const found = messages.slice(from).find((m) => m.type === type);
          if (!found) return false;
          waiters.delete(check);
          clearTimeout(timer);
          resolve(found as never);
          return true;
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`no ${type} within 5 s; got ${JSON.stringify(messages.map((m) => m.type))}`));
        }, 5000);
        if (!check()) {
          waiters.add(check);
          void closed.then(() => setTimeout(() => check() || reject(new Error(`closed without ${type}; got ${JSON.stringify(messages.map((m) => m.type))}`)), 0));
        }
      }),
  };
  peers.push(peer);
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve());
    ws.once('error', reject);
  });
  return peer;
}

function helloFrame(role: number, channel: string, secret = ''): Buffer {
  return encode({ type: 'hello', protocolVersion: PROTOCOL_VERSION, token: 'secret', role: role as 0 | 1 | 2, guestBytes: LAYOUT.guestBytes, pageSize: LAYOUT.pageSize, channel, secret });
}

/** Connects and says hello (with the migration's `secret`, if given); resolves after the welcome. */
async function channel(url: string, role: number, label: string, secret = ''): Promise<Peer> {
  const peer = await connect(url);
  peer.ws.send(helloFrame(role, label, secret));
  await peer.next('welcome');
  return peer;
}

/** The secret a new migration's main channel got in its welcome. */
function secretOf(main: Peer): string {
  const welcome = main.messages[0];
  if (welcome?.type !== 'welcome') throw new Error(`expected a welcome first, got ${welcome?.type}`);
  expect(welcome.secret).toMatch(/^[0-9a-f]{64}$/);
  return welcome.secret;
}

function bitmapOf(pages: Iterable<number>): Uint8Array {
  const map = new Uint8Array(bitmapBytes(PAGES));
  for (const page of pages) bitmapSet(map, page);
  return map;
}

/** The peer got one error (code, message) as its last frame and was closed with `close`. */
async function expectRefused(peer: Peer, code: string, message: string | RegExp, close: number): Promise<void> {
  const closed = await within(peer.closed, 5000, 'the source to close the connection');
  const last = peer.messages.at(-1);
  expect(last?.type).toBe('error');
  if (last?.type === 'error') {
    expect(last.code).toBe(code);
    if (typeof message === 'string') expect(last.message).toBe(message);
    else expect(last.message).toMatch(message);
  }
  expect(closed.code).toBe(close);
}

async function waitFor(predicate: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = performance.now() + ms;
  while (!predicate()) {
    if (performance.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

function nextEvent<T extends unknown[]>(server: SourceServer, event: string, ms = 5000): Promise<T> {
  return within(new Promise<T>((resolve) => server.once(event, (...args: unknown[]) => resolve(args as T))), ms, `the ${event} event`);
}

const CONTENT = new Set(['page', 'zero-page', 'pushed', 'pushed-zero']);

describe('source recovery: paused, resumed', () => {
  it('pauses when the main channel drops, cuts the old fault channels, refuses fault hellos while paused, and resumes on a new main channel', async () => {
    const server = await listenWith();
    const main = await channel(server.url, ChannelRole.Main, 'main');
    const secret = secretOf(main);
    main.ws.send(encode({ type: 'start', push: false, preempt: true }));
    const fault = await channel(server.url, ChannelRole.Fault, 'vcpu0', secret);
    fault.ws.send(encode({ type: 'request', id: 1, page: 3 }));
    fault.ws.send(encode({ type: 'request', id: 2, page: 4 }));
    expect(await fault.next('page', 2)).toMatchObject({ id: 2, page: 4 });
    expect(fault.messages.map((m) => m.type)).toEqual(['welcome', 'page', 'page']);
    expect(server.state).toBe('postcopy-active');

    // The connection is lost (no close handshake): paused, and the old fault channel is cut.
    const paused = nextEvent<[string]>(server, 'paused');
    main.ws.terminate();
    expect((await paused)[0]).toMatch(/main channel closed before the migration finished/);
    expect(server.state).toBe('postcopy-paused');
    await within(fault.closed, 5000, 'the old fault channel to be cut');

    // A fault channel may not come back before the main channel has resumed.
    const early = await connect(server.url);
    early.ws.send(helloFrame(ChannelRole.Fault, 'vcpu0', secret));
    await expectRefused(early, 'ERR_POSTCOPY_PAUSED', `the migration is paused: expected the destination's main channel to resume it first`, 1013);
    expect(early.messages.map((m) => m.type)).toEqual(['error']);

    // Resume: page 4 was sent but never arrived; pages 7 and 9 were requested and are still missing.
    const main2 = await channel(server.url, ChannelRole.Main, 'main', secret);
    const resumedEvent = nextEvent<[number, boolean]>(server, 'resumed');
    main2.ws.send(encode({ type: 'resume', push: false, preempt: true, receivedmap: bitmapOf([3]), requestedmap: bitmapOf([3, 7, 9]) }));
    expect(await main2.next('resumed')).toEqual({ type: 'resumed', pagesMarkedUnsent: 1, restarted: false });
    expect(await resumedEvent).toEqual([1, false]);
    expect(server.state).toBe('postcopy-active');
    await main2.next('page', 3);
    const types = main2.messages.map((m) => m.type);
    expect(types.indexOf('resumed')).toBe(1);
    expect(types.findIndex((t) => CONTENT.has(t))).toBeGreaterThan(types.indexOf('resumed'));
    expect(main2.messages.slice(2)).toEqual([
      { type: 'page', id: 0, page: 7, data: expect.any(Uint8Array) },
      { type: 'page', id: 0, page: 9, data: expect.any(Uint8Array) },
    ]);

    // Now the fault channel reconnects and replays its pending request (old id): already sent; a new one is answered.
    const fault2 = await channel(server.url, ChannelRole.Fault, 'vcpu0', secret);
    fault2.ws.send(encode({ type: 'request', id: 2, page: 4 }));
    fault2.ws.send(encode({ type: 'request', id: 3, page: 7 }));
    const reply = await fault2.next('page');
    expect(reply).toMatchObject({ id: 2, page: 4 });
    expect(Buffer.compare(Buffer.from(reply.data), Buffer.from(IMAGE.pageBytes(4)))).toBe(0);
    expect(await fault2.next('already-sent')).toEqual({ type: 'already-sent', id: 3, page: 7 });

    // The summary: every page sent once to the receivedmap as it ends, every request answered.
    main2.ws.send(encode({ type: 'finish', receivedmap: bitmapOf([3, 4, 7, 9]) }));
    const summary = await main2.next('summary');
    expect(summary).toMatchObject({ pagesSent: 4, pagesSentTwice: 0, sentNotReceived: 0, receivedNotSent: 0, requests: 4, replies: 4, repliesUndeliverable: 0 });
    expect(summary.replies + summary.repliesUndeliverable).toBe(summary.requests);
    expect(server.state).toBe('completed');
    expect(server.migration.stats).toMatchObject({ resumes: 1, pagesResentRequested: 2 });
  });

  it('gives up with destination-lost when the destination does not resume in time; a dropped attempt does not restart the wait', async () => {
    const TIMEOUT = 600;
    const server = await listenWith({ resumeTimeoutMs: TIMEOUT });
    const main = await channel(server.url, ChannelRole.Main, 'main');
    const secret = secretOf(main);
    main.ws.send(encode({ type: 'start', push: true, preempt: true }));
    await main.next('pushed');
    const paused = nextEvent(server, 'paused');
    const lost = nextEvent<[string]>(server, 'destination-lost', 5000);
    main.ws.terminate();
    await paused;
    const pausedAt = performance.now();
    // A resume attempt that drops before it resumes.
    await new Promise((r) => setTimeout(r, TIMEOUT / 2));
    const attempt = await channel(server.url, ChannelRole.Main, 'main', secret);
    const attemptDroppedAt = performance.now();
    attempt.ws.terminate();
    const [reason] = await lost;
    const lostAt = performance.now();
    expect(reason).toBe(`the destination's connection was lost during postcopy and it did not resume within ${TIMEOUT} ms`);
    expect(lostAt - pausedAt).toBeGreaterThanOrEqual(TIMEOUT - 15);
    // Had the dropped attempt restarted the timer, it could not have fired before this.
    expect(lostAt).toBeLessThan(attemptDroppedAt + TIMEOUT);
    expect(server.state).toBe('failed');
  });

  it('a main channel lost before start is destination-lost at once', async () => {
    const server = await listenWith();
    const main = await channel(server.url, ChannelRole.Main, 'main');
    const lost = nextEvent<[string]>(server, 'destination-lost', 2000);
    main.ws.close();
    expect((await lost)[0]).toBe(`the destination's main channel closed before the migration started`);
  });

  it('a --resume source begins paused: it refuses start and fault channels, resumes with restarted=true and sends the requested pages', async () => {
    const secret = 'c0de'.repeat(16);
    const server = await listenWith({ resume: true, resumeTimeoutMs: 5000, secret });
    expect(server.state).toBe('postcopy-paused');
    const fault = await connect(server.url);
    fault.ws.send(helloFrame(ChannelRole.Fault, 'vcpu0', secret));
    await expectRefused(fault, 'ERR_POSTCOPY_PAUSED', /^the migration is paused: expected/, 1013);
    // Without the secret, nobody may even open the main channel of the migration it continues.
    const stranger = await connect(server.url);
    stranger.ws.send(helloFrame(ChannelRole.Main, 'main'));
    await expectRefused(stranger, 'ERR_POSTCOPY_HANDSHAKE', /^expected the migration's secret on a main channel that resumes it, got none/, 1008);

    const main = await channel(server.url, ChannelRole.Main, 'main', secret);
    main.ws.send(encode({ type: 'start', push: true, preempt: true }));
    await expectRefused(main, 'ERR_POSTCOPY_PROTOCOL', 'expected resume: the migration is paused (this source was started with --resume)', 1002);
    expect(server.state).toBe('postcopy-paused');

    const main2 = await channel(server.url, ChannelRole.Main, 'main', secret);
    main2.ws.send(encode({ type: 'resume', push: false, preempt: true, receivedmap: bitmapOf([0, 1]), requestedmap: bitmapOf([1, 5, 6]) }));
    expect(await main2.next('resumed')).toEqual({ type: 'resumed', pagesMarkedUnsent: 0, restarted: true });
    await main2.next('page', 3);
    expect(main2.messages.map((m) => [m.type, 'page' in m ? m.page : undefined])).toEqual([
      ['welcome', undefined],
      ['resumed', undefined],
      ['page', 5],
      ['page', 6],
    ]);
    const fault2 = await channel(server.url, ChannelRole.Fault, 'vcpu0', secret);
    fault2.ws.send(encode({ type: 'request', id: 9, page: 1 }));
    expect(await fault2.next('already-sent')).toEqual({ type: 'already-sent', id: 9, page: 1 });

    // Lost again: this time the source knows what it sent since the restart.
    const paused = nextEvent(server, 'paused');
    main2.ws.terminate();
    await paused;
    const main3 = await channel(server.url, ChannelRole.Main, 'main', secret);
    main3.ws.send(encode({ type: 'start', push: true, preempt: true }));
    await expectRefused(main3, 'ERR_POSTCOPY_PROTOCOL', 'expected resume: the migration is paused (its connection was lost)', 1002);
    const main4 = await channel(server.url, ChannelRole.Main, 'main', secret);
    main4.ws.send(encode({ type: 'resume', push: false, preempt: true, receivedmap: bitmapOf([0, 1, 5]), requestedmap: bitmapOf([]) }));
    // Page 6 was sent but is not in the receivedmap.
    expect(await main4.next('resumed')).toEqual({ type: 'resumed', pagesMarkedUnsent: 1, restarted: false });
  });

  it('a --resume source that nobody resumes gives up after the timeout', async () => {
    const server = await listenWith({ resume: true, resumeTimeoutMs: 100, secret: 'ab'.repeat(32) });
    const [reason] = await nextEvent<[string]>(server, 'destination-lost', 5000);
    expect(reason).toBe('this source was restarted with --resume and the destination did not resume the migration within 100 ms');
  });

  it('a fresh source refuses resume with a clear message', async () => {
    const server = await listenWith();
    const main = await channel(server.url, ChannelRole.Main, 'main');
    main.ws.send(encode({ type: 'resume', push: true, preempt: true, receivedmap: bitmapOf([]), requestedmap: bitmapOf([]) }));
    await expectRefused(
      main,
      'ERR_POSTCOPY_PROTOCOL',
      'expected start: this source has no migration to resume (start it with --resume to continue a migration whose source process died)',
      1002,
    );
    expect(main.messages.map((m) => m.type)).toEqual(['welcome', 'error']);
  });

  it('refuses a second start and a resume while active (and the refused main channel pauses the migration)', async () => {
    const server = await listenWith();
    const main = await channel(server.url, ChannelRole.Main, 'main');
    const secret = secretOf(main);
    main.ws.send(encode({ type: 'start', push: false, preempt: true }));
    main.ws.send(encode({ type: 'resume', push: true, preempt: true, receivedmap: bitmapOf([]), requestedmap: bitmapOf([]) }));
    await expectRefused(main, 'ERR_POSTCOPY_PROTOCOL', 'expected resume only while the migration is paused, got it while it is postcopy-active', 1002);
    await waitFor(() => server.state === 'postcopy-paused', 'the pause');

    const main2 = await channel(server.url, ChannelRole.Main, 'main', secret);
    main2.ws.send(encode({ type: 'resume', push: false, preempt: true, receivedmap: bitmapOf([]), requestedmap: bitmapOf([]) }));
    await main2.next('resumed');
    main2.ws.send(encode({ type: 'start', push: false, preempt: true }));
    await expectRefused(main2, 'ERR_POSTCOPY_PROTOCOL', 'expected start once, got it again (the migration is postcopy-active)', 1002);
  });
});

describe('source batches (one turn, one write)', () => {
  /** A fault channel that sends a batch of frames in one write, as the destination's TurnCork does, and counts its socket's reads. */
  interface BatchingPeer {
    messages: Message[];
    sendBatch(frames: Buffer[]): void;
    reads(): number;
    /** Resolves once `n` messages have arrived. */
    until(n: number): Promise<void>;
  }

  async function batchingPeer(url: string, label: string, secret: string): Promise<BatchingPeer> {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    let socket: Duplex | undefined;
    let reads = 0;
    ws.once('upgrade', (res) => {
      socket = res.socket;
      socket.on('data', () => reads++);
    });
    const messages: Message[] = [];
    const waiters = new Set<() => void>();
    ws.on('message', (data: Buffer) => {
      messages.push(decode(data, { layout: LAYOUT }));
      for (const w of waiters) w();
    });
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    peers.push({ ws, messages, closed: new Promise(() => {}), next: () => Promise.reject(new Error('not used')) });
    const until = (n: number): Promise<void> =>
      new Promise((resolve) => {
        const check = (): void => {
          if (messages.length < n) return;
          waiters.delete(check);
          resolve();
        };
        waiters.add(check);
        check();
      });
    ws.send(helloFrame(ChannelRole.Fault, label, secret));
    await until(1);
    return {
      messages,
      sendBatch: (frames) => {
        socket!.cork();
        for (const f of frames) ws.send(f);
        socket!.uncork();
      },
      reads: () => reads,
      until,
    };
  }

  it('a page in two batches on two channels: each request answered once, its content sent once, each batch answered in one write', async () => {
    const server = await listenWith();
    const main = await channel(server.url, ChannelRole.Main, 'main');
    main.ws.send(encode({ type: 'start', push: false, preempt: true }));
    const a = await batchingPeer(server.url, 'vcpu0', secretOf(main));
    const b = await batchingPeer(server.url, 'vcpu1', secretOf(main));
    const before = [a.reads(), b.reads()];
    a.sendBatch([encode({ type: 'request', id: 1, page: 10 }), encode({ type: 'request', id: 2, page: 11 }), encode({ type: 'request', id: 3, page: 12 })]);
    b.sendBatch([encode({ type: 'request', id: 1, page: 12 }), encode({ type: 'request', id: 2, page: 13 })]);
    await a.until(4);
    await b.until(3);
    const replies = (p: BatchingPeer): { type: string; id: number; page: number }[] =>
      p.messages.slice(1).map((m) => ({ type: m.type, id: (m as { id: number }).id, page: (m as { page: number }).page }));
    const ra = replies(a);
    const rb = replies(b);
    // One reply per request id, for the page asked.
    expect(ra.map((r) => [r.id, r.page])).toEqual([[1, 10], [2, 11], [3, 12]]);
    expect(rb.map((r) => [r.id, r.page])).toEqual([[1, 12], [2, 13]]);
    // Page 12 was in both batches: its content went out once, the other request got already-sent.
    expect([...ra, ...rb].filter((r) => r.page === 12).map((r) => r.type).sort()).toEqual(['already-sent', 'page']);
    // Each batch came in one read and was answered in one write.
    expect([a.reads() - before[0]!, b.reads() - before[1]!]).toEqual([1, 1]);
  });
});

describe('source connection limit', () => {
  it('refuses the connection past maxConnections with ERR_POSTCOPY_BUSY and 1013, and keeps serving the others', async () => {
    const server = await listenWith({ maxConnections: 2 });
    const main = await channel(server.url, ChannelRole.Main, 'main');
    const secret = secretOf(main);
    main.ws.send(encode({ type: 'start', push: false, preempt: true }));
    // Counted without a hello too.
    const silent = await connect(server.url);
    const third = await connect(server.url);
    await expectRefused(third, 'ERR_POSTCOPY_BUSY', 'expected at most 2 connections, this would be 3', 1013);
    expect(third.messages).toHaveLength(1);

    // The first two still work.
    silent.ws.send(helloFrame(ChannelRole.Fault, 'vcpu0', secret));
    await silent.next('welcome');
    silent.ws.send(encode({ type: 'request', id: 1, page: 10 }));
    expect(await silent.next('page')).toMatchObject({ id: 1, page: 10 });

    // A slot freed is a slot for the next connection.
    silent.ws.close();
    await silent.closed;
    await waitFor(() => server.openConnections === 1, 'the slot to free');
    const fourth = await channel(server.url, ChannelRole.Fault, 'vcpu1', secret);
    expect(fourth.messages.map((m) => m.type)).toEqual(['welcome']);
    main.ws.send(encode({ type: 'finish', receivedmap: bitmapOf([10]) }));
    expect(await main.next('summary')).toMatchObject({ pagesSent: 1 });
  });
});

describe('every channel is bound to its migration (the secret)', () => {
  const HANDSHAKE = 'ERR_POSTCOPY_HANDSHAKE';
  /** What an outsider with the token may send right behind its hello: none of it may be served. */
  const pipelined = (): Buffer[] => [encode({ type: 'request', id: 1, page: 0 }), encode({ type: 'request', id: 2, page: 1 }), encode({ type: 'start', push: true, preempt: true })];

  /** Opens a channel with `hello` and pipelined requests; expects exactly one error and the close, nothing else. */
  async function outsider(url: string, role: number, secret: string, message: RegExp): Promise<void> {
    const peer = await connect(url);
    peer.ws.send(helloFrame(role, 'outsider', secret));
    for (const frame of pipelined()) peer.ws.send(frame);
    await expectRefused(peer, HANDSHAKE, message, 1008);
    expect(peer.messages.map((m) => m.type)).toEqual(['error']);
  }

  it('gives the secret to the main channel that starts the migration only; fault channels get an empty one', async () => {
    const server = await listenWith();
    const main = await channel(server.url, ChannelRole.Main, 'main');
    const secret = secretOf(main);
    expect(secret).toBe(server.secret);
    const fault = await channel(server.url, ChannelRole.Fault, 'vcpu0', secret);
    expect(fault.messages[0]).toMatchObject({ type: 'welcome', secret: '' });
    // Another source makes another secret.
    const other = await listenWith();
    expect(other.secret).not.toBe(server.secret);
  });

  it('refuses fault and main channels without the secret, with a wrong one or another migration\'s; nothing is sent, marked sent or counted', async () => {
    const server = await listenWith();
    const other = await listenWith();
    const otherMain = await channel(other.url, ChannelRole.Main, 'main');
    const otherSecret = secretOf(otherMain);

    // Before any migration began, no fault channel may join one.
    await outsider(server.url, ChannelRole.Fault, '', /^expected a fault channel of a running migration, got outsider before any migration started/);
    const main = await channel(server.url, ChannelRole.Main, 'main');
    const secret = secretOf(main);
    main.ws.send(encode({ type: 'start', push: false, preempt: true }));
    await waitFor(() => server.state === 'postcopy-active', 'the start');

    await outsider(server.url, ChannelRole.Fault, '', /^expected the migration's secret in a fault channel's hello, got none: outsider is not part of the migration/);
    await outsider(server.url, ChannelRole.Fault, 'f'.repeat(64), /^expected the secret of the migration this source runs, got another one/);
    await outsider(server.url, ChannelRole.Fault, otherSecret, /^expected the secret of the migration this source runs, got another one/);
    await outsider(server.url, ChannelRole.Main, '', /^expected one main channel, got a second one \(outsider\)/);
    await outsider(server.url, ChannelRole.Main, otherSecret, /^expected the secret of the migration this source runs, got another one/);
    expect(server.migration.stats.requests).toBe(0);
    expect(server.migration.sentmap.sent).toBe(0);
    expect(server.state).toBe('postcopy-active');

    // The real destination's channels are served as ever.
    const fault = await channel(server.url, ChannelRole.Fault, 'vcpu0', secret);
    fault.ws.send(encode({ type: 'request', id: 1, page: 0 }));
    expect(await fault.next('page')).toMatchObject({ id: 1, page: 0 });
    expect(server.migration.stats.requests).toBe(1);
    main.ws.send(encode({ type: 'finish', receivedmap: bitmapOf([0]) }));
    expect(await main.next('summary')).toMatchObject({ requests: 1, replies: 1, pagesSent: 1, sentNotReceived: 0, receivedNotSent: 0 });
    // After the end, nobody joins.
    await outsider(server.url, ChannelRole.Fault, secret, /^expected a channel of a running migration, got outsider after the migration finished/);
  });

  it('while paused, only the secret opens the main channel: an outsider can neither resume nor squat it', async () => {
    const server = await listenWith();
    const main = await channel(server.url, ChannelRole.Main, 'main');
    const secret = secretOf(main);
    main.ws.send(encode({ type: 'start', push: false, preempt: true }));
    const paused = nextEvent(server, 'paused');
    main.ws.terminate();
    await paused;
    await outsider(server.url, ChannelRole.Main, '', /^expected the migration's secret on a main channel that resumes it, got none/);
    await outsider(server.url, ChannelRole.Main, 'e'.repeat(64), /^expected the secret of the migration this source runs/);
    expect(server.state).toBe('postcopy-paused');
    const main2 = await channel(server.url, ChannelRole.Main, 'main', secret);
    main2.ws.send(encode({ type: 'resume', push: false, preempt: true, receivedmap: bitmapOf([]), requestedmap: bitmapOf([]) }));
    expect(await main2.next('resumed')).toEqual({ type: 'resumed', pagesMarkedUnsent: 0, restarted: false });
  });

  it('a main channel with the secret while the old one still looks alive takes over: the old one is cut and the migration pauses for the resume', async () => {
    const server = await listenWith();
    const main = await channel(server.url, ChannelRole.Main, 'main');
    const secret = secretOf(main);
    main.ws.send(encode({ type: 'start', push: false, preempt: true }));
    const fault = await channel(server.url, ChannelRole.Fault, 'vcpu0', secret);
    fault.ws.send(encode({ type: 'request', id: 1, page: 2 }));
    await fault.next('page');
    const paused = nextEvent<[string]>(server, 'paused');
    // As after a dead link: the destination gave up on its old connections and comes back with the secret.
    const main2 = await channel(server.url, ChannelRole.Main, 'main', secret);
    expect((await paused)[0]).toMatch(/^the destination opened a new main channel \(main\): it lost the old one/);
    await within(main.closed, 5000, 'the old main channel to be cut');
    await within(fault.closed, 5000, 'the old fault channel to be cut');
    main2.ws.send(encode({ type: 'resume', push: false, preempt: true, receivedmap: bitmapOf([2]), requestedmap: bitmapOf([]) }));
    expect(await main2.next('resumed')).toEqual({ type: 'resumed', pagesMarkedUnsent: 0, restarted: false });
    expect(server.state).toBe('postcopy-active');
  });

  it('a source restarted with --resume refuses a main channel that presents no secret, or another one', async () => {
    const secret = '5eed'.repeat(16);
    const server = await listenWith({ resume: true, secret });
    await outsider(server.url, ChannelRole.Main, '', /^expected the migration's secret on a main channel that resumes it, got none/);
    await outsider(server.url, ChannelRole.Main, '0'.repeat(64), /^expected the secret of the migration this source runs/);
    await outsider(server.url, ChannelRole.Fault, '0'.repeat(64), /^expected the secret of the migration this source runs/);
    const main = await channel(server.url, ChannelRole.Main, 'main', secret);
    expect(main.messages[0]).toMatchObject({ type: 'welcome', secret: '' });
  });

  it('a fresh source refuses a main channel that presents a secret (there is no migration to resume)', async () => {
    const server = await listenWith();
    await outsider(server.url, ChannelRole.Main, 'a'.repeat(64), /^expected no migration secret \(this source has no migration to resume; .*--resume.*--secret-file/);
    expect(server.state).toBe('setup');
  });
});

describe('source keepalive', () => {
  it('cuts a main channel that stops answering (a dead link sends no close): keepalive-timeout, then paused; the count reaches the summary', async () => {
    const server = await listenWith({ keepaliveMs: 150 });
    const main = await channel(server.url, ChannelRole.Main, 'main');
    const secret = secretOf(main);
    main.ws.send(encode({ type: 'start', push: false, preempt: true }));
    // A peer that answers pings is never cut.
    await new Promise((r) => setTimeout(r, 500));
    expect(server.state).toBe('postcopy-active');
    const timeout = nextEvent<[number]>(server, 'keepalive-timeout');
    const paused = nextEvent<[string]>(server, 'paused');
    // Stop reading: no pong goes back, as when the link dies.
    (main.ws as unknown as { _socket: import('node:net').Socket })._socket.pause();
    const [silentMs] = await timeout;
    expect(silentMs).toBeGreaterThan(150);
    expect(silentMs).toBeLessThan(2000);
    await paused;
    const main2 = await channel(server.url, ChannelRole.Main, 'main', secret);
    main2.ws.send(encode({ type: 'resume', push: false, preempt: true, receivedmap: bitmapOf([]), requestedmap: bitmapOf([]) }));
    await main2.next('resumed');
    main2.ws.send(encode({ type: 'finish', receivedmap: bitmapOf([]) }));
    expect(await main2.next('summary')).toMatchObject({ keepaliveTimeouts: 1 });
  });

  it('with --keepalive-ms 0 a silent main channel is never cut', async () => {
    const server = await listenWith({ keepaliveMs: 0 });
    const main = await channel(server.url, ChannelRole.Main, 'main');
    main.ws.send(encode({ type: 'start', push: false, preempt: true }));
    (main.ws as unknown as { _socket: import('node:net').Socket })._socket.pause();
    await new Promise((r) => setTimeout(r, 600));
    expect(server.state).toBe('postcopy-active');
    expect(server.keepaliveTimeouts).toBe(0);
  });
});

// ---------------------------------------------------------------------------
// Push channels (shared/push-stream.ts): a raw stream, bound to the migration's secret.

/** A raw push channel: upgrade, hello; then everything the source sends (the handshake frame, then records). */
async function pushChannel(url: string, hello: Buffer): Promise<{ bytes: () => Buffer; closed: Promise<void>; socket: Socket }> {
  const { port } = new URL(url);
  const socket = createConnection({ host: '127.0.0.1', port: Number(port) });
  let bytes = Buffer.alloc(0);
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  socket.on('error', () => {});
  await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
  socket.write(`GET /push HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nConnection: Upgrade\r\nUpgrade: ${PUSH_UPGRADE}\r\n\r\n`);
  await new Promise<void>((resolve) => {
    socket.on('data', (chunk: Buffer) => {
      bytes = Buffer.concat([bytes, chunk]);
      const end = bytes.indexOf('\r\n\r\n');
      if (end >= 0 && bytes.subarray(0, 12).toString() === 'HTTP/1.1 101') {
        bytes = bytes.subarray(end + 4);
        resolve();
      }
    });
  });
  socket.write(lengthPrefixed(hello));
  return { bytes: () => bytes, closed, socket };
}

/** The first length-prefixed frame of `bytes`, decoded, and what follows it. */
function firstFrame(bytes: Buffer): { message: Message; rest: Buffer } {
  const length = bytes.readUInt32BE(0);
  return { message: decode(bytes.subarray(4, 4 + length)), rest: bytes.subarray(4 + length) };
}

describe('source push channels', () => {
  it('admits a push channel that presents the secret, refuses one that does not; the push goes on it, complete on main', async () => {
    const server = await listenWith();
    const main = await channel(server.url, ChannelRole.Main, 'main');
    const secret = secretOf(main);
    const outsider = await pushChannel(server.url, helloFrame(ChannelRole.Push, 'push-outsider'));
    await within(outsider.closed, 5000, 'the outsider to be cut');
    const refused = firstFrame(outsider.bytes()).message;
    expect(refused).toMatchObject({ type: 'error', code: 'ERR_POSTCOPY_HANDSHAKE' });
    expect(refused.type === 'error' && refused.message).toMatch(/secret/);

    const push = await pushChannel(server.url, helloFrame(ChannelRole.Push, 'push0', secret));
    await waitFor(() => push.bytes().length >= 4 && push.bytes().length >= 4 + push.bytes().readUInt32BE(0), 'the push channel welcome');
    expect(firstFrame(push.bytes()).message).toMatchObject({ type: 'welcome', secret: '' });
    main.ws.send(encode({ type: 'start', push: true, preempt: true }));
    await main.next('complete');
    // The whole guest fits one record.
    const expected = PUSH_HEADER_BYTES + PAGES * 4096;
    await waitFor(() => firstFrame(push.bytes()).rest.length >= expected, 'every pushed page');
    const records = firstFrame(push.bytes()).rest;
    const pages: number[] = [];
    for (let at = 0; at < records.length; ) {
      const h = decodePushRecordHeader(records.subarray(at, at + PUSH_HEADER_BYTES), LAYOUT);
      at += PUSH_HEADER_BYTES;
      expect(h.kind).toBe(PUSH_RECORD.PAGES);
      expect(records.subarray(at, at + h.count * 4096).equals(Buffer.from(IMAGE.pagesBytes(h.first, h.count)))).toBe(true);
      at += h.count * 4096;
      for (let p = h.first; p < h.first + h.count; p++) pages.push(p);
    }
    expect(pages).toEqual(Array.from({ length: PAGES }, (_, p) => p));
    expect(main.messages.some((m) => CONTENT.has(m.type))).toBe(false);
    push.socket.destroy();
  });

  it("refuses a push channel's hello on a WebSocket, and a fault channel's on a push stream", async () => {
    const server = await listenWith();
    const main = await channel(server.url, ChannelRole.Main, 'main');
    const secret = secretOf(main);
    const ws = await connect(server.url);
    ws.ws.send(helloFrame(ChannelRole.Push, 'push-on-ws', secret));
    await expectRefused(ws, 'ERR_POSTCOPY_HANDSHAKE', /expected a main or fault channel's hello on a WebSocket, got a push channel's/, 1008);
    const stream = await pushChannel(server.url, helloFrame(ChannelRole.Fault, 'fault-on-push', secret));
    await within(stream.closed, 5000, 'the fault hello on a push stream to be refused');
    const refused = firstFrame(stream.bytes()).message;
    expect(refused.type === 'error' && refused.message).toMatch(/expected a push channel's hello \(role 2\)/);
  });
});
