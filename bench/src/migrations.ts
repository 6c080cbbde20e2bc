import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { formatBytes, type Report } from '@postcopy/shared';
import { launch, launcherCommand, splitArgs } from '@postcopy/e2e';

/** One migration configuration the bench runs (its options, as `npm start` takes them). */
export interface RunSpec {
  /** Stable key, e.g. `strategy:kvm-exit`. */
  key: string;
  /** What it measures, for progress lines. */
  label: string;
  /** `npm start` options, without `--memory` and `--json` (the bench adds them). */
  args: string[];
}

/** The figures the bench takes from one run's report. */
export interface RunFigures {
  p50Us: number;
  p99Us: number;
  faults: number;
  pushThroughputMiBs: number;
  elapsedMs: number;
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

/** The large guest (issue 4's memory target): defaults otherwise, so it is the tool as a user runs it. */
export function largeRun(vcpus: number): RunSpec {
  return { key: 'large', label: 'large guest, peak RSS', args: ['--vcpus', String(vcpus)] };
}

/** The full `npm start` command line of a run, to reproduce it by hand. */
export function commandLine(spec: RunSpec, memoryBytes: number): string {
  return `npm start -- ${[...spec.args, '--memory', formatBytes(memoryBytes)].join(' ')}`;
}

/**
 * Runs one real two-process migration through the launcher behind `npm start`
 * and returns its report. A run that fails (a check, a crash, the watchdog) is
 * an error of the bench.
 */
export async function runMigration(spec: RunSpec, memoryBytes: number): Promise<{ report: Report; figures: RunFigures }> {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-bench-'));
  const json = join(dir, 'report.json');
  try {
    const cmd = launcherCommand().exitOverride();
    cmd.parse([...spec.args, '--memory', formatBytes(memoryBytes), '--json', json], { from: 'user' });
    const { sourceArgs, destArgs } = splitArgs(cmd.opts());
    // Piped: the destination's printed report is not wanted (the JSON is), its stderr's end comes back on failure.
    const result = await launch({ sourceArgs, destArgs, destStdio: 'pipe' });
    if (result.code !== 0) {
      throw new Error(
        `${spec.label}: the migration exited with code ${result.code} (destination ${result.destCode}, source ${result.sourceCode}); ` +
          `reproduce with: ${commandLine(spec, memoryBytes)}${result.stderrTail ? `\n${result.stderrTail}` : ''}`,
      );
    }
    const report = JSON.parse(readFileSync(json, 'utf8')) as Report;
    if (!report.verified) {
      const failed = report.checks.filter((c) => !c.ok).map((c) => c.name);
      throw new Error(`${spec.label}: the run's checks failed (${failed.join(', ')}); reproduce with: ${commandLine(spec, memoryBytes)}`);
    }
    return {
      report,
      figures: {
        p50Us: report.latencyUs.p50,
        p99Us: report.latencyUs.p99,
        faults: report.counters.faults,
        pushThroughputMiBs: report.pushThroughputMiBs,
        elapsedMs: report.elapsedMs,
      },
    };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
