/**
 * The bench's devices section (bench/src/devices.ts), tiny, through its own
 * CLI (npm run bench runs the same section): the same guest and device with
 * tracking=device, tracking=iommu, all-dirty and skip-precopy, each with its
 * total time, downtime and parts, and its provider's cost per sync.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { runNode } from '../../e2e/test/run.js';
import type { DevicesResult } from '../src/devices.js';

const CLI = fileURLToPath(new URL('../dist/devices-cli.js', import.meta.url));

describe('the devices section of the bench', () => {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-bench-devices-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('migrates the same guest and device under each tracking and policy, and prints and writes the figures', { timeout: 90_000 }, async () => {
    const file = join(dir, 'devices.json');
    const run = await runNode(CLI, ['--memory', '4MiB', '--warm-up-pages', '64', '--warm-up-requests', '64', '--json', file], { timeoutMs: 85_000 });
    expect(run.code, `stdout:\n${run.stdout}\nstderr:\n${run.stderr}`).toBe(0);
    const r = JSON.parse(readFileSync(file, 'utf8')) as DevicesResult;
    expect(r.rangeBytes).toBe(512 * 1024);
    for (const [variant, provider] of [['tracking=device', 'device'], ['tracking=iommu', 'iommu'], ['all-dirty', 'none'], ['skip-precopy', 'none']] as const) {
      const f = r.variants[variant];
      expect(f.provider, variant).toBe(provider);
      expect(f.totalTimeMs, variant).toBeGreaterThan(0);
      expect(f.downtimeMs, variant).toBeGreaterThan(0);
      expect(f.downtimeDeviceMs, variant).toBeGreaterThan(0);
    }
    // Device logging reads the bitmap of the range the device reaches; the IOMMU, the whole guest's; all-dirty finds the whole range every sync.
    expect(r.variants['tracking=device'].bitmapBytesPerSync).toBe(128 / 8);
    expect(r.variants['tracking=iommu'].bitmapBytesPerSync).toBe(1024 / 8);
    expect(r.variants['all-dirty'].pagesDirtyPerSync).toBe(128);
    expect(r.variants['skip-precopy']).toMatchObject({ rounds: 0, switchover: 'skip-precopy' });
    expect(run.stdout).toMatch(/^devices \(no target\): the same guest/m);
    expect(run.stdout).toMatch(/^ {2}tracking=iommu +\d+ +[\d.]+ +[\d.]+ +[\d.]+ +\d+ +converged +iommu +128 /m);
  });
});
