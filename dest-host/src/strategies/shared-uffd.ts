import type { FaultStrategy } from './strategy.js';

/**
 * shared-uffd: one userfaultfd context for all guest memory and all threads;
 * R reader threads take messages from its one queue (the kernel's
 * `demand_paging_test -a -r R`). Every install is a COPY on that one context,
 * so it wakes every thread waiting on the page: no resolver owes a WAKE.
 */
export const sharedUffd: FaultStrategy = {
  name: 'shared-uffd',
  vcpuFaultDelivery: 'userfaultfd',
  setup(uffd, threads, guestBytes) {
    const ctx = uffd.open();
    uffd.register(ctx, 0, guestBytes);
    // Whoever installs a page COPYs it on this one context, waking its waiters: a reader has nothing to wait for.
    const resolvers = Array.from({ length: threads.readers }, (_, i) => ({ label: `reader${i}`, ctx, owesWake: false, pageWait: 'none' as const }));
    return { resolvers, pushCtx: ctx, vcpuCopyCtx: -1 };
  },
};
