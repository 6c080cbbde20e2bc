import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { Report } from '@postcopy/shared';
import { launch } from '../launcher.js';
import { splitArgs } from '../options.js';
import type { RunSpec } from './matrix.js';
import { rawOptions, traceFile, type ExperimentOptions } from './options.js';

/** What one run of the sweep left behind. */
export interface RunResult {
  spec: RunSpec;
  /** Exit 0 with a verified report. */
  ok: boolean;
  /** The launcher's exit code; -1 when the run could not start. */
  exitCode: number;
  /** The run's report, when the destination wrote one (also for failed checks). */
  report: Report | undefined;
  /** Why the run failed, in one line; undefined when it passed. */
  error: string | undefined;
  /** The end of the hosts' stderr. */
  stderrTail: string;
  durationMs: number;
  /** The run's files, relative to the output directory; `trace` (with --trace) as given. */
  files: { json: string; hgrm: string; trace?: string };
}

/** Where a run's files go, relative to the output directory. */
export function runFiles(name: string): { json: string; hgrm: string } {
  return { json: `runs/${name}.json`, hgrm: `runs/${name}.hgrm` };
}

function readReport(path: string): Report | undefined {
  if (!existsSync(path)) return undefined;
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as Report;
  } catch {
    return undefined;
  }
}

/** Runs one real two-process migration of the sweep (the launcher's `launch()`). */
export async function runOne(options: ExperimentOptions, spec: RunSpec): Promise<RunResult> {
  const files: RunResult['files'] = runFiles(spec.name);
  const json = join(options.out, files.json);
  const hgrm = join(options.out, files.hgrm);
  const trace = options.trace === undefined ? undefined : traceFile(options.trace, spec.name);
  // A file left by an earlier sweep into the same directory must not pass for this run's.
  rmSync(json, { force: true });
  rmSync(hgrm, { force: true });
  if (trace !== undefined) {
    rmSync(trace, { force: true });
    // A template may put each run in a folder of its own.
    mkdirSync(dirname(trace), { recursive: true });
    files.trace = trace;
  }
  const { sourceArgs, destArgs, killSourceAt } = splitArgs(rawOptions(options, spec.combination.values, { json, hgrm, ...(trace !== undefined ? { trace } : {}) }));
  const started = performance.now();
  let exitCode = -1;
  let error: string | undefined;
  let stderrTail = '';
  try {
    const result = await launch({ sourceArgs, destArgs, destStdio: 'pipe', killSourceAt });
    exitCode = result.code;
    stderrTail = result.stderrTail;
  } catch (err) {
    error = (err as Error).message;
  }
  const durationMs = performance.now() - started;
  const report = readReport(json);
  if (error === undefined) {
    const failedChecks = report?.checks.filter((c) => !c.ok).map((c) => c.name) ?? [];
    if (exitCode !== 0) error = `exit code ${exitCode}` + (failedChecks.length > 0 ? `; failed checks: ${failedChecks.join(', ')}` : '');
    else if (report === undefined) error = 'exit code 0 but no JSON report was written';
    else if (!report.verified) error = `report not verified; failed checks: ${failedChecks.join(', ') || 'none named'}`;
  }
  return { spec, ok: error === undefined, exitCode, report, error, stderrTail, durationMs, files };
}
