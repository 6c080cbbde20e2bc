/**
 * The warm-up: before the guest runs, each vCPU and resolver thread runs
 * its fault path on scratch memory, so that its isolate's JavaScript is
 * compiled by then.
 *
 * Why: every vCPU and resolver thread is an isolate of its own, and each
 * compiles the same fault path anew (V8 shares no compiled code between
 * isolates). In a kvm-exit run at 8 vCPUs x 16 MiB that compiling took
 * about 0.46 s of CPU on TurboFan's background threads, whatever the
 * guest's size (the report's `destOther`: 13.8-16.0 µs a fault at 16 MiB a
 * vCPU, 3.5-3.7 at 64 MiB), and the run's first 0.4 s went at 4.5-19 k
 * faults/s against 31-48 k after (its --trace, 100 ms bins). A native VMM's
 * fault path is compiled before its guest starts; a JIT benchmark harness
 * warms up before it measures. This does both: the figures of a run are
 * then the fault path's, not V8's tier-up.
 *
 * What it runs: the same strategy (its setup over scratch memory of the
 * same backend: the same resolvers, contexts and wake duties), the same
 * workload over `pagesPerVcpu` pages a vCPU, the same fault channel kind
 * (and with --trace the same logging, whose logs are dropped), against a
 * local peer (peer.ts) that answers as the source does with the
 * generator's pages, in two rounds (see {@link WarmUp}). The vCPUs run
 * each round through to the end, the resolvers stop; after the last the
 * scratch contexts close, and only then do the threads connect to the
 * source for the run. The run's memory, state,
 * connections and counters are never touched, so every exactly-once check
 * holds as without it. I/O threads and devices' DMA threads do not warm up.
 * Over TLS the warm-up still speaks plain ws:// (the peer has no
 * certificate): the TLS branches compile in the run.
 *
 * The threads leave their warm-up channel open and the scratch memory
 * attached until they exit; the peer and the scratch memory go at the end
 * of the run. Closing them writes their objects' fields (a socket field set
 * to undefined, an error recorded), V8 tracks fields' types per hidden
 * class, and the code optimized in the warm-up depends on them: closed
 * first, it was all thrown away and compiled again in the run (measured at
 * 8 kvm-exit vCPUs: as many TurboFan compiles in the run as without a
 * warm-up, the deopts all "code dependencies").
 *
 * --warm-up-pages 0 turns it off.
 */
import { makeLayout, warmUpRoundSizes, type ImageSpec, type MemoryBackendName, type WorkloadName } from '@postcopy/shared';
import type { BackendMemory } from '../memory/backend.js';
import { BACKEND_BY_NAME } from '../memory/backends.js';
import type { WarmUpPlan } from '../run/guest-threads.js';
import { releaseSetup, type FaultStrategy, type StrategySetup, type ThreadPlan } from '../strategies/index.js';
import { VmmState } from '../vmm/state.js';
import { Watchdog, type WatchedThread } from '../watchdog.js';
import type { SourceEndpoint } from '../workers/protocol.js';
import { WarmUpPeer } from './peer.js';

/** Scratch memory a warm-up may map at most (with 2 MiB pages a vCPU gets fewer pages). */
export const MAX_WARM_UP_BYTES = 64 * 1024 * 1024;

export interface WarmUpSpec {
  /** Pages each vCPU faults on: fewer where {@link MAX_WARM_UP_BYTES} says so, and never more than each vCPU's share of the guest. */
  pagesPerVcpu: number;
  /** The guest's pages. */
  guestPages: number;
  backend: MemoryBackendName;
  pageSize: number;
  memslotBytes: number;
  fault: FaultStrategy;
  plan: ThreadPlan;
  /** Slots of the run's memory (the scratch memory has as many, so that every thread keeps its slot). */
  threadCount: number;
  maxContexts: number;
  image: ImageSpec;
  ignoreWord: number;
  workload: { name: WorkloadName; seed: number; writeFraction: number };
  /** The run's endpoint: its timeouts and fault channel kind. */
  endpoint: SourceEndpoint;
  /**
   * --trace: the threads log their warm-up too (the logs are dropped), so
   * that the logging is compiled with the rest instead of in the run.
   */
  trace: boolean;
}

/**
 * The first round's share of each vCPU's warm-up pages. The first round only
 * has to show V8 the first kind of objects; the second has to take the code
 * that round compiled through its throwing away (the second kind's field
 * types generalize, on each round's memory, state and channel objects) and
 * compile it again before the run. With halves it did not for some of the
 * hot path: --trace-opt showed resolveNow, replyTo and enqueue optimized in
 * the first round, thrown away at the second round's start ("code
 * dependencies", every resolver at once) and optimized again only in the
 * run, with runs at 8 vCPUs optimizing 122 to 139 functions while the guest
 * ran. With a quarter first, those three are compiled again within the
 * second round, and the run optimizes 84 to 88 (per-thread-uffd at 8 vCPUs;
 * kvm-exit 48 -> 41, shared-uffd 69 -> 55).
 * Measured (per-thread-uffd, 16 vCPUs x 16 MiB, --no-push --preempt,
 * sequential, 5 interleaved pairs): compiler threads' CPU a fault (the
 * report's destOther) 10.2-13.0 -> 7.8-9.7 µs, median rate 17.8 k -> 18.9 k
 * pages/s. Smaller first rounds (0.1, 0.15) were no better and had the guest
 * loop compiled on stack twice in the run.
 */
export const DEST_FIRST_ROUND_SHARE = 0.25;

/**
 * The warm-up's rounds: each vCPU's pages split in two, each round on
 * scratch memory, contexts, state and a peer of its own, and each thread
 * runs its fault path once a round with new objects (channel, installer,
 * memory views, session). Why two: V8 optimizes on what a function has seen,
 * and the first set of objects is not the last. Code compiled in one round
 * depends on its objects' maps (a field's type is recorded as the class of
 * its first value; a function called once is optimized only on its loop,
 * OSR) and is thrown away when other objects come: in a one-round warm-up
 * that happened at the run's start, and each isolate compiled its fault path
 * again while the guest ran (kvm-exit, 8 vCPUs x 16 MiB, --trace-opt: the
 * channel's request, replyTo and the guest loop deoptimized on "code
 * dependencies" as the run's objects were made; perf: V8's compiler threads
 * busy the run's first 0.8-1.3 s, up to a core of two). The second round
 * takes that step instead, and the run finds its code compiled for objects
 * of both kinds. Split, so that --warm-up-pages still says how many faults:
 * a quarter in the first round, the rest in the second (above).
 *
 * Measured (8 vCPUs x 16 MiB, --no-push --preempt, sequential, pairs
 * interleaved with the one-round warm-up, a VM with 20 % steal): kvm-exit,
 * 8 pairs, median 18.4 k -> 20.2 k pages/s, the compiler threads' CPU a
 * fault (the report's `destOther`) 12.6-16.9 -> 6.4-11.0 µs; shared-uffd,
 * 3 pairs, 13.3-15.6 k -> 13.9-16.5 k, each pair better, destOther
 * 17.8-23.4 -> 10.4-13.3 µs. The warm-up itself takes longer (kvm-exit at
 * 8 vCPUs 0.79-1.07 -> 1.08-1.15 s): the compiling moved into it.
 */
export class WarmUp {
  private constructor(private readonly rounds: WarmUpRound[]) {}

  /** Pages each vCPU of `spec` faults on in its warm-up, over all rounds. */
  static pagesPerVcpu(spec: Pick<WarmUpSpec, 'pagesPerVcpu' | 'guestPages' | 'pageSize' | 'plan'>): number {
    const vcpus = spec.plan.vcpus;
    return Math.max(1, Math.min(spec.pagesPerVcpu, Math.floor(MAX_WARM_UP_BYTES / spec.pageSize / vcpus), Math.floor(spec.guestPages / vcpus)));
  }

  static async start(spec: WarmUpSpec): Promise<WarmUp> {
    const started = await Promise.allSettled(warmUpRoundSizes(WarmUp.pagesPerVcpu(spec), DEST_FIRST_ROUND_SHARE).map((pages) => WarmUpRound.start(spec, pages)));
    const warmUp = new WarmUp(started.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : [])));
    const failed = started.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (failed !== undefined) {
      // The rounds that did start go as the run's end would take them (no thread runs on them yet).
      warmUp.releaseContexts();
      await warmUp.closePeer();
      warmUp.dispose();
      throw failed.reason;
    }
    return warmUp;
  }

  /** What the threads run on, round by round. */
  get plans(): WarmUpPlan[] {
    return this.rounds.map((r) => r.plan);
  }

  /**
   * A watchdog over each round's threads (not started): a warm-up that
   * stops making progress fails the run, as the run's own watchdog would.
   */
  watchdogs(threads: readonly WatchedThread[], timeoutMs: number, onStall: (err: Error) => void): Watchdog[] {
    return this.rounds.map((r) => r.watchdog(threads, timeoutMs, onStall));
  }

  /** Unregisters and closes every round's scratch contexts (which wakes any thread still blocked in one). Idempotent. */
  releaseContexts(): void {
    for (const r of this.rounds) r.releaseContexts();
  }

  /** Stops the peers, cutting the warm-up's connections (at the end of the run). */
  async closePeer(): Promise<void> {
    await Promise.all(this.rounds.map((r) => r.closePeer()));
  }

  /** Unmaps the scratch memory: only once no thread runs on it (the threads have exited). */
  dispose(): void {
    for (const r of this.rounds) r.dispose();
  }
}

/** One round: its scratch memory, the strategy's setup over it, its state and its peer. */
class WarmUpRound {
  private setup: StrategySetup | undefined;

  private constructor(
    readonly plan: WarmUpPlan,
    private readonly memory: BackendMemory,
    private readonly vmm: VmmState,
    private readonly peer: WarmUpPeer,
    setup: StrategySetup,
  ) {
    this.setup = setup;
  }

  static async start(spec: WarmUpSpec, pagesPerVcpu: number): Promise<WarmUpRound> {
    const vcpus = spec.plan.vcpus;
    const totalPages = pagesPerVcpu * vcpus;
    const layout = makeLayout(totalPages * spec.pageSize, spec.pageSize);
    const memory = BACKEND_BY_NAME[spec.backend].create({ layout, memslotBytes: spec.memslotBytes, maxThreads: spec.threadCount, maxContexts: spec.maxContexts });
    let setup: StrategySetup;
    let peer: WarmUpPeer;
    try {
      // The strategy's own duties, WAKEs included: the testing-only
      // --unsafe-skip-owed-wake is the run's, for its watchdog to catch.
      setup = spec.fault.setup(memory, spec.plan, totalPages);
    } catch (err) {
      memory.dispose();
      throw err;
    }
    try {
      peer = await WarmUpPeer.start(layout, spec.image);
    } catch (err) {
      releaseSetup(memory, setup);
      memory.dispose();
      throw err;
    }
    const vmm = VmmState.create(totalPages, spec.threadCount, spec.trace);
    // The peer speaks plain ws:// (see above): no TLS material.
    const { tls: _tls, ...endpoint } = spec.endpoint;
    const plan: WarmUpPlan = {
      shared: { memory: memory.handle, vmm: vmm.buffers, image: spec.image, ignoreWord: spec.ignoreWord, epochOrigin: performance.timeOrigin },
      endpoint: { ...endpoint, url: peer.url, token: peer.token, secret: peer.secret, guestBytes: layout.guestBytes, pageSize: layout.pageSize },
      plan: setup,
      workload: { name: spec.workload.name, totalPages, vcpus, seed: spec.workload.seed, accesses: 0, writeFraction: spec.workload.writeFraction },
    };
    return new WarmUpRound(plan, memory, vmm, peer, setup);
  }

  watchdog(threads: readonly WatchedThread[], timeoutMs: number, onStall: (err: Error) => void): Watchdog {
    return new Watchdog(this.vmm, this.memory, threads, timeoutMs, () => performance.now(), (err) => onStall(new Error(`warm-up: ${err.message}`, { cause: err })));
  }

  releaseContexts(): void {
    if (this.setup !== undefined) releaseSetup(this.memory, this.setup);
    this.setup = undefined;
  }

  closePeer(): Promise<void> {
    return this.peer.close();
  }

  dispose(): void {
    this.memory.dispose();
  }
}
