import type { FaultStrategy, ResolverSpec } from './strategy.js';

/**
 * per-thread-uffd: one userfaultfd context per vCPU thread (the proposed
 * per-tid userfaultfd), each with a paired resolver thread. Non-vCPU threads
 * and pushed pages use a process-wide context.
 *
 * A COPY wakes only its own context's waiters. When two vCPUs fault the same
 * page, or a page arrives by push, the page is installed through another
 * context; the kernel wakes nobody on the EEXIST that follows, so each
 * resolver owes its vCPU a WAKE whenever the page got in some other way.
 */
export const perThreadUffd: FaultStrategy = {
  name: 'per-thread-uffd',
  vcpuFaultDelivery: 'userfaultfd',
  setup(uffd, threads, guestBytes) {
    const shared = uffd.open();
    uffd.register(shared, 0, guestBytes);
    const resolvers: ResolverSpec[] = [];
    for (let v = 0; v < threads.vcpus; v++) {
      const ctx = uffd.open(threads.vcpuTid(v));
      uffd.register(ctx, 0, guestBytes);
      // Its one vCPU is blocked on the page it waits for: nothing else to do meanwhile.
      resolvers.push({ label: `resolver${v}`, ctx, owesWake: true, pageWait: 'block' });
    }
    if (threads.ioThreads > 0) resolvers.push({ label: 'io-resolver', ctx: shared, owesWake: true, pageWait: 'await' });
    return { resolvers, pushCtx: shared, vcpuCopyCtx: -1 };
  },
};
