/**
 * What each strategy opens and registers, on both memory backends: the
 * ranges that own guest memory cover every page once (pushed pages are
 * installed through them), per-region-uffd splits the guest as the
 * sequential workload does, and per-thread-uffd is refused on uffd naming
 * per-region-uffd. On Linux the uffd backend must run (no skip).
 */
import { accessPattern, BackendUnavailableError, makeLayout, STRATEGIES } from '@postcopy/shared';
import { describe, expect, it } from 'vitest';
import { MEMORY_BACKENDS } from '../memory/backend.js';
import { BACKEND_BY_NAME } from '../memory/backends.js';
import { partitions } from './per-region-uffd.js';
import { rangeOf, STRATEGY_BY_NAME, type ThreadPlan } from './index.js';

const backends = process.platform === 'linux' ? MEMORY_BACKENDS : MEMORY_BACKENDS.filter((b) => b !== 'uffd');
const layout = makeLayout(64 * 4096, 4096);
const plan = (vcpus: number, ioThreads = 0): ThreadPlan => ({ vcpus, ioThreads, readers: 2, vcpuSlot: (v) => v, ioSlot: (i) => vcpus + i });

describe('partitions (per-region-uffd)', () => {
  it("are the sequential workload's partitions, the last one taking the rest", () => {
    for (const [pages, vcpus] of [[64, 1], [64, 3], [65, 4], [1024, 7], [5, 8]] as const) {
      const parts = partitions(pages, vcpus);
      expect(parts[0]![0]).toBe(0);
      expect(parts.at(-1)![1]).toBe(pages);
      for (let i = 1; i < parts.length; i++) expect(parts[i]![0]).toBe(parts[i - 1]![1]);
      if (vcpus <= pages) {
        expect(parts).toHaveLength(vcpus);
        for (let v = 0; v < vcpus; v++) {
          const walk = accessPattern({ name: 'sequential', totalPages: pages, vcpus, seed: 1, accesses: 0, writeFraction: 0 }, v);
          const first = walk.next();
          expect(first).toBe(parts[v]![0]);
        }
      } else {
        expect(parts).toHaveLength(pages);
      }
    }
  });
});

describe.each(backends)('strategy setup on the %s backend', (name) => {
  for (const strategy of STRATEGIES) {
    const refused = name === 'uffd' && strategy === 'per-thread-uffd';
    it(`${strategy}: ${refused ? 'refused: the kernel has no per-thread userfaultfd, per-region-uffd is named' : 'its ranges cover every page once, and every context it opened is listed'}`, () => {
      const memory = BACKEND_BY_NAME[name].create({ layout, memslotBytes: 16 * 4096, maxThreads: 4, maxContexts: 5 });
      try {
        const run = (): ReturnType<(typeof STRATEGY_BY_NAME)[typeof strategy]['setup']> => STRATEGY_BY_NAME[strategy].setup(memory, plan(3, 1), layout.totalPages);
        if (refused) {
          expect(run).toThrow(BackendUnavailableError);
          expect(run).toThrow(/no per-thread userfaultfd.*per-region-uffd/);
          return;
        }
        const setup = run();
        expect(setup.ranges[0]!.firstPage).toBe(0);
        expect(setup.ranges.at(-1)!.endPage).toBe(layout.totalPages);
        for (let i = 1; i < setup.ranges.length; i++) expect(setup.ranges[i]!.firstPage).toBe(setup.ranges[i - 1]!.endPage);
        for (const r of setup.ranges) {
          expect(setup.contexts).toContain(r.ctx);
          expect(rangeOf(setup.ranges, r.firstPage)).toBe(r);
          expect(rangeOf(setup.ranges, r.endPage - 1)).toBe(r);
        }
        for (const r of setup.resolvers) expect(setup.contexts).toContain(r.ctx);
        if (strategy === 'per-region-uffd') {
          expect(setup.ranges.map((r) => [r.firstPage, r.endPage])).toEqual(partitions(layout.totalPages, 3));
          expect(new Set(setup.ranges.map((r) => r.ctx)).size).toBe(3);
          // One reader per region, owing no WAKE: every install into a region is a COPY on its context.
          expect(setup.resolvers.map((r) => [r.ctx, r.owesWake])).toEqual(setup.ranges.map((r) => [r.ctx, false]));
        }
        if (strategy === 'shared-uffd') expect(setup.resolvers).toHaveLength(2);
        if (strategy === 'kvm-exit') expect(setup.vcpuCopyCtx).toBe(setup.ranges[0]!.ctx);
        for (const ctx of setup.contexts) expect(memory.close(ctx)).toBe(0);
      } finally {
        memory.dispose();
      }
    });
  }
});
