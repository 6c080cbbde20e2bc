/**
 * A push channel's precopy records (shared/push-stream.ts: PRECOPY_PAGES,
 * PRECOPY_ZERO, SYNC) placed on both backends (precopy-push-placement.ts:
 * straight into memory on the emulation, a staging buffer and COPY on
 * uffd), with the precopy receiver's semantics: a first arrival is
 * installed (counted in pagesPrecopy), a later one overwrites the page in
 * place (precopyRewrites, never EEXIST), whatever the reads' sizes; the
 * rounds are told to the run and must not go down; a SYNC is handed on
 * only once every record before it is placed, in sequence; a precopy
 * record or a SYNC on a channel without precopy is a protocol error, and
 * so is a postcopy record where the run refuses it. And what the barrier
 * prevents: a precopy page that lands after the discard set brings stale
 * content back into the receivedmap, which the content check sees.
 */
import { PUSH_RECORD, ProtocolError, digestPages, makeLayout, pushRecordHeader, pushSyncHeader } from '@postcopy/shared';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { MEMORY_BACKENDS, type BackendMemory } from '../memory/backend.js';
import { BACKEND_BY_NAME } from '../memory/backends.js';
import { GuestPages } from '../memory/pages.js';
import { PushRecordReader, type PushPlacement } from '../net/push-reader.js';
import { STRATEGY_BY_NAME } from '../strategies/index.js';
import { PageInstaller } from './page-installer.js';
import { precopyPushPlacement } from './precopy-push-placement.js';
import { PrecopyReceiver } from './precopy-receiver.js';
import { COUNTER, PAGE as PAGE_STATUS, VmmState } from './state.js';

const backends = process.platform === 'linux' ? MEMORY_BACKENDS : MEMORY_BACKENDS.filter((b) => b !== 'uffd');
const PAGE = 4096;
const layout = makeLayout(40 * PAGE, PAGE);

/** Page p's bytes in version v: p and v in words 0 and 1, then a pattern. */
function pageBytes(p: number, v: number): Uint8Array {
  const bytes = new Uint8Array(PAGE);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, p, true);
  view.setUint32(4, v, true);
  for (let w = 2; w < PAGE / 4; w++) view.setUint32(w * 4, (p * 2654435761 + w * 7 + v) >>> 0, true);
  return bytes;
}

type Rec = { round: number; first: number; count: number; zero?: boolean; v?: number } | { sync: number };

function stream(recs: Rec[]): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const r of recs) {
    if ('sync' in r) {
      parts.push(pushSyncHeader(r.sync));
      continue;
    }
    parts.push(pushRecordHeader(r.zero ? PUSH_RECORD.PRECOPY_ZERO : PUSH_RECORD.PRECOPY_PAGES, r.first, r.count, r.round));
    if (!r.zero) for (let p = r.first; p < r.first + r.count; p++) parts.push(pageBytes(p, r.v ?? r.round));
  }
  return Buffer.concat(parts);
}

function feed(reader: PushRecordReader, bytes: Uint8Array, sizes: number[]): void {
  let at = 0;
  for (let i = 0; at < bytes.length; i++) {
    const buffer = reader.buffer();
    const n = Math.min(buffer.length, bytes.length - at, sizes[i % sizes.length]!);
    buffer.set(bytes.subarray(at, at + n));
    at += n;
    reader.consumed(n);
  }
}

const noPostcopy: PushPlacement = {
  claim: () => {
    throw new ProtocolError('expected no postcopy records before the switchover');
  },
  commit: () => expect.fail('no postcopy records'),
  release: () => {},
  zero: () => {
    throw new ProtocolError('expected no postcopy records before the switchover');
  },
};

interface Rig {
  memory: BackendMemory;
  vmm: VmmState;
  receiver: PrecopyReceiver;
  reader: PushRecordReader;
  rounds: number[];
  /** At each SYNC: its number and the pages installed then. */
  syncs: [number, number][];
  placed: number;
  /** Whether precopy records may come (the run's state: before the switchover). */
  precopyAllowed: boolean;
  close(): void;
}

function rig(name: (typeof backends)[number]): Rig {
  const memory = BACKEND_BY_NAME[name].create({ layout, memslotBytes: 16 * PAGE, maxThreads: 2, maxContexts: 4 });
  const setup = STRATEGY_BY_NAME['per-region-uffd'].setup(memory, { vcpus: 2, ioThreads: 0, readers: 1, vcpuSlot: (v) => v, ioSlot: (i) => 2 + i }, layout.totalPages);
  const vmm = VmmState.create(layout.totalPages, 2);
  const installer = new PageInstaller(memory, vmm, setup.ranges);
  const receiver = new PrecopyReceiver(memory, vmm, installer);
  const r: Rig = {
    memory,
    vmm,
    receiver,
    reader: undefined as unknown as PushRecordReader,
    rounds: [],
    syncs: [],
    placed: 0,
    precopyAllowed: true,
    close: () => {
      for (const ctx of setup.contexts) memory.close(ctx);
      memory.dispose();
    },
  };
  const precopy = precopyPushPlacement(installer, receiver, {
    round: (round) => {
      if (!r.precopyAllowed) throw new ProtocolError(`expected precopy pages only before the switchover, got round ${round}`);
      r.rounds.push(round);
    },
    synced: (seq) => r.syncs.push([seq, vmm.counter(COUNTER.INSTALLED)]),
    placed: (pages) => (r.placed += pages),
    fail: (err) => {
      throw err;
    },
  });
  r.reader = new PushRecordReader(layout, noPostcopy, precopy);
  return r;
}

function expectContents(r: Rig, pages: Iterable<number>, v: (p: number) => number): void {
  const view = new GuestPages(r.memory);
  for (const p of pages) {
    expect(r.vmm.isReceived(p), `page ${p} received`).toBe(true);
    expect(Buffer.from(view.pageBytes(p)).equals(Buffer.from(pageBytes(p, v(p)))), `page ${p} version ${v(p)}`).toBe(true);
  }
}

describe.each(backends)('precopy records placed on the %s backend', (name) => {
  it('installs first arrivals and overwrites later ones in place (rewrites, no EEXIST), whatever the reads; SYNCs after their records', () => {
    // Round 1: every page (pages 14-17 zero); round 2: pages 3-20 again (some first zero, now with contents) and 30-31 zero.
    const bytes = stream([
      { round: 1, first: 0, count: 14 },
      { round: 1, first: 14, count: 4, zero: true },
      { round: 1, first: 18, count: 22 },
      { sync: 1 },
      { round: 2, first: 3, count: 18 },
      { round: 2, first: 30, count: 2, zero: true },
      { sync: 2 },
    ]);
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: 3 * PAGE }), { minLength: 1, maxLength: 8 }), (sizes) => {
        const r = rig(name);
        try {
          feed(r.reader, bytes, sizes);
          expect(r.vmm.counter(COUNTER.INSTALLED)).toBe(40);
          expect(r.vmm.counter(COUNTER.PAGES_PRECOPY)).toBe(40);
          expect(r.vmm.counter(COUNTER.PRECOPY_REWRITES)).toBe(20);
          expect(r.vmm.counter(COUNTER.PAGES_ZERO)).toBe(4);
          expect(r.vmm.counter(COUNTER.EEXIST)).toBe(0);
          expect(r.vmm.counter(COUNTER.DUPLICATE_DATA)).toBe(0);
          expect(r.vmm.counter(COUNTER.PRECOPY_PUSH_CHANNEL_PAGES)).toBe(60);
          expect(r.placed).toBe(60);
          // SYNC 1 came once all 40 pages of round 1 were installed.
          expect(r.syncs).toEqual([
            [1, 40],
            [2, 40],
          ]);
          expect(r.receiver.round).toBe(2);
          expect(new Set(r.rounds)).toEqual(new Set([1, 2]));
          const others = [...Array(3).keys(), ...Array.from({ length: 9 }, (_, i) => 21 + i), ...Array.from({ length: 8 }, (_, i) => 32 + i)];
          expectContents(r, others, () => 1);
          expectContents(r, Array.from({ length: 18 }, (_, i) => 3 + i), () => 2);
          const view = new GuestPages(r.memory);
          for (const p of [30, 31]) expect(view.pageBytes(p).every((b) => b === 0)).toBe(true);
        } finally {
          r.close();
        }
      }),
      { numRuns: 20 },
    );
  });

  it('refuses rounds that go down, a SYNC out of sequence, and precopy records once the run refuses them', () => {
    const r = rig(name);
    try {
      feed(r.reader, stream([{ round: 3, first: 0, count: 2 }]), [PAGE]);
      expect(() => feed(r.reader, stream([{ round: 2, first: 2, count: 1 }]), [PAGE])).toThrow(/expected precopy rounds not to go down, got round 2 after round 3/);
    } finally {
      r.close();
    }
    const s = rig(name);
    try {
      feed(s.reader, stream([{ sync: 1 }]), [PAGE]);
      expect(() => feed(s.reader, stream([{ sync: 3 }]), [PAGE])).toThrow(/expected SYNC 2, got SYNC 3/);
    } finally {
      s.close();
    }
    const t = rig(name);
    try {
      feed(t.reader, stream([{ round: 1, first: 0, count: 1 }]), [PAGE]);
      t.precopyAllowed = false; // the switchover
      expect(() => feed(t.reader, stream([{ round: 1, first: 1, count: 1 }]), [PAGE])).toThrow(/only before the switchover, got round 1/);
      expect(t.vmm.isReceived(1)).toBe(false);
    } finally {
      t.close();
    }
  });

  it('a postcopy record goes to the postcopy placement (which refuses it before the switchover); without a precopy placement a precopy record or SYNC is a protocol error', () => {
    const r = rig(name);
    try {
      const pushed = Buffer.concat([pushRecordHeader(PUSH_RECORD.PAGES, 0, 1), pageBytes(0, 0)]);
      expect(() => feed(r.reader, pushed, [PAGE])).toThrow(/expected no postcopy records before the switchover/);
      const plain = new PushRecordReader(layout, noPostcopy);
      expect(() => feed(plain, stream([{ round: 1, first: 0, count: 1 }]), [PAGE])).toThrow(/expected no precopy records on a push channel without precopy, got kind 3 of round 1/);
      expect(() => feed(new PushRecordReader(layout, noPostcopy), stream([{ sync: 1 }]), [PAGE])).toThrow(/expected no SYNC on a push channel without precopy/);
    } finally {
      r.close();
    }
  });

  it('what the barrier prevents: a precopy page that lands after the discard set is received again with stale content, and the digest check sees it', () => {
    const r = rig(name);
    try {
      // Round 1 sends pages 0-9 (version 1); the guest dirties 0-3 again; round 2 sends them (version 2) and is still in flight when
      // the switchover's final sync finds 0-1 dirty once more (their content now version 3 on the source): the discard set is 0-1.
      feed(r.reader, stream([{ round: 1, first: 0, count: 10 }, { sync: 1 }]), [PAGE]);
      expect(r.receiver.discard([{ first: 0, count: 2 }])).toBe(0);
      expect(r.vmm.isReceived(0)).toBe(false);
      // The late round 2 lands after the discard (the barrier broken):
      feed(r.reader, stream([{ round: 2, first: 0, count: 4 }]), [PAGE]);
      expect(r.vmm.isReceived(0)).toBe(true);
      // The source's memory as it stopped: 0-1 at version 3, 2-3 at 2, the rest at 1. Compared over the pages received:
      const source = { pageBytes: (p: number) => pageBytes(p, p < 2 ? 3 : p < 4 ? 2 : 1) };
      const received = (p: number): boolean => Atomics.load(r.vmm.pageStatus, p) === PAGE_STATUS.RECEIVED;
      const dest = new GuestPages(r.memory);
      expect(digestPages(dest, layout, received)).not.toBe(digestPages(source, layout, received));
      // Pages 0 and 1 are the stale ones (version 2 where the source has 3): postcopy will never fetch them.
      expect(Buffer.from(dest.pageBytes(0)).equals(Buffer.from(pageBytes(0, 2)))).toBe(true);
      expect(Buffer.from(dest.pageBytes(2)).equals(Buffer.from(source.pageBytes(2)))).toBe(true);
    } finally {
      r.close();
    }
  });
});
