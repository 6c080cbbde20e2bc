import { mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { Command, Option } from 'commander';
import { checkTracePath, preflightMemoryBackend, type PreflightSpec } from '@postcopy/dest-host';
import { BackendUnavailableError, UsageError, parseIntOption } from '@postcopy/shared';
import { launcherCommand, splitArgs } from '../options.js';
import { columnName, combinations, describeCombination, parseList, type SweptParam } from './matrix.js';

/** Launcher options the sweep sets itself, one file per run. */
export const PER_RUN_OPTIONS: readonly string[] = ['json', 'hgrm', 'trace'];

/** In a `--trace` template, where the run's name goes. */
export const RUN_NAME_PLACEHOLDER = '{name}';

/** Plural spellings that read better in a sweep (`--strategies a,b`); both spellings work. */
export const PLURAL_ALIASES: Readonly<Record<string, string>> = { strategy: '--strategies', workload: '--workloads' };

/** One launcher option as the sweep sees it. */
interface LauncherOption {
  key: string;
  flag: string;
  takesValue: boolean;
}

function launcherOptions(): { option: Option; spec: LauncherOption }[] {
  return launcherCommand()
    .options.filter((o) => o.long !== undefined && !PER_RUN_OPTIONS.includes(o.attributeName()))
    .map((option) => ({ option, spec: { key: option.attributeName(), flag: option.long!, takesValue: option.required || option.optional } }));
}

/**
 * `npm run experiment`'s options: every run option of the launcher (derived
 * from {@link launcherCommand}, so new options appear by themselves), each
 * taking a comma list to sweep it, plus `--repeat` and `--out`.
 */
export function experimentCommand(): Command {
  const cmd = new Command('experiment').description(
    'Runs a sweep of two-process postcopy migrations: every combination of the comma-listed option values, --repeat times each, ' +
      'and writes one JSON report and .hgrm per run, summary.csv and report.html to --out.',
  );
  for (const { option, spec } of launcherOptions()) {
    if (!spec.takesValue) {
      // Boolean flags (--no-push, --preempt, ...) pass through unchanged.
      const flag = new Option(option.flags, option.description);
      if (option.defaultValue !== undefined) flag.default(option.defaultValue);
      cmd.addOption(flag);
      continue;
    }
    const arg = /<([^>]+)>/.exec(option.flags)?.[1] ?? 'value';
    const alias = PLURAL_ALIASES[spec.key];
    const choices = option.argChoices ? `; one of ${option.argChoices.join(', ')}` : '';
    const swept = new Option(`${alias ? alias + ', ' : ''}${spec.flag} <${arg},...>`, `${option.description}${choices}; a comma list sweeps it`);
    if (option.defaultValue !== undefined) swept.default(option.defaultValue);
    cmd.addOption(swept);
  }
  cmd.option('--repeat <n>', 'runs of each combination (summarised by their median and min–max)', '1');
  cmd.option(
    '--trace <dir|template>',
    `write each run's timeline (trace-event JSON, for Perfetto or chrome://tracing): DIR/<run name>.trace.json, or a path in which ${RUN_NAME_PLACEHOLDER} becomes the run's name`,
  );
  cmd.requiredOption('--out <dir>', 'directory for runs/*.json, runs/*.hgrm, summary.csv and report.html');
  return cmd;
}

export interface ExperimentOptions {
  /** Options given more than one value, strategy first, then in the launcher's order. */
  params: SweptParam[];
  /** Every other launcher option as the launcher's parser would give it (one value, or a flag). */
  fixed: Record<string, unknown>;
  repeat: number;
  out: string;
  /** `--trace`: a directory, or a path template with {name} (see traceFile). */
  trace?: string;
}

/** Reads the parsed options of {@link experimentCommand} (throws UsageError). */
export function parseExperimentOptions(opts: Record<string, unknown>): ExperimentOptions {
  const params: SweptParam[] = [];
  const fixed: Record<string, unknown> = {};
  for (const { spec } of launcherOptions()) {
    const value = opts[spec.key];
    if (spec.takesValue && value !== undefined) {
      const values = parseList(spec.flag, String(value));
      if (values.length > 1) params.push({ key: spec.key, flag: spec.flag, column: columnName(spec.flag), values });
      else fixed[spec.key] = values[0];
    } else if (value !== undefined) {
      fixed[spec.key] = value;
    }
  }
  params.sort((a, b) => Number(b.key === 'strategy') - Number(a.key === 'strategy'));
  const repeat = parseIntOption('--repeat', String(opts.repeat), 1, 1_000_000);
  const out = String(opts.out ?? '');
  if (out.trim() === '') throw new UsageError('--out: expected a directory, got ""');
  const trace = opts.trace === undefined ? undefined : String(opts.trace);
  if (trace !== undefined && trace.trim() === '') throw new UsageError(`--trace: expected a directory or a path template with ${RUN_NAME_PLACEHOLDER}, got ""`);
  return { params, fixed, repeat, out, ...(trace !== undefined ? { trace } : {}) };
}

/** Where run `name`'s timeline goes: the template with its name in, or DIR/<name>.trace.json. */
export function traceFile(trace: string, name: string): string {
  return trace.includes(RUN_NAME_PLACEHOLDER) ? trace.split(RUN_NAME_PLACEHOLDER).join(name) : join(trace, `${name}.trace.json`);
}

/**
 * `--trace`: its directory can be made and a file in it written, before
 * anything runs (a sweep that runs for an hour must not then lose its
 * timelines to a typo). Throws UsageError.
 */
export function checkTraceTarget(trace: string): void {
  const probe = traceFile(trace, 'r1');
  try {
    mkdirSync(dirname(probe), { recursive: true });
  } catch (err) {
    throw new UsageError(`--trace: cannot make the directory ${dirname(probe)} for the timelines: ${(err as Error).message}`);
  }
  checkTracePath(probe);
}

/** The launcher's raw options for one combination (what `splitArgs` takes). */
export function rawOptions(options: ExperimentOptions, values: Record<string, string>, files: { json?: string; hgrm?: string; trace?: string } = {}): Record<string, unknown> {
  const raw: Record<string, unknown> = { ...options.fixed, ...values };
  if (files.json !== undefined) raw.json = files.json;
  if (files.hgrm !== undefined) raw.hgrm = files.hgrm;
  if (files.trace !== undefined) raw.trace = files.trace;
  return raw;
}

/**
 * Checks every combination with the launcher's own validation before anything
 * runs; the first bad one throws a UsageError naming the combination.
 *
 * Where a combination runs on the kernel's userfaultfd, it also checks that
 * the kernel lets this machine open one for that guest layout (permission,
 * the addon, hugetlbfs pages): if not, no run of it could work, and that
 * throws BackendUnavailableError (exit 2) before anything runs. A strategy
 * the kernel does not have (per-thread-uffd on uffd) is not refused here:
 * those runs fail (exit 2, saying so) and are recorded, and the rest of the
 * sweep goes on, so one sweep can cover every strategy on both backends.
 */
export function validateMatrix(options: ExperimentOptions): void {
  if (options.trace !== undefined) checkTraceTarget(options.trace);
  const checked = new Set<string>();
  for (const combination of combinations(options.params)) {
    const where = options.params.length > 0 ? ` (in the combination ${describeCombination(options.params, combination.values)})` : '';
    let preflight: PreflightSpec;
    try {
      ({ preflight } = splitArgs(rawOptions(options, combination.values)));
    } catch (err) {
      if (!(err instanceof UsageError)) throw err;
      throw new UsageError(err.message + where);
    }
    if (preflight.memoryBackend === 'emulated') continue;
    const kernel: PreflightSpec = { ...preflight, strategy: preflight.strategy === 'per-thread-uffd' ? 'per-region-uffd' : preflight.strategy };
    const key = JSON.stringify(kernel);
    if (checked.has(key)) continue;
    checked.add(key);
    try {
      preflightMemoryBackend(kernel);
    } catch (err) {
      if (!(err instanceof BackendUnavailableError)) throw err;
      throw new BackendUnavailableError(err.backend, err.message + where);
    }
  }
}

/** A fixed (not swept) option as the report shows it. */
export interface FixedSetting {
  /** `--memory 4MiB`, `--no-push`. */
  text: string;
  /** Differs from the launcher's default. */
  changed: boolean;
}

/** The options every run shared, as flags; those changed from the launcher's defaults first. */
export function fixedSettings(options: ExperimentOptions): FixedSetting[] {
  const out: FixedSetting[] = [];
  for (const { option, spec } of launcherOptions()) {
    if (!(spec.key in options.fixed)) continue;
    const value = options.fixed[spec.key];
    if (spec.takesValue) out.push({ text: `${spec.flag} ${String(value)}`, changed: value !== option.defaultValue });
    // A flag shows only when given: --no-push when push is off, --preempt when on.
    else if (option.negate ? value === false : value === true) out.push({ text: spec.flag, changed: true });
  }
  return [...out.filter((s) => s.changed), ...out.filter((s) => !s.changed)];
}
