import { openRegistered, type FaultStrategy } from './strategy.js';

/**
 * shared-uffd: one userfaultfd context for all guest memory and all threads;
 * R reader threads take messages from its one queue (the kernel's
 * `demand_paging_test -a -r R`; on uffd each reader polls the one fd, and
 * the thread id in each message maps it to its vCPU's fault queue). Every
 * install is a COPY on that one context, so it wakes every thread waiting
 * on the page: no resolver owes a WAKE.
 */
export const sharedUffd: FaultStrategy = {
  name: 'shared-uffd',
  vcpuFaultDelivery: 'userfaultfd',
  setup(memory, threads, totalPages) {
    const ctx = openRegistered(memory, 0, totalPages);
    // Whoever installs a page COPYs it on this one context, waking its waiters: a reader has nothing to wait for.
    const resolvers = Array.from({ length: threads.readers }, (_, i) => ({ label: `reader${i}`, ctx, owesWake: false, pageWait: 'none' as const }));
    return { resolvers, ranges: [{ ctx, firstPage: 0, endPage: totalPages }], contexts: [ctx], vcpuCopyCtx: -1 };
  },
};
