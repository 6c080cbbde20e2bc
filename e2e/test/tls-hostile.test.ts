/**
 * The hostile-client tests again, against a real source's TLS listener
 * (`--tls-cert`, `--tls-key`, `--tls-ca`, `--tls-verify-peer`, as
 * `npm start -- --tls` runs it): garbage before the TLS handshake, a TCP
 * peer that never starts TLS, a TLS peer that never sends the WebSocket
 * upgrade, a TLS WebSocket that never sends its hello, and a handshake flood
 * of hundreds of connections, half-open and complete. Each bad peer is cut
 * (at once, or after --handshake-timeout-ms) and logged, gets nothing of the
 * migration, and the source stays up: a real destination migrates verified
 * against the same source process during the flood, and after it.
 */
import { connect as netConnect, type Socket } from 'node:net';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { decode, rng, type Message, type Report } from '@postcopy/shared';
import { DEST, TEST_WARM_UP, failedChecks, runNode } from './run.js';
import {
  MEMORY,
  TOKEN,
  clientTlsOptions,
  destTls,
  expectAnswersWebSockets,
  makeTestCertificates,
  removeCertificates,
  sleep,
  sourceTls,
  startSource,
  until,
  within,
  type SourceHost,
  type TestCertificates,
} from './tls-fixtures.js';

let certs: TestCertificates;
let withCert: ReturnType<typeof clientTlsOptions>;
let withoutCert: ReturnType<typeof clientTlsOptions>;
beforeAll(async () => {
  certs = await makeTestCertificates();
  withCert = clientTlsOptions(certs);
  withoutCert = clientTlsOptions(certs, null);
});
afterAll(() => removeCertificates(certs));

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});
const register = (stop: () => Promise<void>): void => void cleanups.push(stop);

/** A TLS source under test, cutting peers after `handshakeTimeoutMs`. */
function tlsSource(handshakeTimeoutMs: number, extra: string[] = []): Promise<SourceHost> {
  return startSource([...sourceTls(certs), '--handshake-timeout-ms', String(handshakeTimeoutMs), ...extra], register);
}

function hostPort(url: string): { host: string; port: number } {
  const u = new URL(url);
  return { host: u.hostname.replace(/^\[|\]$/g, ''), port: Number(u.port) };
}

/** A connection of the test's own: what it received, and when it closed. */
interface Conn {
  kind: string;
  socket: Socket | WebSocket;
  /** When this process began to connect: the source's timers for it start later than this. */
  createdAt: number;
  /** Resolves once connected (TCP), secured (TLS) or open (WebSocket). */
  ready: Promise<void>;
  readyAt: number | undefined;
  received: Buffer[];
  messages: Message[];
  closedAt: number | undefined;
  closed: Promise<void>;
}

function track(kind: string, socket: Socket | WebSocket, readyEvent: string): Conn {
  const conn: Conn = { kind, socket, createdAt: Date.now(), ready: Promise.resolve(), readyAt: undefined, received: [], messages: [], closedAt: undefined, closed: Promise.resolve() };
  socket.on('error', () => {});
  conn.ready = new Promise<void>((resolve, reject) => {
    socket.once(readyEvent, () => {
      conn.readyAt = Date.now();
      resolve();
    });
    socket.once('close', () => reject(new Error(`${kind}: closed before ${readyEvent}`)));
  });
  conn.ready.catch(() => {});
  conn.closed = new Promise<void>((resolve) =>
    socket.once('close', () => {
      conn.closedAt = Date.now();
      resolve();
    }),
  );
  if (socket instanceof WebSocket) {
    socket.on('message', (data: Buffer) => conn.messages.push(decode(data)));
  } else {
    socket.on('data', (d: Buffer) => conn.received.push(d));
  }
  cleanups.push(() => {
    if (socket instanceof WebSocket) socket.terminate();
    else socket.destroy();
  });
  return conn;
}

/** TCP only: connected, nothing sent (or `bytes`). */
function rawTcp(url: string, bytes?: Buffer, kind = 'tcp'): Conn {
  const { host, port } = hostPort(url);
  const socket = netConnect(port, host);
  const conn = track(kind, socket, 'connect');
  if (bytes) socket.once('connect', () => socket.write(bytes));
  return conn;
}

/** A complete TLS handshake (with or without the client certificate), then nothing: no WebSocket upgrade. */
function tlsOnly(url: string, client: { ca: string; cert?: string; key?: string }, kind = 'tls'): Conn {
  const { host, port } = hostPort(url);
  return track(kind, tlsConnect({ host, port, ...client }), 'secureConnect');
}

/** A TLS WebSocket (with the client certificate) that never sends its hello. */
function silentWebSocket(url: string): Conn {
  return track('websocket', new WebSocket(url, { perMessageDeflate: false, ...withCert }), 'open');
}

/** Deterministic junk: `n` bytes from a seeded PRNG. */
function junk(seed: number, n: number): Buffer {
  const next = rng(seed);
  return Buffer.from(Array.from({ length: n }, () => Math.floor(next() * 256)));
}

/** The first bytes of a TLS handshake record that promises 512 bytes and never sends them. */
const PARTIAL_CLIENT_HELLO = Buffer.concat([Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]), junk(9, 32)]);

/** A real destination process against the source, with its TLS options; returns its exit and report. */
async function migrateAgainst(source: SourceHost): Promise<{ code: number | null; stdout: string; stderr: string; report: Report | undefined; startedAt: number; endedAt: number }> {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-tls-hostile-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const json = join(dir, 'report.json');
  const startedAt = Date.now();
  const r = await runNode(DEST, ['--source', source.url, ...TEST_WARM_UP, '--memory', MEMORY, '--vcpus', '2', '--workload', 'random', ...destTls(certs), '--json', json], {
    env: { POSTCOPY_TOKEN: TOKEN },
    timeoutMs: 40_000,
  });
  const endedAt = Date.now();
  let report: Report | undefined;
  try {
    report = JSON.parse(readFileSync(json, 'utf8')) as Report;
  } catch {
    report = undefined;
  }
  return { ...r, report, startedAt, endedAt };
}

/** The destination's run was verified over TLS, and the source served it and ended normally. */
async function expectVerifiedMigration(source: SourceHost, run: Awaited<ReturnType<typeof migrateAgainst>>): Promise<void> {
  expect(run.code, `dest: ${run.stderr}\nsource: ${source.stderr().slice(-3000)}`).toBe(0);
  const report = run.report!;
  expect(failedChecks(report)).toEqual([]);
  expect(report.verified).toBe(true);
  expect(report.tls).toBe(true);
  expect(report.digest.dest).toBe(report.digest.source);
  expect(report.counters.replies).toBe(report.counters.requests);
  expect(report.counters.pagesInstalled).toBe(report.counters.pagesSentBySource);
  expect(report.counters.pagesSentBySource).toBe(report.counters.totalPages);
  expect(run.stdout).toContain('verified: true');
  expect(await within(source.exit, 10_000, 'the source to exit after its migration')).toBe(0);
  expect(source.stderr()).not.toMatch(/destination lost/);
}

/** Lines the source logged for peers of one kind. */
const logged = (source: SourceHost, pattern: RegExp): string[] => source.rejections().filter((l) => pattern.test(l));

const PEER = String.raw`TLS peer 127\.0\.0\.1:\d+`;

describe('hostile peers against the TLS listener', () => {
  it('garbage before the TLS handshake is cut at once, logged, and answered with a TLS alert at most', async () => {
    const source = await tlsSource(60_000);
    const inputs: [string, Buffer, RegExp][] = [
      ['random bytes', junk(1, 300), /expected a TLS handshake, got bytes that are not one \(ERR_SSL_\w+\)/],
      ['zeros', Buffer.alloc(300), /expected a TLS handshake, got bytes that are not one \(ERR_SSL_\w+\)/],
      ['a handshake record of junk', Buffer.concat([Buffer.from([0x16, 0x03, 0x01, 0x00, 0x40]), junk(2, 64)]), /expected a TLS handshake, got bytes that are not one \(ERR_SSL_\w+\)/],
      ['a record longer than TLS allows', Buffer.from([0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3]), /expected a TLS handshake, got bytes that are not one \(ERR_SSL_PACKET_LENGTH_TOO_LONG\)/],
      ['a plain HTTP upgrade', Buffer.from('GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n'), /expected a TLS handshake, got plain HTTP \(a ws:\/\/ peer: it should use wss:\/\/\)/],
    ];
    for (const [name, bytes, pattern] of inputs) {
      const before = source.rejections().length;
      const conn = rawTcp(source.url, bytes, name);
      // The handshake timeout is a minute: a close within seconds is the garbage being refused.
      await within(conn.closed, 5_000, `the source to cut ${name}`);
      const got = Buffer.concat(conn.received);
      // Nothing but (at most) a TLS alert record: no HTTP, no WebSocket, no page.
      if (got.length > 0) expect(got[0], `${name}: ${got.toString('hex')}`).toBe(0x15);
      expect(got.length, name).toBeLessThanOrEqual(7);
      await until(() => source.rejections().length > before, 5_000, `the source to log ${name}`);
      expect(source.rejections().slice(before), name).toHaveLength(1);
      expect(source.rejections()[before], name).toMatch(new RegExp(`^source: rejected ${PEER}: ${pattern.source}$`));
    }
    await expectAnswersWebSockets(source.url, withCert);
    expect(source.child.exitCode).toBeNull();
  });

  it('a TCP peer that never starts TLS, and a TLS peer that never sends the upgrade, are cut after --handshake-timeout-ms', async () => {
    const T = 700;
    const source = await tlsSource(T);
    const tcp = rawTcp(source.url);
    const partial = rawTcp(source.url, PARTIAL_CLIENT_HELLO, 'partial ClientHello');
    const tls = tlsOnly(source.url, withCert);
    const tlsNoCert = tlsOnly(source.url, withoutCert, 'tls without a client certificate');
    for (const conn of [tcp, partial, tls, tlsNoCert]) {
      await within(conn.ready, 5_000, `${conn.kind} to connect`);
      await within(conn.closed, T + 5_000, `the source to cut ${conn.kind}`);
      // Not before the timeout (the source's timer starts after this process began to connect), not long after it.
      expect(conn.closedAt! - conn.createdAt, conn.kind).toBeGreaterThanOrEqual(T - 5);
      expect(conn.closedAt! - conn.readyAt!, conn.kind).toBeLessThan(T + 3_000);
      expect(Buffer.concat(conn.received).length, `${conn.kind} received`).toBe(0);
    }
    await until(() => source.rejections().length >= 4, 5_000, 'four rejections in the log');
    expect(logged(source, new RegExp(`^source: rejected ${PEER}: expected a TLS handshake within ${T} ms \\(--handshake-timeout-ms\\), got none: cut$`))).toHaveLength(2);
    expect(logged(source, new RegExp(`^source: rejected ${PEER}: expected a WebSocket upgrade within ${T} ms \\(--handshake-timeout-ms\\), got none: cut$`))).toHaveLength(2);
    expect(source.rejections()).toHaveLength(4);
    await expectAnswersWebSockets(source.url, withCert);
  });

  it('a TLS WebSocket that never sends its hello gets the handshake error and is closed (1008)', async () => {
    const T = 700;
    const source = await tlsSource(T);
    const conn = silentWebSocket(source.url);
    await within(conn.ready, 5_000, 'the WebSocket to open');
    const closedWith = new Promise<number>((resolve) => (conn.socket as WebSocket).once('close', (code: number) => resolve(code)));
    await within(conn.closed, T + 5_000, 'the source to close a hello-less WebSocket');
    expect(await closedWith).toBe(1008);
    expect(conn.closedAt! - conn.createdAt).toBeGreaterThanOrEqual(T - 5);
    expect(conn.messages).toHaveLength(1);
    expect(conn.messages[0]).toMatchObject({ type: 'error', code: 'ERR_POSTCOPY_HANDSHAKE', message: `expected hello within ${T} ms, got none` });
    await until(() => source.rejections().length > 0, 5_000, 'the rejection in the log');
    expect(source.rejections()).toEqual([`source: rejected unidentified: expected hello within ${T} ms, got none`]);
    await expectAnswersWebSockets(source.url, withCert);
  });
});

/** Hundreds of connections of every kind, opened at once. */
function flood(url: string, n: { tcp: number; partial: number; tls: number; tlsNoCert: number; websocket: number }): Conn[] {
  const conns: Conn[] = [];
  for (let i = 0; i < n.tcp; i++) conns.push(rawTcp(url));
  for (let i = 0; i < n.partial; i++) conns.push(rawTcp(url, PARTIAL_CLIENT_HELLO, 'partial'));
  for (let i = 0; i < n.tls; i++) conns.push(tlsOnly(url, withCert));
  for (let i = 0; i < n.tlsNoCert; i++) conns.push(tlsOnly(url, withoutCert, 'tlsNoCert'));
  for (let i = 0; i < n.websocket; i++) conns.push(silentWebSocket(url));
  return conns;
}

/** Nothing of the migration reached a flood connection: no bytes on the raw ones, at most the hello-timeout error on the WebSockets. */
function expectNothingServed(conns: Conn[]): void {
  for (const c of conns) {
    expect(Buffer.concat(c.received).length, `${c.kind} received bytes`).toBe(0);
    for (const m of c.messages) expect(m, `${c.kind} received a message`).toMatchObject({ type: 'error', code: 'ERR_POSTCOPY_HANDSHAKE' });
  }
}

const FLOOD = { tcp: 100, partial: 50, tls: 100, tlsNoCert: 50, websocket: 100 };
const FLOOD_SIZE = Object.values(FLOOD).reduce((a, b) => a + b, 0);

describe(`a handshake flood (${FLOOD_SIZE} connections, half-open and complete)`, () => {
  it('held open during a real migration, with more connecting and dropping meanwhile: the migration completes verified', async () => {
    // A long timeout: the whole flood is still held when the destination comes.
    // 8 MiB pushed at 32 Mbit/s: a migration of about two seconds to flood.
    const source = await tlsSource(30_000, ['--max-postcopy-bandwidth', '32mbit']);
    const conns = flood(source.url, FLOOD);
    await within(Promise.all(conns.map((c) => c.ready)), 20_000, `the ${FLOOD_SIZE} flood connections to be established`);
    expect(conns.filter((c) => c.closedAt !== undefined)).toEqual([]);

    // Churn while the destination runs: batches that connect (half-open or complete) and vanish.
    let stop = false;
    let churned = 0;
    const churn = (async () => {
      for (let round = 0; !stop; round++) {
        const batch = flood(source.url, { tcp: 4, partial: 4, tls: 4, tlsNoCert: 2, websocket: 2 });
        await Promise.allSettled(batch.map((c) => within(c.ready, 5_000, 'a churn connection')));
        for (const c of batch) {
          if (c.socket instanceof WebSocket) c.socket.terminate();
          else c.socket.destroy();
        }
        churned += batch.length;
        await sleep(10);
      }
    })();
    cleanups.push(async () => {
      stop = true;
      await churn;
    });

    // A second into the migration (which the push cap makes last over two), the whole flood is still held.
    let destRunning = true;
    const running = migrateAgainst(source).finally(() => (destRunning = false));
    await sleep(1_000);
    const heldMidway = conns.filter((c) => c.closedAt === undefined).length;
    const midwayWhileRunning = destRunning;
    const run = await running;
    const destEndedAt = Date.now();
    stop = true;
    await within(churn, 10_000, 'the churn to stop');
    await expectVerifiedMigration(source, run);
    // And it ended promptly: the half-open peers (a 30 s handshake timeout) did not hold it.
    expect(Date.now() - destEndedAt).toBeLessThan(5_000);
    expect(midwayWhileRunning).toBe(true);
    expect(heldMidway).toBe(FLOOD_SIZE);
    expect(churned).toBeGreaterThan(0);

    // Cut only when the source ended, and nothing of the migration reached them.
    await within(Promise.all(conns.map((c) => c.closed)), 10_000, 'the flood connections to be closed once the source ended');
    expectNothingServed(conns);
  });

  it('cut after --handshake-timeout-ms, every one logged; then a real migration completes verified on the same source', async () => {
    // Long enough for all 400 to finish what they do before the cut on a loaded two-core machine: at 1 s a TLS
    // WebSocket of the flood once did not get through its TLS handshake and upgrade in time (closed before open).
    const T = 4_000;
    const source = await tlsSource(T);
    const startedAt = Date.now();
    const conns = flood(source.url, FLOOD);
    await within(Promise.all(conns.map((c) => c.ready)), 20_000, `the ${FLOOD_SIZE} flood connections to be established`);
    // TLS has T to finish; a TLS peer has T again to upgrade, a WebSocket T to say hello.
    await within(Promise.all(conns.map((c) => c.closed)), 2 * T + 10_000, 'the source to cut the whole flood');
    // Cut by the timer, not at once: the source's timer for each starts after this process began to connect
    // (which timer cut which kind, the log below says).
    for (const c of conns) {
      expect(c.closedAt! - c.createdAt, c.kind).toBeGreaterThanOrEqual(T - 5);
    }
    expect(Math.max(...conns.map((c) => c.closedAt!)) - startedAt).toBeLessThan(2 * T + 10_000);
    expectNothingServed(conns);
    for (const c of conns.filter((c) => c.kind === 'websocket')) {
      expect(c.messages).toEqual([expect.objectContaining({ type: 'error', message: `expected hello within ${T} ms, got none` })]);
    }
    // One line for each, saying what it did not do in time.
    await until(() => source.rejections().length >= FLOOD_SIZE, 10_000, `${FLOOD_SIZE} rejections in the log (have ${source.rejections().length})`);
    expect(logged(source, new RegExp(`^source: rejected ${PEER}: expected a TLS handshake within ${T} ms`))).toHaveLength(FLOOD.tcp + FLOOD.partial);
    expect(logged(source, new RegExp(`^source: rejected ${PEER}: expected a WebSocket upgrade within ${T} ms`))).toHaveLength(FLOOD.tls + FLOOD.tlsNoCert);
    expect(logged(source, new RegExp(`^source: rejected unidentified: expected hello within ${T} ms, got none$`))).toHaveLength(FLOOD.websocket);
    expect(source.rejections()).toHaveLength(FLOOD_SIZE);

    expect(source.child.exitCode).toBeNull();
    await expectVerifiedMigration(source, await migrateAgainst(source));
  });
});
