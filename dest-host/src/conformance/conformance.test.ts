/**
 * The conformance suite on both memory backends, with the same expected
 * results (what Linux does). On Linux the uffd backend must run: a machine
 * that cannot open a userfaultfd fails here, it does not skip. Elsewhere
 * only the emulation runs.
 */
import { describe, expect, it } from 'vitest';
import { MEMORY_BACKENDS } from '../memory/backend.js';
import { BACKEND_BY_NAME } from '../memory/backends.js';
import { CASES } from './cases.js';
import { runCase, runConformance } from './run.js';

const CASE_TIMEOUT_MS = 30_000;
const backends = process.platform === 'linux' ? MEMORY_BACKENDS : MEMORY_BACKENDS.filter((b) => b !== 'uffd');

describe.each(backends)('userfaultfd conformance on the %s backend', (name) => {
  for (const c of CASES) {
    it(`${c.id}: ${c.title}`, { timeout: CASE_TIMEOUT_MS }, async () => {
      const r = await runCase(BACKEND_BY_NAME[name], c);
      expect(r.observed).toEqual(c.expected);
      expect(r.pass).toBe(true);
    });
  }
});

describe('the conformance report', () => {
  it('is byte-identical across backends that agree (no names, addresses, tids or timings in it)', { timeout: 2 * CASE_TIMEOUT_MS }, async () => {
    const some = CASES.filter((c) => c.id === 'two-faulters-two-messages' || c.id === 'copy-other-context');
    expect(some).toHaveLength(2);
    const reports = await Promise.all(backends.map(async (b) => JSON.stringify(await runConformance(BACKEND_BY_NAME[b], some))));
    for (const r of reports) expect(r).toBe(reports[0]);
    expect(reports[0]).not.toMatch(/emulated|uffd"|tid[^a-z]|0x[0-9a-f]{6,}/);
  });
});
