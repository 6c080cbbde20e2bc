/**
 * The page installer on both memory backends: pushed runs are split at the
 * owning contexts' ranges (on the kernel a COPY must lie in one registered
 * vma: one spanning two contexts' ranges is ENOENT), EEXIST results and
 * WAKEs are counted by the VMM, and nothing here touches guest memory but
 * through ioctls (on uffd a touch of a missing page would block this thread).
 */
import { makeLayout } from '@postcopy/shared';
import { describe, expect, it } from 'vitest';
import { ERRNO, MEMORY_BACKENDS } from '../memory/backend.js';
import { BACKEND_BY_NAME } from '../memory/backends.js';
import { GuestPages } from '../memory/pages.js';
import { STRATEGY_BY_NAME } from '../strategies/index.js';
import { PageInstaller } from './page-installer.js';
import { COUNTER, ORIGIN, VmmState } from './state.js';

const backends = process.platform === 'linux' ? MEMORY_BACKENDS : MEMORY_BACKENDS.filter((b) => b !== 'uffd');
const PAGE = 4096;

describe.each(backends)('PageInstaller on the %s backend', (name) => {
  it('installs a pushed run across two regions (per-region-uffd) with one COPY per region, counting EEXIST', () => {
    const layout = makeLayout(32 * PAGE, PAGE);
    const memory = BACKEND_BY_NAME[name].create({ layout, memslotBytes: 8 * PAGE, maxThreads: 2, maxContexts: 4 });
    try {
      const setup = STRATEGY_BY_NAME['per-region-uffd'].setup(memory, { vcpus: 2, ioThreads: 0, readers: 1, vcpuSlot: (v) => v, ioSlot: (i) => 2 + i }, layout.totalPages);
      expect(setup.ranges.map((r) => [r.firstPage, r.endPage])).toEqual([[0, 16], [16, 32]]);
      const vmm = VmmState.create(layout.totalPages, 2);
      const installer = new PageInstaller(memory, vmm, setup.ranges);
      // Pages 12..19: four in each region.
      const data = new Uint8Array(8 * PAGE);
      for (let p = 0; p < 8; p++) new DataView(data.buffer, p * PAGE).setUint32(0, 12 + p, true);
      // A single COPY over both ranges is refused by the kernel (and the emulation): the installer must split.
      expect(memory.copy(setup.ranges[0]!.ctx, 12 * PAGE, data, 8 * PAGE)).toBe(-ERRNO.ENOENT);
      // Page 14 is in already: the run stops short there, counts it, and goes on after it.
      expect(installer.installOwned(14, data.subarray(2 * PAGE, 3 * PAGE))).toBe(PAGE);
      vmm.markReceived(14, ORIGIN.PUSH);
      expect(installer.installRun(12, data, 8, ORIGIN.PUSH)).toBe(7);
      expect(vmm.counter(COUNTER.EEXIST)).toBe(1);
      expect(vmm.counter(COUNTER.DUPLICATE_DATA)).toBe(1);
      expect(vmm.counter(COUNTER.INSTALLED)).toBe(8);
      const pages = new GuestPages(memory);
      for (let p = 12; p < 20; p++) expect(pages.pageWords(p)[0]).toBe(p);
      // The owner of a page is its region's context.
      expect(installer.ownerOf(15)).toBe(setup.ranges[0]!.ctx);
      expect(installer.ownerOf(16)).toBe(setup.ranges[1]!.ctx);
      // A zero page installed on its owner; a second is EEXIST, counted.
      expect(installer.installOwned(30, undefined)).toBe(PAGE);
      expect(installer.installOwned(30, undefined)).toBe(-ERRNO.EEXIST);
      expect(vmm.counter(COUNTER.EEXIST)).toBe(2);
      for (const ctx of setup.contexts) memory.close(ctx);
    } finally {
      memory.dispose();
    }
  });
});
