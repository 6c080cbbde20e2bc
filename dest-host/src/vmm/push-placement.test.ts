/**
 * A push channel's records (net/push-reader.ts) placed in guest memory on
 * both backends (push-placement.ts: straight into memory on the emulation,
 * through a staging buffer and COPY on uffd): whatever the reads' sizes,
 * every page is installed once with its bytes, on the context owning it; a
 * page installed first by a fault's reply (a page both pushed and demanded)
 * keeps its bytes and counts as EEXIST and duplicate data; a stream cut in
 * the middle of a record installs only the pages whose bytes all came, and
 * gives the rest back missing, so that sending them again (the resume)
 * installs them: nothing lost, nothing twice.
 */
import { PUSH_RECORD, makeLayout, maxPushRunPages, pushRecordHeader } from '@postcopy/shared';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ERRNO, MEMORY_BACKENDS, type BackendMemory } from '../memory/backend.js';
import { BACKEND_BY_NAME } from '../memory/backends.js';
import { GuestPages } from '../memory/pages.js';
import { PushRecordReader } from '../net/push-reader.js';
import { STRATEGY_BY_NAME } from '../strategies/index.js';
import { PageInstaller } from './page-installer.js';
import { pushPlacement } from './push-placement.js';
import { COUNTER, VmmState } from './state.js';

const backends = process.platform === 'linux' ? MEMORY_BACKENDS : MEMORY_BACKENDS.filter((b) => b !== 'uffd');
const PAGE = 4096;
const layout = makeLayout(40 * PAGE, PAGE);

/** Page p's bytes: its index in word 0, then a pattern. */
function pageBytes(p: number): Uint8Array {
  const bytes = new Uint8Array(PAGE);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, p, true);
  for (let w = 1; w < PAGE / 4; w++) view.setUint32(w * 4, (p * 2654435761 + w) >>> 0, true);
  return bytes;
}

/** The records of `runs` ([first, count, zero]) as one byte stream. */
function stream(runs: [number, number, boolean][]): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const [first, count, zero] of runs) {
    parts.push(pushRecordHeader(zero ? PUSH_RECORD.ZERO : PUSH_RECORD.PAGES, first, count));
    if (!zero) for (let p = first; p < first + count; p++) parts.push(pageBytes(p));
  }
  return Buffer.concat(parts);
}

/** Reads `bytes` the way onread does: each read at most `sizes[i]` bytes, into the buffer the reader gives. */
function feed(reader: PushRecordReader, bytes: Uint8Array, sizes: number[], stopAt = bytes.length): number {
  let at = 0;
  for (let i = 0; at < stopAt; i++) {
    const buffer = reader.buffer();
    expect(buffer.length).toBeGreaterThan(0);
    const n = Math.min(buffer.length, stopAt - at, sizes[i % sizes.length]!);
    buffer.set(bytes.subarray(at, at + n));
    at += n;
    reader.consumed(n);
  }
  return at;
}

interface Rig {
  memory: BackendMemory;
  vmm: VmmState;
  installer: PageInstaller;
  reader: PushRecordReader;
  installed: { pages: number; zeros: number };
  close(): void;
}

function rig(name: (typeof backends)[number]): Rig {
  // Memslots of 16 pages and two regions of 20 (per-region-uffd): runs split at both.
  const memory = BACKEND_BY_NAME[name].create({ layout, memslotBytes: 16 * PAGE, maxThreads: 2, maxContexts: 4 });
  const setup = STRATEGY_BY_NAME['per-region-uffd'].setup(memory, { vcpus: 2, ioThreads: 0, readers: 1, vcpuSlot: (v) => v, ioSlot: (i) => 2 + i }, layout.totalPages);
  const vmm = VmmState.create(layout.totalPages, 2);
  const installer = new PageInstaller(memory, vmm, setup.ranges);
  const installed = { pages: 0, zeros: 0 };
  const placement = pushPlacement(installer, {
    installed: (pages) => {
      installed.pages += pages;
      vmm.count(COUNTER.PAGES_PUSHED, pages);
    },
    zero: (page) => {
      expect(installer.installOwned(page, undefined)).toBe(PAGE);
      vmm.markReceived(page);
      installed.zeros++;
    },
    fail: (err) => {
      throw err;
    },
  });
  const reader = new PushRecordReader(layout, placement);
  return {
    memory,
    vmm,
    installer,
    reader,
    installed,
    close: () => {
      for (const ctx of setup.contexts) memory.close(ctx);
      memory.dispose();
    },
  };
}

function expectContents(memory: BackendMemory, vmm: VmmState, pages: Iterable<number>): void {
  const view = new GuestPages(memory);
  for (const p of pages) {
    expect(vmm.isReceived(p)).toBe(true);
    expect(Buffer.from(view.pageBytes(p)).equals(Buffer.from(pageBytes(p)))).toBe(true);
  }
}

describe.each(backends)('push records placed on the %s backend', (name) => {
  it('installs every page once with its bytes, whatever the reads, across memslots and regions', () => {
    const runs: [number, number, boolean][] = [
      [0, 14, false],
      [14, 4, true],
      [18, maxPushRunPages(PAGE) > 22 ? 22 : 1, false],
    ];
    if (runs[2]![1] === 1) throw new Error('expected a run of 22 pages to fit one record');
    const bytes = stream(runs);
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: 3 * PAGE }), { minLength: 1, maxLength: 8 }), (sizes) => {
        const r = rig(name);
        try {
          feed(r.reader, bytes, sizes);
          expect(r.reader.records).toBe(3);
          expect(r.installed).toEqual({ pages: 36, zeros: 4 });
          expect(r.vmm.counter(COUNTER.INSTALLED)).toBe(40);
          expect(r.vmm.counter(COUNTER.EEXIST)).toBe(0);
          expectContents(r.memory, r.vmm, [...Array(14).keys(), ...Array.from({ length: 22 }, (_, i) => 18 + i)]);
        } finally {
          r.close();
        }
      }),
      { numRuns: 25 },
    );
  });

  it('a page demanded and installed before its push keeps its bytes: EEXIST and duplicate data, the rest installed', () => {
    const r = rig(name);
    try {
      // Page 5 came first as a fault's reply (different bytes, so an overwrite would show).
      const demanded = new Uint8Array(PAGE).fill(0xab);
      expect(r.installer.installOwned(5, demanded)).toBe(PAGE);
      r.vmm.markReceived(5);
      feed(r.reader, stream([[0, 10, false]]), [1000, PAGE, 7 * PAGE]);
      expect(r.installed.pages).toBe(9);
      expect(r.vmm.counter(COUNTER.EEXIST)).toBe(1);
      expect(r.vmm.counter(COUNTER.DUPLICATE_DATA)).toBe(1);
      expectContents(r.memory, r.vmm, [0, 1, 2, 3, 4, 6, 7, 8, 9]);
      expect(new GuestPages(r.memory).pageBytes(5)[0]).toBe(0xab);
    } finally {
      r.close();
    }
  });

  it('a record cut by a drop installs the pages that came whole; the rest, sent again after the resume, install once', () => {
    const r = rig(name);
    try {
      const bytes = stream([[2, 12, false]]);
      // The stream stops in the middle of page 8 (the 7th of the record).
      const cutAt = 12 + 6 * PAGE + 100;
      feed(r.reader, bytes, [3 * PAGE + 5], cutAt);
      const released = r.reader.end();
      expect(r.installed.pages).toBe(6);
      expectContents(r.memory, r.vmm, [2, 3, 4, 5, 6, 7]);
      for (let p = 8; p < 14; p++) expect(r.vmm.isReceived(p)).toBe(false);
      expect(released).toBeGreaterThan(0);
      // Given back missing: a COPY of page 8 now succeeds (it would be EEXIST had it stayed taken or been installed).
      if (name === 'emulated') {
        const again = pageBytes(8);
        expect(r.memory.copy(r.installer.ownerOf(8), 8 * PAGE, again, PAGE)).toBe(PAGE);
        r.vmm.markReceived(8);
      }
      // The resume: the source sends what the receivedmap lacks.
      const rest = name === 'emulated' ? stream([[9, 5, false]]) : stream([[8, 6, false]]);
      feed(r.reader, rest, [PAGE]);
      expect(r.vmm.counter(COUNTER.INSTALLED)).toBe(12);
      expect(r.vmm.counter(COUNTER.EEXIST)).toBe(0);
      expectContents(r.memory, r.vmm, Array.from({ length: 12 }, (_, i) => 2 + i));
    } finally {
      r.close();
    }
  });

  it('a drop that goes off inside an install (the channel cut from its own commit) gives back only the pages not installed', () => {
    const r = rig(name);
    try {
      let cut = -1;
      const reader: PushRecordReader = new PushRecordReader(
        layout,
        pushPlacement(r.installer, {
          installed: (pages) => {
            r.installed.pages += pages;
            // The injected drop: the run pauses, and the pause cuts this very channel.
            if (cut < 0) cut = reader.end();
          },
          zero: () => expect.fail('no zero pages here'),
          fail: (err) => {
            throw err;
          },
        }),
      );
      // Pages 0..9 in one record; the first read brings 3 pages and a half.
      feed(reader, stream([[0, 10, false]]), [12 + 3.5 * PAGE], 12 + 3.5 * PAGE);
      expect(r.installed.pages).toBe(3);
      expect(cut).toBeGreaterThan(0);
      expectContents(r.memory, r.vmm, [0, 1, 2]);
      // The installed pages stay present: a COPY of one is EEXIST; a given-back page takes a COPY.
      expect(r.memory.copy(r.installer.ownerOf(1), 1 * PAGE, pageBytes(1), PAGE)).toBe(-ERRNO.EEXIST);
      expect(r.memory.copy(r.installer.ownerOf(3), 3 * PAGE, pageBytes(3), PAGE)).toBe(PAGE);
    } finally {
      r.close();
    }
  });

  it('refuses a header that is not a record: a bad kind, a count of 0, pages past the guest', () => {
    const r = rig(name);
    try {
      const bad = (kind: number, first: number, count: number): void => {
        const reader = new PushRecordReader(layout, { claim: () => expect.fail('claimed'), commit: () => {}, release: () => {}, zero: () => expect.fail('zero') });
        const header = pushRecordHeader(kind, first, count);
        expect(() => feed(reader, header, [header.length])).toThrow(/push record/);
      };
      bad(3, 0, 1);
      bad(PUSH_RECORD.PAGES, 0, 0);
      bad(PUSH_RECORD.PAGES, 39, 2);
      bad(PUSH_RECORD.ZERO, 0, maxPushRunPages(PAGE) + 1);
      expect(ERRNO.EEXIST).toBeGreaterThan(0);
    } finally {
      r.close();
    }
  });
});
