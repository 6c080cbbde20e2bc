import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { formatBytes, type CpuGroup, type Report } from '@postcopy/shared';
import { exitCode, launch, launcherCommand, splitArgs } from '@postcopy/e2e';

/** The built launcher behind `npm start` (e2e/dist/cli.js), for runs timed as a whole process. */
export const LAUNCHER_CLI = fileURLToPath(new URL('./cli.js', import.meta.resolve('@postcopy/e2e')));

/** One migration configuration the bench runs (its options, as `npm start` takes them). */
export interface RunSpec {
  /** Stable key, e.g. `strategy:kvm-exit`. */
  key: string;
  /** What it measures, for progress lines. */
  label: string;
  /** `npm start` options, without `--memory`, `--inject` and `--json` (the bench adds them). */
  args: string[];
  /**
   * Recovery runs: the fault to inject (`--inject KIND@P`), at P = a quarter of
   * the guest's pages. P depends on the guest size, so the bench adds it
   * (see {@link runArgs}) rather than the static `args`.
   */
  inject?: 'drop' | 'kill-source';
  /** `--trace` to a file of the run's own (removed with it): what recording the timeline costs. */
  trace?: boolean;
}

/** The recovery figures the bench takes from a recovery run's report (see {@link RECOVERY_RUNS}). */
export interface RecoveryRunFigures {
  pauses: number;
  resumes: number;
  /** Time paused per pause, ms: from the pause to the source answering resume (the report's pausedMs / pauses). */
  pausedMs: number;
  pagesResent: number;
  requestsReplayed: number;
}

/** The figures the bench takes from one run's report. */
export interface RunFigures {
  p50Us: number;
  p99Us: number;
  faults: number;
  /** The report's demand paging rate (pages/s, demand_paging_test's). */
  pagesPerSec: number;
  pushThroughputMiBs: number;
  elapsedMs: number;
  /** The report's CPU µs per fault of each process and thread group (null: unknown here). */
  cpuPerFaultUs: Record<CpuGroup, number | null>;
  /** Recovery runs only. */
  recovery?: RecoveryRunFigures;
}

/**
 * Demand paging rate with many vCPUs (issue 9): `npm start -- --strategy S
 * --vcpus N --memory (N x M)MiB --no-push --workload sequential --preempt`.
 * Each vCPU touches its own M MiB partition once, in order, like the native
 * floor. `--preempt` brings each requested page back on the channel that
 * asked for it, as in the floor, where every handler reads its page from its
 * own connection. Without it (`defaults`, as a new user first runs it, and
 * printed beside) the page comes on the main channel, as in QEMU without
 * postcopy-preempt: one more thread, and one more message, on every fault.
 */
export function throughputRun(strategy: string, vcpus: number, mibPerVcpu: number, config: 'preempt' | 'defaults' = 'preempt'): RunSpec {
  const preempt = config === 'preempt';
  return {
    key: `${preempt ? 'throughput' : 'throughput-defaults'}:${strategy}:${vcpus}`,
    label: `${strategy} demand paging rate (${vcpus} vCPUs x ${mibPerVcpu} MiB, push off${preempt ? ', preempt' : ', no preempt'})`,
    args: ['--strategy', strategy, '--vcpus', String(vcpus), '--no-push', '--workload', 'sequential', ...(preempt ? ['--preempt'] : [])],
  };
}

/** The guest of a throughput run: `mibPerVcpu` MiB for each vCPU. */
export function throughputMemoryBytes(vcpus: number, mibPerVcpu: number): number {
  return vcpus * mibPerVcpu * 1024 * 1024;
}

/** Fault latency per strategy: 1 vCPU, idle link, push off, requested pages on the fault's own channel (`--preempt`). */
export function strategyRun(strategy: string): RunSpec {
  return {
    key: `strategy:${strategy}`,
    label: `${strategy} fault latency (1 vCPU, push off, preempt)`,
    args: ['--strategy', strategy, '--vcpus', '1', '--no-push', '--preempt', '--workload', 'sequential'],
  };
}

/**
 * Urgent fault latency with kvm-exit and 1 vCPU. The random workload faults on
 * pages far from the push cursor, so under push the faults are real requests
 * racing pushed pages (with sequential, the vCPU mostly waits for the push
 * itself). The idle run keeps `--preempt` so that push is the only difference.
 */
export const URGENT_RUNS = {
  pushOff: { key: 'urgent:push-off', label: 'urgent fault latency, push off', args: ['--strategy', 'kvm-exit', '--vcpus', '1', '--workload', 'random', '--no-push', '--preempt'] },
  pushOn: { key: 'urgent:push-on', label: 'urgent fault latency, push on', args: ['--strategy', 'kvm-exit', '--vcpus', '1', '--workload', 'random'] },
  pushOnPreempt: {
    key: 'urgent:push-on-preempt',
    label: 'urgent fault latency, push on + preempt',
    args: ['--strategy', 'kvm-exit', '--vcpus', '1', '--workload', 'random', '--preempt'],
  },
  /** For comparison, not a target: the same with the push capped (QEMU's max-postcopy-bandwidth), leaving CPU for the urgent path. */
  pushCappedPreempt: {
    key: 'urgent:push-capped-preempt',
    label: 'urgent fault latency, push capped at 400mbit + preempt',
    args: ['--strategy', 'kvm-exit', '--vcpus', '1', '--workload', 'random', '--preempt', '--max-postcopy-bandwidth', '400mbit'],
  },
} as const satisfies Record<string, RunSpec>;

/**
 * Push throughput: push on, one vCPU that touches one page, so the run is the
 * push. No zero pages, so every pushed page carries 4 KiB, like the floor's bulk stream.
 */
export const PUSH_RUN: RunSpec = {
  key: 'push',
  label: 'push throughput',
  args: ['--strategy', 'kvm-exit', '--vcpus', '1', '--accesses', '1', '--zero-fraction', '0'],
};

/**
 * The idle push again at the large guest's size (a figure, no target): what
 * the guest's size alone does to the push, with no vCPU faulting, to set the
 * large guest's push beside. On a VM whose host backs guest memory lazily
 * the first touch of gigabytes costs far more than of one.
 */
export const LARGE_IDLE_PUSH_RUN: RunSpec = { key: 'push:large', label: 'idle push of the large guest', args: PUSH_RUN.args };

/**
 * Postcopy recovery, no target (the issue sets none): kvm-exit, 1 vCPU, random
 * workload, push on but capped at 400mbit so the migration is still under way
 * when the fault hits at a quarter of the guest's pages installed. `drop`: the
 * destination cuts all its connections once and recovers (pause, reconnect,
 * resume); `kill-source`: the launcher SIGKILLs the source and restarts it
 * with `--resume`.
 */
export const RECOVERY_RUNS = {
  drop: {
    key: 'recovery:drop',
    label: 'recovery from a dropped connection',
    args: ['--strategy', 'kvm-exit', '--vcpus', '1', '--workload', 'random', '--max-postcopy-bandwidth', '400mbit'],
    inject: 'drop',
  },
  killSource: {
    key: 'recovery:kill-source',
    label: 'recovery from a killed source',
    args: ['--strategy', 'kvm-exit', '--vcpus', '1', '--workload', 'random', '--max-postcopy-bandwidth', '400mbit'],
    inject: 'kill-source',
  },
} as const satisfies Record<string, RunSpec>;

/** The page size of every bench run: the bench never passes `--page-size`, so the tool's default, 4 KiB. */
export const BENCH_PAGE_BYTES = 4096;

/** Where a recovery run injects its fault: after a quarter of the guest's pages are installed. */
export function injectAtPages(memoryBytes: number): number {
  return Math.floor(memoryBytes / BENCH_PAGE_BYTES / 4);
}

/**
 * The warm-ups the bench's runs ask for: `pages` the destination's
 * (--warm-up-pages), `requests` the source's (--warm-up-requests); each
 * absent is the tool's default, what a user's run gets.
 */
export interface RunWarmUp {
  pages?: number;
  requests?: number;
}

/** A run's full `npm start` options, without `--json`: its args, `--inject` for a recovery run, `--memory`, and the warm-ups asked for. */
export function runArgs(spec: RunSpec, memoryBytes: number, warmUp: RunWarmUp = {}): string[] {
  const inject = spec.inject === undefined ? [] : ['--inject', `${spec.inject}@${injectAtPages(memoryBytes)}`];
  return [
    ...spec.args,
    ...inject,
    '--memory',
    formatBytes(memoryBytes),
    ...(warmUp.pages !== undefined ? ['--warm-up-pages', String(warmUp.pages)] : []),
    ...(warmUp.requests !== undefined ? ['--warm-up-requests', String(warmUp.requests)] : []),
  ];
}

/**
 * The same fault and push runs over TLS (`--tls`: throwaway certificates, the
 * source verifying the destination's too), to set against the plain ones of
 * the same bench run: kvm-exit's fault latency (the strategy nearest the floor,
 * so TLS's share shows most) and the push throughput.
 */
export const TLS_RUNS = {
  fault: { key: 'tls:fault', label: 'kvm-exit fault latency over TLS (1 vCPU, push off, preempt)', args: [...strategyRun('kvm-exit').args, '--tls'] },
  push: { key: 'tls:push', label: 'push throughput over TLS', args: [...PUSH_RUN.args, '--tls'] },
} as const satisfies Record<string, RunSpec>;

/**
 * The same fault and push runs, and one demand paging rate run, with
 * `--trace` (issue 9: the timeline must move the run's figures by at most a
 * few percent), to set against the runs without it of the same bench.
 */
export function traceRuns(throughputVcpus: number, mibPerVcpu: number): { fault: RunSpec; push: RunSpec; rate: RunSpec } {
  const rate = throughputRun('shared-uffd', throughputVcpus, mibPerVcpu);
  return {
    fault: { key: 'trace:fault', label: 'kvm-exit fault latency with --trace (1 vCPU, push off, preempt)', args: strategyRun('kvm-exit').args, trace: true },
    push: { key: 'trace:push', label: 'push throughput with --trace', args: PUSH_RUN.args, trace: true },
    rate: { key: 'trace:rate', label: `${rate.label} with --trace`, args: rate.args, trace: true },
  };
}

/**
 * The large guest (issue 4's memory target, issue 9's push with many faulting
 * vCPUs and time targets): defaults otherwise, so it is the tool as a user runs it.
 */
export function largeRun(vcpus: number): RunSpec {
  return { key: 'large', label: `large guest (${vcpus} vCPUs): push, time and peak RSS`, args: ['--vcpus', String(vcpus)] };
}

/** The full `npm start` command line of a run, to reproduce it by hand. */
export function commandLine(spec: RunSpec, memoryBytes: number, warmUp: RunWarmUp = {}): string {
  return npmStart(runArgs(spec, memoryBytes, warmUp));
}

function npmStart(args: readonly string[]): string {
  return `npm start -- ${args.join(' ')}`;
}

/**
 * Runs one real two-process migration through the launcher behind `npm start`
 * and returns its report. A run that fails (a check, a crash, the watchdog) is
 * an error of the bench.
 */
export async function runMigration(spec: RunSpec, memoryBytes: number, warmUp: RunWarmUp = {}): Promise<{ report: Report; figures: RunFigures }> {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-bench-'));
  const json = join(dir, 'report.json');
  const args = runArgs(spec, memoryBytes, warmUp);
  try {
    const cmd = launcherCommand().exitOverride();
    cmd.parse([...args, '--json', json, ...(spec.trace ? ['--trace', join(dir, 'run.trace.json')] : [])], { from: 'user' });
    const { sourceArgs, destArgs, killSourceAt, tls, host } = splitArgs(cmd.opts());
    // Piped: the destination's printed report is not wanted (the JSON is), its stderr's end comes back on failure.
    const result = await launch({ sourceArgs, destArgs, killSourceAt, tls, host, destStdio: 'pipe' });
    if (result.code !== 0) {
      throw new Error(
        `${spec.label}: the migration exited with code ${result.code} (destination ${result.destCode}, source ${result.sourceCode}); ` +
          `reproduce with: ${npmStart(args)}${result.stderrTail ? `\n${result.stderrTail}` : ''}`,
      );
    }
    return checkedFigures(spec, memoryBytes, npmStart(args), JSON.parse(readFileSync(json, 'utf8')) as Report, result.sourceKills);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The same as {@link runMigration}, but as `npm start` runs it, without the
 * build: the launcher as a process of its own (`node e2e/dist/cli.js ARGS`),
 * timed from its spawn to its exit (`wallMs`: the source's image, both hosts'
 * start, the migration, the digests and teardown).
 */
export async function runMigrationProcess(spec: RunSpec, memoryBytes: number, warmUp: RunWarmUp = {}): Promise<{ report: Report; figures: RunFigures; wallMs: number }> {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-bench-'));
  const json = join(dir, 'report.json');
  const args = runArgs(spec, memoryBytes, warmUp);
  try {
    const started = performance.now();
    const child = spawn(process.execPath, [LAUNCHER_CLI, ...args, '--json', json], { stdio: ['ignore', 'ignore', 'pipe'] });
    let tail = '';
    child.stderr!.on('data', (d: Buffer) => (tail = (tail + d.toString()).slice(-4000)));
    const code = await exitCode(child);
    const wallMs = performance.now() - started;
    if (code !== 0) {
      throw new Error(`${spec.label}: the migration exited with code ${code}; reproduce with: ${npmStart(args)}${tail.trim() ? `\n${tail.trim()}` : ''}`);
    }
    const checked = checkedFigures(spec, memoryBytes, npmStart(args), JSON.parse(readFileSync(json, 'utf8')) as Report, 0);
    return { ...checked, wallMs };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** A run's figures from its report, once its checks (and a recovery run's one pause) hold; `reproduce`: its command line, for the errors. */
function checkedFigures(spec: RunSpec, memoryBytes: number, reproduce: string, report: Report, sourceKills: number): { report: Report; figures: RunFigures } {
  if (!report.verified) {
    const failed = report.checks.filter((c) => !c.ok).map((c) => c.name);
    throw new Error(`${spec.label}: the run's checks failed (${failed.join(', ')}); reproduce with: ${reproduce}`);
  }
  const figures: RunFigures = {
    p50Us: report.latencyUs.p50,
    p99Us: report.latencyUs.p99,
    faults: report.counters.faults,
    pagesPerSec: report.demandPagingRate.overall,
    pushThroughputMiBs: report.pushThroughputMiBs,
    elapsedMs: report.elapsedMs,
    cpuPerFaultUs: report.cpu.perFaultUs,
  };
  if (spec.inject !== undefined) {
    // One fault injected, so exactly one pause, resumed. Zero pauses means the fault never went off (the migration ended first).
    const rec = report.recovery;
    if (rec.pauses !== 1 || rec.resumes !== 1) {
      throw new Error(
        `${spec.label}: expected 1 pause and 1 resume from --inject ${spec.inject}@${injectAtPages(memoryBytes)}, ` +
          `got ${rec.pauses} pause${rec.pauses === 1 ? '' : 's'} and ${rec.resumes} resume${rec.resumes === 1 ? '' : 's'} ` +
          `(${sourceKills} source kill${sourceKills === 1 ? '' : 's'}); reproduce with: ${reproduce}`,
      );
    }
    figures.recovery = {
      pauses: rec.pauses,
      resumes: rec.resumes,
      pausedMs: rec.pausedMs / rec.pauses,
      pagesResent: rec.pagesResent,
      requestsReplayed: rec.requestsReplayed,
    };
  }
  return { report, figures };
}
