import { openRegistered, type ContextRange, type FaultStrategy } from './strategy.js';

/**
 * per-region-uffd: one userfaultfd context per vCPU's memory partition (the
 * partition the sequential workload walks), each with its own reader thread:
 * the kernel's `demand_paging_test` without `-a`, and what QEMU could do
 * today with one userfaultfd per RAMBlock. A fault goes to the context of
 * the region it hits, whichever thread faults (a vCPU outside its own
 * partition, an I/O thread), so the queues are split by address, not by
 * thread. Unlike per-thread-uffd this exists in the kernel.
 *
 * Every install into a region is a COPY on that region's context: the
 * region's resolver for its faults, and the main thread for pushed pages
 * and requested pages that came on the main channel (one COPY per region a
 * run of pages touches; a COPY must lie in one registered vma, and two
 * contexts' ranges are two vmas). So each install wakes every thread waiting
 * on the page, and no resolver owes a WAKE: a COPY wakes the waiters of the
 * range on the context it is issued on, messages read or not
 * (fs/userfaultfd.c, __wake_userfault walks both fault_pending_wqh and
 * fault_wqh), and a thread woken before its message was read takes the
 * message with it (handle_userfault removes its wait entry), so no stale
 * message is left for a reader to resolve twice.
 */
export const perRegionUffd: FaultStrategy = {
  name: 'per-region-uffd',
  vcpuFaultDelivery: 'userfaultfd',
  setup(memory, threads, totalPages) {
    const ranges: ContextRange[] = [];
    try {
      for (const [firstPage, endPage] of partitions(totalPages, threads.vcpus)) {
        ranges.push({ ctx: openRegistered(memory, firstPage, endPage), firstPage, endPage });
      }
    } catch (err) {
      for (const r of ranges) memory.close(r.ctx);
      throw err;
    }
    // As shared-uffd's readers: a COPY on the region's context wakes its waiters, nothing to wait for.
    const resolvers = ranges.map((r, i) => ({ label: `region${i}-reader`, ctx: r.ctx, owesWake: false, pageWait: 'none' as const }));
    return { resolvers, ranges, contexts: ranges.map((r) => r.ctx), vcpuCopyCtx: -1 };
  },
};

/**
 * The vCPUs' partitions as [first, end) page ranges, as the sequential
 * workload splits the guest (shared/src/guest/workloads.ts): equal shares,
 * the last one taking the rest. With more vCPUs than pages, one page each
 * for as many as there are pages.
 */
export function partitions(totalPages: number, vcpus: number): [number, number][] {
  const count = Math.max(1, Math.min(vcpus, totalPages));
  const per = Math.floor(totalPages / count);
  return Array.from({ length: count }, (_, i) => [i * per, i === count - 1 ? totalPages : (i + 1) * per] as [number, number]);
}
