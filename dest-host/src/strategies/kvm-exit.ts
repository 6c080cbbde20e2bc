import { openRegistered, type FaultStrategy, type ResolverSpec } from './strategy.js';

/**
 * kvm-exit: the vCPU checks the userfault bitmap (the receivedmap) before each
 * access, as KVM does with memory-fault exits (KVM_EXIT_MEMORY_FAULT); on a
 * missing page it leaves its run loop, fetches the page on its own connection,
 * installs it with COPY in DONTWAKE mode and goes on, also after EEXIST.
 *
 * Accesses that are not a vCPU's (I/O threads) still fault through a
 * process-wide userfaultfd. A vCPU's DONTWAKE COPY wakes none of them, so
 * their resolver owes a WAKE whenever a page got in some other way.
 */
export const kvmExit: FaultStrategy = {
  name: 'kvm-exit',
  vcpuFaultDelivery: 'memory-fault-exit',
  setup(memory, threads, totalPages) {
    const shared = openRegistered(memory, 0, totalPages);
    const resolvers: ResolverSpec[] = [];
    if (threads.ioThreads > 0) resolvers.push({ label: 'io-resolver', ctx: shared, owesWake: true, pageWait: 'await' });
    return { resolvers, ranges: [{ ctx: shared, firstPage: 0, endPage: totalPages }], contexts: [shared], vcpuCopyCtx: shared };
  },
};
