import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { summaryCsv } from './csv.js';
import { figures } from './figures.js';
import { reportHtml } from './html.js';
import type { RunSpec } from './matrix.js';
import { fixedSettings, type ExperimentOptions } from './options.js';
import { runOne, type RunResult } from './run.js';
import { summarizeRuns, type CombinationSummary } from './summary.js';

export interface SweepHooks {
  onStart?: (run: RunSpec) => void;
  onDone?: (result: RunResult) => void;
}

/** Writes summary.csv and report.html for the runs so far; returns the per-combination summaries. */
export function writeSummary(options: ExperimentOptions, results: readonly RunResult[], command: string): CombinationSummary[] {
  const summaries = summarizeRuns(options.params, results);
  writeFileSync(join(options.out, 'summary.csv'), summaryCsv(options.params, results));
  const html = reportHtml({
    params: options.params,
    fixed: fixedSettings(options),
    repeat: options.repeat,
    results,
    summaries,
    figures: figures({ params: options.params, fixed: options.fixed, summaries, repeats: options.repeat }),
    command,
    generatedAt: new Date(),
  });
  writeFileSync(join(options.out, 'report.html'), html);
  return summaries;
}

/**
 * Runs every run of the sweep one after another (the hosts' threads need
 * the cores), a failed run recorded and the sweep going on. summary.csv and
 * report.html are rewritten after each run, so a long sweep can be looked at
 * while it goes and an interrupted one keeps what it measured.
 */
export async function runSweep(options: ExperimentOptions, runs: readonly RunSpec[], command: string, hooks: SweepHooks = {}): Promise<RunResult[]> {
  mkdirSync(join(options.out, 'runs'), { recursive: true });
  const results: RunResult[] = [];
  for (const run of runs) {
    hooks.onStart?.(run);
    const result = await runOne(options, run);
    results.push(result);
    hooks.onDone?.(result);
    writeSummary(options, results, command);
  }
  return results;
}
