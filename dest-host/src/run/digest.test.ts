/**
 * The destination's final digest (run/digest.ts) on both backends: hashed
 * with helper threads attached to the same memory, it equals the digest on
 * one thread and the source's over the same pages; it covers received pages
 * only (a missing page on uffd would block a reader in the kernel); a wrong
 * byte in any page makes it differ.
 */
import { DIGEST_STATE, combineSegmentHashes, digestPages, digestWork, makeLayout, startWorker, type PageSource } from '@postcopy/shared';
import { describe, expect, it } from 'vitest';
import { MEMORY_BACKENDS } from '../memory/backend.js';
import { BACKEND_BY_NAME } from '../memory/backends.js';
import { GuestPages } from '../memory/pages.js';
import { STRATEGY_BY_NAME } from '../strategies/index.js';
import { PageInstaller } from '../vmm/page-installer.js';
import { VmmState } from '../vmm/state.js';
import type { DigestWorkerData } from '../workers/digest-worker.js';
import { digestReceived } from './digest.js';
import { WORKERS_CALLER } from './guest-threads.js';

const backends = process.platform === 'linux' ? MEMORY_BACKENDS : MEMORY_BACKENDS.filter((b) => b !== 'uffd');
const PAGE = 4096;
// 256 pages in memslots of 48 (runs split at memslot ends); digest segments of 16 pages.
const layout = makeLayout(256 * PAGE, PAGE);
const SEGMENT = 16 * PAGE;

function pageBytes(p: number): Uint8Array {
  const bytes = new Uint8Array(PAGE);
  const view = new DataView(bytes.buffer);
  for (let w = 0; w < PAGE / 4; w++) view.setUint32(w * 4, (p * 2654435761 + w * 40503) >>> 0, true);
  return bytes;
}

/** The source's side: the same pages in one buffer. */
const source: PageSource = { pageBytes };

describe.each(backends)('digestReceived on %s', (name) => {
  it('equals the digest on one thread and the source’s, over the received pages only; a wrong byte changes it', { timeout: 60_000 }, async () => {
    const memory = BACKEND_BY_NAME[name].create({ layout, memslotBytes: 48 * PAGE, maxThreads: 2, maxContexts: 4 });
    const setup = STRATEGY_BY_NAME['shared-uffd'].setup(memory, { vcpus: 1, ioThreads: 0, readers: 1, vcpuSlot: (v) => v, ioSlot: (i) => 1 + i }, layout.totalPages);
    const vmm = VmmState.create(layout.totalPages, 2);
    const installer = new PageInstaller(memory, vmm, setup.ranges);
    // Every page but every 9th is installed (and received); the rest stay missing.
    const received = (p: number): boolean => p % 9 !== 4;
    for (let p = 0; p < layout.totalPages; p++) {
      if (!received(p)) continue;
      expect(installer.installOwned(p, pageBytes(p))).toBe(PAGE);
      vmm.markReceived(p);
    }
    try {
      const expected = digestPages(source, layout, received, SEGMENT);
      expect(digestPages(new GuestPages(memory), layout, received, SEGMENT)).toBe(expected);
      const parallel = (): Promise<string> => digestReceived(memory, vmm, layout, { threads: 3, minBytes: 0, segmentBytes: SEGMENT });
      await expect(parallel()).resolves.toBe(expected);
      await expect(digestReceived(memory, vmm, layout, { threads: 1, segmentBytes: SEGMENT })).resolves.toBe(expected);
      // A helper thread alone (attached through the backend) hashes every segment as this thread would.
      const work = digestWork(layout, SEGMENT);
      const helper = startWorker(WORKERS_CALLER, 'digest-worker', { workerData: { work, memory: memory.handle, vmm: vmm.buffers } satisfies DigestWorkerData });
      await expect(new Promise((resolve) => helper.once('exit', resolve))).resolves.toBe(0);
      const state = new Int32Array(work.state);
      for (let s = 0; s < work.segments; s++) expect(state[DIGEST_STATE.DONE + s]).toBe(1);
      expect(combineSegmentHashes(new Uint8Array(work.hashes))).toBe(expected);
      // One wrong byte, in the last page of a memslot: the digest differs.
      const view = new GuestPages(memory).pageBytes(47);
      view[100] = view[100]! ^ 0x40;
      await expect(parallel()).resolves.not.toBe(expected);
    } finally {
      for (const r of setup.ranges) memory.unregister(r.ctx, r.firstPage * PAGE, (r.endPage - r.firstPage) * PAGE);
      for (const ctx of setup.contexts) memory.close(ctx);
      memory.dispose();
    }
  });
});
