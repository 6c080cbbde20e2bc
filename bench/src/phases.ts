/**
 * The bench's section on the phases before postcopy (issue 10): the same
 * guest, with the same guest running on the source at the same dirty rate,
 * migrated by precopy, hybrid and postcopy, side by side (total time and
 * downtime); precopy's first round (every page, the bulk) against the push
 * throughput of the same bench; and the measured downtime of a converging
 * precopy against its downtime limit. Kept apart from bench.ts (a small
 * hook), as the memory-backends section is.
 */
import { MIGRATION_MODES, type MigrationMode, type Report } from '@postcopy/shared';
import { runMigration, type RunSpec, type RunWarmUp } from './migrations.js';
import type { Step } from './steps.js';

/** Pages per second each source vCPU dirties in these runs: low enough that precopy converges on loopback. */
export const PHASES_DIRTY_RATE = 1000;

/** One mode's run: one vCPU touching one page, so the run is the transfer; no zero pages, so every page carries its bytes. */
export function phaseRun(mode: MigrationMode): RunSpec {
  return {
    key: `phases:${mode}`,
    label: `${mode}: total time and downtime (1 source vCPU dirtying ${PHASES_DIRTY_RATE} pages/s)`,
    args: ['--mode', mode, '--strategy', 'kvm-exit', '--vcpus', '1', '--accesses', '1', '--zero-fraction', '0', ...(mode === 'postcopy' ? [] : ['--dirty-rate', String(PHASES_DIRTY_RATE)])],
  };
}

interface PhaseSample {
  totalTimeMs: number;
  downtimeMs: number;
  downtimeLimitMs: number;
  rounds: number;
  /** Round 1's throughput (MiB/s of page bytes), precopy modes only. */
  round1MiBs: number;
  switchover: string;
}

/** Medians of one mode's runs. */
export type PhaseFigures = PhaseSample;

export interface PhasesResult {
  dirtyRate: number;
  modes: Record<MigrationMode, PhaseFigures>;
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

const round3 = (x: number): number => Math.round(x * 1000) / 1000;

function sample(report: Report): PhaseSample {
  const first = report.precopy.perRound[0];
  return {
    totalTimeMs: report.totalTimeMs,
    downtimeMs: report.downtimeMs,
    downtimeLimitMs: report.downtimeLimitMs,
    rounds: report.precopy.rounds,
    // mbps is megabits of page bytes per second.
    round1MiBs: first ? (first.mbps * 1e6) / 8 / 1048576 : 0,
    switchover: report.switchover.reason,
  };
}

export class PhasesBench {
  private readonly samples = new Map<MigrationMode, PhaseSample[]>(MIGRATION_MODES.map((m) => [m, []]));

  constructor(
    private readonly memoryBytes: number,
    private readonly warmUp: RunWarmUp = {},
  ) {}

  /** One repeat: each mode once. */
  steps(): Step[] {
    return MIGRATION_MODES.map((mode) => {
      const spec = phaseRun(mode);
      return {
        label: spec.label,
        run: async () => {
          const { report } = await runMigration(spec, this.memoryBytes, this.warmUp);
          const s = sample(report);
          this.samples.get(mode)!.push(s);
          return `total ${s.totalTimeMs.toFixed(0)} ms, downtime ${s.downtimeMs.toFixed(1)} ms${mode === 'postcopy' ? '' : `, ${s.rounds} round(s), round 1 at ${s.round1MiBs.toFixed(1)} MiB/s, switchover ${s.switchover}`}`;
        },
      };
    });
  }

  result(): PhasesResult {
    const modes = {} as Record<MigrationMode, PhaseFigures>;
    for (const mode of MIGRATION_MODES) {
      const runs = this.samples.get(mode)!;
      if (runs.length === 0) throw new Error(`expected runs of mode ${mode}, got none`);
      const med = (pick: (s: PhaseSample) => number): number => round3(median(runs.map(pick)));
      modes[mode] = {
        totalTimeMs: med((s) => s.totalTimeMs),
        downtimeMs: med((s) => s.downtimeMs),
        downtimeLimitMs: runs[0]!.downtimeLimitMs,
        rounds: med((s) => s.rounds),
        round1MiBs: med((s) => s.round1MiBs),
        switchover: runs[runs.length - 1]!.switchover,
      };
    }
    return { dirtyRate: PHASES_DIRTY_RATE, modes };
  }
}

/** The section of the printed bench. */
export function formatPhases(r: PhasesResult, pushThroughputMiBs: number): string {
  const rows = [['mode', 'total ms', 'downtime ms', 'rounds', 'round 1 MiB/s', 'switchover']];
  for (const mode of MIGRATION_MODES) {
    const f = r.modes[mode];
    rows.push([mode, f.totalTimeMs.toFixed(0), f.downtimeMs.toFixed(1), String(f.rounds), mode === 'postcopy' ? '-' : f.round1MiBs.toFixed(1), f.switchover]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  const table = rows.map((row) => '  ' + row.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('   ')).join('\n');
  return (
    `phases before postcopy: the same guest, 1 source vCPU dirtying ${r.dirtyRate} pages/s (postcopy: none, the guest starts on the destination); push throughput of this bench ${pushThroughputMiBs.toFixed(1)} MiB/s\n` +
    table
  );
}
