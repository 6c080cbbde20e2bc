import { openRegistered, type FaultStrategy, type ResolverSpec } from './strategy.js';

/**
 * per-thread-uffd: one userfaultfd context per vCPU thread (the proposed
 * per-tid userfaultfd), each with a paired resolver thread. Non-vCPU threads
 * and pushed pages use a process-wide context.
 *
 * A COPY wakes only its own context's waiters. When two vCPUs fault the same
 * page, or a page arrives by push, the page is installed through another
 * context; the kernel wakes nobody on the EEXIST that follows, so each
 * resolver owes its vCPU a WAKE whenever the page got in some other way.
 *
 * The kernel has no per-thread userfaultfd: on the uffd backend the first
 * per-thread open throws BackendUnavailableError naming per-region-uffd.
 * This strategy is the emulation's.
 */
export const perThreadUffd: FaultStrategy = {
  name: 'per-thread-uffd',
  vcpuFaultDelivery: 'userfaultfd',
  setup(memory, threads, totalPages) {
    const contexts: number[] = [];
    try {
      const shared = openRegistered(memory, 0, totalPages);
      contexts.push(shared);
      const resolvers: ResolverSpec[] = [];
      for (let v = 0; v < threads.vcpus; v++) {
        const ctx = openRegistered(memory, 0, totalPages, threads.vcpuSlot(v));
        contexts.push(ctx);
        // Its one vCPU is blocked on the page it waits for: nothing else to do meanwhile.
        resolvers.push({ label: `resolver${v}`, ctx, owesWake: true, pageWait: 'block' });
      }
      if (threads.ioThreads > 0) resolvers.push({ label: 'io-resolver', ctx: shared, owesWake: true, pageWait: 'await' });
      return { resolvers, ranges: [{ ctx: shared, firstPage: 0, endPage: totalPages }], contexts, vcpuCopyCtx: -1 };
    } catch (err) {
      for (const ctx of contexts) memory.close(ctx);
      throw err;
    }
  },
};
