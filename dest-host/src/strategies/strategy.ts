import type { StrategyName } from '@postcopy/shared';
import type { Userfaultfd } from '../uffd/userfaultfd.js';
import type { PageWait } from '../vmm/page-installer.js';

/** Which faulting threads a run has; thread ids index the userfaultfd's thread slots. */
export interface ThreadPlan {
  vcpus: number;
  ioThreads: number;
  /** Reader threads for the shared context (shared-uffd only). */
  readers: number;
  vcpuTid(vcpu: number): number;
  ioTid(index: number): number;
}

/** A resolver thread: reads one context's messages, fetches, installs, wakes. */
export interface ResolverSpec {
  label: string;
  ctx: number;
  /** Must WAKE its context when a page was installed elsewhere (see PageInstaller). */
  owesWake: boolean;
  /** How it waits for a page installed elsewhere (see PageWait). */
  pageWait: PageWait;
}

export interface StrategySetup {
  resolvers: ResolverSpec[];
  /** Context the main thread installs pushed pages on (its waiters are woken). */
  pushCtx: number;
  /** Context a vCPU issues its own DONTWAKE COPY on (kvm-exit), or -1. */
  vcpuCopyCtx: number;
}

/**
 * A fault-delivery strategy: how a fault reaches code that resolves it, and
 * how the faulting thread is woken. Strategies differ only here; memory,
 * workloads, the source, and the accounting are the same for all.
 */
export interface FaultStrategy {
  readonly name: StrategyName;
  /**
   * `userfaultfd`: a vCPU touching a missing page blocks in the kernel and a
   * resolver thread handles the message. `memory-fault-exit`: the vCPU checks
   * the userfault bitmap before each access and resolves the fault itself.
   */
  readonly vcpuFaultDelivery: 'userfaultfd' | 'memory-fault-exit';
  /** Opens and registers the contexts this strategy needs; says which resolvers to start. */
  setup(uffd: Userfaultfd, threads: ThreadPlan, guestBytes: number): StrategySetup;
}
