import { UsageError } from '@postcopy/shared';

/** One swept run option: the launcher's attribute name, its flag, and the values to try in order. */
export interface SweptParam {
  /** Commander attribute name, the key in the launcher's raw options (`linkDelayUs`). */
  key: string;
  /** The option as typed (`--link-delay-us`). */
  flag: string;
  /** The CSV column (`link_delay_us`). */
  column: string;
  values: string[];
}

/** One point of the matrix: a value for every swept parameter, by key. */
export interface Combination {
  /** Position in the matrix (0-based), the order combinations run in. */
  index: number;
  values: Record<string, string>;
}

/** One run: a combination and a repeat (1-based), named for its files. */
export interface RunSpec {
  /** Position in the run order (0-based). */
  index: number;
  combination: Combination;
  repeat: number;
  name: string;
}

/** `--link-delay-us` → `link_delay_us`. */
export function columnName(flag: string): string {
  return flag.replace(/^--/, '').replace(/-/g, '_');
}

/**
 * The values of one option: a comma list (`1,2,4`) or a single value. Items
 * are trimmed; duplicates are dropped (keeping the first) so every
 * combination is distinct; an empty item is a usage error.
 */
export function parseList(flag: string, text: string): string[] {
  const items = text.split(',').map((s) => s.trim());
  if (items.some((s) => s === '')) {
    throw new UsageError(`${flag}: expected a value or a comma list of values such as 1,2,4, got ${JSON.stringify(text)} (an empty item)`);
  }
  return [...new Set(items)];
}

/** Every combination of the swept values; the last parameter varies fastest. */
export function combinations(params: readonly SweptParam[]): Combination[] {
  let rows: Record<string, string>[] = [{}];
  for (const p of params) {
    const next: Record<string, string>[] = [];
    for (const row of rows) for (const v of p.values) next.push({ ...row, [p.key]: v });
    rows = next;
  }
  return rows.map((values, index) => ({ index, values }));
}

/** A value as it may appear in a file name: letters, digits, `.` and `-`. */
function fileSafe(value: string): string {
  return value.replace(/[^A-Za-z0-9.-]+/g, '-');
}

/** `strategy=kvm-exit_vcpus=4_r2`: the swept values and the repeat, safe as a file name. */
export function runName(params: readonly SweptParam[], combination: Combination, repeat: number): string {
  const parts = params.map((p) => `${p.flag.replace(/^--/, '')}=${fileSafe(combination.values[p.key] ?? '')}`);
  return [...parts, `r${repeat}`].join('_');
}

/** `strategy=kvm-exit vcpus=4`: a combination as people read it. */
export function describeCombination(params: readonly SweptParam[], values: Record<string, string>, separator = ' '): string {
  return params.map((p) => `${p.flag.replace(/^--/, '')}=${values[p.key] ?? ''}`).join(separator);
}

/**
 * The runs of a sweep in the order they go: repeat by repeat, each repeat
 * over every combination, so slow drift of the machine spreads over all
 * combinations instead of landing on the last ones.
 */
export function expandRuns(params: readonly SweptParam[], repeat: number): RunSpec[] {
  if (!Number.isSafeInteger(repeat) || repeat < 1) throw new UsageError(`--repeat: expected a whole number from 1, got ${repeat}`);
  const combos = combinations(params);
  const runs: RunSpec[] = [];
  for (let r = 1; r <= repeat; r++) {
    for (const combination of combos) runs.push({ index: runs.length, combination, repeat: r, name: runName(params, combination, r) });
  }
  const seen = new Set<string>();
  for (const run of runs) {
    // Values that differ only in characters a file name cannot hold would collide.
    if (seen.has(run.name)) run.name = `${run.name}_${run.index + 1}`;
    seen.add(run.name);
  }
  return runs;
}
