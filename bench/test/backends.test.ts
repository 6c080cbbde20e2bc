/**
 * The bench's memory-backends section (bench/src/backends.ts), tiny: every
 * strategy on both memory backends, their ratios emulated / uffd, and each
 * backend's local floor, through its own CLI (npm run bench runs the same
 * section). On Linux the uffd figures must be there: a machine that cannot
 * open a userfaultfd fails this test.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { runNode } from '../../e2e/test/run.js';
import type { BackendsResult } from '../src/backends.js';
import { measureBackendFloor } from '../src/backend-floor.js';

const CLI = fileURLToPath(new URL('../dist/backends-cli.js', import.meta.url));
const linux = process.platform === 'linux';

describe('the memory-backends section of the bench', () => {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-bench-backends-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('runs every strategy on both backends, prints the ratios emulated / uffd and the local floors, and writes them as JSON', { timeout: 120_000 }, async () => {
    const file = join(dir, 'backends.json');
    const run = await runNode(CLI, ['--memory', '2MiB', '--warm-up-pages', '64', '--warm-up-requests', '64', '--json', file], { timeoutMs: 110_000 });
    expect(run.code, `stdout:\n${run.stdout}\nstderr:\n${run.stderr}`).toBe(0);
    const r = JSON.parse(readFileSync(file, 'utf8')) as BackendsResult;
    const backends = linux ? ['emulated', 'uffd'] : ['emulated'];
    expect(r.memoryBackends).toEqual(backends);
    expect(r.uffdUnavailable).toBeUndefined();
    for (const strategy of ['shared-uffd', 'per-thread-uffd', 'per-region-uffd', 'kvm-exit'] as const) {
      const e = r.strategies[strategy]!;
      for (const backend of backends) {
        if (backend === 'uffd' && strategy === 'per-thread-uffd') {
          expect(e.uffd).toBeUndefined(); // the kernel has no per-thread userfaultfd
          continue;
        }
        const f = e[backend as 'emulated' | 'uffd']!;
        expect(f.p50Us, `${strategy} on ${backend}`).toBeGreaterThan(0);
        expect(f.p99Us).toBeGreaterThanOrEqual(f.p50Us);
        expect(f.rate['1']).toBeGreaterThan(0);
        expect(f.rate['8']).toBeGreaterThan(0);
      }
      if (linux && strategy !== 'per-thread-uffd') {
        expect(e.ratio!.p50).toBeGreaterThan(0);
        expect(e.ratio!.p99).toBeGreaterThan(0);
        expect(Object.keys(e.ratio!.rate)).toEqual(['1', '8']);
      }
    }
    for (const backend of backends) {
      const f = r.floor[backend as 'emulated' | 'uffd']!;
      expect(f.pages).toBe(512);
      expect(f.latencyUs.p50).toBeGreaterThan(0);
      expect(f.pagesPerSec).toBeGreaterThan(0);
    }
    if (linux) expect(r.floor.ratio!.p50).toBeGreaterThan(0);
    expect(run.stdout).toMatch(/^memory backends: every strategy on emulated and uffd/m);
    expect(run.stdout).toMatch(/^ {2}kvm-exit +emulated \/ uffd +\d+\.\d\d +\d+\.\d\d +\d+\.\d\d +\d+\.\d\d$/m);
    expect(run.stdout).toMatch(/^ {2}uffd +512 +\d+\.\d +\d+\.\d +\d+\.\d k$/m);
    expect(run.stdout).toContain('per-thread-uffd has no uffd run');
  });

  it('the local floor puts each page where it faulted (both backends)', async () => {
    for (const backend of linux ? (['emulated', 'uffd'] as const) : (['emulated'] as const)) {
      const f = await measureBackendFloor(backend, 64);
      expect(f.pages).toBe(64);
      expect(f.latencyUs.p99).toBeGreaterThanOrEqual(f.latencyUs.p50);
    }
  });

  it('rejects a bad --memory-backends with exit code 2, naming the option and what it accepts', async () => {
    const run = await runNode(CLI, ['--memory-backends', 'emulated,bogus']);
    expect(run.code).toBe(2);
    expect(run.stderr).toContain('--memory-backends: expected one of emulated, uffd, got "bogus"');
  });
});
