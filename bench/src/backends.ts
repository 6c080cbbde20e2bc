/**
 * The bench's memory-backends section (issue 12, part 8): each strategy on
 * both memory backends in one run, the ratio emulated / uffd of each figure,
 * and the local floor of each backend (backend-floor.ts). Kept apart from
 * the rest of the bench (bench.ts calls it through a small hook) so it can
 * also run alone (backends-cli.ts).
 *
 * Figures per strategy and backend, from real two-process migrations
 * (sequential workload, push off, --preempt, as the bench's strategy runs):
 * the fault latency p50 and p99 with 1 vCPU, and the demand paging rate
 * (pages/s, demand_paging_test's) with 1 and with 8 vCPUs. per-thread-uffd
 * exists on the emulation only: the kernel has no per-thread userfaultfd.
 */
import { BackendUnavailableError, MEMORY_BACKENDS, STRATEGIES, makeLayout, type MemoryBackendName, type StrategyName } from '@postcopy/shared';
import { preflightMemoryBackend } from '@postcopy/dest-host';
import type { Command } from 'commander';
import { measureBackendFloor, type BackendFloorResult } from './backend-floor.js';
import { parseChoiceList } from './list-options.js';
import { runMigration, type RunSpec, type RunWarmUp } from './migrations.js';
import type { Step } from './steps.js';

/** Median; with an even count, the mean of the two middle values. */
function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** Four significant digits, as the bench's other ratios. */
const sig4 = (x: number): number => Number(x.toPrecision(4));

/** vCPU counts of the demand-paging-rate runs. */
export const BACKEND_RATE_VCPUS = [1, 8] as const;
/** Pages the local floor faults at most (64 MiB of 4 KiB pages); fewer with a smaller --memory. */
export const BACKEND_FLOOR_MAX_PAGES = 16384;

export interface BackendsOptions {
  /** Backends to compare; empty: the section is skipped (`--memory-backends none`). */
  memoryBackends: MemoryBackendName[];
}

/** `--memory-backends`: the section's one option (a hook in options.ts adds it to the bench). */
export function addBackendsOption(cmd: Command): Command {
  return cmd.option(
    '--memory-backends <list>',
    `memory backends to run every strategy on and compare (ratio emulated / uffd), and to measure the local floor of; none skips that section`,
    MEMORY_BACKENDS.join(','),
  );
}

export function parseBackendsOptions(raw: Record<string, unknown>): BackendsOptions {
  const text = String(raw.memoryBackends ?? MEMORY_BACKENDS.join(','));
  if (text.trim() === 'none') return { memoryBackends: [] };
  return { memoryBackends: [...new Set(parseChoiceList('--memory-backends', text, MEMORY_BACKENDS))] };
}

/** The strategies a backend runs: all on the emulation; on uffd all but per-thread-uffd. */
export function strategiesOn(backend: MemoryBackendName): StrategyName[] {
  return STRATEGIES.filter((s) => backend === 'emulated' || s !== 'per-thread-uffd');
}

/** One migration of the section: a strategy on a backend with N vCPUs. */
export function backendRun(strategy: StrategyName, backend: MemoryBackendName, vcpus: number): RunSpec {
  return {
    key: `backend:${backend}:${strategy}:${vcpus}`,
    label: `${strategy} on ${backend}, ${vcpus} vCPU${vcpus > 1 ? 's' : ''} (sequential, push off, preempt)`,
    args: ['--strategy', strategy, '--memory-backend', backend, '--vcpus', String(vcpus), '--no-push', '--preempt', '--workload', 'sequential'],
  };
}

/** One strategy on one backend (medians of the repeats). */
export interface StrategyOnBackend {
  /** Fault latency with 1 vCPU (µs). */
  p50Us: number;
  p99Us: number;
  /** Demand paging rate (pages/s) by vCPU count: `1`, `8`. */
  rate: Record<string, number>;
}

/** emulated / uffd of each figure: above 1, the emulation is slower (latency) or faster (rate). */
export interface BackendRatios {
  p50: number;
  p99: number;
  rate: Record<string, number>;
}

export interface BackendsResult {
  memoryBackends: MemoryBackendName[];
  /** Why uffd was left out (not Linux, no permission, no addon...), or absent when it ran or was not asked for. */
  uffdUnavailable?: string;
  strategies: Partial<Record<StrategyName, Partial<Record<MemoryBackendName, StrategyOnBackend>> & { ratio?: BackendRatios }>>;
  floor: Partial<Record<MemoryBackendName, BackendFloorResult>> & { ratio?: { p50: number; p99: number; pagesPerSec: number } };
  method: string;
  samples: { runs: Record<string, { p50Us: number; p99Us: number; rate: number }[]>; floor: BackendFloorResult[] };
}

export const BACKENDS_METHOD =
  'npm start -- --strategy S --memory-backend B --vcpus N --no-push --preempt --workload sequential (N = 1 for the fault latency and the 1-vCPU rate, N = 8 for the 8-vCPU rate); ' +
  "the report's latencyUs and demandPagingRate.overall; ratios emulated / uffd of the medians. Local floor: one thread faulting every page of a fresh guest in order, " +
  "this process resolving each fault with a blocking read(2) of the message and a UFFDIO_COPY from memory (which wakes), no network; timed per fault by the faulting thread";

/**
 * The section's measurements for one bench: `steps()` gives one repeat's
 * steps (the bench interleaves them with its own), `result()` the medians.
 */
export class BackendsBench {
  private readonly backends: MemoryBackendName[];
  private readonly unavailable: string | undefined;
  private readonly runSamples: Record<string, { p50Us: number; p99Us: number; rate: number }[]> = {};
  private readonly floorSamples: BackendFloorResult[] = [];

  constructor(
    options: BackendsOptions,
    private readonly memoryBytes: number,
    private readonly warmUp: RunWarmUp = {},
  ) {
    let unavailable: string | undefined;
    if (options.memoryBackends.includes('uffd')) {
      try {
        preflightMemoryBackend({ memoryBackend: 'uffd', strategy: 'shared-uffd', layout: makeLayout(memoryBytes, 4096), memslotBytes: 1 << 30, vcpus: 8, ioThreads: 0, readers: 1 });
      } catch (err) {
        if (!(err instanceof BackendUnavailableError)) throw err;
        unavailable = err.message;
      }
    }
    this.unavailable = unavailable;
    this.backends = options.memoryBackends.filter((b) => b !== 'uffd' || unavailable === undefined);
  }

  /** Say so at the start when uffd was asked for and cannot run here. */
  get note(): string | undefined {
    return this.unavailable === undefined ? undefined : `memory backends: uffd left out: ${this.unavailable}`;
  }

  private get floorPages(): number {
    return Math.max(64, Math.min(BACKEND_FLOOR_MAX_PAGES, Math.floor(this.memoryBytes / 4096)));
  }

  steps(): Step[] {
    const steps: Step[] = [];
    for (const backend of this.backends) {
      steps.push({
        label: `local floor of ${backend} (fault, UFFDIO_COPY from memory, wake; ${this.floorPages} pages, no network)`,
        run: async () => {
          const f = await measureBackendFloor(backend, this.floorPages);
          this.floorSamples.push(f);
          return `p50 ${f.latencyUs.p50.toFixed(1)} µs, p99 ${f.latencyUs.p99.toFixed(1)} µs, ${(f.pagesPerSec / 1000).toFixed(1)} k pages/s`;
        },
      });
    }
    for (const vcpus of BACKEND_RATE_VCPUS) {
      for (const strategy of STRATEGIES) {
        for (const backend of this.backends) {
          if (!strategiesOn(backend).includes(strategy)) continue;
          const spec = backendRun(strategy, backend, vcpus);
          steps.push({
            label: spec.label,
            run: async () => {
              const { report } = await runMigration(spec, this.memoryBytes, this.warmUp);
              (this.runSamples[spec.key] ??= []).push({ p50Us: report.latencyUs.p50, p99Us: report.latencyUs.p99, rate: report.demandPagingRate.overall });
              return `p50 ${report.latencyUs.p50.toFixed(1)} µs, p99 ${report.latencyUs.p99.toFixed(1)} µs, ${(report.demandPagingRate.overall / 1000).toFixed(1)} k pages/s over ${report.counters.faults} faults`;
            },
          });
        }
      }
    }
    return steps;
  }

  result(): BackendsResult {
    const round3 = (x: number): number => Math.round(x * 1000) / 1000;
    const med = (key: string, pick: (s: { p50Us: number; p99Us: number; rate: number }) => number): number | undefined => {
      const samples = this.runSamples[key];
      return samples === undefined || samples.length === 0 ? undefined : round3(median(samples.map(pick)));
    };
    const strategies: BackendsResult['strategies'] = {};
    for (const strategy of STRATEGIES) {
      const entry: NonNullable<BackendsResult['strategies'][StrategyName]> = {};
      for (const backend of this.backends) {
        const latency = backendRun(strategy, backend, 1).key;
        const p50Us = med(latency, (s) => s.p50Us);
        const p99Us = med(latency, (s) => s.p99Us);
        if (p50Us === undefined || p99Us === undefined) continue;
        const rate: Record<string, number> = {};
        for (const vcpus of BACKEND_RATE_VCPUS) {
          const r = med(backendRun(strategy, backend, vcpus).key, (s) => s.rate);
          if (r !== undefined) rate[String(vcpus)] = r;
        }
        entry[backend] = { p50Us, p99Us, rate };
      }
      const emu = entry.emulated;
      const uffd = entry.uffd;
      if (emu && uffd) {
        const rate: Record<string, number> = {};
        for (const v of Object.keys(emu.rate)) if (uffd.rate[v] !== undefined) rate[v] = sig4(emu.rate[v]! / uffd.rate[v]!);
        entry.ratio = { p50: sig4(emu.p50Us / uffd.p50Us), p99: sig4(emu.p99Us / uffd.p99Us), rate };
      }
      if (Object.keys(entry).length > 0) strategies[strategy] = entry;
    }
    const floor: BackendsResult['floor'] = {};
    for (const backend of this.backends) {
      const samples = this.floorSamples.filter((f) => f.backend === backend);
      if (samples.length === 0) continue;
      floor[backend] = {
        backend,
        pages: samples[0]!.pages,
        latencyUs: {
          p50: round3(median(samples.map((f) => f.latencyUs.p50))),
          p99: round3(median(samples.map((f) => f.latencyUs.p99))),
          mean: round3(median(samples.map((f) => f.latencyUs.mean))),
        },
        pagesPerSec: Math.round(median(samples.map((f) => f.pagesPerSec))),
      };
    }
    if (floor.emulated && floor.uffd) {
      floor.ratio = {
        p50: sig4(floor.emulated.latencyUs.p50 / floor.uffd.latencyUs.p50),
        p99: sig4(floor.emulated.latencyUs.p99 / floor.uffd.latencyUs.p99),
        pagesPerSec: sig4(floor.emulated.pagesPerSec / floor.uffd.pagesPerSec),
      };
    }
    return {
      memoryBackends: this.backends,
      ...(this.unavailable !== undefined ? { uffdUnavailable: this.unavailable } : {}),
      strategies,
      floor,
      method: BACKENDS_METHOD,
      samples: { runs: this.runSamples, floor: this.floorSamples },
    };
  }
}

function table(rows: string[][], indent = '  '): string {
  const widths: number[] = [];
  for (const row of rows) row.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  return rows.map((row) => indent + row.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('   ').trimEnd()).join('\n');
}

/** The section as `npm run bench` prints it. */
export function formatBackends(r: BackendsResult | undefined): string {
  if (r === undefined || (r.memoryBackends.length === 0 && r.uffdUnavailable === undefined)) return 'memory backends: not measured (--memory-backends none)';
  const lines: string[] = [];
  const n = (x: number | undefined, digits = 1): string => (x === undefined ? '-' : x.toFixed(digits));
  const k = (x: number | undefined): string => (x === undefined ? '-' : `${(x / 1000).toFixed(1)} k`);
  lines.push(
    `memory backends: every strategy on ${r.memoryBackends.join(' and ')} (sequential, push off, --preempt); fault latency at 1 vCPU, demand paging rate at ${BACKEND_RATE_VCPUS.join(' and ')} vCPUs; ratio = emulated / uffd`,
  );
  if (r.uffdUnavailable !== undefined) lines.push(`  uffd left out: ${r.uffdUnavailable}`);
  const rows: string[][] = [['strategy', 'backend', 'p50 µs', 'p99 µs', ...BACKEND_RATE_VCPUS.map((v) => `pages/s ${v} vCPU${v > 1 ? 's' : ''}`)]];
  for (const strategy of STRATEGIES) {
    const e = r.strategies[strategy];
    if (e === undefined) continue;
    for (const backend of r.memoryBackends) {
      const f = e[backend];
      if (f === undefined) {
        rows.push([strategy, backend, '-', '-', ...BACKEND_RATE_VCPUS.map(() => '-')]);
        continue;
      }
      rows.push([strategy, backend, n(f.p50Us), n(f.p99Us), ...BACKEND_RATE_VCPUS.map((v) => k(f.rate[String(v)]))]);
    }
    if (e.ratio) rows.push([strategy, 'emulated / uffd', n(e.ratio.p50, 2), n(e.ratio.p99, 2), ...BACKEND_RATE_VCPUS.map((v) => n(e.ratio!.rate[String(v)], 2))]);
  }
  lines.push(table(rows));
  if (r.memoryBackends.includes('uffd')) lines.push("  (per-thread-uffd has no uffd run: the kernel has no per-thread userfaultfd; per-region-uffd is the kernel's nearest)");
  lines.push('  (a latency ratio above 1: the emulation is slower; a rate ratio below 1: the emulation is slower)');
  lines.push('');
  lines.push('local floor of each backend: one thread faults every page in order; the resolver reads the message and UFFDIO_COPYs the page from memory (which wakes); no network');
  const floorRows: string[][] = [['backend', 'pages', 'p50 µs', 'p99 µs', 'pages/s']];
  for (const backend of r.memoryBackends) {
    const f = r.floor[backend];
    if (f) floorRows.push([backend, String(f.pages), n(f.latencyUs.p50), n(f.latencyUs.p99), k(f.pagesPerSec)]);
  }
  if (r.floor.ratio) floorRows.push(['emulated / uffd', '', n(r.floor.ratio.p50, 2), n(r.floor.ratio.p99, 2), n(r.floor.ratio.pagesPerSec, 2)]);
  lines.push(table(floorRows));
  return lines.join('\n');
}
