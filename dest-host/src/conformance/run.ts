/**
 * Runs the conformance cases on one memory backend, each on a fresh guest,
 * and reports what each observed next to what the kernel does. The report
 * holds nothing backend-specific (no backend name, addresses, thread ids or
 * timings): two backends that agree give byte-identical JSON.
 */
import { isDeepStrictEqual } from 'node:util';
import { BackendUnavailableError } from '@postcopy/shared';
import type { MemoryBackend } from '../memory/backend.js';
import { CASES, type ConformanceCase, type Observed } from './cases.js';
import { Harness } from './harness.js';

export interface CaseResult {
  id: string;
  title: string;
  pass: boolean;
  observed: Observed;
  expected: Observed;
}

export interface ConformanceReport {
  suite: 'userfaultfd-conformance';
  passed: number;
  failed: number;
  cases: CaseResult[];
}

/**
 * One case on a fresh guest; a case that throws is observed as `{ error }`,
 * except a backend that cannot run here, which ends the whole run (the CLI
 * exits 2 saying why). Teardown always runs.
 */
export async function runCase(backend: MemoryBackend, c: ConformanceCase): Promise<CaseResult> {
  const h = Harness.create(backend);
  let observed: Observed;
  try {
    observed = await c.run(h);
  } catch (err) {
    if (err instanceof BackendUnavailableError) throw err;
    observed = { error: (err as Error).message };
  } finally {
    await h.dispose();
  }
  return { id: c.id, title: c.title, pass: isDeepStrictEqual(observed, c.expected), observed, expected: c.expected };
}

/**
 * Throws BackendUnavailableError, saying why, where the backend cannot run
 * (no addon, no permission...): maps a guest, opens and closes a context.
 */
export async function checkAvailable(backend: MemoryBackend): Promise<void> {
  const h = Harness.create(backend);
  try {
    h.open();
  } finally {
    await h.dispose();
  }
}

export async function runConformance(
  backend: MemoryBackend,
  cases: readonly ConformanceCase[] = CASES,
  onCase?: (result: CaseResult) => void,
): Promise<ConformanceReport> {
  const results: CaseResult[] = [];
  for (const c of cases) {
    const r = await runCase(backend, c);
    onCase?.(r);
    results.push(r);
  }
  const passed = results.filter((r) => r.pass).length;
  return { suite: 'userfaultfd-conformance', passed, failed: results.length - passed, cases: results };
}

/** A case as text: its title, then each observation, marked where it differs from the kernel's. */
export function formatCase(r: CaseResult): string {
  const lines = [`${r.pass ? 'ok  ' : 'FAIL'} ${r.id}: ${r.title}`];
  const keys = [...new Set([...Object.keys(r.expected), ...Object.keys(r.observed)])];
  for (const key of keys) {
    const got = r.observed[key];
    const want = r.expected[key];
    const same = isDeepStrictEqual(got, want);
    lines.push(`       ${key}: ${got === undefined ? '(nothing)' : String(got)}${same ? '' : `   <- expected ${want === undefined ? '(nothing)' : String(want)}`}`);
  }
  return lines.join('\n');
}
