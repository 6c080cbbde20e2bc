/**
 * Precopy on the source, in process: the dirty log under concurrent writers,
 * QEMU's convergence arithmetic and auto-converge steps, the lifecycle's
 * transitions, and whole precopy runs with the real guest vCPU threads
 * writing while a fake destination applies what it receives, so that its
 * memory can be compared with the source's at the moment the guest stopped.
 */
import { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';
import { PHASE, coalesce, counterWord, decode, makeLayout, type GuestLayout, type Message, type PageRange } from '@postcopy/shared';
import { AUTO_CONVERGE, AutoConverge, convergence } from './convergence.js';
import { DirtyLog, bitSet, popcount } from './dirty-log.js';
import { SourceGuest } from './guest/source-guest.js';
import { GuestImage } from './image.js';
import { SourceLifecycle, type SourceState } from './lifecycle.js';
import type { Channel } from './migration.js';
import { NotConvergedError, Precopy, type PrecopyOptions } from './precopy.js';

const closers: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  while (closers.length) await closers.pop()!();
});

describe('dirty log', () => {
  it('read-and-clear under concurrent writers loses no bit: every page written is found by some sync', async () => {
    const PAGES = 50_000;
    const log = new DirtyLog(PAGES);
    // Writers mark pages of their own seeded sequence and count each write in `written`.
    const written = new Int32Array(new SharedArrayBuffer(PAGES * 4));
    const source = `
      const { workerData } = require('node:worker_threads');
      const words = new Int32Array(workerData.log);
      const written = new Int32Array(workerData.written);
      let x = workerData.seed | 1;
      for (let i = 0; i < workerData.writes; i++) {
        x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
        const page = (x >>> 0) % workerData.pages;
        Atomics.add(written, page, 1);           // the "store"
        Atomics.or(words, page >>> 5, 1 << (page & 31)); // then the bit
      }
    `;
    const writers = Array.from({ length: 3 }, (_, i) => new Worker(source, { eval: true, workerData: { log: log.buffer, written: written.buffer, seed: 17 + i, writes: 200_000, pages: PAGES } }));
    closers.push(() => Promise.all(writers.map((w) => w.terminate())));
    const done = Promise.all(writers.map((w) => new Promise((resolve) => w.once('exit', resolve))));
    const seen = new Int32Array(log.words.length);
    let finished = false;
    void done.then(() => (finished = true));
    let syncs = 0;
    while (!finished) {
      log.sync(seen);
      syncs++;
      await new Promise((r) => setImmediate(r));
    }
    log.sync(seen);
    expect(syncs).toBeGreaterThan(1);
    let pagesWritten = 0;
    for (let page = 0; page < PAGES; page++) {
      if (written[page]! > 0) {
        pagesWritten++;
        if (!bitSet(seen, page)) throw new Error(`page ${page} was written ${written[page]} times and no sync saw it`);
      } else {
        expect(bitSet(seen, page), `page ${page} never written`).toBe(false);
      }
    }
    expect(pagesWritten).toBeGreaterThan(PAGES / 2);
    // And the log is clear after the last sync.
    expect(log.words.every((w) => w === 0)).toBe(true);
    expect(log.syncCount).toBe(syncs + 1);
  });

  it('the testing-only fault forgets every Nth dirty bit, and says how many', () => {
    const log = new DirtyLog(64, undefined, { loseEvery: 3 });
    for (let page = 0; page < 30; page++) log.mark(page);
    const seen = new Int32Array(2);
    expect(log.sync(seen)).toBe(20);
    expect(log.lost).toBe(10);
    expect(popcount(seen[0]!)).toBe(20);
    expect(bitSet(seen, 2)).toBe(false);
    expect(bitSet(seen, 0)).toBe(true);
  });
});

describe('convergence (QEMU: threshold = bandwidth x downtime limit)', () => {
  it('threshold and expected downtime', () => {
    // 100 MB/s = 100_000 bytes/ms; 300 ms limit: 30 MB threshold.
    expect(convergence(10_000_000, 100_000, 300)).toEqual({ thresholdBytes: 30_000_000, expectedDowntimeMs: 100, converged: true });
    expect(convergence(30_000_000, 100_000, 300).converged).toBe(true);
    expect(convergence(30_000_001, 100_000, 300)).toMatchObject({ converged: false });
    expect(convergence(50_000_000, 100_000, 300).expectedDowntimeMs).toBe(500);
    expect(convergence(0, 0, 300)).toEqual({ thresholdBytes: 0, expectedDowntimeMs: 0, converged: true });
    expect(convergence(1, 0, 300)).toMatchObject({ converged: false, expectedDowntimeMs: Infinity });
  });

  it('auto-converge: a step after two periods over 50 % of what was sent; 20, then +10, up to 99', () => {
    const ac = new AutoConverge();
    expect(ac.period(40, 100)).toBeUndefined(); // under the trigger
    expect(ac.period(60, 100)).toBeUndefined(); // first period over
    expect(ac.period(60, 100)).toBe(AUTO_CONVERGE.initialPercent);
    expect(ac.period(60, 100)).toBeUndefined();
    expect(ac.period(60, 100)).toBe(30);
    const steps: number[] = [];
    for (let i = 0; i < 40; i++) {
      const s = ac.period(90, 100);
      if (s !== undefined) steps.push(s);
    }
    expect(steps).toEqual([40, 50, 60, 70, 80, 90, 99]);
    expect(ac.throttlePercent).toBe(99);
  });
});

describe('the source lifecycle', () => {
  it('follows QEMU\'s states: a table of legal transitions, anything else throws', () => {
    const l = new SourceLifecycle(false);
    const seen: SourceState[] = [];
    l.on('state', (to: SourceState) => seen.push(to));
    l.start(true);
    l.switchover();
    l.switched(true);
    l.pause('lost');
    l.resume();
    l.finish();
    expect(seen).toEqual(['active', 'device', 'postcopy-active', 'postcopy-paused', 'postcopy-active', 'completed']);
    expect(l.ended).toBe(true);
    expect(() => l.start(false)).toThrow(/expected a transition from completed/);
    const p = new SourceLifecycle(false);
    p.start(true);
    p.cancel('lost during precopy');
    expect(p.state).toBe('cancelled');
    expect(() => p.resume()).toThrow(/from cancelled to one of nothing/);
    // A precopy that completed (stop-and-copy) pauses and resumes back to completed.
    const c = new SourceLifecycle(false);
    c.start(true);
    c.switchover();
    c.switched(false);
    c.pause('lost before the summary');
    c.resume();
    expect(c.state).toBe('completed');
    expect(new SourceLifecycle(true).state).toBe('postcopy-paused');
    expect(SourceLifecycle.successors('active')).toEqual(['device', 'cancelled', 'failed']);
  });
});

/** A destination that keeps what precopy sends in its own memory, applies discards, and records the stream. */
class FakeDestination implements Channel {
  readonly label = 'fake-main';
  isOpen = true;
  /** Frames not yet "on the wire": a slow link makes the sender wait (each frame takes `delayMs`). */
  private inFlight = 0;
  delayMs = 0;
  get bufferedAmount(): number {
    return this.inFlight * 1024 * 1024;
  }
  readonly memory: Uint8Array;
  readonly received: Uint8Array;
  readonly discarded: PageRange[] = [];
  readonly types: string[] = [];
  switchover: Extract<Message, { type: 'switchover' }> | undefined;
  /** Called for every frame, before it is applied (a scripted guest writes meanwhile). */
  onFrame: (() => void) | undefined;
  constructor(private readonly layout: GuestLayout) {
    this.memory = new Uint8Array(layout.guestBytes);
    this.received = new Uint8Array(layout.totalPages);
  }
  send(frame: Uint8Array, sent?: (err?: Error) => void): void {
    this.onFrame?.();
    const m = decode(frame, { layout: this.layout });
    this.types.push(m.type);
    const size = this.layout.pageSize;
    if (m.type === 'precopy-pages') {
      this.memory.set(m.data, m.page * size);
      for (let p = m.page; p < m.page + m.data.length / size; p++) this.received[p] = 1;
    } else if (m.type === 'precopy-zero') {
      this.memory.fill(0, m.page * size, (m.page + 1) * size);
      this.received[m.page] = 1;
    } else if (m.type === 'discard') {
      for (const r of m.ranges) {
        this.discarded.push(r);
        for (let p = r.first; p < r.first + r.count; p++) this.received[p] = 0;
      }
    } else if (m.type === 'switchover') this.switchover = m;
    // Each send takes a moment, as a real link does, so the guest writes during a round.
    this.inFlight++;
    setTimeout(() => {
      this.inFlight--;
      sent?.();
    }, this.delayMs);
  }
}

interface Run {
  image: GuestImage;
  dest: FakeDestination;
  precopy: Precopy;
  guest: SourceGuest;
  phases: Uint8Array;
}

async function precopyRun(options: Partial<PrecopyOptions>, guest: { vcpus: number; dirtyRate: number; dirtySetPages?: number }, loseEvery = 0, delayMs = 0): Promise<Run & { decision: Awaited<ReturnType<Precopy['run']>> | Error }> {
  const layout = makeLayout(2 * 1024 * 1024, 4096);
  const image = new GuestImage(layout, { seed: 3, zeroFraction: 0.1 });
  const log = new DirtyLog(layout.totalPages, undefined, { loseEvery });
  const g = new SourceGuest(image, log, { vcpus: guest.vcpus, dirtyRate: guest.dirtyRate, dirtySetPages: guest.dirtySetPages ?? layout.totalPages });
  closers.push(() => g.close());
  const phases = new Uint8Array(layout.totalPages);
  const precopy = new Precopy(image, log, g, phases, { batchBytes: 16 * 4096, ...options });
  const dest = new FakeDestination(layout);
  dest.delayMs = delayMs;
  await g.start((err) => {
    throw err;
  });
  let decision: Awaited<ReturnType<Precopy['run']>> | Error;
  try {
    decision = await precopy.run(dest, performance.now());
  } catch (err) {
    decision = err as Error;
  }
  return { image, dest, precopy, guest: g, phases, decision };
}

/** Pages whose bytes differ between the fake destination and the source, among those `include` selects. */
function differing(run: Run, include: (page: number) => boolean): number[] {
  const out: number[] = [];
  const size = run.image.layout.pageSize;
  for (let p = 0; p < run.image.layout.totalPages; p++) {
    if (!include(p)) continue;
    if (Buffer.compare(Buffer.from(run.dest.memory.subarray(p * size, (p + 1) * size)), Buffer.from(run.image.pageBytes(p))) !== 0) out.push(p);
  }
  return out;
}

describe('precopy rounds against a fake destination (the real guest vCPU threads write meanwhile)', () => {
  it('precopy at a low dirty rate converges, stops and copies: the destination holds the source\'s memory as it stopped, counters included', async () => {
    const run = await precopyRun({ mode: 'precopy', downtimeLimitMs: 300 }, { vcpus: 2, dirtyRate: 2000 });
    expect(run.decision).toEqual({ postcopy: false, reason: 'converged' });
    await run.precopy.switchover(run.dest, run.decision as { postcopy: false; reason: 'converged' });
    expect(run.guest.stopped).toBe(true);
    expect(run.guest.writes()).toBeGreaterThan(0);
    expect(run.dest.received.every((r) => r === 1)).toBe(true);
    expect(differing(run, () => true)).toEqual([]);
    // The guest really changed memory: counter words moved from the image as built.
    const cw = counterWord(4096);
    const built = new GuestImage(run.image.layout, run.image.spec);
    let changed = 0;
    for (let p = 0; p < 512; p++) {
      const now = new Uint32Array(run.dest.memory.buffer, p * 4096, 1024)[cw];
      const was = new Uint32Array(built.pageBytes(p).buffer, built.pageBytes(p).byteOffset, 1024)[cw];
      if (now !== was) changed++;
    }
    expect(changed).toBeGreaterThan(0);
    const s = run.precopy.summary(100);
    expect(s.rounds).toBeGreaterThanOrEqual(1);
    expect(s.dirtySyncCount).toBe(s.rounds + 1);
    expect(s.pagesSent).toBe(512 + s.pagesResent);
    expect(s.perRound[0]).toMatchObject({ round: 1, pagesSent: 512 });
    expect(run.phases.every((p) => p !== PHASE.NEVER)).toBe(true);
  });

  /**
   * A guest whose writes are scripted, not timed: every frame the source
   * sends, it writes `perFrame` pages of a hot set (fewer as it is
   * throttled), so these runs do not depend on how busy the machine is.
   */
  class ScriptedGuest {
    throttlePercent = 0;
    writes = 0;
    private cursor = 0;
    private readonly zero: Uint8Array;
    constructor(
      private readonly log: DirtyLog,
      private readonly image: GuestImage,
      private readonly hot: number,
      private readonly perFrame: number,
    ) {
      this.zero = new Uint8Array(image.toBuffers().zero);
    }
    setThrottle(p: number): void {
      this.throttlePercent = p;
    }
    private stopped = false;
    async stop(): Promise<number> {
      this.stopped = true;
      return performance.now();
    }
    /** The guest runs for one frame's time: (100 - throttle) % of perFrame writes (none once stopped). */
    tick(): void {
      if (this.stopped) return;
      const n = Math.floor((this.perFrame * (100 - this.throttlePercent)) / 100);
      for (let i = 0; i < n; i++) {
        const page = this.cursor++ % this.hot;
        const bytes = this.image.pageBytes(page);
        new Uint32Array(bytes.buffer, bytes.byteOffset, 1024)[1023]! += 1;
        // As a real vCPU write: the store, the page no longer zero, then its dirty bit (see guest/vcpu-worker.ts).
        Atomics.store(this.zero, page, 0);
        this.log.mark(page);
        this.writes++;
      }
    }
  }

  async function scriptedRun(options: Partial<PrecopyOptions>, hot: number, perFrame: number): Promise<{ decision: Awaited<ReturnType<Precopy['run']>> | Error; precopy: Precopy; guest: ScriptedGuest }> {
    const layout = makeLayout(2 * 1024 * 1024, 4096);
    const image = new GuestImage(layout, { seed: 3, zeroFraction: 0 });
    const log = new DirtyLog(layout.totalPages);
    const guest = new ScriptedGuest(log, image, hot, perFrame);
    const precopy = new Precopy(image, log, guest, new Uint8Array(layout.totalPages), { batchBytes: 16 * 4096, ...options });
    const dest = new FakeDestination(layout);
    dest.onFrame = () => guest.tick();
    try {
      return { decision: await precopy.run(dest, performance.now()), precopy, guest };
    } catch (err) {
      return { decision: err as Error, precopy, guest };
    }
  }

  it('a dirty rate above what the link carries does not converge: it fails after --max-precopy-rounds, naming the dirty rate and the bandwidth', async () => {
    // 256 hot pages, 64 writes a frame: every round finds the whole hot set dirty; 1 ms of the 100 kB/s assumed is 100 bytes.
    const run = await scriptedRun({ mode: 'precopy', maxRounds: 3, downtimeLimitMs: 1, availSwitchoverBytesPerSec: 100_000 }, 256, 64);
    expect(run.decision).toBeInstanceOf(NotConvergedError);
    const message = (run.decision as Error).message;
    expect(message).toMatch(/^precopy did not converge in 3 rounds: the guest dirties \d+ pages\/s \([\d.]+ MiB\/s\) against a bandwidth of [\d.]+ MiB\/s, so the expected downtime is \d+ ms over the 1 ms limit; expected a dirty rate below the bandwidth: try --auto-converge/);
    expect((run.decision as NotConvergedError).code).toBe('ERR_POSTCOPY_NOT_CONVERGED');
    expect(run.precopy.summary(1).perRound.map((r) => r.pagesDirtied)).toEqual([256, 256, 256]);
  });

  it('with auto-converge the same guest is throttled in steps (20, 30, ...) until it converges', async () => {
    // Converged once a round finds at most 12 dirty pages (50 ms of 1 MB/s): only near the top of the throttle.
    const run = await scriptedRun({ mode: 'precopy', maxRounds: 3, autoConverge: true, downtimeLimitMs: 50, availSwitchoverBytesPerSec: 1_000_000 }, 256, 64);
    expect(run.decision).toEqual({ postcopy: false, reason: 'auto-converge' });
    expect(run.guest.throttlePercent).toBeGreaterThanOrEqual(90);
    const s = run.precopy.summary(1);
    expect(s.rounds).toBeGreaterThan(3);
    expect(s.throttlePercent).toBe(run.guest.throttlePercent);
    expect(s.perRound.at(-1)!.pagesDirtied).toBeLessThanOrEqual(12);
  });

  it('hybrid with a hot dirty set: the discard set is exactly the pages sent before and dirty at the stop; the rest equals the source', async () => {
    const layout = makeLayout(2 * 1024 * 1024, 4096);
    const image = new GuestImage(layout, { seed: 3, zeroFraction: 0.1 });
    const log = new DirtyLog(layout.totalPages);
    const guest = new ScriptedGuest(log, image, 64, 8);
    const phases = new Uint8Array(layout.totalPages);
    const precopy = new Precopy(image, log, guest, phases, { mode: 'hybrid', postcopyAfterRounds: 1, batchBytes: 16 * 4096 });
    const dest = new FakeDestination(layout);
    dest.onFrame = () => guest.tick();
    const decision = await precopy.run(dest, performance.now());
    expect(decision).toEqual({ postcopy: true, reason: 'rounds' });
    const result = await precopy.switchover(dest, decision);
    expect(result.discardPages).toBe(64);
    expect(result.discard).toEqual([{ first: 0, count: 64 }]);
    expect(result.discard).toEqual(dest.discarded);
    // What the destination keeps (received, not discarded) equals the source's memory as it stopped.
    const run: Run = { image, dest, precopy, guest: guest as unknown as SourceGuest, phases };
    expect(differing(run, (p) => dest.received[p] === 1)).toEqual([]);
    // And postcopy counts exactly those as sent.
    for (let p = 0; p < 512; p++) expect(((result.sentForPostcopy[p >>> 3]! >> (p & 7)) & 1) === 1, `page ${p}`).toBe(dest.received[p] === 1);
    expect(dest.switchover).toBeUndefined(); // the controller sends it, once postcopy is set up
  });

  it.each([
    [0, 'no bit lost: the destination equals the source'],
    [2, 'every 2nd bit lost: stale pages on the destination (the fault the run\'s content check must catch)'],
  ])('a scripted guest over a hot set, losing every %sth dirty bit: %s', async (loseEvery) => {
    const layout = makeLayout(2 * 1024 * 1024, 4096);
    const image = new GuestImage(layout, { seed: 3, zeroFraction: 0.1 });
    const log = new DirtyLog(layout.totalPages, undefined, { loseEvery });
    const guest = new ScriptedGuest(log, image, 64, 8);
    const phases = new Uint8Array(layout.totalPages);
    const precopy = new Precopy(image, log, guest, phases, { mode: 'precopy', batchBytes: 16 * 4096 });
    const dest = new FakeDestination(layout);
    dest.onFrame = () => guest.tick();
    const decision = await precopy.run(dest, performance.now());
    await precopy.switchover(dest, decision);
    const stale = differing({ image, dest, precopy, guest: guest as unknown as SourceGuest, phases }, () => true);
    if (loseEvery === 0) expect(stale).toEqual([]);
    else {
      expect(stale.length).toBeGreaterThan(0);
      expect(stale.every((p) => p < 64)).toBe(true);
    }
  });

  it('migrate-start-postcopy ends the round at once in hybrid', async () => {
    const layout = makeLayout(8 * 1024 * 1024, 4096);
    const image = new GuestImage(layout, { seed: 3, zeroFraction: 0 });
    const log = new DirtyLog(layout.totalPages);
    const g = new SourceGuest(image, log, { vcpus: 1, dirtyRate: 100, dirtySetPages: layout.totalPages });
    closers.push(() => g.close());
    const precopy = new Precopy(image, log, g, new Uint8Array(layout.totalPages), { mode: 'hybrid', postcopyAfterRounds: 100, batchBytes: 4096 });
    const dest = new FakeDestination(layout);
    await g.start(() => {});
    const decision = precopy.run(dest, performance.now());
    await new Promise((r) => setTimeout(r, 20));
    precopy.requestPostcopy();
    expect(await decision).toEqual({ postcopy: true, reason: 'migrate-start-postcopy' });
    expect(precopy.summary(1).perRound[0]!.pagesSent).toBeLessThan(layout.totalPages);
  });
});
