/**
 * Push channels over TLS (issue 8): the source's real server on wss:// with
 * --tls-verify-peer and the destination's real PushClient, in this process.
 *
 * - the push channel's hello must carry the migration's secret over TLS as
 *   over plain TCP: refused without it (and without a client certificate,
 *   with the listener's 403), admitted with it;
 * - the records the source writes on the TLS socket land in the reader's
 *   buffers with the image's bytes, every page exactly once, across a drop
 *   in the middle of the push and the resume after it;
 * - full `--tls` migrations whose report says the pushed pages came on the
 *   push channel (pagesPushedOnPushChannel), so a silent fallback to the
 *   main channel fails; and with --no-push-channel, that they did not.
 */
import { readFileSync } from 'node:fs';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { ChannelRole, PROTOCOL_VERSION, bitmapBytes, bitmapSet, decode, encode, makeLayout, type Message } from '@postcopy/shared';
import { GuestImage, SourceServer } from '@postcopy/source-host';
import { PushClient, type PushClaim, type PushPlacement } from '@postcopy/dest-host';
import { expectVerified, migrate } from './run.js';
import { makeTestCertificates, removeCertificates, until, within, type TestCertificates } from './tls-fixtures.js';

const PAGE = 4096;
/** 8 MiB: several 1 MiB records, so a drop lands in the middle of the push. */
const PAGES = 2048;
const LAYOUT = makeLayout(PAGES * PAGE, PAGE);
const IMAGE = new GuestImage(LAYOUT, { seed: 11, zeroFraction: 0 });
const TOKEN = 'tls-push-token';

let certs: TestCertificates;
beforeAll(async () => {
  certs = await makeTestCertificates();
});
afterAll(() => removeCertificates(certs));

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

const pem = (path: string): string => readFileSync(path, 'utf8');

/** The source's server on wss://127.0.0.1 with --tls-verify-peer (closed after the test). */
async function tlsServer(): Promise<SourceServer> {
  const server = await SourceServer.listen(IMAGE, {
    host: '127.0.0.1',
    port: 0,
    token: TOKEN,
    tls: { cert: pem(certs.source.cert), key: pem(certs.source.key), ca: pem(certs.ca), verifyPeer: true },
  });
  cleanups.push(() => server.close());
  return server;
}

/** The destination's TLS options (CA, client certificate unless `false`). */
function clientTls(withCert = true): { ca: string; cert?: string; key?: string } {
  return { ca: pem(certs.ca), ...(withCert ? { cert: pem(certs.dest.cert), key: pem(certs.dest.key) } : {}) };
}

interface Main {
  ws: WebSocket;
  messages: Message[];
}

/** A main channel over TLS: hello (with `secret` when it resumes), resolves after the welcome. */
async function mainChannel(url: string, secret = ''): Promise<Main> {
  const ws = new WebSocket(url, { perMessageDeflate: false, ...clientTls() });
  cleanups.push(() => ws.terminate());
  const messages: Message[] = [];
  ws.on('error', () => {});
  ws.on('message', (data: Buffer) => messages.push(decode(data, { layout: LAYOUT })));
  await within(new Promise<void>((resolve, reject) => (ws.once('open', () => resolve()), ws.once('error', reject))), 10_000, 'the main channel to open');
  ws.send(encode({ type: 'hello', protocolVersion: PROTOCOL_VERSION, token: TOKEN, role: ChannelRole.Main, guestBytes: LAYOUT.guestBytes, pageSize: PAGE, channel: 'main', secret }));
  await until(() => messages.some((m) => m.type === 'welcome'), 10_000, 'the main channel welcome');
  return { ws, messages };
}

/**
 * Where the push client puts pages: each claim is a buffer of its own;
 * committed pages are kept, with their bytes, and a page committed twice is
 * recorded as such.
 */
class Collecting implements PushPlacement {
  readonly pages = new Map<number, Uint8Array>();
  readonly twice: number[] = [];
  /** Called after each commit (the test's drop). */
  afterCommit: () => void = () => {};

  claim(first: number, count: number): PushClaim {
    const pages = Math.min(count, 64);
    return { first, pages, view: new Uint8Array(pages * PAGE), present: false };
  }

  commit(claim: PushClaim, first: number, pages: number): void {
    for (let p = first; p < first + pages; p++) {
      if (this.pages.has(p)) this.twice.push(p);
      const at = (p - claim.first) * PAGE;
      this.pages.set(p, claim.view.slice(at, at + PAGE));
    }
    this.afterCommit();
  }

  release(): void {}

  zero(first: number, count: number): void {
    for (let p = first; p < first + count; p++) {
      if (this.pages.has(p)) this.twice.push(p);
      this.pages.set(p, new Uint8Array(PAGE));
    }
  }
}

function openPush(url: string, placement: PushPlacement, secret: string, withCert = true): Promise<PushClient> {
  return PushClient.connect({
    url,
    tls: clientTls(withCert),
    token: TOKEN,
    secret,
    layout: LAYOUT,
    channel: 'push0',
    connectTimeoutMs: 10_000,
    placement,
    onClose: () => {},
  });
}

function receivedmap(pages: Iterable<number>): Uint8Array {
  const map = new Uint8Array(bitmapBytes(PAGES));
  for (const p of pages) bitmapSet(map, p);
  return map;
}

describe('push channels over TLS (source server and PushClient in-process)', () => {
  it('refused without the secret or without a client certificate; admitted with the secret, the pushed records land exactly once across a drop and resume', async () => {
    const server = await tlsServer();
    expect(server.url).toMatch(/^wss:\/\//);
    const main = await mainChannel(server.url);
    const welcome = main.messages[0];
    if (welcome?.type !== 'welcome') throw new Error(`expected a welcome, got ${welcome?.type}`);
    const secret = welcome.secret;
    expect(secret).toMatch(/^[0-9a-f]{64}$/);

    // Without the secret: the hello is refused, over TLS as over TCP.
    await expect(within(openPush(server.url, new Collecting(), ''), 15_000, 'the refusal of a push channel without the secret')).rejects.toThrow(
      /the source refused the push channel: .*secret/,
    );
    // Without a client certificate under --tls-verify-peer: the listener's 403, before any hello.
    await expect(within(openPush(server.url, new Collecting(), secret, false), 15_000, 'the refusal of a push channel without a client certificate')).rejects.toThrow(
      /HTTP 101.*403.*client certificate/,
    );

    // With it: admitted; the push goes there, and the test drops everything after some pages.
    const first = new Collecting();
    const push1 = await within(openPush(server.url, first, secret), 15_000, 'the push channel');
    cleanups.push(() => push1.cut());
    let dropped = false;
    first.afterCommit = () => {
      if (dropped || first.pages.size < 300) return;
      dropped = true;
      // As the destination's pause does: the main channel goes, and the push
      // channel is cut before the receivedmap is taken.
      main.ws.terminate();
      push1.cut();
    };
    const paused = within(new Promise<void>((resolve) => server.once('paused', () => resolve())), 15_000, 'the source to pause');
    main.ws.send(encode({ type: 'start', push: true, preempt: true }));
    await paused;
    expect(dropped).toBe(true);
    expect(first.pages.size).toBeLessThan(PAGES);
    // Nothing was pushed on the main channel while the push channel was there.
    expect(main.messages.filter((m) => m.type === 'pushed' || m.type === 'pushed-zero')).toEqual([]);

    // Resume with what arrived whole; the rest comes again, once.
    const main2 = await mainChannel(server.url, secret);
    main2.ws.send(encode({ type: 'resume', push: true, preempt: true, receivedmap: receivedmap(first.pages.keys()), requestedmap: receivedmap([]) }));
    await until(() => main2.messages.some((m) => m.type === 'resumed'), 10_000, 'resumed');
    const second = new Collecting();
    const push2 = await within(openPush(server.url, second, secret), 15_000, 'the push channel after the resume');
    cleanups.push(() => push2.cut());
    // A pushed frame holds a run of consecutive pages.
    const onMain = (): number[] =>
      main2.messages.flatMap((m) =>
        m.type === 'pushed' ? Array.from({ length: m.data.length / PAGE }, (_, i) => m.page + i) : m.type === 'pushed-zero' ? [m.page] : [],
      );
    await until(() => main2.messages.some((m) => m.type === 'complete') && first.pages.size + second.pages.size + onMain().length >= PAGES, 30_000, 'every page and complete');

    expect(first.twice).toEqual([]);
    expect(second.twice).toEqual([]);
    const seen = new Uint8Array(PAGES);
    for (const p of [...first.pages.keys(), ...second.pages.keys(), ...onMain()]) seen[p]! += 1;
    expect([...seen].every((n) => n === 1), 'every page exactly once').toBe(true);
    for (const placed of [first, second]) {
      for (const [p, bytes] of placed.pages) {
        if (!Buffer.from(bytes).equals(Buffer.from(IMAGE.pagesBytes(p, 1)))) throw new Error(`page ${p}: bytes differ from the image`);
      }
    }
    for (const m of main2.messages) {
      if (m.type === 'pushed' && !Buffer.from(m.data).equals(Buffer.from(IMAGE.pagesBytes(m.page, m.data.length / PAGE)))) throw new Error(`pages from ${m.page} on the main channel: bytes differ`);
    }
    // The push channel after the resume carried pages too (the main channel only until it was there).
    expect(second.pages.size).toBeGreaterThan(0);
    expect(push2.records).toBeGreaterThan(0);
  });
});

describe('full migrations over TLS (npm start -- --tls): the pushed pages come on the push channel', () => {
  it('kvm-exit, push: verified, every pushed page on the push channel', async () => {
    const result = await migrate(['--tls', '--strategy', 'kvm-exit', '--memory', '16MiB', '--vcpus', '1', '--accesses', '200', '--zero-fraction', '0'], 40_000);
    const report = expectVerified(result);
    expect(report.tls).toBe(true);
    expect(report.counters.pagesPushed).toBeGreaterThan(0);
    expect(report.counters.pagesPushedOnPushChannel).toBe(report.counters.pagesPushed);
    expect(result.stderr).not.toMatch(/pushing on the main channel instead/);
    expect(result.stderr).not.toMatch(/rejected/);
  });

  it('a drop under TLS: the push channel comes back after the resume, verified', async () => {
    const result = await migrate(['--tls', '--memory', '16MiB', '--vcpus', '2', '--inject', 'drop@1000'], 40_000);
    const report = expectVerified(result);
    expect(report.recovery.pauses).toBe(1);
    expect(report.recovery.resumes).toBe(1);
    expect(report.checks.find((c) => c.name === 'no-page-sent-twice')?.ok).toBe(true);
    expect(report.counters.pagesPushedOnPushChannel).toBeGreaterThan(0);
    expect(result.stderr).not.toMatch(/pushing on the main channel instead/);
  });

  it('hybrid over TLS: precopy\'s pages on the push channel too, verified', async () => {
    const result = await migrate(['--tls', '--memory', '16MiB', '--vcpus', '2', '--mode', 'hybrid', '--dirty-set', '1MiB'], 40_000);
    const report = expectVerified(result);
    expect(report.counters.pagesPrecopyOnPushChannel).toBe(report.precopy.pagesSent);
    expect(report.counters.pagesPrecopyOnPushChannel).toBeGreaterThan(0);
    expect(result.stderr).not.toMatch(/pushing on the main channel instead/);
  });

  it('--no-push-channel under TLS: verified, every pushed page on the main channel', async () => {
    const result = await migrate(['--tls', '--strategy', 'kvm-exit', '--memory', '16MiB', '--vcpus', '1', '--no-push-channel'], 40_000);
    const report = expectVerified(result);
    expect(report.counters.pagesPushed).toBeGreaterThan(0);
    expect(report.counters.pagesPushedOnPushChannel).toBe(0);
  });
});
