/**
 * A real source process against hostile and broken clients: random bytes,
 * msgpack of the wrong shape, unknown types, wrong versions and tokens, text
 * and oversized frames, requests before the handshake or outside the guest,
 * floods. Each bad peer gets an `error` naming what was expected and its
 * connection is closed (1002 protocol error, 1008 handshake/policy, 1009 too
 * big); the process stays up and a new valid hello still gets a welcome. And
 * a real migration against the same source completes verified while hostile
 * clients hammer it.
 *
 * Attacks that need a channel open it with the migration's secret (the test
 * plays the destination's part to get it), to reach the frame checks behind
 * the hello. The hostile clients of the last test hold no token, or hold the
 * token but not the secret: their hellos are refused before they can send
 * anything (e2e/test/outsider.test.ts is the outsider who asks for pages).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { connect as netConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { pack } from 'msgpackr';
import { afterEach, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import {
  ChannelRole,
  MessageType,
  PROTOCOL_VERSION,
  decode,
  encode,
  makeLayout,
  maxFrameBytes,
  rng,
  type Message,
  type Report,
} from '@postcopy/shared';
import { DEST, SOURCE, TEST_SOURCE_WARM_UP, TEST_WARM_UP, failedChecks, runNode, within } from './run.js';

const TOKEN = 'hostile-test-token';
const MEMORY = '8MiB';
const LAYOUT = makeLayout(8 * 1024 * 1024, 4096);
const MAX_PAYLOAD = maxFrameBytes(LAYOUT.pageSize, LAYOUT.totalPages);
const LAST_PAGE = LAYOUT.totalPages - 1;

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});


const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface SourceProcess {
  url: string;
  child: ChildProcess;
  stderr: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Starts a real source process (built CLI, ephemeral port, token in the environment); resolves once it listens. */
async function startSource(args: string[] = []): Promise<SourceProcess> {
  const child = spawn(process.execPath, [SOURCE, '--port', '0', ...TEST_SOURCE_WARM_UP, '--memory', MEMORY, '--handshake-timeout-ms', '600000', ...args], {
    env: { ...process.env, POSTCOPY_TOKEN: TOKEN },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  cleanups.push(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await within(exited, 5_000, 'the source process to exit after SIGKILL');
  });
  const url = await within(
    new Promise<string>((resolve, reject) => {
      createInterface({ input: child.stdout! }).on('line', (line) => {
        const m = /^listening (ws:\/\/\S+)$/.exec(line);
        if (m) resolve(m[1]!);
      });
      child.once('exit', (code) => reject(new Error(`source exited (${code}) before listening: ${stderr}`)));
    }),
    20_000,
    'the source to print "listening ws://..."',
  );
  return { url, child, stderr: () => stderr, exited };
}

/** A WebSocket client that records what it receives and how it was closed. */
interface Peer {
  ws: WebSocket;
  messages: Message[];
  /** Frames from the source that did not decode (must stay empty). */
  garbage: string[];
  closed: Promise<{ code: number; reason: string }>;
}

async function connect(url: string): Promise<Peer> {
  const ws = new WebSocket(url, { perMessageDeflate: false });
  const messages: Message[] = [];
  const garbage: string[] = [];
  ws.on('message', (data: Buffer, isBinary: boolean) => {
    try {
      if (!isBinary) throw new Error('a text frame');
      messages.push(decode(data, { layout: LAYOUT }));
    } catch (err) {
      garbage.push((err as Error).message);
    }
  });
  // A peer that is cut off mid-send may see EPIPE/ECONNRESET; the close event says the rest.
  ws.on('error', () => {});
  const closed = new Promise<{ code: number; reason: string }>((resolve) =>
    ws.once('close', (code: number, reason: Buffer) => resolve({ code, reason: reason.toString() })),
  );
  cleanups.push(() => ws.terminate());
  await within(
    new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    }),
    5_000,
    `a WebSocket connection to ${url}`,
  );
  return { ws, messages, garbage, closed };
}

/** Waits until `predicate` holds, polling; fails after `ms`. */
async function until(predicate: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms: ${what}`);
    await sleep(5);
  }
}

/**
 * The secret of the migration the source under test runs, once the test has
 * opened its main channel ({@link claimMigration}); fault hellos present it.
 */
let migrationSecret = '';

function hello(overrides: Partial<Extract<Message, { type: 'hello' }>> = {}): Buffer {
  return encode({
    type: 'hello',
    protocolVersion: PROTOCOL_VERSION,
    token: TOKEN,
    role: ChannelRole.Fault,
    guestBytes: LAYOUT.guestBytes,
    pageSize: LAYOUT.pageSize,
    channel: 'hostile',
    secret: migrationSecret,
    ...overrides,
  });
}

/** Opens the source's main channel as its destination would and keeps its secret for the fault hellos. */
async function claimMigration(source: SourceProcess): Promise<Peer> {
  const main = await connect(source.url);
  main.ws.send(hello({ role: ChannelRole.Main, channel: 'main', secret: '' }));
  await until(() => main.messages.length > 0, 5_000, 'the main channel\'s welcome');
  const welcome = main.messages[0]!;
  if (welcome.type !== 'welcome' || welcome.secret === '') throw new Error(`expected a welcome with the migration's secret, got ${JSON.stringify(welcome)}`);
  migrationSecret = welcome.secret;
  return main;
}
afterEach(() => {
  migrationSecret = '';
});

const PROTOCOL = { code: 'ERR_POSTCOPY_PROTOCOL', close: 1002 } as const;
const HANDSHAKE = { code: 'ERR_POSTCOPY_HANDSHAKE', close: 1008 } as const;

/**
 * The peer got exactly one `error` (with this code and a message matching
 * `pattern`) after whatever else it was meant to get, nothing undecodable,
 * and was closed with `close`.
 */
async function expectRejected(
  peer: Peer,
  expected: { code: string; close: number },
  pattern: RegExp,
  before: Message['type'][] = [],
): Promise<void> {
  const closed = await within(peer.closed, 5_000, 'the source to close the connection');
  expect(peer.garbage).toEqual([]);
  expect(peer.messages.map((m) => m.type)).toEqual([...before, 'error']);
  const error = peer.messages.at(-1) as Extract<Message, { type: 'error' }>;
  expect(error.code).toBe(expected.code);
  expect(error.message).toMatch(pattern);
  expect(error.message).toMatch(/expected/);
  expect(closed.code).toBe(expected.close);
}

/** The process is alive and a new valid hello still gets a welcome. */
async function expectServing(source: SourceProcess): Promise<void> {
  expect(source.child.exitCode, source.stderr()).toBeNull();
  expect(source.child.signalCode).toBeNull();
  const peer = await connect(source.url);
  peer.ws.send(hello({ channel: 'probe' }));
  await until(() => peer.messages.length > 0, 5_000, 'a welcome for a valid hello');
  const welcome = peer.messages[0]!;
  expect(welcome.type).toBe('welcome');
  if (welcome.type === 'welcome') {
    expect(welcome.protocolVersion).toBe(PROTOCOL_VERSION);
    expect(welcome.totalPages).toBe(LAYOUT.totalPages);
  }
  peer.ws.close();
}

/** Deterministic junk: `n` bytes from a seeded PRNG. */
function randomBytes(seed: number, n: number): Buffer {
  const next = rng(seed);
  return Buffer.from(Array.from({ length: n }, () => Math.floor(next() * 256)));
}

interface Attack {
  name: string;
  /** Sends the hello first and expects its welcome, for attacks that need a channel. */
  afterHello?: boolean;
  /** Fields of that hello other than the defaults. */
  hello?: Partial<Extract<Message, { type: 'hello' }>>;
  frames: () => (Buffer | string)[];
  expected: { code: string; close: number };
  pattern: RegExp;
}

const ATTACKS: Attack[] = [
  { name: 'random bytes', frames: () => [randomBytes(1, 512)], expected: PROTOCOL, pattern: /expected a msgpack frame|expected a message/ },
  { name: 'bytes that are not msgpack (a never-used tag)', frames: () => [Buffer.from([0xc1, 0x01, 0x02])], expected: PROTOCOL, pattern: /expected a msgpack frame, got 3 bytes that do not decode/ },
  { name: 'valid msgpack that is not an array', frames: () => [pack({ hello: 'world' })], expected: PROTOCOL, pattern: /expected a message array \[type, \.\.\.fields\], got object/ },
  { name: 'an empty array', frames: () => [pack([])], expected: PROTOCOL, pattern: /expected a message array \[type, \.\.\.fields\], got array of 0/ },
  { name: 'a hello of the wrong shape', frames: () => [pack([MessageType.Hello, PROTOCOL_VERSION, TOKEN])], expected: PROTOCOL, pattern: /hello: expected 7 fields, got 2/ },
  { name: 'a hello with a string where the role goes', frames: () => [pack([MessageType.Hello, PROTOCOL_VERSION, TOKEN, 'main', LAYOUT.guestBytes, 4096, 'x', ''])], expected: PROTOCOL, pattern: /hello\.role: expected a whole number from 0 to 2, got "main" \(string\)/ },
  { name: 'a hello with role 3', frames: () => [pack([MessageType.Hello, PROTOCOL_VERSION, TOKEN, 3, LAYOUT.guestBytes, 4096, 'x', ''])], expected: PROTOCOL, pattern: /hello\.role: expected a whole number from 0 to 2, got 3 \(number\)/ },
  { name: 'an unknown message type', frames: () => [pack([99, 1, 2])], expected: PROTOCOL, pattern: /expected a message type from 1 to 14, 20, 21 or 23 to 36, got 99 \(number\)/ },
  { name: 'a reserved (future) message type', frames: () => [pack([22, new Uint8Array(8)])], expected: PROTOCOL, pattern: /expected a message type from 1 to 14, 20, 21 or 23 to 36, got 22/ },
  { name: 'a type that is not a number', frames: () => [pack(['hello', 1])], expected: PROTOCOL, pattern: /expected a message type from 1 to 14, 20, 21 or 23 to 36, got "hello" \(string\)/ },
  { name: 'a discard sent to the source', afterHello: true, frames: () => [encode({ type: 'discard', ranges: [{ first: 0, count: 1 }] })], expected: PROTOCOL, pattern: /expected request, start or finish, got discard/ },
  { name: 'running before any switchover', afterHello: true, hello: { role: ChannelRole.Fault }, frames: () => [encode({ type: 'running' })], expected: PROTOCOL, pattern: /expected running on the main channel, got it on hostile/ },
  { name: 'a hello with the wrong protocol version', frames: () => [hello({ protocolVersion: 1 })], expected: HANDSHAKE, pattern: new RegExp(`expected protocol version ${PROTOCOL_VERSION}, got 1`) },
  { name: 'a hello with a wrong token', frames: () => [hello({ token: 'guess' })], expected: HANDSHAKE, pattern: /expected a valid access token, got a wrong one/ },
  { name: 'a hello with an empty token', frames: () => [hello({ token: '' })], expected: HANDSHAKE, pattern: /expected a valid access token, got none/ },
  { name: 'a hello without the token field', frames: () => [pack([MessageType.Hello, PROTOCOL_VERSION, ChannelRole.Main, LAYOUT.guestBytes, 4096, 'x', ''])], expected: PROTOCOL, pattern: /hello: expected 7 fields, got 6/ },
  { name: 'a hello with a token longer than any real one', frames: () => [pack([MessageType.Hello, PROTOCOL_VERSION, 'x'.repeat(10_000), 0, LAYOUT.guestBytes, 4096, 'x', ''])], expected: PROTOCOL, pattern: /hello\.token: expected a string of at most 256 characters/ },
  // The token without the secret: not part of the migration (see e2e/test/outsider.test.ts).
  { name: 'a fault hello with the token but without the secret', frames: () => [hello({ secret: '' }), encode({ type: 'request', id: 1, page: 0 })], expected: HANDSHAKE, pattern: /expected the migration's secret in a fault channel's hello, got none|before any migration started/ },
  { name: 'a fault hello with a wrong secret', frames: () => [hello({ secret: '0'.repeat(64) }), encode({ type: 'request', id: 1, page: 0 })], expected: HANDSHAKE, pattern: /expected the secret of the migration this source runs, got another one|expected no migration secret/ },
  { name: 'a hello with a secret that is not one', frames: () => [pack([MessageType.Hello, PROTOCOL_VERSION, TOKEN, 1, LAYOUT.guestBytes, 4096, 'x', 'x'.repeat(4096)])], expected: PROTOCOL, pattern: /hello\.secret: expected '' or 64 hex digits, got "x{40}…" \(string\)/ },
  { name: 'a second main hello with the token but without the secret', frames: () => [hello({ role: ChannelRole.Main, secret: '' })], expected: HANDSHAKE, pattern: /expected one main channel, got a second one \(hostile\)/ },
  { name: 'a hello with another guest layout', frames: () => [hello({ guestBytes: 16 * 1024 * 1024 })], expected: HANDSHAKE, pattern: /expected guest layout 8MiB in 4KiB pages, got 16MiB in 4KiB pages/ },
  { name: 'a text frame', frames: () => ['{"type":"hello"}'], expected: PROTOCOL, pattern: /expected binary frames, got a text frame/ },
  { name: 'a request before the hello', frames: () => [encode({ type: 'request', id: 1, page: 0 })], expected: PROTOCOL, pattern: /request: expected the handshake \(hello, welcome\) first, got request before it/ },
  { name: 'start before the hello', frames: () => [encode({ type: 'start', push: true, preempt: false })], expected: PROTOCOL, pattern: /expected hello first, got start/ },
  { name: 'a request for the page past the end of the guest', afterHello: true, frames: () => [encode({ type: 'request', id: 1, page: LAYOUT.totalPages })], expected: PROTOCOL, pattern: new RegExp(`request\\.page: expected a whole number from 0 to ${LAST_PAGE}, got ${LAYOUT.totalPages} \\(number\\)`) },
  { name: 'a request for a negative page', afterHello: true, frames: () => [pack([MessageType.Request, 1, -1])], expected: PROTOCOL, pattern: new RegExp(`request\\.page: expected a whole number from 0 to ${LAST_PAGE}, got -1 \\(number\\)`) },
  { name: 'a request for page 2^32', afterHello: true, frames: () => [pack([MessageType.Request, 1, 2 ** 32])], expected: PROTOCOL, pattern: /request\.page: expected a whole number from 0 to \d+, got 4294967296/ },
  { name: 'a request for a fractional page', afterHello: true, frames: () => [pack([MessageType.Request, 1, 1.5])], expected: PROTOCOL, pattern: /request\.page: expected a whole number .*got 1\.5 \(number\)/ },
  { name: 'a request id above 2^32-1', afterHello: true, frames: () => [pack([MessageType.Request, 2 ** 32, 0])], expected: PROTOCOL, pattern: /request\.id: expected a whole number from 0 to 4294967295, got 4294967296/ },
  { name: 'a second hello', afterHello: true, frames: () => [hello()], expected: PROTOCOL, pattern: /expected request, start or finish, got hello/ },
  { name: 'start on a fault channel', afterHello: true, frames: () => [encode({ type: 'start', push: true, preempt: false })], expected: PROTOCOL, pattern: /expected start on the main channel, got it on hostile/ },
  { name: 'finish on a fault channel', afterHello: true, frames: () => [encode({ type: 'finish', receivedmap: new Uint8Array(LAYOUT.totalPages / 8) })], expected: PROTOCOL, pattern: /expected finish on the main channel/ },
  { name: 'a page sent to the source', afterHello: true, frames: () => [encode({ type: 'page', id: 1, page: 0, data: new Uint8Array(4096) })], expected: PROTOCOL, pattern: /expected request, start or finish, got page/ },
  // Errors that quote what came: once longer than a close frame's 123-byte reason in UTF-8 (not in characters), they crashed the source.
  { name: 'a string of non-ASCII text', frames: () => [pack('é'.repeat(100))], expected: PROTOCOL, pattern: /expected a message array \[type, \.\.\.fields\], got "é{40}…" \(string\)/ },
  { name: 'start on a fault channel with a non-ASCII label', afterHello: true, hello: { channel: '🦀'.repeat(32) }, frames: () => [encode({ type: 'start', push: true, preempt: false })], expected: PROTOCOL, pattern: /expected start on the main channel, got it on \?{64}$/ },
  { name: 'garbage after a good hello', afterHello: true, frames: () => [randomBytes(2, 64)], expected: PROTOCOL, pattern: /expected/ },
];

/** Sends an attack on a fresh connection and asserts it is rejected as it should be. */
async function runAttack(url: string, attack: Attack): Promise<void> {
  const peer = await connect(url);
  if (attack.afterHello) {
    peer.ws.send(hello(attack.hello));
    await until(() => peer.messages.length > 0, 5_000, 'a welcome');
  }
  for (const frame of attack.frames()) peer.ws.send(frame, { binary: typeof frame !== 'string' });
  await expectRejected(peer, attack.expected, attack.pattern, attack.afterHello ? ['welcome'] : []);
}

describe('the source answers every hostile client with a clear error, closes it, and keeps serving', () => {
  it(`${ATTACKS.length} attacks in turn against one source, each rejected clearly; it serves a valid hello after each`, async () => {
    const source = await startSource();
    await claimMigration(source);
    for (const attack of ATTACKS) {
      try {
        await runAttack(source.url, attack);
        await expectServing(source);
      } catch (err) {
        (err as Error).message = `${attack.name}: ${(err as Error).message}`;
        throw err;
      }
    }
    expect(source.stderr().match(/^source: rejected /gm)).toHaveLength(ATTACKS.length);
  });

  it('behind an emulated link (delay and bandwidth) the error still arrives before the close, and only one', async () => {
    // The error frame crosses the emulated link; the close must wait for it.
    const source = await startSource(['--link-delay-us', '3000', '--link-bandwidth', '100mbit']);
    await claimMigration(source);
    for (const attack of ATTACKS.filter((a) => /random bytes|wrong token|before the hello|past the end|text frame/.test(a.name))) {
      await runAttack(source.url, attack);
    }
    // A bad frame followed by good requests: the channel is done at the first
    // bad frame; what was already on its way is not served.
    const peer = await connect(source.url);
    peer.ws.send(hello());
    await until(() => peer.messages.length > 0, 5_000, 'a welcome');
    peer.ws.send(pack([MessageType.Request, 1, -1]));
    for (let id = 2; id < 50; id++) peer.ws.send(encode({ type: 'request', id, page: id }));
    peer.ws.send(randomBytes(4, 100));
    await expectRejected(peer, PROTOCOL, /request\.page: expected a whole number/, ['welcome']);
    await expectServing(source);
  });

  it('an oversized frame (maxPayload + 1 bytes) is closed with 1009, before and after the hello', async () => {
    const source = await startSource();
    await claimMigration(source);
    for (const afterHello of [false, true]) {
      const peer = await connect(source.url);
      if (afterHello) {
        peer.ws.send(hello());
        await until(() => peer.messages.length > 0, 5_000, 'a welcome');
      }
      peer.ws.send(Buffer.alloc(MAX_PAYLOAD + 1, 0x91));
      const closed = await within(peer.closed, 5_000, 'the source to close an oversized frame');
      expect(closed.code).toBe(1009);
      expect(peer.messages.filter((m) => m.type !== 'welcome')).toEqual([]);
    }
    // A frame of exactly maxPayload bytes is not too big: it is read, then rejected as a bad message.
    const peer = await connect(source.url);
    peer.ws.send(Buffer.alloc(MAX_PAYLOAD, 0xc1));
    await expectRejected(peer, PROTOCOL, /expected a msgpack frame/);
    await expectServing(source);
  });

  it('a second main channel is refused; the first keeps its slot', async () => {
    const source = await startSource();
    const first = await connect(source.url);
    first.ws.send(hello({ role: ChannelRole.Main, channel: 'main' }));
    await until(() => first.messages.length > 0, 5_000, 'a welcome for the first main channel');
    const welcome = first.messages[0]!;
    expect(welcome.type).toBe('welcome');
    if (welcome.type === 'welcome') migrationSecret = welcome.secret;
    const second = await connect(source.url);
    second.ws.send(hello({ role: ChannelRole.Main, channel: 'intruder' }));
    await expectRejected(second, HANDSHAKE, /expected one main channel, got a second one \(intruder\)/);
    // The first main channel is still open and served.
    first.ws.send(encode({ type: 'request', id: 7, page: 3 }));
    await until(() => first.messages.length > 1, 5_000, 'a reply on the first main channel');
    expect(first.messages[1]).toMatchObject({ id: 7, page: 3 });
    expect(first.ws.readyState).toBe(WebSocket.OPEN);
    await expectServing(source);
  });

  it("a peer's text cannot forge or garble the source's log lines", async () => {
    const source = await startSource();
    await claimMigration(source);
    const forged = 'x\nsource: finished\x1b[2J\x1b]0;pwned\x07';
    const peer = await connect(source.url);
    peer.ws.send(hello({ token: 'guess', channel: forged }));
    await expectRejected(peer, HANDSHAKE, /expected a valid access token/);
    const junk = await connect(source.url);
    junk.ws.send(Buffer.concat([Buffer.from([0x91, 0xd9, 0x20]), Buffer.from('\n\x1b[31msource: finished\x1b[0m\r\x00\x00\x00\x00\x00\x00')]));
    await expectRejected(junk, PROTOCOL, /expected/);
    await expectServing(source);
    await until(() => source.stderr().split('\n').length > 2, 5_000, 'both rejections in the log');
    const log = source.stderr();
    expect(log).not.toMatch(/[\x00-\x09\x0b-\x1f\x7f]/); // no escapes, no carriage returns: newlines only end lines
    expect(log.split('\n').filter((line) => line !== '').every((line) => line.startsWith('source: rejected '))).toBe(true);
    expect(peer.messages.at(-1)).toMatchObject({ type: 'error' });
  });

  it('not WebSocket at all: raw TCP garbage and a half-sent frame', async () => {
    const source = await startSource();
    await claimMigration(source);
    const { hostname, port } = new URL(source.url);
    const raw = netConnect(Number(port), hostname);
    raw.on('error', () => {});
    let answer = '';
    raw.on('data', (d: Buffer) => (answer += d.toString('latin1')));
    const rawClosed = new Promise<void>((r) => raw.once('close', () => r()));
    await within(new Promise<void>((r) => raw.once('connect', () => r())), 5_000, 'a TCP connection');
    raw.write(randomBytes(3, 300));
    await within(rawClosed, 5_000, 'the source to drop a non-HTTP peer');
    expect(answer).toMatch(/^HTTP\/1\.1 400 Bad Request\r\n/);
    // A WebSocket peer that dies halfway through a frame header.
    const peer = await connect(source.url);
    const socket = (peer.ws as unknown as { _socket: import('node:net').Socket })._socket;
    socket.write(Buffer.from([0x82, 0xfe, 0x10])); // binary, masked, 16-bit length... and then nothing
    socket.destroy();
    await within(peer.closed, 5_000, 'the half-sent frame peer to close');
    await expectServing(source);
  });

  it('a flood of 5,000 requests after a valid hello: exactly one reply each, and the process stays up', async () => {
    const source = await startSource();
    await claimMigration(source);
    const peer = await connect(source.url);
    peer.ws.send(hello({ channel: 'flood' }));
    await until(() => peer.messages.length > 0, 5_000, 'a welcome');
    expect(peer.messages.shift()!.type).toBe('welcome');

    const N = 5_000;
    const next = rng(42);
    const pageOf = new Map<number, number>();
    for (let id = 1; id <= N; id++) {
      const page = Math.floor(next() * LAYOUT.totalPages); // repeats on purpose: they are answered already-sent
      pageOf.set(id, page);
      peer.ws.send(encode({ type: 'request', id, page }));
    }
    await until(() => peer.messages.length >= N, 30_000, `${N} replies (got ${peer.messages.length})`);
    await sleep(200); // and no more than that
    expect(peer.garbage).toEqual([]);
    expect(peer.messages).toHaveLength(N);

    const repliesPerId = new Map<number, number>();
    const contentPerPage = new Map<number, number>();
    for (const m of peer.messages) {
      if (m.type !== 'page' && m.type !== 'zero-page' && m.type !== 'already-sent') throw new Error(`unexpected ${m.type} in the flood's replies`);
      repliesPerId.set(m.id, (repliesPerId.get(m.id) ?? 0) + 1);
      expect(m.page).toBe(pageOf.get(m.id));
      if (m.type === 'page') expect(m.data.length).toBe(LAYOUT.pageSize);
      if (m.type !== 'already-sent') contentPerPage.set(m.page, (contentPerPage.get(m.page) ?? 0) + 1);
    }
    expect(repliesPerId.size).toBe(N);
    expect([...repliesPerId.values()].every((n) => n === 1)).toBe(true);
    // Each distinct page's content went out once; every repeat was answered already-sent.
    const distinct = new Set(pageOf.values()).size;
    expect(contentPerPage.size).toBe(distinct);
    expect([...contentPerPage.values()].every((n) => n === 1)).toBe(true);
    expect(peer.messages.filter((m) => m.type === 'already-sent')).toHaveLength(N - distinct);
    expect(peer.ws.readyState).toBe(WebSocket.OPEN);
    await expectServing(source);
  });
});

/** How a hello with the token but not the migration's secret is refused: before the migration began, or during it. */
const OUTSIDER = /expected (the migration's secret in a fault channel's hello|a fault channel of a running migration|the secret of the migration this source runs|no migration secret)/;

/** What the hostile clients of the concurrent test did and saw. */
interface HammerStats {
  attempts: number;
  /** Attacks rejected exactly as expected, with the time each ended. */
  rejectedAt: number[];
  /** Connections the source cut when it finished (1006 or refused): at most one per attacker, at the end. */
  interrupted: number;
  /** Anything else: a wrong error, a wrong close code, a welcome without the token, data. */
  unexpected: string[];
}

/** Attacks a source in a loop until `stop()` says so or the source goes away. */
async function hammer(url: string, offset: number, stop: () => boolean, stats: HammerStats): Promise<void> {
  // Token-less attacks, and hellos with the token but without the secret
  // (they never reach the migration: the hello is refused before any page is
  // touched). A main hello is left out: with the token, it may start the
  // migration before the real destination does, which is what the token is for.
  const attacks = ATTACKS.filter((a) => !a.name.includes('main hello'));
  for (let i = offset; !stop(); i++) {
    stats.attempts++;
    const oversized = i % 7 === 3;
    const attack = attacks[i % attacks.length]!;
    let peer: Peer;
    try {
      peer = await connect(url);
    } catch {
      stats.interrupted++;
      return; // the source finished and closed its port
    }
    try {
      if (!oversized && attack.afterHello) {
        peer.ws.send(hello({ channel: `hostile${offset}`, ...attack.hello }));
        await until(() => peer.messages.length > 0 || peer.ws.readyState !== WebSocket.OPEN, 5_000, 'a welcome');
      }
      if (peer.ws.readyState === WebSocket.OPEN) {
        if (oversized) peer.ws.send(Buffer.alloc(MAX_PAYLOAD + 1, 0x91));
        else for (const frame of attack.frames()) peer.ws.send(frame, { binary: typeof frame !== 'string' });
      }
      const closed = await within(peer.closed, 10_000, `the source to close ${attack.name}`);
      if (closed.code === 1006) {
        stats.interrupted++;
        return;
      }
      const types = peer.messages.map((m) => m.type).join(',');
      const last = peer.messages.at(-1);
      // Without the secret, the hello an attack needs is itself refused (before the destination came, or after).
      const refusedHello = !oversized && attack.afterHello;
      const wantTypes = oversized ? '' : 'error';
      const wantClose = oversized ? 1009 : refusedHello ? HANDSHAKE.close : attack.expected.close;
      const pattern = refusedHello ? OUTSIDER : attack.pattern;
      const tag = oversized ? 'oversized frame' : attack.name;
      if (types !== wantTypes) stats.unexpected.push(`${tag}: got messages [${types}]`);
      else if (closed.code !== wantClose) stats.unexpected.push(`${tag}: closed with ${closed.code}, expected ${wantClose}`);
      else if (!oversized && (last?.type !== 'error' || !pattern.test(last.message))) stats.unexpected.push(`${tag}: error ${JSON.stringify(last)}`);
      else if (peer.garbage.length) stats.unexpected.push(`${tag}: undecodable frames ${peer.garbage.join('; ')}`);
      else stats.rejectedAt.push(Date.now());
    } catch (err) {
      if (stop()) return;
      stats.unexpected.push(`${attack.name}: ${(err as Error).message}`);
    } finally {
      peer.ws.terminate();
    }
  }
}

describe('a real migration completes verified while hostile clients hammer the same source', () => {
  const RUNS = [
    {
      name: 'shared-uffd, push on (capped at 64 Mbit/s: about a second of migration to attack)',
      source: ['--max-postcopy-bandwidth', '64mbit'],
      dest: ['--workload', 'random'],
      push: true,
    },
    {
      name: 'per-thread-uffd, no push, 500 µs link delay (a fault channel per vCPU, every fault a slow round trip)',
      source: ['--link-delay-us', '500'],
      dest: ['--strategy', 'per-thread-uffd', '--workload', 'random', '--no-push'],
      push: false,
    },
  ];
  it.each(RUNS.map((r) => [r.name, r] as const))('%s; 4 attackers and 20 idle squatters', async (_name, run) => {
    const source = await startSource(run.source);
    let stopped = false;
    const stats: HammerStats = { attempts: 0, rejectedAt: [], interrupted: 0, unexpected: [] };
    const ATTACKERS = 4;
    const attackers = Array.from({ length: ATTACKERS }, (_, i) => hammer(source.url, i * 5, () => stopped, stats));
    cleanups.push(async () => {
      stopped = true;
      await within(Promise.all(attackers), 15_000, 'the attackers to stop');
    });
    // Connections that open and never say a word hold no slot and block nobody.
    const squatters = await Promise.all(Array.from({ length: 20 }, () => connect(source.url)));
    await until(() => stats.rejectedAt.length >= 8, 10_000, 'the attacks to be under way');

    const dir = mkdtempSync(join(tmpdir(), 'postcopy-hostile-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const json = join(dir, 'report.json');
    const destStart = Date.now();
    const dest = await runNode(DEST, ['--source', source.url, ...TEST_WARM_UP, '--memory', MEMORY, '--vcpus', '2', ...run.dest, '--json', json], {
      env: { POSTCOPY_TOKEN: TOKEN },
      timeoutMs: 40_000,
    });
    const destEnd = Date.now();
    stopped = true;
    await within(Promise.all(attackers), 15_000, 'the attackers to stop');

    expect(dest.code, `dest stderr: ${dest.stderr}\nsource stderr: ${source.stderr().slice(-2000)}`).toBe(0);
    const report = JSON.parse(readFileSync(json, 'utf8')) as Report;
    expect(failedChecks(report)).toEqual([]);
    expect(report.verified).toBe(true);
    expect(report.digest.dest).toBe(report.digest.source);
    expect(report.counters.replies).toBe(report.counters.requests);
    expect(report.counters.pagesInstalled).toBe(report.counters.pagesSentBySource);
    if (run.push) expect(report.counters.pagesSentBySource).toBe(report.counters.totalPages);
    else expect(report.counters.pagesPushed).toBe(0);
    expect(dest.stdout).toContain('verified: true');

    // The source served its one migration and ended normally.
    expect(await within(source.exited, 10_000, 'the source to exit after the migration')).toEqual({ code: 0, signal: null });
    expect(source.stderr()).not.toContain('destination lost');

    // The attackers were really there, during the migration, and every one was answered as expected.
    expect(stats.unexpected).toEqual([]);
    expect(stats.interrupted).toBeLessThanOrEqual(ATTACKERS);
    const during = stats.rejectedAt.filter((t) => t >= destStart && t <= destEnd).length;
    expect(during, `${stats.attempts} attempts, ${stats.rejectedAt.length} rejected`).toBeGreaterThanOrEqual(10);
    // The squatters were cut when the source finished, never served.
    for (const s of squatters) {
      await within(s.closed, 5_000, 'a squatter to be closed');
      expect(s.messages).toEqual([]);
    }
  });
});
