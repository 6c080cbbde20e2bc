import { execFileSync } from 'node:child_process';
import { arch, cpus, loadavg, platform } from 'node:os';
import { formatBytes } from '@postcopy/shared';
import {
  BENCH_STRATEGIES,
  checkTargets,
  median,
  ratios,
  sig4,
  type BenchFigures,
  type BenchStrategy,
  type RatioName,
  type Ratios,
  type TargetResult,
} from './figures.js';
import { measureFloor, type FloorResult } from './floor.js';
import { PUSH_RUN, RECOVERY_RUNS, TLS_RUNS, URGENT_RUNS, injectAtPages, largeRun, runMigration, strategyRun, type RunFigures, type RunSpec } from './migrations.js';
import type { BenchOptions } from './options.js';
import { BackendsBench, type BackendsResult } from './backends.js';
import { PhasesBench, type PhasesResult } from './phases.js';

export interface FloorSample {
  p50Us: number;
  p99Us: number;
  bulkMiBs: number;
}

/** Everything one bench run found; this is what `--json` writes. */
export interface BenchResult extends BenchFigures {
  bench: 'postcopy';
  date: string;
  machine: { node: string; platform: string; arch: string; cpus: number; cpuModel: string; loadAverage1mAtStart: number };
  /** The source tree measured: `git describe --always --dirty`, or `unknown` outside a checkout. */
  revision: string;
  options: { memory: string; memoryBytes: number; repeat: number; floorRequests: number; floorWarmup: number; bulkMiB: number; largeMemory: string; largeVcpus: number };
  ratios: Ratios;
  targets: Partial<Record<RatioName, TargetResult>>;
  /** How each figure was measured. */
  method: Record<string, string>;
  /** Every repeat's figures, before the medians. */
  samples: { floor: FloorSample[]; runs: Record<string, RunFigures[]> };
  /** Each strategy on each memory backend, and each backend's local floor (backends.ts). */
  backends: BackendsResult;
  /** Precopy, hybrid and postcopy of the same guest (phases.ts). */
  phases: PhasesResult;
}

export const METHOD = {
  floor:
    'a floor server process and this process on 127.0.0.1 (ephemeral port): ws with perMessageDeflate off, binary frames, ' +
    "the tool's msgpackr codec; one request outstanding; timed from request encode to reply decode; HdrHistogram",
  bulk: "the floor server streams 4 KiB pushed frames as fast as ws takes them (bufferedAmount held under the tool's push high-water mark), this process decodes them; timed from its start message to complete",
  strategies: "npm start -- --strategy S --vcpus 1 --no-push --preempt --workload sequential: the fault's reply comes back on the requester's own channel, the floor's shape",
  urgent: 'npm start -- --strategy kvm-exit --vcpus 1 --workload random, with --no-push --preempt (idle), push on, and push on with --preempt',
  push: 'npm start -- --strategy kvm-exit --vcpus 1 --accesses 1 --zero-fraction 0 (push on): the report\'s pushThroughputMiBs (pushed page bytes / run time)',
  phases: 'npm start -- --mode precopy|hybrid|postcopy --strategy kvm-exit --vcpus 1 --accesses 1 --zero-fraction 0 --dirty-rate 1000 (no dirty rate in postcopy): the report\'s totalTimeMs and downtimeMs; precopy\'s round 1 (every page) throughput from precopy.perRound[0].mbps',
  tls: "the kvm-exit strategy run and the push run again with --tls (throwaway EC P-256 certificates, TLS 1.3, the source verifying the destination's certificate too), interleaved with the plain ones; ratios against the plain runs of the same bench",
  recovery:
    'npm start -- --strategy kvm-exit --vcpus 1 --workload random --max-postcopy-bandwidth 400mbit (push on, capped so the fault lands mid-migration) ' +
    '--inject drop@P (the destination cuts all its connections once, reconnects and resumes) or --inject kill-source@P (the launcher SIGKILLs the source and restarts it with --resume), ' +
    "P = a quarter of the guest's 4 KiB pages; each run must end verified with 1 pause and 1 resume. From the report: recovery.pausedMs / recovery.pauses " +
    "(pause to the source's answer to resume; after kill-source this includes the new source's start), recovery.pagesResent, recovery.requestsReplayed, and elapsedMs; no target",
  large: 'npm start -- --memory L --vcpus N (defaults otherwise), once: the report\'s memory.destPeakRssBytes and sourcePeakRssBytes (getrusage maxrss of each host process)',
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

interface Step {
  label: string;
  run: () => Promise<string>;
}

/** Runs every measurement `repeat` times, interleaved (floor, then every migration, then again), and takes medians. */
export async function runBench(options: BenchOptions, progress: Progress = () => {}): Promise<BenchResult> {
  // Other work on the machine skews every figure: note how busy it was.
  const loadAverage1mAtStart = Math.round(loadavg()[0]! * 100) / 100;
  const floorSamples: FloorSample[] = [];
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
  for (const spec of runSpecs) runSamples[spec.key] = [];

  const steps: Step[] = [];
  const backends = new BackendsBench(options.backends, options.memoryBytes);
  if (backends.note) progress(backends.note);
  const phases = new PhasesBench(options.memoryBytes);
  for (let r = 0; r < options.repeat; r++) {
    steps.push(...backends.steps());
    steps.push(...phases.steps());
    steps.push({
      label: 'floor (round trip and bulk)',
      run: async () => {
        const f: FloorResult = await measureFloor({ requests: options.floorRequests, warmup: options.floorWarmup, bulkMiB: options.bulkMiB });
        floorSamples.push({ p50Us: f.roundTripUs.p50, p99Us: f.roundTripUs.p99, bulkMiBs: sig4(f.bulkMiBs) });
        return `p50 ${f.roundTripUs.p50.toFixed(1)} µs, p99 ${f.roundTripUs.p99.toFixed(1)} µs, bulk ${f.bulkMiBs.toFixed(1)} MiB/s`;
      },
    });
    for (const spec of runSpecs) {
      steps.push({
        label: spec.label,
        run: async () => {
          const { figures } = await runMigration(spec, options.memoryBytes);
          runSamples[spec.key]!.push(figures);
          if (figures.recovery) {
            const rec = figures.recovery;
            return `paused ${rec.pausedMs.toFixed(1)} ms at page ${injectAtPages(options.memoryBytes)}, ${rec.pagesResent} pages resent, ${rec.requestsReplayed} requests replayed, run ${figures.elapsedMs.toFixed(0)} ms`;
          }
          return spec === PUSH_RUN || spec === TLS_RUNS.push
            ? `${figures.pushThroughputMiBs} MiB/s`
            : `p50 ${figures.p50Us.toFixed(1)} µs, p99 ${figures.p99Us.toFixed(1)} µs over ${figures.faults} faults`;
        },
      });
    }
  }
  // Once, after the repeats: the large guest for peak RSS.
  let large: BenchFigures['large'] | undefined;
  steps.push({
    label: `large guest (${formatBytes(options.largeMemoryBytes)}, ${options.largeVcpus} vCPUs), peak RSS`,
    run: async () => {
      const { report } = await runMigration(largeRun(options.largeVcpus), options.largeMemoryBytes);
      large = {
        guestBytes: report.guestBytes,
        vcpus: report.vcpus,
        elapsedMs: report.elapsedMs,
        destPeakRssBytes: report.memory.destPeakRssBytes,
        sourcePeakRssBytes: report.memory.sourcePeakRssBytes,
      };
      return `destination ${formatBytes(Math.round(large.destPeakRssBytes / 1048576) * 1048576)}, source ${formatBytes(Math.round(large.sourcePeakRssBytes / 1048576) * 1048576)}`;
    },
  });
  for (const [i, step] of steps.entries()) {
    const prefix = `[${i + 1}/${steps.length}] ${step.label}`;
    progress(`${prefix} ...`);
    const started = performance.now();
    const outcome = await step.run();
    progress(`${prefix}: ${outcome} (${((performance.now() - started) / 1000).toFixed(1)} s)`);
  }

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
  const strategies = {} as Record<BenchStrategy, { p50: number; p99: number }>;
  for (const s of BENCH_STRATEGIES) {
    const key = strategyRun(s).key;
    strategies[s] = { p50: med(key, (f) => f.p50Us), p99: med(key, (f) => f.p99Us) };
  }
  const phasesResult = phases.result();
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
    strategies,
    urgent: {
      pushOff: { p50: med(URGENT_RUNS.pushOff.key, (f) => f.p50Us) },
      pushOn: { p50: med(URGENT_RUNS.pushOn.key, (f) => f.p50Us) },
      pushOnPreempt: { p50: med(URGENT_RUNS.pushOnPreempt.key, (f) => f.p50Us) },
      pushCappedPreempt: { p50: med(URGENT_RUNS.pushCappedPreempt.key, (f) => f.p50Us) },
    },
    pushThroughputMiBs: med(PUSH_RUN.key, (f) => f.pushThroughputMiBs),
    tls: {
      fault: { p50: med(TLS_RUNS.fault.key, (f) => f.p50Us), p99: med(TLS_RUNS.fault.key, (f) => f.p99Us) },
      pushThroughputMiBs: med(TLS_RUNS.push.key, (f) => f.pushThroughputMiBs),
    },
    recovery: { drop: recoveryMedians(RECOVERY_RUNS.drop.key), killSource: recoveryMedians(RECOVERY_RUNS.killSource.key) },
    large: large!,
  };
  const r = ratios(figures);
  const cpuList = cpus();
  return {
    bench: 'postcopy',
    date: new Date().toISOString(),
    machine: { node: process.version, platform: platform(), arch: arch(), cpus: cpuList.length, cpuModel: cpuList[0]?.model.trim() ?? 'unknown', loadAverage1mAtStart },
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
    },
    ...figures,
    ratios: r,
    targets: checkTargets(r),
    method: { ...METHOD },
    samples: { floor: floorSamples, runs: runSamples },
    backends: backends.result(),
    phases: phasesResult,
  };
}
