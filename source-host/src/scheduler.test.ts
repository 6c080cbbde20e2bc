/**
 * The source's send scheduler (urgent before background, background yields to
 * the event loop) and the migration built on it (exactly-once replies, each
 * page sent at most once, requested pages ahead of pushed ones), with fake
 * channels that decode every frame they are given.
 */
import { PUSH_HEADER_BYTES, PUSH_RECORD, bitmapBytes, bitmapSet, decode, decodePushRecordHeader, digestPages, fillPage, makeLayout, verifyPage, type GuestLayout, type ImageSpec, type Message } from '@postcopy/shared';
import { describe, expect, it } from 'vitest';
import { GuestImage } from './image.js';
import { SourceMigration, type Channel, type PushStream } from './migration.js';
import { Scheduler } from './scheduler.js';

const PAGE = 4096;

describe('Scheduler', () => {
  it('runs an urgent task ahead of 10,000 queued background tasks', async () => {
    const scheduler = new Scheduler();
    const ran: string[] = [];
    for (let i = 0; i < 10_000; i++) void scheduler.background(() => void ran.push(`b${i}`));
    expect(scheduler.waiting).toBeGreaterThanOrEqual(9_999);
    void scheduler.urgent(() => void ran.push('urgent'));
    await scheduler.onIdle();
    expect(ran).toHaveLength(10_001);
    // The first background task may already be running when the urgent one is queued.
    expect(ran.indexOf('urgent')).toBeLessThanOrEqual(1);
    // Background tasks keep their order.
    const background = ran.filter((id) => id !== 'urgent');
    expect(background.every((id, i) => id === `b${i}`)).toBe(true);
  });

  it('runs urgent tasks in order and ahead of background tasks queued before them', async () => {
    const scheduler = new Scheduler();
    const ran: string[] = [];
    for (let i = 0; i < 5; i++) void scheduler.background(() => void ran.push(`b${i}`));
    for (let i = 0; i < 3; i++) void scheduler.urgent(() => void ran.push(`u${i}`));
    await scheduler.onIdle();
    expect(ran).toEqual(['b0', 'u0', 'u1', 'u2', 'b1', 'b2', 'b3', 'b4']);
  });

  it('lets the event loop run between background tasks', async () => {
    const scheduler = new Scheduler();
    const ran: string[] = [];
    const TASKS = 100;
    for (let i = 0; i < TASKS; i++) void scheduler.background(() => void ran.push(`b${i}`));
    // Stands for a socket read: a macrotask scheduled after the pushes were queued.
    setImmediate(() => ran.push('immediate'));
    await scheduler.onIdle();
    const at = ran.indexOf('immediate');
    expect(at).toBeGreaterThanOrEqual(0);
    expect(at).toBeLessThan(ran.indexOf(`b${TASKS - 1}`));
    // Not just before the last: after at most a couple of pushes.
    expect(at).toBeLessThanOrEqual(3);
  });

  it('an urgent task queued from a macrotask while pushes run goes ahead of the rest', async () => {
    const scheduler = new Scheduler();
    const ran: string[] = [];
    for (let i = 0; i < 1000; i++) void scheduler.background(() => void ran.push(`b${i}`));
    setImmediate(() => void scheduler.urgent(() => void ran.push('urgent')));
    await scheduler.onIdle();
    expect(ran).toHaveLength(1001);
    expect(ran.indexOf('urgent')).toBeLessThanOrEqual(4);
  });

  it('runs an urgent task at once, in the caller\'s turn, when nothing is running or waiting', async () => {
    const scheduler = new Scheduler();
    const ran: string[] = [];
    const done = scheduler.urgent(() => void ran.push('u0'));
    expect(ran).toEqual(['u0']);
    await done;
    // Twice in a row: each finds the queue idle again.
    void scheduler.urgent(() => void ran.push('u1'));
    expect(ran).toEqual(['u0', 'u1']);
    // A task that throws rejects its promise, as a queued one does.
    await expect(scheduler.urgent(() => { throw new Error('boom'); })).rejects.toThrow('boom');
  });

  it('queues an urgent task behind a waiting one: arrival order holds', async () => {
    const scheduler = new Scheduler();
    const ran: string[] = [];
    void scheduler.background(async () => {
      ran.push('b0');
      await new Promise((r) => setTimeout(r, 5));
    });
    void scheduler.urgent(() => void ran.push('u0'));
    void scheduler.urgent(() => void ran.push('u1'));
    // Both wait for the running push, and neither jumps the other.
    expect(ran).toEqual(['b0']);
    await scheduler.onIdle();
    expect(ran).toEqual(['b0', 'u0', 'u1']);
  });

  it('between two pushes, an urgent task runs at once and ahead of the pushes still waiting', async () => {
    const scheduler = new Scheduler();
    const ran: string[] = [];
    let inTurn: boolean | undefined;
    // A macrotask queued by the first push runs in the yield that follows it (a socket read there).
    void scheduler.background(() => {
      ran.push('b0');
      setImmediate(() => {
        void scheduler.urgent(() => void ran.push('urgent'));
        inTurn = ran.at(-1) === 'urgent';
      });
    });
    for (let i = 1; i < 3; i++) void scheduler.background(() => void ran.push(`b${i}`));
    await scheduler.onIdle();
    expect(inTurn).toBe(true);
    expect(ran).toEqual(['b0', 'urgent', 'b1', 'b2']);
  });

  it('clear drops waiting tasks', async () => {
    const scheduler = new Scheduler();
    const ran: number[] = [];
    for (let i = 0; i < 100; i++) void scheduler.background(() => void ran.push(i));
    scheduler.clear();
    expect(scheduler.waiting).toBe(0);
    await scheduler.onIdle();
    expect(ran).toEqual([0]);
  });
});

interface Sent {
  channel: string;
  message: Message;
  bytes: number;
}

/** A channel that decodes every frame it is given, as the destination would. */
class FakeChannel implements Channel {
  isOpen = true;
  bufferedAmount = 0;
  constructor(
    readonly label: string,
    private readonly layout: GuestLayout,
    private readonly wire: Sent[],
  ) {}
  send(frame: Uint8Array, sent?: (err?: Error) => void): void {
    this.wire.push({ channel: this.label, message: decode(frame, { layout: this.layout }), bytes: frame.length });
    sent?.();
  }
}

/** The page a message carries (any kind of send; a pushed run's first page), or undefined. */
function pageOf(message: Message): number | undefined {
  return 'page' in message ? message.page : undefined;
}

/** Every page a message carries: a pushed frame carries a run of consecutive pages. */
function pagesOf(message: Message): number[] {
  if (message.type === 'pushed') return Array.from({ length: message.data.length / PAGE }, (_, i) => message.page + i);
  const page = pageOf(message);
  return page === undefined ? [] : [page];
}

/** Messages that carry a page's content (or zero notice), as opposed to already-sent. */
const SENDS = new Set(['page', 'zero-page', 'pushed', 'pushed-zero']);
const REPLIES = new Set(['page', 'zero-page', 'already-sent']);

/** How many times each page's content (or zero notice) went out. */
function sendCounts(wire: Sent[], totalPages: number): Uint32Array {
  const counts = new Uint32Array(totalPages);
  for (const { message } of wire) {
    if (SENDS.has(message.type)) for (const page of pagesOf(message)) counts[page]!++;
  }
  return counts;
}

/** Replies on `channel`, by request id. */
function repliesById(wire: Sent[], channel: string): Map<number, Message[]> {
  const byId = new Map<number, Message[]>();
  for (const s of wire) {
    if (s.channel !== channel || !REPLIES.has(s.message.type)) continue;
    const id = (s.message as { id: number }).id;
    byId.set(id, [...(byId.get(id) ?? []), s.message]);
  }
  return byId;
}

const allReceived = (totalPages: number): Uint8Array => {
  const map = new Uint8Array(Math.ceil(totalPages / 8)).fill(0xff);
  return map;
};

const imageCache = new Map<string, GuestImage>();
/** Images are read-only to the migration; build each shape once. */
function image(pages: number, spec: ImageSpec): GuestImage {
  const key = `${pages}/${spec.seed}/${spec.zeroFraction}`;
  let img = imageCache.get(key);
  if (!img) {
    img = new GuestImage(makeLayout(pages * PAGE, PAGE), spec);
    imageCache.set(key, img);
  }
  return img;
}

describe('SourceMigration', () => {
  it('answers a request ahead of 10,000 queued pushes, and sends every page exactly once', async () => {
    const PAGES = 10_240;
    const REQUESTED = 10_200;
    const spec: ImageSpec = { seed: 7, zeroFraction: 0.1 };
    const img = image(PAGES, spec);
    const wire: Sent[] = [];
    const main = new FakeChannel('main', img.layout, wire);
    const fault = new FakeChannel('vcpu0', img.layout, wire);
    // One page per background task: 10,240 push tasks.
    const migration = new SourceMigration(img, { pushBatchBytes: PAGE });

    migration.startPush(main);
    void migration.request(fault, 1, REQUESTED);
    await migration.onIdle();

    const replyAt = wire.findIndex((s) => s.channel === 'vcpu0');
    expect(replyAt).toBeGreaterThanOrEqual(0);
    expect(replyAt).toBeLessThan(5);
    // In fact right after the push that was running when the request came (FIFO would put a queued push first).
    expect(replyAt).toBeLessThanOrEqual(1);
    const reply = wire[replyAt]!.message;
    expect(['page', 'zero-page']).toContain(reply.type);
    expect(reply).toMatchObject({ id: 1, page: REQUESTED });
    expect(reply.type).toBe(img.isZero(REQUESTED) ? 'zero-page' : 'page');
    if (reply.type === 'page') {
      expect(Buffer.compare(Buffer.from(reply.data), Buffer.from(img.pageBytes(REQUESTED)))).toBe(0);
    }

    // Only one message on the fault channel; everything else went to main.
    expect(wire.filter((s) => s.channel === 'vcpu0')).toHaveLength(1);
    // The requested page is not pushed again.
    expect(wire.some((s) => s.message.type.startsWith('pushed') && pagesOf(s.message).includes(REQUESTED))).toBe(false);

    // Every page exactly once across page/zero-page/pushed/pushed-zero.
    const counts = sendCounts(wire, PAGES);
    expect(counts.every((c) => c === 1)).toBe(true);
    expect(wire).toHaveLength(PAGES + 1);

    // Pushed pages are pushed in order and carry the right content; zero pages carry none.
    const words = new Uint32Array(PAGE / 4);
    let checked = 0;
    let previous = -1;
    let zeroFrames = 0;
    for (const { message, bytes } of wire) {
      if (message.type === 'pushed') {
        expect(message.page).toBeGreaterThan(previous);
        previous = message.page;
        // Copy: the data is an unaligned view into the frame.
        new Uint8Array(words.buffer).set(message.data);
        if (verifyPage(spec, message.page, words) !== -1) throw new Error(`pushed page ${message.page} has wrong content`);
        checked++;
      } else if (message.type === 'pushed-zero') {
        expect(message.page).toBeGreaterThan(previous);
        previous = message.page;
        expect(img.isZero(message.page)).toBe(true);
        expect(bytes).toBeLessThan(16);
        zeroFrames++;
      }
    }
    expect(zeroFrames).toBeGreaterThan(0);
    expect(checked + zeroFrames).toBe(PAGES - 1);

    // 'complete' comes last, once, on the main channel, with every page counted.
    expect(wire.filter((s) => s.message.type === 'complete')).toHaveLength(1);
    expect(wire.at(-1)).toMatchObject({ channel: 'main', message: { type: 'complete', pagesSent: PAGES } });

    const summary = migration.summarize(allReceived(PAGES));
    expect(summary).toMatchObject({
      requests: 1,
      replies: 1,
      repliesAlreadySent: 0,
      pagesSent: PAGES,
      pagesPushed: PAGES - 1,
      pagesZero: img.zeroPages,
      pagesSentTwice: 0,
      sentNotReceived: 0,
      receivedNotSent: 0,
      digestOfReceived: img.digest,
    });
    expect(summary.repliesPage + summary.repliesZero).toBe(1);
    // The summary reuses the image digest when every page was received: it
    // must be the digest of all pages, as the destination hashes them.
    expect(digestPages(img, img.layout)).toBe(img.digest);
    // With a page missing, the digest covers only the pages received.
    const partial = allReceived(PAGES);
    partial[0] = partial[0]! & ~1;
    expect(migration.summarize(partial).digestOfReceived).toBe(digestPages(img, img.layout, (p) => p !== 0));
    expect(migration.summarize(partial).digestOfReceived).not.toBe(img.digest);
    // The controller's path (digestOfReceived, then summarize with it) gives the same.
    await expect(migration.digestOfReceived(partial)).resolves.toBe(digestPages(img, img.layout, (p) => p !== 0));
    await expect(migration.digestOfReceived(allReceived(PAGES))).resolves.toBe(img.digest);
  });

  it('answers two requests for the same page on two channels once with the page, once with already-sent', async () => {
    const img = image(64, { seed: 3, zeroFraction: 0 });
    const wire: Sent[] = [];
    const a = new FakeChannel('vcpu0', img.layout, wire);
    const b = new FakeChannel('vcpu1', img.layout, wire);
    const migration = new SourceMigration(img);
    void migration.request(a, 10, 5);
    void migration.request(b, 10, 5);
    await migration.onIdle();

    expect(wire.map((s) => [s.channel, s.message.type])).toEqual([
      ['vcpu0', 'page'],
      ['vcpu1', 'already-sent'],
    ]);
    expect(wire[1]!.message).toEqual({ type: 'already-sent', id: 10, page: 5 });
    expect(migration.stats).toMatchObject({ requests: 2, replies: 2, repliesPage: 1, repliesAlreadySent: 1 });
    expect(migration.sentmap.pagesSentTwice).toBe(0);
    expect(migration.sentmap.sent).toBe(1);
  });

  it('answers already-sent for a page that was pushed', async () => {
    const img = image(64, { seed: 3, zeroFraction: 0 });
    const wire: Sent[] = [];
    const main = new FakeChannel('main', img.layout, wire);
    const fault = new FakeChannel('vcpu0', img.layout, wire);
    const migration = new SourceMigration(img, { pushBatchBytes: PAGE });
    migration.startPush(main);
    // Page 0 goes out as soon as the push starts.
    expect(wire[0]!.message).toMatchObject({ type: 'pushed', page: 0 });
    void migration.request(fault, 1, 0);
    await migration.onIdle();
    // After the push finished, every page is already sent.
    void migration.request(fault, 2, 40);
    void migration.request(fault, 3, 63);
    await migration.onIdle();

    const replies = wire.filter((s) => s.channel === 'vcpu0').map((s) => s.message);
    expect(replies).toEqual([
      { type: 'already-sent', id: 1, page: 0 },
      { type: 'already-sent', id: 2, page: 40 },
      { type: 'already-sent', id: 3, page: 63 },
    ]);
    expect(sendCounts(wire, 64).every((c) => c === 1)).toBe(true);
    expect(migration.summarize(allReceived(64))).toMatchObject({ requests: 3, replies: 3, repliesAlreadySent: 3, pagesSentTwice: 0 });
  });

  it('gives every request exactly one reply while pushing, and sends every page once', async () => {
    const PAGES = 512;
    const img = image(PAGES, { seed: 11, zeroFraction: 0.2 });
    const wire: Sent[] = [];
    const main = new FakeChannel('main', img.layout, wire);
    const channels = [0, 1, 2].map((v) => new FakeChannel(`vcpu${v}`, img.layout, wire));
    const migration = new SourceMigration(img, { pushBatchBytes: 2 * PAGE });
    migration.startPush(main);

    // Requests arrive in bursts between pushes, hitting the same pages from several channels.
    let seed = 12345;
    const next = (): number => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0);
    const sentIds = new Map<string, number[]>(channels.map((c) => [c.label, []]));
    for (let burst = 0; burst < 20; burst++) {
      await new Promise<void>((resolve) => setImmediate(resolve));
      for (let k = 0; k < 10; k++) {
        const channel = channels[next() % channels.length]!;
        const id = burst * 100 + k;
        const page = next() % 64 < 32 ? next() % 16 : next() % PAGES;
        sentIds.get(channel.label)!.push(id);
        void migration.request(channel, id, page);
      }
    }
    await migration.onIdle();

    for (const channel of channels) {
      const byId = repliesById(wire, channel.label);
      const ids = sentIds.get(channel.label)!;
      expect([...byId.keys()].sort((x, y) => x - y)).toEqual([...ids].sort((x, y) => x - y));
      for (const replies of byId.values()) expect(replies).toHaveLength(1);
    }
    expect(sendCounts(wire, PAGES).every((c) => c === 1)).toBe(true);
    const summary = migration.summarize(allReceived(PAGES));
    expect(summary).toMatchObject({ requests: 200, replies: 200, pagesSent: PAGES, pagesSentTwice: 0, sentNotReceived: 0, receivedNotSent: 0 });
    expect(summary.repliesPage + summary.repliesZero + summary.repliesAlreadySent).toBe(200);
    expect(summary.repliesAlreadySent).toBeGreaterThan(0);
    expect(wire.at(-1)!.message.type).toBe('complete');
  });

  it('replies zero-page, with no data on the wire, for zero pages', async () => {
    const img = image(64, { seed: 1, zeroFraction: 1 });
    expect(img.zeroPages).toBe(64);
    const wire: Sent[] = [];
    const fault = new FakeChannel('vcpu0', img.layout, wire);
    const main = new FakeChannel('main', img.layout, wire);
    const migration = new SourceMigration(img);
    for (let page = 0; page < 64; page += 7) void migration.request(fault, page, page);
    await migration.onIdle();
    const replies = wire.map((s) => s.message);
    expect(replies.length).toBe(10);
    for (const [i, { message, bytes }] of wire.entries()) {
      expect(message).toEqual({ type: 'zero-page', id: i * 7, page: i * 7 });
      expect(bytes).toBeLessThan(16);
    }
    // Pushing the rest sends zero notices only.
    migration.startPush(main);
    await migration.onIdle();
    const pushed = wire.filter((s) => s.channel === 'main').map((s) => s.message.type);
    expect(pushed.filter((t) => t === 'pushed-zero')).toHaveLength(64 - 10);
    expect(pushed.includes('pushed')).toBe(false);
    expect(pushed.at(-1)).toBe('complete');
    expect(migration.summarize(allReceived(64))).toMatchObject({ repliesZero: 10, repliesPage: 0, pagesZero: 64, pagesSent: 64 });
  });

  it('does not answer a request on a closed channel, nor mark its page sent', async () => {
    const img = image(64, { seed: 3, zeroFraction: 0 });
    const wire: Sent[] = [];
    const closed = new FakeChannel('vcpu0', img.layout, wire);
    closed.isOpen = false;
    const open = new FakeChannel('vcpu1', img.layout, wire);
    const migration = new SourceMigration(img);
    void migration.request(closed, 1, 9);
    await migration.onIdle();
    expect(wire).toEqual([]);
    expect(migration.sentmap.isSent(9)).toBe(false);
    expect(migration.stats).toMatchObject({ requests: 1, replies: 0, repliesUndeliverable: 1 });

    void migration.request(open, 2, 9);
    await migration.onIdle();
    expect(wire).toHaveLength(1);
    expect(wire[0]).toMatchObject({ channel: 'vcpu1', message: { type: 'page', id: 2, page: 9 } });
    const expected = new Uint32Array(PAGE / 4);
    fillPage(img.spec, 9, expected);
    const data = (wire[0]!.message as { data: Uint8Array }).data;
    expect(Buffer.compare(Buffer.from(data), Buffer.from(expected.buffer))).toBe(0);
    expect(migration.sentmap.isSent(9)).toBe(true);
  });
});

describe('SourceMigration back-pressure', () => {
  it('pauses pushing while the push channel is over its high-water mark, and keeps answering requests meanwhile', async () => {
    const img = image(256, { seed: 5, zeroFraction: 0 });
    const layout = img.layout;
    const wire: Sent[] = [];
    const main = new StuckChannel('main', layout, wire);
    const fault = new FakeChannel('fault', layout, wire);
    const migration = new SourceMigration(img, { pushBatchBytes: 4 * PAGE, pushHighWaterBytes: 8 * PAGE });
    migration.startPush(main);
    await new Promise((r) => setTimeout(r, 20));
    const pushedBefore = wire.filter((s) => s.message.type === 'pushed').length;
    // Over the mark after a few batches, the push stops...
    expect(pushedBefore).toBeGreaterThan(0);
    expect(pushedBefore).toBeLessThan(256);
    // ...while a request on another channel is answered at once.
    await migration.request(fault, 7, 200);
    const reply = wire.find((s) => s.channel === 'fault');
    expect(reply?.message).toMatchObject({ type: 'page', id: 7, page: 200 });
    expect(wire.filter((s) => s.message.type === 'pushed').length).toBe(pushedBefore);
    // Once the socket drains, pushing resumes and finishes.
    while (!wire.some((s) => s.message.type === 'complete')) {
      main.drain();
      await new Promise((r) => setTimeout(r, 1));
    }
    expect(sendCounts(wire, 256).every((n) => n === 1)).toBe(true);
  });
});

describe('SourceMigration pushed runs', () => {
  it('pushes consecutive pages as runs of up to 16 pages, zero pages as notices that break a run', async () => {
    const img = image(200, { seed: 9, zeroFraction: 0.1 });
    const wire: Sent[] = [];
    const main = new FakeChannel('main', img.layout, wire);
    const migration = new SourceMigration(img);
    migration.startPush(main);
    await migration.onIdle();
    while (!wire.some((s) => s.message.type === 'complete')) await new Promise((r) => setTimeout(r, 1));
    const runs = wire.filter((s) => s.message.type === 'pushed').map((s) => s.message as Extract<Message, { type: 'pushed' }>);
    expect(Math.max(...runs.map((m) => m.data.length / PAGE))).toBe(16);
    const words = new Uint32Array(PAGE / 4);
    for (const m of runs) {
      for (let i = 0; i < m.data.length / PAGE; i++) {
        expect(img.isZero(m.page + i)).toBe(false);
        new Uint8Array(words.buffer).set(m.data.subarray(i * PAGE, (i + 1) * PAGE));
        expect(verifyPage({ seed: 9, zeroFraction: 0.1 }, m.page + i, words)).toBe(-1);
      }
    }
    expect(sendCounts(wire, 200).every((n) => n === 1)).toBe(true);
    expect(wire.filter((s) => s.message.type === 'pushed-zero').length).toBe(img.zeroPages);
  });
});

describe('SourceMigration push cap (max-postcopy-bandwidth)', () => {
  it('keeps the push under the cap, and never holds back a requested page', async () => {
    const img = image(256, { seed: 4, zeroFraction: 0 });
    const wire: Sent[] = [];
    const main = new FakeChannel('main', img.layout, wire);
    const fault = new FakeChannel('fault', img.layout, wire);
    // 1 MiB at 80 Mbit/s (10 MB/s): about 100 ms, less the first burst.
    const migration = new SourceMigration(img, { maxPushBps: 80e6 });
    const start = performance.now();
    migration.startPush(main);
    await new Promise((r) => setTimeout(r, 10));
    const t0 = performance.now();
    await migration.request(fault, 1, 250);
    expect(performance.now() - t0).toBeLessThan(50);
    expect(wire.find((s) => s.channel === 'fault')?.message).toMatchObject({ type: 'page', id: 1, page: 250 });
    while (!wire.some((s) => s.message.type === 'complete')) await new Promise((r) => setTimeout(r, 2));
    const elapsedMs = performance.now() - start;
    const burst = 64 * 1024;
    expect(elapsedMs).toBeGreaterThanOrEqual(((256 * PAGE - burst - PAGE) / 10e6) * 1000 * 0.95);
    expect(sendCounts(wire, 256).every((n) => n === 1)).toBe(true);
  });
});

/** A bitmap with `pages` set, one bit a page (receivedmap, requestedmap). */
function bitmapOf(totalPages: number, pages: Iterable<number>): Uint8Array {
  const map = new Uint8Array(bitmapBytes(totalPages));
  for (const page of pages) bitmapSet(map, page);
  return map;
}

/** Pages whose content (or zero notice) went out in `wire`, in order, with repeats. */
function sentPages(wire: Sent[]): number[] {
  return wire.filter((s) => SENDS.has(s.message.type)).flatMap((s) => pagesOf(s.message));
}

/** A channel whose socket never drains until told to (push stops at the high-water mark). */
class StuckChannel extends FakeChannel {
  readonly held: (() => void)[] = [];
  override send(frame: Uint8Array, sent?: (err?: Error) => void): void {
    super.send(frame);
    this.bufferedAmount += frame.length;
    if (sent) this.held.push(sent);
  }
  drain(): void {
    this.bufferedAmount = 0;
    for (const cb of this.held.splice(0)) cb();
  }
}

async function untilComplete(wire: Sent[], channel: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!wire.some((s) => s.channel === channel && s.message.type === 'complete')) {
    if (Date.now() > deadline) throw new Error(`no complete on ${channel} within 10 s`);
    await new Promise((r) => setTimeout(r, 1));
  }
}


/** A migration that pushed every page on `main1` (complete went out), then lost that channel and paused. */
async function lostAfterComplete(pages: number, spec: ImageSpec, wire: Sent[]): Promise<{ img: GuestImage; migration: SourceMigration }> {
  const img = image(pages, spec);
  const migration = new SourceMigration(img);
  const main1 = new FakeChannel('main1', img.layout, wire);
  migration.startPush(main1);
  await untilComplete(wire, 'main1');
  await migration.onIdle();
  main1.isOpen = false;
  migration.pause();
  return { img, migration };
}

describe('SourceMigration recovery (pause, resume)', () => {
  it('pushes again the pushed pages the destination lacks, and nothing it has; each page once per receivedmap', async () => {
    const PAGES = 256;
    const img = image(PAGES, { seed: 11, zeroFraction: 0.1 });
    const before: Sent[] = [];
    const main1 = new StuckChannel('main1', img.layout, before);
    const migration = new SourceMigration(img, { pushBatchBytes: 8 * PAGE, pushHighWaterBytes: 16 * PAGE });
    migration.startPush(main1);
    await migration.onIdle();
    const pushed1 = sentPages(before);
    // The push stopped at the high-water mark, part way.
    expect(pushed1.length).toBeGreaterThan(8);
    expect(pushed1.length).toBeLessThan(PAGES);
    expect(new Set(pushed1).size).toBe(pushed1.length);

    // The connection goes: the last 5 pages pushed never arrived.
    main1.isOpen = false;
    migration.pause();
    const lost = pushed1.slice(-5);
    const received = pushed1.slice(0, -5);
    // Old pushes waiting for the socket to drain end instead of running beside the new session's.
    main1.drain();
    await migration.onIdle();
    expect(sentPages(before)).toEqual(pushed1);

    const after: Sent[] = [];
    const main2 = new FakeChannel('main2', img.layout, after);
    const pagesMarkedUnsent = migration.resume(main2, {
      push: true,
      preempt: true,
      receivedmap: bitmapOf(PAGES, received),
      requestedmap: bitmapOf(PAGES, []),
    });
    expect(pagesMarkedUnsent).toBe(5);
    await untilComplete(after, 'main2');
    await migration.onIdle();

    // Session 2 sent exactly the pages the receivedmap lacked, each once, in page order from page 0.
    const pushed2 = sentPages(after);
    const receivedSet = new Set(received);
    expect(pushed2).toEqual(Array.from({ length: PAGES }, (_, p) => p).filter((p) => !receivedSet.has(p)));
    for (const page of lost) expect(pushed2).toContain(page);
    // Each page went out once to the receivedmap as it ends: received before, or sent after.
    const counts = sendCounts(after, PAGES);
    for (const page of received) counts[page]!++;
    expect(counts.every((c) => c === 1)).toBe(true);
    expect(after.filter((s) => s.channel !== 'main2')).toEqual([]);

    // complete goes out again, last, for every page.
    expect(after.filter((s) => s.message.type === 'complete')).toHaveLength(1);
    expect(after.at(-1)!.message).toEqual({ type: 'complete', pagesSent: PAGES });
    expect(before.some((s) => s.message.type === 'complete')).toBe(false);
    expect(migration.stats.resumes).toBe(1);
    expect(migration.stats.pagesResentRequested).toBe(0);
    expect(migration.summarize(allReceived(PAGES))).toMatchObject({ pagesSent: PAGES, pagesSentTwice: 0, sentNotReceived: 0, receivedNotSent: 0, digestOfReceived: img.digest });
  });

  it("sends the requestedmap's missing pages on main, after the announcement and ahead of any push, as id-0 page/zero-page", async () => {
    const PAGES = 64;
    const img = image(PAGES, { seed: 12, zeroFraction: 0.3 });
    const zero = Array.from({ length: PAGES }, (_, p) => p).filter((p) => img.isZero(p));
    const data = Array.from({ length: PAGES }, (_, p) => p).filter((p) => !img.isZero(p));
    expect(zero.length).toBeGreaterThan(1);
    // Requested and still missing: two data pages and a zero page; one requested page did arrive.
    const missing = [data[3]!, zero[1]!, data[10]!].sort((a, b) => a - b);
    const arrived = data[0]!;
    const wire: Sent[] = [];
    const fault = new FakeChannel('vcpu0', img.layout, wire);
    const migration = new SourceMigration(img);
    void migration.request(fault, 1, arrived);
    await migration.onIdle();
    fault.isOpen = false;
    migration.pause();

    const main = new FakeChannel('main2', img.layout, wire);
    const announced: number[] = [];
    const pagesMarkedUnsent = migration.resume(
      main,
      { push: true, preempt: true, receivedmap: bitmapOf(PAGES, [arrived]), requestedmap: bitmapOf(PAGES, [arrived, ...missing]) },
      (n) => {
        announced.push(n);
        // Nothing of the new session went out before the announcement.
        expect(wire.filter((s) => s.channel === 'main2')).toEqual([]);
        wire.push({ channel: 'main2', message: { type: 'resumed', pagesMarkedUnsent: n, restarted: false }, bytes: 0 });
      },
    );
    expect(pagesMarkedUnsent).toBe(0);
    expect(announced).toEqual([0]);
    await untilComplete(wire, 'main2');

    const onMain = wire.filter((s) => s.channel === 'main2').map((s) => s.message);
    expect(onMain[0]!.type).toBe('resumed');
    expect(onMain.slice(1, 4)).toEqual(
      missing.map((page) => (img.isZero(page) ? { type: 'zero-page', id: 0, page } : { type: 'page', id: 0, page, data: expect.any(Uint8Array) })),
    );
    const page = onMain.find((m) => m.type === 'page')!;
    if (page.type === 'page') expect(Buffer.compare(Buffer.from(page.data), Buffer.from(img.pageBytes(page.page)))).toBe(0);
    // Then the push, which skips them and the page that arrived.
    expect(onMain.slice(4).every((m) => m.type === 'pushed' || m.type === 'pushed-zero' || m.type === 'complete')).toBe(true);
    const counts = sendCounts(wire, PAGES);
    expect(counts.every((c) => c === 1)).toBe(true);

    // Counted as pages sent (page/zero), not as replies: no request of this session asked.
    expect(migration.stats).toMatchObject({ requests: 1, replies: 1, repliesPage: 3, repliesZero: 1, pagesResentRequested: 3, resumes: 1 });
    expect(migration.summarize(allReceived(PAGES))).toMatchObject({ pagesSent: PAGES, pagesZero: img.zeroPages, pagesSentTwice: 0, sentNotReceived: 0, receivedNotSent: 0 });

    // The destination replays its request on a new fault channel: already sent.
    const fault2 = new FakeChannel('vcpu0-2', img.layout, wire);
    await migration.request(fault2, 7, missing[0]!);
    expect(wire.at(-1)!.message).toEqual({ type: 'already-sent', id: 7, page: missing[0] });
  });

  it('counts answers queued for channels that closed as undeliverable: every request answered or counted', async () => {
    const PAGES = 128;
    const img = image(PAGES, { seed: 13, zeroFraction: 0 });
    const wire: Sent[] = [];
    const main = new FakeChannel('main', img.layout, wire);
    const fault = new FakeChannel('vcpu0', img.layout, wire);
    const migration = new SourceMigration(img, { pushBatchBytes: PAGE });
    migration.preempt = false;
    migration.mainChannel = main;
    migration.startPush(main);
    const REQUESTS = 20;
    for (let i = 0; i < REQUESTS; i++) void migration.request(fault, i, 100 + i);
    // The connection goes before the queue has run: the answers still queued must not be dropped.
    main.isOpen = false;
    fault.isOpen = false;
    migration.pause();
    await migration.onIdle();
    const { requests, replies, repliesUndeliverable } = migration.stats;
    expect(requests).toBe(REQUESTS);
    expect(repliesUndeliverable).toBeGreaterThan(0);
    expect(replies + repliesUndeliverable).toBe(REQUESTS);
    // What was not delivered is not marked sent.
    expect(migration.sentmap.sent).toBe(sentPages(wire).length);
  });

  it('sends complete again, at once, when the receivedmap is already full and push is on', async () => {
    const PAGES = 32;
    const before: Sent[] = [];
    // Lost after complete went out (the destination had every page).
    const { img, migration } = await lostAfterComplete(PAGES, { seed: 14, zeroFraction: 0 }, before);
    // Answers of the old session still queued: the queue is busy when the resume comes.
    const fault = new FakeChannel('vcpu0', img.layout, before);
    fault.isOpen = false;
    for (let i = 0; i < 3; i++) void migration.request(fault, i, i);

    const after: Sent[] = [];
    const main2 = new FakeChannel('main2', img.layout, after);
    expect(migration.resume(main2, { push: true, preempt: true, receivedmap: allReceived(PAGES), requestedmap: bitmapOf(PAGES, [3]) })).toBe(0);
    expect(after.map((s) => s.message)).toEqual([{ type: 'complete', pagesSent: PAGES }]);
    await migration.onIdle();
    await new Promise((r) => setTimeout(r, 5));
    expect(after).toHaveLength(1);
    expect(migration.stats).toMatchObject({ requests: 3, replies: 0, repliesUndeliverable: 3 });
    expect(migration.summarize(allReceived(PAGES))).toMatchObject({ pagesSent: PAGES, pagesPushed: PAGES, pagesSentTwice: 0, sentNotReceived: 0, receivedNotSent: 0 });
  });

  it('sends complete again after a resume when the first session had sent it and pages were lost', async () => {
    const PAGES = 48;
    const wire: Sent[] = [];
    const { img, migration } = await lostAfterComplete(PAGES, { seed: 16, zeroFraction: 0.2 }, wire);
    const main2 = new FakeChannel('main2', img.layout, wire);
    const received = Array.from({ length: PAGES }, (_, p) => p).filter((p) => p % 5 !== 0);
    expect(migration.resume(main2, { push: true, preempt: true, receivedmap: bitmapOf(PAGES, received), requestedmap: bitmapOf(PAGES, []) })).toBe(PAGES - received.length);
    await untilComplete(wire, 'main2');
    expect(wire.filter((s) => s.message.type === 'complete').map((s) => s.channel)).toEqual(['main1', 'main2']);
    expect(sentPages(wire.filter((s) => s.channel === 'main2'))).toEqual(Array.from({ length: PAGES }, (_, p) => p).filter((p) => p % 5 === 0));
    expect(migration.summarize(allReceived(PAGES))).toMatchObject({ pagesSent: PAGES, pagesSentTwice: 0, sentNotReceived: 0, receivedNotSent: 0 });
  });

  it('without push after resume sends only the requested pages, and no complete', async () => {
    const PAGES = 32;
    const img = image(PAGES, { seed: 15, zeroFraction: 0 });
    const wire: Sent[] = [];
    const migration = new SourceMigration(img);
    const main = new FakeChannel('main', img.layout, wire);
    migration.resume(main, { push: false, preempt: false, receivedmap: bitmapOf(PAGES, []), requestedmap: bitmapOf(PAGES, [4, 30]) });
    await migration.onIdle();
    await new Promise((r) => setTimeout(r, 5));
    expect(wire.map((s) => s.message.type)).toEqual(['page', 'page']);
    expect(sentPages(wire)).toEqual([4, 30]);
    expect(migration.preempt).toBe(false);
  });
});

/** A push channel that records the records written to it (shared/push-stream.ts), as the destination reads them. */
class FakePushStream implements PushStream {
  isOpen = true;
  bufferedAmount = 0;
  /** Bytes written count against bufferedAmount until drain() (a socket that does not drain). */
  stuck = false;
  private bytes: Buffer[] = [];
  private waiting: (() => void)[] = [];
  corks = 0;
  cork(): void {
    this.corks++;
  }
  uncork(): void {}
  write(bytes: Uint8Array): void {
    this.bytes.push(Buffer.from(bytes));
    if (this.stuck) this.bufferedAmount += bytes.length;
  }
  drained(): Promise<void> {
    return this.bufferedAmount === 0 ? Promise.resolve() : new Promise((resolve) => this.waiting.push(resolve));
  }
  drain(): void {
    this.bufferedAmount = 0;
    for (const w of this.waiting.splice(0)) w();
  }
  /** The records, with each PAGES record's bytes. */
  records(layout: GuestLayout): { kind: number; first: number; count: number; data?: Buffer }[] {
    const all = Buffer.concat(this.bytes);
    const out: { kind: number; first: number; count: number; data?: Buffer }[] = [];
    for (let at = 0; at < all.length; ) {
      const h = decodePushRecordHeader(all.subarray(at, at + PUSH_HEADER_BYTES), layout);
      at += PUSH_HEADER_BYTES;
      if (h.kind === PUSH_RECORD.PAGES) {
        out.push({ ...h, data: all.subarray(at, at + h.count * layout.pageSize) });
        at += h.count * layout.pageSize;
      } else out.push(h);
    }
    return out;
  }
}

const recordPages = (records: { first: number; count: number }[]): number[] => records.flatMap((r) => Array.from({ length: r.count }, (_, i) => r.first + i));

describe('SourceMigration on a push channel', () => {
  it('pushes every page once in records (runs of contents, runs of zero pages), answers a request on its channel, and says complete on main', async () => {
    const PAGES = 2048;
    const img = image(PAGES, { seed: 5, zeroFraction: 0.1 });
    const wire: Sent[] = [];
    const main = new FakeChannel('main', img.layout, wire);
    const fault = new FakeChannel('vcpu0', img.layout, wire);
    const stream = new FakePushStream();
    const migration = new SourceMigration(img, { pushStreamBatchBytes: 64 * PAGE });
    migration.attachPushStream(stream);
    migration.startPush(main);
    void migration.request(fault, 1, 1500);
    await untilComplete(wire, 'main');
    await migration.onIdle();
    const records = stream.records(img.layout);
    const pushed = recordPages(records);
    // Page order, every page but the requested one, once.
    expect(pushed).toEqual(Array.from({ length: PAGES }, (_, p) => p).filter((p) => p !== 1500));
    for (const r of records) {
      for (let p = r.first; p < r.first + r.count; p++) expect(img.isZero(p)).toBe(r.kind === PUSH_RECORD.ZERO);
      if (r.data) expect(r.data.equals(Buffer.from(img.pagesBytes(r.first, r.count)))).toBe(true);
    }
    // Runs: far fewer records than pages; each batch corked into one write.
    expect(records.length).toBeLessThan(PAGES / 3);
    expect(stream.corks).toBeGreaterThanOrEqual(PAGES / 64);
    // Main carries no pushed frames: only complete.
    expect(wire.filter((s) => s.channel === 'main').map((s) => s.message.type)).toEqual(['complete']);
    expect(wire.filter((s) => s.channel === 'vcpu0').map((s) => s.message)).toMatchObject([{ id: 1, page: 1500 }]);
    expect(migration.stats.pagesPushed).toBe(PAGES - 1);
    expect(migration.summarize(allReceived(PAGES))).toMatchObject({ pagesSent: PAGES, pagesSentTwice: 0 });
  });

  it('a record cut by a drop: after the resume the push channel gets exactly the pages the receivedmap lacks, none twice', async () => {
    const PAGES = 1024;
    const img = image(PAGES, { seed: 9, zeroFraction: 0 });
    const before: Sent[] = [];
    const main1 = new FakeChannel('main1', img.layout, before);
    const stream1 = new FakePushStream();
    stream1.stuck = true;
    const migration = new SourceMigration(img, { pushStreamBatchBytes: 128 * PAGE, pushStreamHighWaterBytes: 200 * PAGE });
    migration.attachPushStream(stream1);
    migration.startPush(main1);
    await migration.onIdle();
    const pushed1 = recordPages(stream1.records(img.layout));
    // Stopped at the high-water mark, part way.
    expect(pushed1.length).toBe(256);
    // The drop: the destination got the first record whole and 40 pages of the second.
    const received = pushed1.slice(0, 128 + 40);
    stream1.isOpen = false;
    migration.detachPushStream(stream1);
    migration.pause();
    stream1.drain();
    await migration.onIdle();
    expect(recordPages(stream1.records(img.layout))).toEqual(pushed1);

    const after: Sent[] = [];
    const main2 = new FakeChannel('main2', img.layout, after);
    const stream2 = new FakePushStream();
    migration.attachPushStream(stream2);
    expect(migration.resume(main2, { push: true, preempt: true, receivedmap: bitmapOf(PAGES, received), requestedmap: bitmapOf(PAGES, []) })).toBe(256 - 168);
    await untilComplete(after, 'main2');
    await migration.onIdle();
    const pushed2 = recordPages(stream2.records(img.layout));
    expect(pushed2).toEqual(Array.from({ length: PAGES - 168 }, (_, i) => 168 + i));
    expect(sentPages(after)).toEqual([]);
    expect(migration.summarize(allReceived(PAGES))).toMatchObject({ pagesSent: PAGES, pagesSentTwice: 0, sentNotReceived: 0, receivedNotSent: 0 });
  });

  it('falls back to the main channel when the push channel closes, and moves to a push channel opened mid-push', async () => {
    const PAGES = 512;
    const img = image(PAGES, { seed: 3, zeroFraction: 0 });
    const wire: Sent[] = [];
    const main = new FakeChannel('main', img.layout, wire);
    const migration = new SourceMigration(img, { pushBatchBytes: 16 * PAGE, pushStreamBatchBytes: 16 * PAGE });
    migration.startPush(main);
    // A few batches on main, then the push channel arrives.
    await new Promise((resolve) => setImmediate(resolve));
    await new Promise((resolve) => setImmediate(resolve));
    const stream = new FakePushStream();
    migration.attachPushStream(stream);
    await untilComplete(wire, 'main');
    await migration.onIdle();
    const onMain = sentPages(wire);
    const onStream = recordPages(stream.records(img.layout));
    expect(onMain.length).toBeGreaterThan(0);
    expect(onStream.length).toBeGreaterThan(0);
    expect([...onMain, ...onStream]).toEqual(Array.from({ length: PAGES }, (_, p) => p));
  });
});
