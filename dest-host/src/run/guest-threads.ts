/**
 * The destination's worker threads: the strategy's resolvers, the guest's
 * vCPUs and its I/O threads. They start before the migration does (each
 * opens its own connection, binds to guest memory and says `ready`), the
 * guest runs on `go` (all together, like demand_paging_test's barrier: after
 * the switchover in precopy modes), and at the end the resolvers stop
 * reading and finish what they have in flight.
 */
import type { Worker } from 'node:worker_threads';
import { startWorker, type PageRange, type StrategyName, type WorkloadName } from '@postcopy/shared';
import type { FaultStrategy, StrategySetup, ThreadPlan } from '../strategies/index.js';
import type { ResolverTrace } from '../trace/thread-logs.js';
import type { WatchedThread } from '../watchdog.js';
import type { GuestThreadData, GuestThreadResult, ResolverData, SharedState, SourceEndpoint, WorkerReport } from '../workers/protocol.js';
import { expectReport, type Abort } from './abort.js';

export interface GuestThreadsOptions {
  strategy: StrategyName;
  fault: FaultStrategy;
  plan: StrategySetup;
  threads: ThreadPlan;
  shared: SharedState;
  endpoint: SourceEndpoint;
  workload: { name: WorkloadName; totalPages: number; vcpus: number; seed: number; accesses: number; writeFraction: number };
  ioAccesses: number;
  abort: Abort;
  /** A worker's fault channel dropped in session `epoch` (see net/session.ts): the caller pauses or fails. */
  onChannelLost: (label: string, message: string, epoch: number) => void;
  /** --trace: every thread logs its faults and messages for the timeline. */
  trace: boolean;
}

/** What a resolver reports at its end. */
export interface ResolverEnd {
  label: string;
  owesWake: boolean;
  /** Its own CPU time over the run, µs (null where it cannot be told). */
  cpuUs: number | null;
  /** --trace: its fault messages. */
  trace?: ResolverTrace;
}

interface Thread {
  worker: Worker;
  label: string;
}

/** A resolver thread and what its end reports name (its label, whether it owes WAKEs). */
interface ResolverThread extends Thread {
  owesWake: boolean;
}

/**
 * startWorker() finds an entry next to its caller's URL; the entries are in
 * ../workers/, so the "caller" is a file there (.ts under the test runner,
 * .js when built, as this file is).
 */
export const WORKERS_CALLER = new URL(`../workers/threads.${import.meta.url.endsWith('.ts') ? 'ts' : 'js'}`, import.meta.url).href;

export class GuestThreads {
  readonly workers: Worker[] = [];
  private readonly resolvers: ResolverThread[];
  private readonly vcpus: Thread[];
  private readonly ios: Thread[];
  /** The devices' DMA threads (added once the source said which devices the guest has). */
  private readonly devices: Thread[] = [];
  /** Each device's DMA thread by name and slot, in the order run() gives their results. */
  readonly deviceThreads: { name: string; slot: number }[] = [];
  /** What the watchdog watches; device threads join it as they are added. */
  private readonly watchedThreads: WatchedThread[];
  private readonly start: (name: string, workerData: unknown, label: string) => Thread;

  constructor(private readonly o: GuestThreadsOptions) {
    const start = (this.start = (name: string, workerData: unknown, label: string): Thread => {
      const worker = startWorker(WORKERS_CALLER, name, { workerData });
      this.workers.push(worker);
      worker.on('message', (m: WorkerReport) => {
        if (m.type === 'error') o.abort.fail(new Error(`${label}: ${m.message}`));
        else if (m.type === 'channel-lost') o.onChannelLost(label, m.message, m.epoch);
      });
      worker.on('error', (err) => o.abort.fail(new Error(`${label}: ${err.message}`)));
      return { worker, label };
    });
    this.resolvers = o.plan.resolvers.map((spec) => {
      const data: ResolverData = { label: spec.label, ctx: spec.ctx, owesWake: spec.owesWake, pageWait: spec.pageWait, state: o.shared, source: o.endpoint, trace: o.trace };
      return { ...start('resolver-worker', data, spec.label), owesWake: spec.owesWake };
    });
    const guestThread = (kind: 'vcpu' | 'io', index: number): Thread => {
      const data: GuestThreadData = {
        kind,
        index,
        slot: kind === 'vcpu' ? o.threads.vcpuSlot(index) : o.threads.ioSlot(index),
        strategy: o.strategy,
        delivery: kind === 'vcpu' ? o.fault.vcpuFaultDelivery : 'userfaultfd',
        state: o.shared,
        workload: o.workload,
        ioAccesses: o.ioAccesses,
        source: o.endpoint,
        copyCtx: o.plan.vcpuCopyCtx,
        trace: o.trace,
      };
      return start('guest-thread-worker', data, kind === 'vcpu' ? `vCPU ${index}` : `I/O thread ${index}`);
    };
    this.vcpus = Array.from({ length: o.threads.vcpus }, (_, v) => guestThread('vcpu', v));
    this.ios = Array.from({ length: o.threads.ioThreads }, (_, i) => guestThread('io', i));
    this.watchedThreads = [
      ...this.vcpus.map((_, v) => ({ slot: this.o.threads.vcpuSlot(v), name: `vCPU ${v}` })),
      ...this.ios.map((_, i) => ({ slot: this.o.threads.ioSlot(i), name: `I/O thread ${i}` })),
    ];
  }

  /**
   * The devices' DMA threads, in the slots after the I/O threads'. They
   * fault through the userfaultfd as I/O threads do; a context of the
   * strategy's that no resolver reads yet (kvm-exit's and per-thread-uffd's
   * process-wide one, without I/O threads) gets one, which owes a WAKE after
   * EEXIST as the I/O-thread resolver does (`owesWake` false: the testing-only
   * --unsafe-skip-owed-wake). Resolves once each is ready.
   */
  async addDevices(devices: { name: string; index: number; dmaRanges: PageRange[]; slot: number }[], owesWake = true): Promise<void> {
    const o = this.o;
    const added: Thread[] = [];
    const read = new Set(o.plan.resolvers.map((r) => r.ctx));
    for (const ctx of new Set(o.plan.ranges.map((r) => r.ctx))) {
      if (read.has(ctx)) continue;
      const data: ResolverData = { label: `device-resolver${ctx}`, ctx, owesWake, pageWait: 'await', state: o.shared, source: o.endpoint, trace: o.trace };
      const t = { ...this.start('resolver-worker', data, data.label), owesWake };
      this.resolvers.push(t);
      added.push(t);
    }
    for (const d of devices) {
      const data: GuestThreadData = {
        kind: 'device',
        index: d.index,
        slot: d.slot,
        strategy: o.strategy,
        delivery: 'userfaultfd',
        state: o.shared,
        workload: o.workload,
        ioAccesses: o.ioAccesses,
        source: o.endpoint,
        copyCtx: o.plan.vcpuCopyCtx,
        dmaRanges: d.dmaRanges,
        trace: o.trace,
      };
      const t = this.start('guest-thread-worker', data, `device ${d.name}`);
      this.devices.push(t);
      this.deviceThreads.push({ name: `device ${d.name}`, slot: d.slot });
      added.push(t);
      this.watchedThreads.push({ slot: d.slot, name: `device ${d.name}` });
    }
    await Promise.all(added.map((t) => expectReport(t.worker, 'ready', t.label, this.o.abort)));
  }

  /** Every thread connected and bound to guest memory. */
  async ready(): Promise<void> {
    await Promise.all([...this.resolvers, ...this.vcpus, ...this.ios].map((t) => expectReport(t.worker, 'ready', t.label, this.o.abort)));
  }

  /** The threads the watchdog watches: every vCPU, I/O thread and device (the list grows as devices are added). */
  watched(): WatchedThread[] {
    return this.watchedThreads;
  }

  /** The guest runs: every vCPU, I/O thread and device at once. Resolves with their results once every one is done. */
  async run(): Promise<{ vcpuResults: GuestThreadResult[]; ioResults: GuestThreadResult[]; deviceResults: GuestThreadResult[] }> {
    const guest = [...this.vcpus, ...this.ios, ...this.devices];
    const done = guest.map((t) => expectReport(t.worker, 'done', t.label, this.o.abort));
    for (const t of guest) t.worker.postMessage({ type: 'go' });
    const results = (await Promise.all(done)).map((r) => r.result);
    const v = this.vcpus.length;
    const io = this.ios.length;
    return { vcpuResults: results.slice(0, v), ioResults: results.slice(v, v + io), deviceResults: results.slice(v + io) };
  }

  /**
   * The resolvers stop reading and finish their in-flight requests (before
   * their contexts may close). Resolves with each resolver's end: its own CPU
   * time over the run, and with --trace its log.
   */
  async stopResolvers(): Promise<ResolverEnd[]> {
    const done = this.resolvers.map((r) => expectReport(r.worker, 'resolver-done', r.label, this.o.abort));
    for (const r of this.resolvers) r.worker.postMessage({ type: 'stop' });
    return (await Promise.all(done)).map((d, i) => ({
      label: this.resolvers[i]!.label,
      owesWake: this.resolvers[i]!.owesWake,
      cpuUs: d.cpuUs,
      ...(d.trace ? { trace: d.trace } : {}),
    }));
  }
}
