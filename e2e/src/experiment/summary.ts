import { formatNumber } from './format.js';
import { combinations, type Combination, type SweptParam } from './matrix.js';
import { METRICS } from './metrics.js';
import type { RunResult } from './run.js';

/** Repeats of one figure: their median and their spread (min–max). */
export interface Spread {
  median: number;
  min: number;
  max: number;
  n: number;
}

export function median(values: readonly number[]): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** Median and min–max of the values; undefined when there are none. */
export function spread(values: readonly number[]): Spread | undefined {
  const finite = values.filter((v) => Number.isFinite(v));
  if (finite.length === 0) return undefined;
  return { median: median(finite), min: Math.min(...finite), max: Math.max(...finite), n: finite.length };
}

/** All runs of one combination, and each metric over its passed runs. */
export interface CombinationSummary {
  combination: Combination;
  runs: RunResult[];
  passed: number;
  metrics: Map<string, Spread>;
}

/**
 * Groups the runs by combination, in matrix order. Only passed runs count
 * toward the figures: a run whose checks failed is reported, not averaged.
 */
export function summarizeRuns(params: readonly SweptParam[], results: readonly RunResult[]): CombinationSummary[] {
  return combinations(params).map((combination) => {
    const runs = results.filter((r) => r.spec.combination.index === combination.index);
    const passed = runs.filter((r) => r.ok && r.report);
    const metrics = new Map<string, Spread>();
    for (const m of METRICS) {
      const s = spread(passed.map((r) => m.value(r.report!)));
      if (s) metrics.set(m.name, s);
    }
    return { combination, runs, passed: passed.length, metrics };
  });
}

/** `412 (398–430)`, or `412` for a single run, or `–` for none. */
export function formatSpread(s: Spread | undefined): string {
  if (!s) return '–';
  if (s.n === 1 || s.min === s.max) return formatNumber(s.median);
  return `${formatNumber(s.median)} (${formatNumber(s.min)}–${formatNumber(s.max)})`;
}

/** The columns of the comparison table: metric name and header. */
export const TABLE_METRICS: readonly { name: string; header: string }[] = [
  { name: 'latency_p50_us', header: 'p50 µs' },
  { name: 'latency_p99_us', header: 'p99 µs' },
  { name: 'demand_paging_rate', header: 'pages/s' },
  { name: 'blocktime_total_ms', header: 'blocktime ms' },
  { name: 'vcpu_blocktime_mean_ms', header: 'vCPU blocktime ms' },
];

/** Left-aligned text columns, right-aligned figures. */
export function alignColumns(rows: readonly string[][], leftColumns: number): string {
  const widths: number[] = [];
  for (const row of rows) row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, [...cell].length)));
  return rows
    .map((row) =>
      row
        .map((cell, i) => {
          const pad = ' '.repeat(widths[i]! - [...cell].length);
          return i < leftColumns ? cell + pad : pad + cell;
        })
        .join('  ')
        .replace(/\s+$/, ''),
    )
    .join('\n');
}

/** The table printed on stdout: per combination, median (min–max) of the headline figures. */
export function comparisonTable(params: readonly SweptParam[], summaries: readonly CombinationSummary[]): string {
  const header = [...params.map((p) => p.flag.replace(/^--/, '')), 'runs ok', ...TABLE_METRICS.map((m) => m.header)];
  const rows = summaries.map((s) => [
    ...params.map((p) => s.combination.values[p.key] ?? ''),
    `${s.passed}/${s.runs.length}`,
    ...TABLE_METRICS.map((m) => formatSpread(s.metrics.get(m.name))),
  ]);
  return alignColumns([header, ...rows], params.length) + '\n\nmedian (min–max) over the passed repeats of each combination';
}
