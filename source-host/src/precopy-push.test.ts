/**
 * Precopy on a push channel (shared/push-stream.ts), in process, against a
 * fake destination whose push channel delivers only when the test says so:
 * the rounds' pages go as PRECOPY_PAGES / PRECOPY_ZERO records carrying
 * their round, a SYNC after each round's and the stop-and-copy's pages, and
 * nothing in the main channel's frames; the switchover's discard set (and
 * stop-and-copy's end) waits for the destination's acknowledgement of the
 * last SYNC (QEMU's multifd sync). Without that barrier (the testing-only
 * unsafeSkipSync) the discard set overtakes pages still on the push
 * channel, and those pages bring stale content back: the comparison with
 * the source's memory (the run's content check) finds them. Deterministic:
 * the test orders the two channels' deliveries itself.
 */
import { describe, expect, it } from 'vitest';
import { PHASE, PUSH_HEADER_BYTES, PUSH_RECORD, ProtocolError, decode, decodePushRecordHeader, makeLayout, type GuestLayout } from '@postcopy/shared';
import { DirtyLog } from './dirty-log.js';
import { GuestImage } from './image.js';
import type { Channel, PushStream } from './migration.js';
import { Precopy, PrecopyCancelledError, type PrecopyGuest, type PrecopyOptions } from './precopy.js';

/** A guest whose writes are scripted: `perWrite` pages of a hot set at each write to the push channel. */
class ScriptedGuest implements PrecopyGuest {
  throttlePercent = 0;
  private cursor = 0;
  private stopped = false;
  private readonly zero: Uint8Array;
  constructor(
    private readonly log: DirtyLog,
    private readonly image: GuestImage,
    private readonly hot: number,
    private readonly perWrite: number,
  ) {
    this.zero = new Uint8Array(image.toBuffers().zero);
  }
  setThrottle(p: number): void {
    this.throttlePercent = p;
  }
  async stop(): Promise<number> {
    this.stopped = true;
    return performance.now();
  }
  tick(): void {
    if (this.stopped) return;
    for (let i = 0; i < this.perWrite; i++) {
      const page = this.cursor++ % this.hot;
      const bytes = this.image.pageBytes(page);
      new Uint32Array(bytes.buffer, bytes.byteOffset, 1024)[1023]! += 1;
      Atomics.store(this.zero, page, 0);
      this.log.mark(page);
    }
  }
}

/** The destination: its memory, what it received, and its two channels (the push channel delivers on deliver()). */
class FakeDestination {
  readonly memory: Uint8Array;
  readonly received: Uint8Array;
  readonly mainTypes: string[] = [];
  readonly records: { kind: number; first: number; count: number; round: number }[] = [];
  readonly syncs: number[] = [];
  /** Pages a record placed after the discard set had dropped them. */
  readonly resurrected: number[] = [];
  private readonly discardedNow = new Set<number>();
  private pending: Buffer[] = [];
  /** SYNCs written and not delivered yet. */
  syncsInFlight = 0;
  onWrite: (() => void) | undefined;

  constructor(private readonly layout: GuestLayout) {
    this.memory = new Uint8Array(layout.guestBytes);
    this.received = new Uint8Array(layout.totalPages);
  }

  readonly main: Channel = {
    label: 'fake-main',
    isOpen: true,
    bufferedAmount: 0,
    send: (frame, sent) => {
      const m = decode(frame, { layout: this.layout });
      this.mainTypes.push(m.type);
      if (m.type === 'discard') {
        for (const r of m.ranges) {
          for (let p = r.first; p < r.first + r.count; p++) {
            this.received[p] = 0;
            this.discardedNow.add(p);
          }
        }
      }
      sent?.();
    },
  };

  readonly stream: PushStream & { isOpen: boolean } = {
    isOpen: true,
    bufferedAmount: 0,
    cork: () => {},
    uncork: () => {},
    // The kernel takes the bytes at once (a copy, as a socket's write does); the destination reads them on deliver().
    write: (bytes, sent) => {
      this.onWrite?.();
      this.pending.push(Buffer.from(bytes));
      if (bytes.length === PUSH_HEADER_BYTES && bytes[0] === PUSH_RECORD.SYNC) this.syncsInFlight++;
      sent?.();
    },
    drained: () => Promise.resolve(),
  };

  /** The destination's push reader places everything that arrived; returns the SYNCs read. */
  deliver(): number[] {
    const all = Buffer.concat(this.pending);
    this.pending = [];
    this.syncsInFlight = 0;
    const size = this.layout.pageSize;
    const syncs: number[] = [];
    for (let at = 0; at < all.length; ) {
      const h = decodePushRecordHeader(all.subarray(at, at + PUSH_HEADER_BYTES), this.layout);
      at += PUSH_HEADER_BYTES;
      this.records.push(h);
      if (h.kind === PUSH_RECORD.SYNC) {
        syncs.push(h.first);
        continue;
      }
      for (let p = h.first; p < h.first + h.count; p++) {
        if (this.discardedNow.has(p)) this.resurrected.push(p);
        if (h.kind === PUSH_RECORD.PRECOPY_PAGES) {
          this.memory.set(all.subarray(at, at + size), p * size);
          at += size;
        } else this.memory.fill(0, p * size, (p + 1) * size);
        this.received[p] = 1;
      }
    }
    this.syncs.push(...syncs);
    return syncs;
  }
}

function setup(options: Partial<PrecopyOptions>, hot = 64, perWrite = 8): { image: GuestImage; dest: FakeDestination; precopy: Precopy; phases: Uint8Array } {
  const layout = makeLayout(2 * 1024 * 1024, 4096);
  const image = new GuestImage(layout, { seed: 3, zeroFraction: 0.1 });
  const log = new DirtyLog(layout.totalPages);
  const guest = new ScriptedGuest(log, image, hot, perWrite);
  const phases = new Uint8Array(layout.totalPages);
  // Small batches, so that the guest writes during a round.
  const precopy = new Precopy(image, log, guest, phases, { streamBatchBytes: 16 * 4096, ...options });
  const dest = new FakeDestination(layout);
  dest.onWrite = () => guest.tick();
  precopy.attachStream(dest.stream);
  return { image, dest, precopy, phases };
}

/** Pages whose bytes differ between the destination and the source, among those it holds (the run's content check). */
function stale(image: GuestImage, dest: FakeDestination): number[] {
  const out: number[] = [];
  const size = image.layout.pageSize;
  for (let p = 0; p < image.layout.totalPages; p++) {
    if (dest.received[p] !== 1) continue;
    if (Buffer.compare(Buffer.from(dest.memory.subarray(p * size, (p + 1) * size)), Buffer.from(image.pageBytes(p))) !== 0) out.push(p);
  }
  return out;
}

const turns = async (n: number): Promise<void> => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};

/** Turns of the event loop until `done()` (no clock involved). */
async function until(done: () => boolean): Promise<void> {
  while (!done()) await turns(1);
}

describe('precopy on a push channel', () => {
  it('sends rounds as precopy records of their round with a SYNC after each, nothing on the main channel, counters as on the main channel', async () => {
    const { image, dest, precopy, phases } = setup({ mode: 'precopy', downtimeLimitMs: 300, availSwitchoverBytesPerSec: 1e6 });
    const decision = await precopy.run(dest.main, performance.now());
    expect(precopy.onPushChannel).toBe(true);
    const syncs = dest.deliver();
    const s = precopy.summary(1);
    expect(syncs).toEqual(Array.from({ length: s.rounds }, (_, i) => i + 1));
    expect(dest.mainTypes).toEqual([]);
    const kinds = new Set(dest.records.map((r) => r.kind));
    expect([...kinds].sort()).toEqual([PUSH_RECORD.PRECOPY_PAGES, PUSH_RECORD.PRECOPY_ZERO, PUSH_RECORD.SYNC]);
    // Round 1's records (up to SYNC 1) carry round 1 and cover every page once.
    const firstSync = dest.records.findIndex((r) => r.kind === PUSH_RECORD.SYNC);
    const round1 = dest.records.slice(0, firstSync);
    expect(round1.every((r) => r.round === 1)).toBe(true);
    expect(round1.reduce((n, r) => n + r.count, 0)).toBe(512);
    // Stop-and-copy: its records (round = last round + 1), then a SYNC; switchover waits for its ack.
    const switched = precopy.switchover(dest.main, decision);
    await until(() => dest.syncsInFlight > 0);
    await turns(20);
    const before = dest.records.length;
    const last = dest.deliver();
    expect(last).toEqual([s.rounds + 1]);
    const stopCopy = dest.records.slice(before, -1);
    expect(stopCopy.length).toBeGreaterThan(0);
    expect(stopCopy.every((r) => r.kind !== PUSH_RECORD.SYNC && r.round === s.rounds + 1)).toBe(true);
    for (let seq = 1; seq <= s.rounds + 1; seq++) precopy.synced(seq);
    await switched;
    expect(dest.received.every((r) => r === 1)).toBe(true);
    expect(stale(image, dest)).toEqual([]);
    const after = precopy.summary(1);
    expect(after.pagesSent).toBe(512 + after.pagesResent);
    expect(precopy.pagesOnPushChannel).toBe(after.pagesSent);
    expect(after.perRound[0]).toMatchObject({ round: 1, pagesSent: 512 });
    expect(phases.every((p) => p !== PHASE.NEVER)).toBe(true);
    expect(phases.some((p) => p === PHASE.STOP_AND_COPY)).toBe(true);
  });

  it('hybrid: the discard set waits for the last SYNC\'s acknowledgement; then what the destination holds equals the source', async () => {
    const { image, dest, precopy } = setup({ mode: 'hybrid', postcopyAfterRounds: 1 });
    const decision = await precopy.run(dest.main, performance.now());
    expect(decision).toEqual({ postcopy: true, reason: 'rounds' });
    const switched = precopy.switchover(dest.main, decision);
    let done = false;
    void switched.then(() => (done = true));
    await turns(20);
    // Round 1's pages are still on the push channel: no discard may have gone.
    expect(dest.mainTypes).toEqual([]);
    expect(done).toBe(false);
    expect(dest.deliver()).toEqual([1]);
    precopy.synced(1);
    const result = await switched;
    expect(dest.mainTypes).toEqual(['discard']);
    expect(result.discardPages).toBe(64);
    expect(dest.resurrected).toEqual([]);
    expect(stale(image, dest)).toEqual([]);
  });

  it('without the barrier (unsafeSkipSync, testing only) the discard set overtakes pages still in flight, and they come back stale: the content check fails', async () => {
    const { image, dest, precopy } = setup({ mode: 'hybrid', postcopyAfterRounds: 1, unsafeSkipSync: true });
    const decision = await precopy.run(dest.main, performance.now());
    const result = await precopy.switchover(dest.main, decision);
    // The switchover did not wait: the discard went while round 1 was still on the push channel.
    expect(dest.mainTypes).toEqual(['discard']);
    expect(result.discardPages).toBe(64);
    dest.deliver();
    expect(dest.resurrected.length).toBeGreaterThan(0);
    const bad = stale(image, dest);
    expect(bad.length).toBeGreaterThan(0);
    expect(bad.every((p) => p < 64)).toBe(true);
  });

  it('refuses an acknowledgement out of sequence or of a SYNC never written', async () => {
    const { dest, precopy } = setup({ mode: 'hybrid', postcopyAfterRounds: 1 });
    await precopy.run(dest.main, performance.now());
    expect(() => precopy.synced(2)).toThrow(ProtocolError);
    expect(() => precopy.synced(2)).toThrow(/expected precopy-synced 1 \(SYNC 1 is the last written\), got 2/);
    precopy.synced(1);
    expect(() => precopy.synced(1)).toThrow(/expected precopy-synced 2/);
    expect(() => precopy.synced(2)).toThrow(/SYNC 1 is the last written/);
  });

  it('a push channel that closes during a round cancels precopy', async () => {
    const { dest, precopy } = setup({ mode: 'precopy' });
    let writes = 0;
    dest.onWrite = () => {
      if (++writes === 3) dest.stream.isOpen = false;
    };
    await expect(precopy.run(dest.main, performance.now())).rejects.toThrow(PrecopyCancelledError);
    await expect(setup({ mode: 'precopy' }).precopy.run({ ...dest.main, isOpen: false }, performance.now())).rejects.toThrow(/main channel closed during precopy round 1/);
  });

  it('a push channel that closes while the switchover waits for its SYNC cancels it', async () => {
    const { dest, precopy } = setup({ mode: 'hybrid', postcopyAfterRounds: 1 });
    const decision = await precopy.run(dest.main, performance.now());
    const switched = precopy.switchover(dest.main, decision);
    await turns(5);
    dest.stream.isOpen = false;
    await expect(switched).rejects.toThrow(/push channel closed during the switchover/);
    expect(dest.mainTypes).toEqual([]);
  });

  it('without a push channel at round 1 every round goes on the main channel', async () => {
    const layout = makeLayout(256 * 1024, 4096);
    const image = new GuestImage(layout, { seed: 3, zeroFraction: 0.1 });
    const log = new DirtyLog(layout.totalPages);
    const precopy = new Precopy(image, log, new ScriptedGuest(log, image, 8, 0), new Uint8Array(layout.totalPages), { mode: 'precopy' });
    const dest = new FakeDestination(layout);
    const decision = await precopy.run(dest.main, performance.now());
    precopy.attachStream(dest.stream); // too late: the rounds keep to the main channel
    await precopy.switchover(dest.main, decision);
    expect(precopy.onPushChannel).toBe(false);
    expect(dest.deliver()).toEqual([]);
    expect(dest.mainTypes.every((t) => t === 'precopy-pages' || t === 'precopy-zero')).toBe(true);
    expect(dest.mainTypes.length).toBeGreaterThan(0);
  });
});
