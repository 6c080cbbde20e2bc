import type { StrategyName } from '@postcopy/shared';
import type { BackendMemory } from '../memory/backend.js';
import type { PageWait } from '../vmm/page-installer.js';

/**
 * Which faulting threads a run has. A thread's slot indexes its fault queue
 * (VmmState) and, on the emulation, its thread table entry; the id its
 * fault messages carry is its slot on the emulation and its gettid() on uffd
 * (VmmState.tidOf maps slots to those ids once the threads run).
 */
export interface ThreadPlan {
  vcpus: number;
  ioThreads: number;
  /** Reader threads for the shared context (shared-uffd only). */
  readers: number;
  vcpuSlot(vcpu: number): number;
  ioSlot(index: number): number;
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

/**
 * Pages [firstPage, endPage) and the context that registers them (a
 * "registered range"). A COPY wakes only the waiters of the context it is
 * issued on, and on the kernel it must lie inside one registered vma
 * (mm/userfaultfd.c, find_dst_vma): installs that are not a resolver's
 * (pushed pages, requested pages sent on the main channel) go to the
 * context of the range they land in, one COPY per range.
 */
export interface ContextRange {
  ctx: number;
  firstPage: number;
  endPage: number;
}

export interface StrategySetup {
  resolvers: ResolverSpec[];
  /**
   * The contexts that own guest memory, in page order, covering every page
   * once: one range over the whole guest, or one per vCPU partition
   * (per-region-uffd).
   */
  ranges: ContextRange[];
  /** Every context the strategy opened (closed at the end of the run). */
  contexts: number[];
  /** Context a vCPU issues its own DONTWAKE COPY on (kvm-exit), or -1. */
  vcpuCopyCtx: number;
}

/**
 * A fault-delivery strategy: how a fault reaches code that resolves it, and
 * how the faulting thread is woken. Strategies differ only here; memory,
 * workloads, the source, and the accounting are the same for all, and they
 * see guest memory through the memory backend only, so each runs on either.
 */
export interface FaultStrategy {
  readonly name: StrategyName;
  /**
   * `userfaultfd`: a vCPU touching a missing page blocks in the kernel and a
   * resolver thread handles the message. `memory-fault-exit`: the vCPU checks
   * the userfault bitmap before each access and resolves the fault itself.
   */
  readonly vcpuFaultDelivery: 'userfaultfd' | 'memory-fault-exit';
  /**
   * Opens and registers the contexts this strategy needs; says which
   * resolvers to start. Throws BackendUnavailableError where the backend
   * lacks what the strategy needs (a per-thread context on uffd).
   */
  setup(memory: BackendMemory, threads: ThreadPlan, totalPages: number): StrategySetup;
}

/** userfaultfd(2) + UFFDIO_REGISTER over pages [firstPage, endPage): the new context. */
export function openRegistered(memory: BackendMemory, firstPage: number, endPage: number, thread?: number): number {
  const ctx = memory.open(thread === undefined ? {} : { thread });
  const size = memory.layout.pageSize;
  const r = memory.register(ctx, firstPage * size, (endPage - firstPage) * size);
  if (r !== 0) {
    memory.close(ctx);
    throw new Error(`expected UFFDIO_REGISTER of pages ${firstPage} to ${endPage - 1} to succeed, got errno ${-r}`);
  }
  return ctx;
}

/**
 * Undoes a strategy's setup: unregisters each range and closes every
 * context (on the kernel that wakes any thread still blocked in one).
 */
export function releaseSetup(memory: BackendMemory, setup: StrategySetup): void {
  const size = memory.layout.pageSize;
  for (const r of setup.ranges) memory.unregister(r.ctx, r.firstPage * size, (r.endPage - r.firstPage) * size);
  for (const ctx of setup.contexts) memory.close(ctx);
}

/** The range holding `page` (ranges in page order, covering the guest). */
export function rangeOf(ranges: readonly ContextRange[], page: number): ContextRange {
  if (ranges.length === 1) return ranges[0]!;
  let lo = 0;
  let hi = ranges.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >>> 1;
    if (ranges[mid]!.firstPage <= page) lo = mid;
    else hi = mid - 1;
  }
  return ranges[lo]!;
}
