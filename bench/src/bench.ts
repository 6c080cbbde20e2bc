import { execFileSync } from 'node:child_process';
import { arch, cpus, loadavg, platform } from 'node:os';
import { CPU_GROUPS, formatBytes, type CpuGroup } from '@postcopy/shared';
import { NativeBuildError, NoCompilerError, UffdUnavailableError } from './errors.js';
import { runSteps, type Step } from './steps.js';
import {
  BENCH_STRATEGIES,
  checkTargets,
  median,
  ratioDefs,
  ratios,
  sig4,
  type BenchFigures,
  type BenchStrategy,
  type RateFigures,
  type RatioDef,
  type RatioName,
  type Ratios,
  type TargetResult,
  type ThroughputFigures,
} from './figures.js';
import { measureFloor, type FloorResult } from './floor.js';
import {
  LARGE_IDLE_PUSH_RUN,
  PUSH_RUN,
  RECOVERY_RUNS,
  TLS_RUNS,
  traceRuns,
  URGENT_RUNS,
  injectAtPages,
  largeRun,
  runMigration,
  runMigrationProcess,
  strategyRun,
  throughputMemoryBytes,
  throughputRun,
  type RunFigures,
  type RunSpec,
} from './migrations.js';
import { NATIVE_COUNTERPART, buildNativeFloor, runNativeFloorBinary, type NativeFloorResult } from './native-floor.js';
import type { NetSenderMemory } from './net-ceiling-layout.js';
import { measureNetCeiling, type NetCeilingResult, type NetReceiveMode } from './net-ceiling.js';
import type { BenchOptions } from './options.js';
import { BackendsBench, type BackendsResult } from './backends.js';
import { PhasesBench, type PhasesResult } from './phases.js';
import { DevicesBench, type DevicesResult } from './devices.js';
import { freePageReporting } from './machine.js';

/** The net ceiling's measurements in the order they run: the ceiling itself (onread, sender stream) last, right before the idle push. */
const NET_STEPS: readonly { receive: NetReceiveMode; sender: NetSenderMemory }[] = [
  { receive: 'onread', sender: 'image' },
  { receive: 'data', sender: 'stream' },
  { receive: 'onread', sender: 'stream' },
];

export interface FloorSample {
  p50Us: number;
  p99Us: number;
  bulkMiBs: number;
}

/** Everything one bench run found; this is what `--json` writes. */
export interface BenchResult extends BenchFigures {
  bench: 'postcopy';
  date: string;
  machine: {
    node: string;
    platform: string;
    arch: string;
    cpus: number;
    cpuModel: string;
    loadAverage1mAtStart: number;
    /** A VM whose freed memory goes back to its host (machine.ts): first touches then cost a host fault too. null: cannot tell. */
    freePageReporting: boolean | null;
  };
  /** The source tree measured: `git describe --always --dirty`, or `unknown` outside a checkout. */
  revision: string;
  options: {
    memory: string;
    memoryBytes: number;
    repeat: number;
    floorRequests: number;
    floorWarmup: number;
    bulkMiB: number;
    largeMemory: string;
    largeVcpus: number;
    throughputVcpus: number[];
    mibPerVcpu: number;
    netMiB: number;
    pushMemory: string;
  };
  /** Every ratio computed, in print order, with its meaning and target. */
  ratioDefs: RatioDef[];
  ratios: Ratios;
  targets: Record<RatioName, TargetResult>;
  /** How each figure was measured. */
  method: Record<string, string>;
  /** Every repeat's figures, before the medians. */
  samples: {
    floor: FloorSample[];
    netCeiling: NetCeilingResult[];
    native: NativeFloorResult[];
    runs: Record<string, RunFigures[]>;
    large: (RunFigures & { wallMs: number; destPeakRssBytes: number; sourcePeakRssBytes: number })[];
  };
  /** Each strategy on each memory backend, and each backend's local floor (backends.ts). */
  backends: BackendsResult;
  /** Precopy, hybrid and postcopy of the same guest (phases.ts). */
  phases: PhasesResult;
  /** The same guest and device under each DMA tracking and untracked-DMA policy (devices.ts); absent with --device-section off. */
  devices?: DevicesResult;
}

export const METHOD = {
  floor:
    'a floor server process and this process on 127.0.0.1 (ephemeral port): ws with perMessageDeflate off, binary frames, ' +
    "the tool's msgpackr codec; one request outstanding; timed from request encode to reply decode; HdrHistogram",
  bulk: "the floor server streams 4 KiB pushed frames as fast as ws takes them (bufferedAmount held under the tool's push high-water mark), this process decodes them; timed from its start message to complete",
  strategies: "npm start -- --strategy S --vcpus 1 --no-push --preempt --workload sequential: the fault's reply comes back on the requester's own channel, the floor's shape",
  cpu:
    "the report's cpu.perFaultUs (CPU time over the run / its faults) of each process (process.cpuUsage) and thread group of the destination " +
    '(each thread its own /proc/thread-self/schedstat; other = the rest of the destination process: GC, compiler and libuv threads): medians over the repeats',
  urgent: 'npm start -- --strategy kvm-exit --vcpus 1 --workload random, with --no-push --preempt (idle), push on, and push on with --preempt',
  push: "npm start -- --strategy kvm-exit --vcpus 1 --accesses 1 --zero-fraction 0 --memory P (push on; P = --push-memory): the report's pushThroughputMiBs (pushed page bytes / run time)",
  netCeiling:
    "the net ceiling (net-ceiling.ts): a sender process streams the floor's image over one net connection on 127.0.0.1, this process copies every read into a fresh SharedArrayBuffer " +
    "(the stream's size, at most 1 GiB), timed from connect to the last byte, content checked. The sender sends from memory of that size it filled first, as a source host holds the guest " +
    "(sender stream). onread (net.connect's onread: reads into one reused buffer) from it is the ceiling, the most Node's sockets carry with the one copy into guest memory the destination must make; " +
    "'data' events (a new buffer a read, how ws reads) and onread from the 16 MiB image alone (sender image: only the receiver touches fresh memory) are figures",
  throughput:
    'npm start -- --strategy S --vcpus N --memory (N x M)MiB --no-push --workload sequential (no --preempt, as a new user runs it): the report\'s demandPagingRate.overall; ' +
    "against the native floor (bench/native/fault-floor.c, built with the machine's compiler: the real userfaultfd, loopback TCP, N vCPU threads each reading " +
    'its own M MiB partition in order) in the counterpart mode of each strategy (shared-uffd: shared, per-thread-uffd: per-region, kvm-exit: exit), each tool run followed by its native run',
  phases: 'npm start -- --mode precopy|hybrid|postcopy --strategy kvm-exit --vcpus 1 --accesses 1 --zero-fraction 0 --dirty-rate 1000 (no dirty rate in postcopy): the report\'s totalTimeMs and downtimeMs; precopy\'s round 1 (every page) throughput from precopy.perRound[0].mbps',
  devices:
    "npm start -- --mode precopy --strategy kvm-exit --vcpus 1 --accesses 1 --zero-fraction 0 --dirty-rate 1000 --downtime-limit 1000 --device bench0:tracking=T,dma-rate=2000,state=8MiB,pre-copy,dma-range=(the guest's first eighth), T = device, iommu, or none with --untracked-dma all-dirty or skip-precopy: the report's totalTimeMs, downtimeMs, downtimeSplit, and dirtyTracking.perProvider of the device's provider (bitmap bytes and pages per sync, ms per sync); no target",
  trace:
    "the kvm-exit strategy run, the push run and the shared-uffd demand paging rate run at the first --throughput-vcpus again with --trace FILE (each right after its twin), the file removed with the run: the cost of recording the timeline; ratios against the runs without it",
  tls: "the kvm-exit strategy run and the push run again with --tls (throwaway EC P-256 certificates, TLS 1.3, the source verifying the destination's certificate too), interleaved with the plain ones; ratios against the plain runs of the same bench",
  recovery:
    'npm start -- --strategy kvm-exit --vcpus 1 --workload random --max-postcopy-bandwidth 400mbit (push on, capped so the fault lands mid-migration) ' +
    '--inject drop@P (the destination cuts all its connections once, reconnects and resumes) or --inject kill-source@P (the launcher SIGKILLs the source and restarts it with --resume), ' +
    "P = a quarter of the guest's 4 KiB pages; each run must end verified with 1 pause and 1 resume. From the report: recovery.pausedMs / recovery.pauses " +
    "(pause to the source's answer to resume; after kill-source this includes the new source's start), recovery.pagesResent, recovery.requestsReplayed, and elapsedMs; no target",
  large:
    "node e2e/dist/cli.js --memory L --vcpus N (npm start without the build; defaults otherwise, push on), once a repeat: the report's memory.destPeakRssBytes and sourcePeakRssBytes " +
    "(getrusage maxrss of each host process), pushThroughputMiBs and elapsedMs, and the launcher process's time from spawn to exit (wallMs)",
  repeats: 'each figure is the median over the repeats (runs interleaved); ratios are ratios of the medians',
} as const;

export type Progress = (line: string) => void;

function revision(): string {
  try {
    return execFileSync('git', ['describe', '--always', '--dirty'], { cwd: new URL('.', import.meta.url), encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return 'unknown';
  }
}

/** Why the native floor cannot run here (no compiler, a failed build), or its binary. */
async function nativeBinary(): Promise<{ path: string } | { unavailable: string }> {
  try {
    return { path: (await buildNativeFloor()).path };
  } catch (err) {
    if (err instanceof NoCompilerError || err instanceof NativeBuildError) return { unavailable: err.message };
    throw err;
  }
}

/**
 * Runs every measurement `repeat` times, interleaved (floor, every
 * migration with the net ceiling right before the idle push, each
 * throughput run beside its native counterpart, the large guest; then
 * again), and takes medians.
 */
export async function runBench(options: BenchOptions, progress: Progress = () => {}): Promise<BenchResult> {
  // Other work on the machine skews every figure: note how busy it was.
  const loadAverage1mAtStart = Math.round(loadavg()[0]! * 100) / 100;
  const floorSamples: FloorSample[] = [];
  const netSamples: NetCeilingResult[] = [];
  const nativeSamples: NativeFloorResult[] = [];
  const largeSamples: BenchResult['samples']['large'] = [];
  const runSamples: Record<string, RunFigures[]> = {};
  const runSpecs: RunSpec[] = [
    ...BENCH_STRATEGIES.map(strategyRun),
    TLS_RUNS.fault,
    URGENT_RUNS.pushOff,
    URGENT_RUNS.pushOn,
    URGENT_RUNS.pushOnPreempt,
    URGENT_RUNS.pushCappedPreempt,
    PUSH_RUN,
    TLS_RUNS.push,
    RECOVERY_RUNS.drop,
    RECOVERY_RUNS.killSource,
  ];
  // --trace's cost: the same runs with it on, each right after its twin without it.
  const TRACE_RUNS = traceRuns(options.throughputVcpus[0]!, options.mibPerVcpu);
  runSpecs.splice(runSpecs.findIndex((spec) => spec.key === strategyRun('kvm-exit').key) + 1, 0, TRACE_RUNS.fault);
  runSpecs.splice(runSpecs.indexOf(PUSH_RUN) + 1, 0, TRACE_RUNS.push);
  const isPush = (spec: RunSpec): boolean => spec === PUSH_RUN || spec === TLS_RUNS.push || spec === TRACE_RUNS.push;
  const memoryOf = (spec: RunSpec): number => (isPush(spec) ? options.pushMemoryBytes : options.memoryBytes);
  for (const spec of runSpecs) runSamples[spec.key] = [];
  const throughputSpecs = options.throughputVcpus.flatMap((v) =>
    BENCH_STRATEGIES.map((s) => ({ strategy: s, vcpus: v, spec: throughputRun(s, v, options.mibPerVcpu), defaults: throughputRun(s, v, options.mibPerVcpu, 'defaults') })),
  );
  for (const t of throughputSpecs) {
    runSamples[t.spec.key] = [];
    runSamples[t.defaults.key] = [];
  }
  runSamples[TRACE_RUNS.rate.key] = [];
  runSamples[LARGE_IDLE_PUSH_RUN.key] = [];

  const native = await nativeBinary();
  let nativeUnavailable = 'unavailable' in native ? native.unavailable : undefined;
  if (nativeUnavailable) progress(`native floor unavailable, its ratios are skipped: ${nativeUnavailable}`);

  const steps: Step[] = [];
  const backends = new BackendsBench(options.backends, options.memoryBytes, options.warmUp);
  if (backends.note) progress(backends.note);
  const phases = new PhasesBench(options.memoryBytes, options.warmUp);
  const devices = options.deviceSection ? new DevicesBench(options.memoryBytes, options.warmUp) : undefined;
  for (let r = 0; r < options.repeat; r++) {
    steps.push(...backends.steps());
    steps.push(...phases.steps());
    if (devices) steps.push(...devices.steps());
    steps.push({
      label: 'floor (round trip and bulk)',
      run: async () => {
        const f: FloorResult = await measureFloor({ requests: options.floorRequests, warmup: options.floorWarmup, bulkMiB: options.bulkMiB });
        floorSamples.push({ p50Us: f.roundTripUs.p50, p99Us: f.roundTripUs.p99, bulkMiBs: sig4(f.bulkMiBs) });
        return `p50 ${f.roundTripUs.p50.toFixed(1)} µs, p99 ${f.roundTripUs.p99.toFixed(1)} µs, bulk ${f.bulkMiBs.toFixed(1)} MiB/s`;
      },
    });
    // The net ceiling goes right before the idle push it is held to, the
    // figures before it: on this VM a first touch costs more the longer ago
    // memory was freed (free page reporting), so the two are measured in the
    // same state of the machine.
    const netSteps: Step[] = [];
    for (const { receive, sender } of NET_STEPS) {
      netSteps.push({
        label: `net ceiling (${receive}, sender ${sender}, ${options.netMiB} MiB)`,
        run: async () => {
          const n = await measureNetCeiling({ mib: options.netMiB, receive, sender });
          netSamples.push(n);
          return `${n.mibPerSec} MiB/s`;
        },
      });
    }
    for (const spec of runSpecs) {
      if (spec === PUSH_RUN) steps.push(...netSteps);
      steps.push({
        label: spec.label,
        run: async () => {
          const { figures } = await runMigration(spec, memoryOf(spec), options.warmUp);
          runSamples[spec.key]!.push(figures);
          if (figures.recovery) {
            const rec = figures.recovery;
            return `paused ${rec.pausedMs.toFixed(1)} ms at page ${injectAtPages(options.memoryBytes)}, ${rec.pagesResent} pages resent, ${rec.requestsReplayed} requests replayed, run ${figures.elapsedMs.toFixed(0)} ms`;
          }
          return isPush(spec)
            ? `${figures.pushThroughputMiBs} MiB/s`
            : `p50 ${figures.p50Us.toFixed(1)} µs, p99 ${figures.p99Us.toFixed(1)} µs over ${figures.faults} faults`;
        },
      });
    }
    for (const t of throughputSpecs) {
      // The --trace twin of a rate run goes right after it (the same options but --trace), before its no-preempt sibling.
      const twin = t.strategy === 'shared-uffd' && t.vcpus === options.throughputVcpus[0] ? TRACE_RUNS.rate : undefined;
      for (const spec of [t.spec, ...(twin ? [twin] : []), t.defaults]) {
        steps.push({
          label: spec.label,
          run: async () => {
            const { figures } = await runMigration(spec, throughputMemoryBytes(t.vcpus, options.mibPerVcpu), options.warmUp);
            runSamples[spec.key]!.push(figures);
            if (spec === twin) return `${(figures.pagesPerSec / 1000).toFixed(1)} k pages/s, p50 ${figures.p50Us.toFixed(1)} µs`;
            const c = figures.cpuPerFaultUs;
            return `${(figures.pagesPerSec / 1000).toFixed(1)} k pages/s, p50 ${figures.p50Us.toFixed(1)} µs, CPU per fault: source ${c.source ?? 'n/a'} µs, destination ${c.dest ?? 'n/a'} µs`;
          },
        });
      }
      steps.push({
        label: `native floor, ${NATIVE_COUNTERPART[t.strategy]} (${t.vcpus} vCPUs x ${options.mibPerVcpu} MiB)`,
        run: async () => {
          if (nativeUnavailable !== undefined || 'unavailable' in native) return 'skipped (unavailable)';
          try {
            const n = await runNativeFloorBinary(native.path, { mode: NATIVE_COUNTERPART[t.strategy], vcpus: t.vcpus, mibPerVcpu: options.mibPerVcpu });
            nativeSamples.push(n);
            return `${(n.pagesPerSec / 1000).toFixed(1)} k pages/s, p50 ${n.latencyUs.p50.toFixed(1)} µs`;
          } catch (err) {
            if (!(err instanceof UffdUnavailableError)) throw err;
            nativeUnavailable = err.message;
            return `unavailable, its ratios are skipped: ${err.message}`;
          }
        },
      });
    }
    steps.push({
      label: `${LARGE_IDLE_PUSH_RUN.label} (${formatBytes(options.largeMemoryBytes)}, 1 vCPU)`,
      run: async () => {
        const { figures } = await runMigration(LARGE_IDLE_PUSH_RUN, options.largeMemoryBytes, options.warmUp);
        runSamples[LARGE_IDLE_PUSH_RUN.key]!.push(figures);
        return `${figures.pushThroughputMiBs} MiB/s`;
      },
    });
    steps.push({
      label: `large guest (${formatBytes(options.largeMemoryBytes)}, ${options.largeVcpus} vCPUs): push, time, peak RSS`,
      run: async () => {
        const { report, figures, wallMs } = await runMigrationProcess(largeRun(options.largeVcpus), options.largeMemoryBytes, options.warmUp);
        const sample = { ...figures, wallMs, destPeakRssBytes: report.memory.destPeakRssBytes, sourcePeakRssBytes: report.memory.sourcePeakRssBytes };
        largeSamples.push(sample);
        const mib = (b: number): string => formatBytes(Math.round(b / 1048576) * 1048576);
        return (
          `push ${figures.pushThroughputMiBs} MiB/s, elapsed ${(figures.elapsedMs / 1000).toFixed(1)} s, whole process ${(wallMs / 1000).toFixed(1)} s; ` +
          `peak RSS destination ${mib(sample.destPeakRssBytes)}, source ${mib(sample.sourcePeakRssBytes)}`
        );
      },
    });
  }
  await runSteps(steps, progress);

  // Medians in µs to the ns, as the reports give them (an even count averages two).
  const round3 = (x: number): number => Math.round(x * 1000) / 1000;
  const med = (key: string, pick: (f: RunFigures) => number): number => round3(median(runSamples[key]!.map(pick)));
  // runMigration gives every recovery run its recovery figures (or throws).
  const recoveryMedians = (key: string): BenchFigures['recovery']['drop'] => ({
    pausedMs: med(key, (f) => f.recovery!.pausedMs),
    elapsedMs: med(key, (f) => f.elapsedMs),
    pagesResent: med(key, (f) => f.recovery!.pagesResent),
    requestsReplayed: med(key, (f) => f.recovery!.requestsReplayed),
  });
  /** Medians of each CPU group's µs per fault (null if any repeat could not tell). */
  const cpuMed = (key: string): Record<CpuGroup, number | null> => {
    const out = {} as Record<CpuGroup, number | null>;
    for (const g of CPU_GROUPS) {
      const xs = runSamples[key]!.map((f) => f.cpuPerFaultUs[g]);
      out[g] = xs.some((x) => x === null) ? null : round3(median(xs as number[]));
    }
    return out;
  };
  const strategies = {} as BenchFigures['strategies'];
  for (const s of BENCH_STRATEGIES) {
    const key = strategyRun(s).key;
    strategies[s] = { p50: med(key, (f) => f.p50Us), p99: med(key, (f) => f.p99Us), cpuPerFaultUs: cpuMed(key) };
  }
  const phasesResult = phases.result();
  const toolRates = {} as ThroughputFigures['tool'];
  const toolDefaults = {} as ThroughputFigures['toolDefaults'];
  const nativeRates = {} as Record<BenchStrategy, Record<string, RateFigures>>;
  const rateOf = (key: string): RateFigures => ({ pagesPerSec: round3(med(key, (f) => f.pagesPerSec)), p50Us: med(key, (f) => f.p50Us), cpuPerFaultUs: cpuMed(key) });
  for (const s of BENCH_STRATEGIES) {
    toolRates[s] = {};
    toolDefaults[s] = {};
    nativeRates[s] = {};
    for (const v of options.throughputVcpus) {
      toolRates[s][String(v)] = rateOf(throughputRun(s, v, options.mibPerVcpu).key);
      toolDefaults[s][String(v)] = rateOf(throughputRun(s, v, options.mibPerVcpu, 'defaults').key);
      const mine = nativeSamples.filter((n) => n.mode === NATIVE_COUNTERPART[s] && n.vcpus === v);
      if (mine.length > 0) {
        const rates = mine.map((n) => n.pagesPerSec);
        nativeRates[s][String(v)] = {
          pagesPerSec: round3(median(rates)),
          p50Us: round3(median(mine.map((n) => n.latencyUs.p50))),
          ...(mine.length > 1 ? { pagesPerSecRange: [round3(Math.min(...rates)), round3(Math.max(...rates))] as [number, number] } : {}),
        };
      }
    }
  }
  const netMedian = (receive: NetReceiveMode, sender: NetSenderMemory): number =>
    sig4(median(netSamples.filter((n) => n.receive === receive && n.sender === sender).map((n) => n.mibPerSec)));
  const largeMed = (pick: (l: BenchResult['samples']['large'][number]) => number): number => round3(median(largeSamples.map(pick)));
  const figures: BenchFigures = {
    precopy: {
      roundMiBs: phasesResult.modes.precopy.round1MiBs,
      downtimeMs: phasesResult.modes.precopy.downtimeMs,
      downtimeLimitMs: phasesResult.modes.precopy.downtimeLimitMs,
    },
    floor: {
      roundTripUs: { p50: round3(median(floorSamples.map((f) => f.p50Us))), p99: round3(median(floorSamples.map((f) => f.p99Us))) },
      bulkMiBs: sig4(median(floorSamples.map((f) => f.bulkMiBs))),
    },
    netCeiling: { mib: options.netMiB, onreadMiBs: netMedian('onread', 'stream'), dataMiBs: netMedian('data', 'stream'), onreadImageMiBs: netMedian('onread', 'image') },
    strategies,
    throughput: {
      vcpus: options.throughputVcpus,
      mibPerVcpu: options.mibPerVcpu,
      tool: toolRates,
      toolDefaults,
      native: nativeUnavailable !== undefined ? { unavailable: nativeUnavailable } : nativeRates,
    },
    urgent: {
      pushOff: { p50: med(URGENT_RUNS.pushOff.key, (f) => f.p50Us) },
      pushOn: { p50: med(URGENT_RUNS.pushOn.key, (f) => f.p50Us) },
      pushOnPreempt: { p50: med(URGENT_RUNS.pushOnPreempt.key, (f) => f.p50Us) },
      pushCappedPreempt: { p50: med(URGENT_RUNS.pushCappedPreempt.key, (f) => f.p50Us) },
    },
    pushThroughputMiBs: med(PUSH_RUN.key, (f) => f.pushThroughputMiBs),
    pushGuestBytes: options.pushMemoryBytes,
    tls: {
      fault: { p50: med(TLS_RUNS.fault.key, (f) => f.p50Us), p99: med(TLS_RUNS.fault.key, (f) => f.p99Us) },
      pushThroughputMiBs: med(TLS_RUNS.push.key, (f) => f.pushThroughputMiBs),
    },
    trace: {
      fault: { p50: med(TRACE_RUNS.fault.key, (f) => f.p50Us), p99: med(TRACE_RUNS.fault.key, (f) => f.p99Us) },
      pushThroughputMiBs: med(TRACE_RUNS.push.key, (f) => f.pushThroughputMiBs),
      rate: { vcpus: options.throughputVcpus[0]!, pagesPerSec: med(TRACE_RUNS.rate.key, (f) => f.pagesPerSec) },
    },
    recovery: { drop: recoveryMedians(RECOVERY_RUNS.drop.key), killSource: recoveryMedians(RECOVERY_RUNS.killSource.key) },
    large: {
      guestBytes: options.largeMemoryBytes,
      vcpus: options.largeVcpus,
      elapsedMs: largeMed((l) => l.elapsedMs),
      wallMs: largeMed((l) => l.wallMs),
      pushThroughputMiBs: largeMed((l) => l.pushThroughputMiBs),
      idlePushThroughputMiBs: med(LARGE_IDLE_PUSH_RUN.key, (f) => f.pushThroughputMiBs),
      destPeakRssBytes: largeMed((l) => l.destPeakRssBytes),
      sourcePeakRssBytes: largeMed((l) => l.sourcePeakRssBytes),
    },
  };
  const defs = ratioDefs(options.throughputVcpus, options.largeVcpus);
  const r = ratios(figures);
  const cpuList = cpus();
  return {
    bench: 'postcopy',
    date: new Date().toISOString(),
    machine: { node: process.version, platform: platform(), arch: arch(), cpus: cpuList.length, cpuModel: cpuList[0]?.model.trim() ?? 'unknown', loadAverage1mAtStart, freePageReporting: freePageReporting() },
    revision: revision(),
    options: {
      memory: formatBytes(options.memoryBytes),
      memoryBytes: options.memoryBytes,
      repeat: options.repeat,
      floorRequests: options.floorRequests,
      floorWarmup: options.floorWarmup,
      bulkMiB: options.bulkMiB,
      largeMemory: formatBytes(options.largeMemoryBytes),
      largeVcpus: options.largeVcpus,
      throughputVcpus: options.throughputVcpus,
      mibPerVcpu: options.mibPerVcpu,
      netMiB: options.netMiB,
      pushMemory: formatBytes(options.pushMemoryBytes),
    },
    ...figures,
    ratioDefs: defs,
    ratios: r,
    targets: checkTargets(r, defs),
    method: { ...METHOD },
    samples: { floor: floorSamples, netCeiling: netSamples, native: nativeSamples, runs: runSamples, large: largeSamples },
    backends: backends.result(),
    phases: phasesResult,
    ...(devices ? { devices: devices.result() } : {}),
  };
}
