/**
 * Precopy's barrier on the push channel, with the source's real server and
 * the destination's real PushClient in this process, and a hand-driven main
 * channel: the test decides when the destination acknowledges a SYNC.
 *
 * - hybrid: round 1's pages come as precopy records of round 1 followed by
 *   SYNC 1; however long the destination holds back its `precopy-synced`,
 *   neither the discard set nor `switchover` goes on the main channel (the
 *   source sits in its switchover state, the guest stopped); once it
 *   acknowledges, they go;
 * - a push channel lost while precopy uses it cancels the migration, as a
 *   lost main channel does;
 * - an acknowledgement out of sequence is a protocol error of the
 *   destination.
 */
import { afterEach, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { ChannelRole, PROTOCOL_VERSION, decode, encode, makeLayout, type Message } from '@postcopy/shared';
import { GuestImage, SourceServer } from '@postcopy/source-host';
import { PushClient, type PrecopyPushPlacement, type PushClaim, type PushPlacement } from '@postcopy/dest-host';
import { sleep, until, within } from './tls-fixtures.js';

const PAGE = 4096;
const PAGES = 1024;
const LAYOUT = makeLayout(PAGES * PAGE, PAGE);
const TOKEN = 'barrier-token';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

/** Collects precopy records: the pages placed (with their round) and the SYNCs, none acknowledged by itself. */
class Collecting implements PrecopyPushPlacement {
  readonly rounds: number[] = [];
  readonly syncs: number[] = [];
  readonly pages = new Map<number, number>();
  private current = 0;
  round(round: number): void {
    this.current = round;
    this.rounds.push(round);
  }
  synced(seq: number): void {
    this.syncs.push(seq);
  }
  claim(first: number, count: number): PushClaim {
    const pages = Math.min(count, 64);
    return { first, pages, view: new Uint8Array(pages * PAGE), present: false };
  }
  commit(_claim: PushClaim, first: number, pages: number): void {
    for (let p = first; p < first + pages; p++) this.pages.set(p, this.current);
  }
  release(): void {}
  zero(first: number, count: number): void {
    for (let p = first; p < first + count; p++) this.pages.set(p, this.current);
  }
}

const refusing: PushPlacement = {
  claim: () => {
    throw new Error('expected no postcopy records in this test');
  },
  commit: () => {},
  release: () => {},
  zero: () => {
    throw new Error('expected no postcopy records in this test');
  },
};

async function setUp(mode: 'precopy' | 'hybrid'): Promise<{ server: SourceServer; ws: WebSocket; messages: Message[]; precopy: Collecting; push: PushClient; closed: Error[] }> {
  const image = new GuestImage(LAYOUT, { seed: 5, zeroFraction: 0.1 });
  const server = await SourceServer.listen(image, { host: '127.0.0.1', port: 0, token: TOKEN, mode, guest: { vcpus: 1, dirtyRate: 200 }, precopy: { postcopyAfterRounds: 1 } });
  cleanups.push(() => server.close());
  const ws = new WebSocket(server.url, { perMessageDeflate: false });
  cleanups.push(() => ws.terminate());
  const messages: Message[] = [];
  ws.on('error', () => {});
  ws.on('message', (data: Buffer) => messages.push(decode(data, { layout: LAYOUT })));
  await within(new Promise<void>((resolve, reject) => (ws.once('open', () => resolve()), ws.once('error', reject))), 10_000, 'the main channel to open');
  ws.send(encode({ type: 'hello', protocolVersion: PROTOCOL_VERSION, token: TOKEN, role: ChannelRole.Main, guestBytes: LAYOUT.guestBytes, pageSize: PAGE, channel: 'main', secret: '' }));
  await until(() => messages.some((m) => m.type === 'welcome'), 10_000, 'the welcome');
  const welcome = messages.find((m) => m.type === 'welcome') as Extract<Message, { type: 'welcome' }>;
  const precopy = new Collecting();
  const closed: Error[] = [];
  const push = await PushClient.connect({
    url: server.url,
    token: TOKEN,
    secret: welcome.secret,
    layout: LAYOUT,
    channel: 'push0',
    connectTimeoutMs: 10_000,
    placement: refusing,
    precopy,
    onClose: (err) => closed.push(err),
  });
  cleanups.push(() => push.cut());
  ws.send(encode({ type: 'start', push: true, preempt: false }));
  return { server, ws, messages, precopy, push, closed };
}

describe('precopy on the push channel: the SYNC barrier (source server and PushClient in-process)', () => {
  it('hybrid: no discard and no switchover before the destination acknowledged the last SYNC; then both', async () => {
    const { server, ws, messages, precopy } = await setUp('hybrid');
    await until(() => precopy.syncs.length === 1, 20_000, 'SYNC 1');
    expect(precopy.syncs).toEqual([1]);
    expect(precopy.pages.size).toBe(PAGES);
    expect(new Set(precopy.rounds)).toEqual(new Set([1]));
    // Round 1's pages did not go in main-channel messages.
    expect(messages.some((m) => m.type === 'precopy-pages' || m.type === 'precopy-zero')).toBe(false);
    // However long the acknowledgement takes, the source holds the discard set and switchover back.
    await until(() => server.state === 'device', 20_000, 'the switchover state');
    await sleep(300);
    expect(server.state).toBe('device');
    expect(messages.filter((m) => m.type === 'discard' || m.type === 'switchover')).toEqual([]);
    ws.send(encode({ type: 'precopy-synced', seq: 1 }));
    await until(() => messages.some((m) => m.type === 'switchover'), 20_000, 'switchover');
    const types = messages.map((m) => m.type);
    const switchover = types.indexOf('switchover');
    expect(types.slice(switchover + 1)).not.toContain('discard');
    expect(messages[switchover]).toEqual({ type: 'switchover', postcopy: true });
    expect(server.state).toBe('postcopy-active');
  });

  it('a push channel lost during precopy cancels the migration (the guest stays on the source)', async () => {
    const { server, push } = await setUp('precopy');
    const cancelled = new Promise<string>((resolve) => server.once('cancelled', resolve));
    await until(() => server.state === 'device', 20_000, 'the switchover, waiting for the SYNC');
    push.cut();
    const reason = await within(cancelled, 10_000, 'the cancel');
    expect(reason).toMatch(/the destination's push channel closed during precopy: the migration is cancelled and the guest stays on the source/);
    expect(server.state).toBe('cancelled');
  });

  it('an acknowledgement of a SYNC out of sequence is a protocol error', async () => {
    const { ws, messages, precopy } = await setUp('hybrid');
    await until(() => precopy.syncs.length === 1, 20_000, 'SYNC 1');
    ws.send(encode({ type: 'precopy-synced', seq: 2 }));
    await until(() => messages.some((m) => m.type === 'error'), 10_000, 'the error');
    const error = messages.find((m) => m.type === 'error') as Extract<Message, { type: 'error' }>;
    expect(error.message).toMatch(/expected precopy-synced 1 \(SYNC 1 is the last written\), got 2/);
  });
});
