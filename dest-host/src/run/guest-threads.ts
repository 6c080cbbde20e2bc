/**
 * The destination's worker threads: the strategy's resolvers, the guest's
 * vCPUs and its I/O threads. They start before the migration does (each
 * opens its own connection, binds to guest memory and says `ready`), the
 * guest runs on `go` (all together, like demand_paging_test's barrier: after
 * the switchover in precopy modes), and at the end the resolvers stop
 * reading and finish what they have in flight.
 */
import type { Worker } from 'node:worker_threads';
import { startWorker, type PageRange, type StrategyName, type WorkloadName, type WorkloadSpec } from '@postcopy/shared';
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
  /** The warm-up's rounds the vCPUs and resolvers run first (warm-up/warm-up.ts): see {@link GuestThreads.warmUp}. */
  warmUp?: WarmUpPlan[];
}

/** Scratch memory, its strategy's contexts and the local peer a warm-up's round runs on. */
export interface WarmUpPlan {
  shared: SharedState;
  endpoint: SourceEndpoint;
  /** The strategy's setup over the scratch memory: the same resolvers as the run's, in the same order. */
  plan: StrategySetup;
  workload: WorkloadSpec;
}

/** What the warm-up did. */
export interface WarmUpDone {
  /** Faults of every vCPU on scratch memory, in all rounds. */
  faults: number;
  /** Rounds run (see warm-up/warm-up.ts). */
  rounds: number;
  /** From every thread ready for the first round (started, connected to its peer) to the resolvers stopped after the last. */
  ms: number;
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
        // The warm-up's peer is in this process: a lost connection to it is a failure, never the migration's pause.
        else if (m.type === 'warm-up' && m.report.type === 'channel-lost') o.abort.fail(new Error(`${label}: warm-up: the connection to the warm-up peer was lost: ${m.report.message}`));
      });
      worker.on('error', (err) => o.abort.fail(new Error(`${label}: ${err.message}`)));
      return { worker, label };
    });
    const warm = o.warmUp;
    for (const round of warm ?? []) {
      if (round.plan.resolvers.map((r) => r.label).join() !== o.plan.resolvers.map((r) => r.label).join()) {
        throw new Error(`expected the warm-up's resolvers to be the run's (${o.plan.resolvers.map((r) => r.label).join(', ')}), got ${round.plan.resolvers.map((r) => r.label).join(', ')}`);
      }
    }
    this.resolvers = o.plan.resolvers.map((spec, i) => {
      const data: ResolverData = {
        label: spec.label,
        ctx: spec.ctx,
        owesWake: spec.owesWake,
        pageWait: spec.pageWait,
        state: o.shared,
        source: o.endpoint,
        trace: o.trace,
        ...(warm ? { warmUp: warm.map((w) => ({ state: w.shared, source: w.endpoint, ctx: w.plan.resolvers[i]!.ctx, owesWake: w.plan.resolvers[i]!.owesWake })) } : {}),
      };
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
        ...(warm && kind === 'vcpu' ? { warmUp: warm.map((w) => ({ state: w.shared, source: w.endpoint, workload: w.workload, copyCtx: w.plan.vcpuCopyCtx })) } : {}),
      };
      return start('guest-thread-worker', data, kind === 'vcpu' ? `vCPU ${index}` : `I/O thread ${index}`);
    };
    this.vcpus = Array.from({ length: o.threads.vcpus }, (_, v) => guestThread('vcpu', v));
    this.ios = Array.from({ length: o.threads.ioThreads }, (_, i) => guestThread('io', i));
    this.watchedThreads = [
      ...this.vcpus.map((_, v) => ({ slot: this.o.threads.vcpuSlot(v), name: `vCPU ${v}` })),
      ...this.ios.map((_, i) => ({ slot: this.o.threads.ioSlot(i), name: `I/O thread ${i}` })),
    ];
    // Listening from the start: a thread says `ready` once it is set up, after its warm-up if it has one.
    this.readied = Promise.all([...this.resolvers, ...this.vcpus, ...this.ios].map((t) => expectReport(t.worker, 'ready', t.label, this.o.abort))).then(() => {});
    this.readied.catch(() => {});
  }

  private readonly readied: Promise<void>;

  /**
   * The warm-up, round by round: every vCPU runs its access pattern over the
   * round's scratch memory, its faults resolved by the same strategy's
   * resolvers from the round's peer, with the same code as the run's; then
   * the resolvers stop, and the next round begins. Nothing of the run's
   * memory, state or connections is touched. Call it before {@link ready},
   * with `warmUp` given.
   *
   * `watchdogs` (one a round) watch the vCPUs' warm-up alone: each starts
   * once every warmed thread is ready for its round, as the run's starts
   * only once its threads are (their start, isolates booting and
   * connecting, makes no progress a watchdog could see: on a loaded 2-core
   * machine it took over 500 ms and failed runs with --watchdog-ms 500), and
   * it stops once the vCPUs are done, before the resolvers are told to stop.
   */
  async warmUp(watchdogs: readonly { start(): void; stop(): void }[]): Promise<WarmUpDone> {
    const rounds = this.o.warmUp;
    if (rounds === undefined) throw new Error('expected a warm-up plan (GuestThreadsOptions.warmUp) for warmUp()');
    if (watchdogs.length !== rounds.length) throw new Error(`expected a watchdog for each of the warm-up's ${rounds.length} rounds, got ${watchdogs.length}`);
    const { abort } = this.o;
    const warmed = [...this.resolvers, ...this.vcpus];
    const readyForRound = (): Promise<unknown> => {
      const ready = Promise.all(warmed.map((t) => expectReport(t.worker, 'ready', t.label, abort, true)));
      // A round that fails leaves the next one's wait unawaited: its rejection is the same failure.
      ready.catch(() => {});
      return ready;
    };
    let ready = readyForRound();
    let started: number | undefined;
    let faults = 0;
    for (const [round, watchdog] of watchdogs.entries()) {
      await ready;
      // Listening for the next round's `ready` before this round ends: a thread says it as soon as its round is done.
      if (round + 1 < watchdogs.length) ready = readyForRound();
      // Timed from here: the threads' start, before it, is the run's with or without a warm-up.
      started ??= performance.now();
      const done = this.vcpus.map((t) => expectReport(t.worker, 'done', t.label, abort, true));
      for (const t of this.vcpus) t.worker.postMessage({ type: 'go' });
      watchdog.start();
      const results = await Promise.all(done).finally(() => watchdog.stop());
      const stopped = this.resolvers.map((r) => expectReport(r.worker, 'resolver-done', r.label, abort, true));
      for (const r of this.resolvers) r.worker.postMessage({ type: 'stop' });
      await Promise.all(stopped);
      faults += results.reduce((n, r) => n + r.result.faults, 0);
    }
    return { faults, ms: started === undefined ? 0 : performance.now() - started, rounds: watchdogs.length };
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
  ready(): Promise<void> {
    return this.readied;
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
