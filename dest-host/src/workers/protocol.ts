import type { ImageSpec, PageRange, StrategyName, WorkloadSpec } from '@postcopy/shared';
import type { BackendHandle } from '../memory/backend.js';
import type { ClientTls } from '../net/page-client.js';
import type { FaultTrace, ResolverTrace } from '../trace/thread-logs.js';
import type { PageWait } from '../vmm/page-installer.js';
import type { VmmBuffers } from '../vmm/state.js';

/** Where a worker's own connection goes (kvm-exit vCPUs, resolvers). */
export interface SourceEndpoint {
  url: string;
  token: string;
  guestBytes: number;
  pageSize: number;
  connectTimeoutMs: number;
  /** After a resume, a fault channel that cannot reconnect within this time fails the run. */
  reconnectTimeoutMs: number;
  /** The migration's secret: every channel but the first main one presents it. */
  secret: string;
  /** wss:// sources: how to verify them and the client certificate to show. */
  tls?: ClientTls;
  /** How threads that block on their fault fetch their pages. */
  faultChannel: FaultChannelKind;
}

/** Everything a worker needs to attach to the destination's shared state. */
/**
 * How a thread that blocks on its fault fetches the page: `blocking`, a
 * socket of its own read with blocking system calls (BlockingPageChannel;
 * plain ws:// with the uffd addon built), or `event-loop`, PageClient on the
 * worker's event loop (any source, TLS included).
 */
export type FaultChannelKind = 'blocking' | 'event-loop';

/** `--fault-channel`: a kind, or `auto` (blocking where it can be). */
export type FaultChannelChoice = FaultChannelKind | 'auto';
export const FAULT_CHANNEL_CHOICES = ['auto', 'blocking', 'event-loop'] as const satisfies readonly FaultChannelChoice[];

export interface SharedState {
  /** Guest memory and its contexts, whichever backend: the worker attaches with BACKEND_BY_NAME[memory.backend]. */
  memory: BackendHandle;
  vmm: VmmBuffers;
  image: ImageSpec;
  /**
   * The word of each page the first-touch check skips: the counter the guest
   * changed on the source before the switchover (precopy and hybrid), or -1
   * (postcopy: every page is still exactly the generator's).
   */
  ignoreWord: number;
  /** The main thread's performance.timeOrigin: workers report times relative to it. */
  epochOrigin: number;
}

export interface GuestThreadData {
  /** A vCPU, an I/O thread, or a device's DMA (after the switchover: it faults through the userfaultfd, as an I/O thread). */
  kind: 'vcpu' | 'io' | 'device';
  /** vCPU index, or I/O thread index. */
  index: number;
  /** Thread slot: its fault queue, and its entry in the emulation's thread table (ThreadPlan). */
  slot: number;
  strategy: StrategyName;
  delivery: 'userfaultfd' | 'memory-fault-exit';
  state: SharedState;
  workload: WorkloadSpec;
  /** I/O threads: accesses to make. */
  ioAccesses: number;
  source?: SourceEndpoint;
  /** kvm-exit: context of the vCPU's DONTWAKE COPY. */
  copyCtx: number;
  /** A device's DMA: the guest RAM it reaches. */
  dmaRanges?: PageRange[];
  /** --trace: log each fault's page, access and (kvm-exit) resolution for the timeline. */
  trace: boolean;
  /** vCPUs: the warm-up's rounds this thread runs first, each on scratch memory of its own (see warm-up/warm-up.ts). */
  warmUp?: GuestThreadWarmUp[];
}

/** What a guest thread's warm-up round runs on instead of the run's memory, source and workload. */
export interface GuestThreadWarmUp {
  state: SharedState;
  source: SourceEndpoint;
  workload: WorkloadSpec;
  copyCtx: number;
}

/** What a resolver's warm-up round serves instead of the run's context and source. */
export interface ResolverWarmUp {
  state: SharedState;
  source: SourceEndpoint;
  ctx: number;
  /** The strategy's own duty (a testing-only skip of the run's is not the warm-up's). */
  owesWake: boolean;
}

export interface ResolverData {
  label: string;
  ctx: number;
  owesWake: boolean;
  pageWait: PageWait;
  state: SharedState;
  source: SourceEndpoint;
  /** --trace: log each fault message and its resolution for the timeline. */
  trace: boolean;
  /** The warm-up's rounds this resolver serves first, each on scratch memory of its own (see warm-up/warm-up.ts). */
  warmUp?: ResolverWarmUp[];
}

export interface GuestThreadResult {
  faults: number;
  accesses: number;
  /** Blocked intervals, [start, end, ...] in ms since the epoch. */
  intervals: Float64Array;
  startMs: number;
  endMs: number;
  /** This thread's own CPU time from 'go' to its last access, µs (null where it cannot be told: see shared's cpu.ts). */
  cpuUs: number | null;
  /** --trace: each fault's page and flags, beside `intervals`. */
  trace?: FaultTrace;
}

/** Messages workers post to the main thread. */
export type WorkerReport =
  | { type: 'ready' }
  | { type: 'done'; result: GuestThreadResult }
  /** cpuUs: the resolver thread's own CPU time from ready to done, µs (null where it cannot be told). */
  | { type: 'resolver-done'; messages: number; cpuUs: number | null; trace?: ResolverTrace }
  /** A fault channel's connection dropped while its session was current: the main thread pauses the migration. */
  | { type: 'channel-lost'; epoch: number; message: string }
  | { type: 'error'; message: string; stack?: string }
  /** A report of the thread's warm-up (the same kinds, about scratch memory: never the run's). */
  | { type: 'warm-up'; report: WorkerReport };

/**
 * Messages the main thread posts to workers: `go` starts the guest threads;
 * `stop` tells a resolver to stop reading its context and to end once its
 * requests in flight are installed (the main thread closes the contexts only
 * after that: an install on a closed context is EBADF on the kernel).
 */
export type WorkerCommand = { type: 'go' } | { type: 'stop' };
