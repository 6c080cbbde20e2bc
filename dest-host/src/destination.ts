import { CheckError, type GuestLayout, type MdevCatalog, type MemoryBackendName, type Report, type StrategyName, type WorkloadName } from '@postcopy/shared';
import type { ClientTls } from './net/page-client.js';
import type { FaultChannelChoice } from './workers/protocol.js';
import type { Timeline } from './trace/timeline.js';
import { DestinationRun } from './run/destination-run.js';

export interface DestinationOptions {
  source: string;
  token: string;
  /** wss:// sources: the CA to verify them with, a client certificate, the name to expect. */
  tls?: ClientTls | undefined;
  /** Ping the source on the main channel; a silence this long counts as a lost connection (0 = never). */
  keepaliveMs: number;
  layout: GuestLayout;
  memslotBytes: number;
  /** Pages each vCPU faults on in the warm-up before the guest runs (warm-up/warm-up.ts); 0 = none. */
  warmUpPages: number;
  /** What guest memory and the userfaultfd are: `emulated`, or `uffd` (the kernel's). */
  memoryBackend: MemoryBackendName;
  strategy: StrategyName;
  vcpus: number;
  readers: number;
  ioThreads: number;
  ioAccesses: number;
  workload: WorkloadName;
  /** Accesses per vCPU; 0 = the workload's default. */
  accesses: number;
  writeFraction: number;
  seed: number;
  push: boolean;
  /** Pushed pages come on a push channel of their own (net/push-client.ts) where one can be opened. */
  pushChannel?: boolean;
  /**
   * How a thread that blocks on its fault (a kvm-exit vCPU) fetches the page:
   * `auto` (absent) is `blocking` where it can be (a ws:// source, the uffd
   * addon built), else `event-loop` (see FaultChannelKind).
   */
  faultChannel?: FaultChannelChoice;
  /**
   * With preempt and push, the main thread's nice value once the guest
   * threads are started (0 or absent: unchanged); see DestinationRun.lowerPushPriority.
   */
  pushNice?: number;
  /** QEMU's postcopy-preempt: requested pages come back on their own channels, apart from pushed pages. */
  preempt: boolean;
  watchdogMs: number;
  connectTimeoutMs: number;
  /** After a lost connection, give up when the migration cannot be resumed within this time. */
  reconnectTimeoutMs: number;
  /** Fault injection: cut every connection once after this many pages are installed, for each entry. */
  injectDrops: number[];
  /** The same, counted in pages installed after the switchover (demand or push). */
  injectPostcopyDrops?: number[];
  /** Recovery events (pause, resume), as lines for the log. */
  onEvent?: (line: string) => void;
  /** For tests only: resolvers skip the WAKE they owe (proves wake scope is per context). */
  skipOwedWake: boolean;
  /** For tests only: keep the pages the switch to postcopy discards (the content check must fail). */
  skipDiscard?: boolean;
  /** Called about every 200 ms with pages installed so far. */
  onProgress?: (installed: number, total: number, faults: number) => void;
  /** Serve GET /status on this port (0 = any free port), or undefined for none. */
  statusPort?: number | undefined;
  /** Address the status server binds (default 127.0.0.1). */
  statusHost?: string;
  /** Called with the status URL once it listens. */
  onStatusUrl?: (url: string) => void;
  /** The mdev parents and types of this host (--mdev-types; default the built-in GPU). */
  mdevCatalog?: MdevCatalog;
  /** --trace: record the run as a timeline (DestinationResult.timeline); off, nothing is recorded. */
  trace?: boolean;
}

export interface DestinationResult {
  report: Report;
  /** The vCPU fault-latency distribution in HdrHistogram's .hgrm text (values in µs). */
  hgrm: string;
  /** With options.trace: the run as a trace-event document (written by the caller: see trace/trace-event.ts). */
  timeline?: Timeline;
}

/**
 * Runs the destination side of one migration, phase by phase (the states of
 * lifecycle.ts; one method each in run/destination-run.ts), and returns its
 * report once every check has run.
 */
export function runDestination(options: DestinationOptions): Promise<DestinationResult> {
  return new DestinationRun(options).run();
}

/** Throws a {@link CheckError} naming the first failed check of a report. */
export function assertVerified(report: Report): void {
  const failed = report.checks.find((c) => !c.ok);
  if (failed) throw new CheckError(failed.name, failed.detail);
}
