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
 * generator's pages. The vCPUs run it through to the end, the resolvers
 * stop and the scratch contexts close; only then do the threads connect to
 * the source for the run. The run's memory, state,
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
import { makeLayout, type ImageSpec, type MemoryBackendName, type WorkloadName } from '@postcopy/shared';
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

export class WarmUp {
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

  /** Pages each vCPU of `spec` faults on in its warm-up. */
  static pagesPerVcpu(spec: Pick<WarmUpSpec, 'pagesPerVcpu' | 'guestPages' | 'pageSize' | 'plan'>): number {
    const vcpus = spec.plan.vcpus;
    return Math.max(1, Math.min(spec.pagesPerVcpu, Math.floor(MAX_WARM_UP_BYTES / spec.pageSize / vcpus), Math.floor(spec.guestPages / vcpus)));
  }

  static async start(spec: WarmUpSpec): Promise<WarmUp> {
    const vcpus = spec.plan.vcpus;
    const totalPages = WarmUp.pagesPerVcpu(spec) * vcpus;
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
    return new WarmUp(plan, memory, vmm, peer, setup);
  }

  /**
   * A watchdog over the warm-up's threads (not started): a warm-up that
   * stops making progress fails the run, as the run's own watchdog would.
   */
  watchdog(threads: readonly WatchedThread[], timeoutMs: number, onStall: (err: Error) => void): Watchdog {
    return new Watchdog(this.vmm, this.memory, threads, timeoutMs, () => performance.now(), (err) => onStall(new Error(`warm-up: ${err.message}`, { cause: err })));
  }

  /** Unregisters and closes the scratch contexts (which wakes any thread still blocked in one). Idempotent. */
  releaseContexts(): void {
    if (this.setup !== undefined) releaseSetup(this.memory, this.setup);
    this.setup = undefined;
  }

  /** Stops the peer, cutting the warm-up's connections (at the end of the run). */
  closePeer(): Promise<void> {
    return this.peer.close();
  }

  /** Unmaps the scratch memory: only once no thread runs on it (the threads have exited). */
  dispose(): void {
    this.memory.dispose();
  }
}
