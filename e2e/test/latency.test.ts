import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { LAUNCHER, failedChecks, migrate } from './run.js';

const dirs: string[] = [];
afterEach(() => {
  while (dirs.length) rmSync(dirs.pop()!, { recursive: true, force: true });
});

describe('link shaping and channels, end to end', () => {
  it('a 200 µs one-way delay shows in every fault: p50 >= 400 µs', async () => {
    const r = await migrate(['--strategy', 'kvm-exit', '--vcpus', '1', '--memory', '2MiB', '--no-push', '--preempt', '--link-delay-us', '200']);
    expect(r.code, r.stderr).toBe(0);
    expect(failedChecks(r.report!)).toEqual([]);
    expect(r.report!.linkDelayUs).toBe(200);
    expect(r.report!.latencyUs.p50).toBeGreaterThanOrEqual(400);
  });

  it('a bandwidth limit caps push throughput', async () => {
    const r = await migrate(['--vcpus', '1', '--accesses', '1', '--memory', '4MiB', '--link-bandwidth', '100mbit']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.report!.linkBandwidthBps).toBe(100e6);
    // 100 Mbit/s is 11.9 MiB/s of payload at most.
    expect(r.report!.pushThroughputMiBs).toBeLessThanOrEqual(12);
    expect(r.report!.pushThroughputMiBs).toBeGreaterThan(3);
  });

  it('without --preempt requested pages come on the main channel; with it, on their own', async () => {
    const shared = await migrate(['--strategy', 'per-thread-uffd', '--vcpus', '2', '--memory', '4MiB', '--no-push']);
    expect(shared.code, shared.stderr).toBe(0);
    expect(shared.report!.preempt).toBe(false);
    expect(shared.report!.counters.repliesOnMain).toBe(shared.report!.counters.requests);
    const own = await migrate(['--strategy', 'per-thread-uffd', '--vcpus', '2', '--memory', '4MiB', '--no-push', '--preempt']);
    expect(own.code, own.stderr).toBe(0);
    expect(own.report!.preempt).toBe(true);
    expect(own.report!.counters.repliesOnMain).toBe(0);
    expect(own.report!.counters.pagesDemand).toBe(own.report!.counters.requests);
  });

  it('--hgrm writes the latency distribution in HdrHistogram format', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'postcopy-hgrm-'));
    dirs.push(dir);
    const file = join(dir, 'run.hgrm');
    const r = await migrate(['--vcpus', '1', '--memory', '2MiB', '--no-push', '--hgrm', file]);
    expect(r.code, r.stderr).toBe(0);
    const text = readFileSync(file, 'utf8');
    expect(text).toMatch(/Value\s+Percentile\s+TotalCount\s+1\/\(1-Percentile\)/);
    expect(text).toMatch(/#\[Mean\s+=\s+[\d.]+, StdDeviation\s+=/);
    expect(text).toMatch(new RegExp(`#\\[Max\\s+=\\s+[\\d.]+, Total count\\s+=\\s+${r.report!.counters.faults}\\]`));
  });

  it('--status-port serves a query-migrate-like snapshot while the migration runs', async () => {
    const child = spawn(
      process.execPath,
      [LAUNCHER, '--vcpus', '1', '--memory', '8MiB', '--no-push', '--link-delay-us', '1000', '--status-port', '0'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const killer = setTimeout(() => child.kill('SIGKILL'), 45_000);
    try {
      const url = await new Promise<string>((resolve, reject) => {
        let err = '';
        child.stderr.on('data', (d: Buffer) => {
          err += d.toString();
          const m = /status (http:\/\/127\.0\.0\.1:\d+\/status)/.exec(err);
          if (m) resolve(m[1]!);
        });
        child.once('exit', () => reject(new Error(`exited before serving status: ${err}`)));
      });
      let snapshot: Record<string, unknown> | undefined;
      for (let i = 0; i < 100 && snapshot?.status !== 'postcopy-active'; i++) {
        snapshot = (await (await fetch(url)).json()) as Record<string, unknown>;
        if (snapshot.status !== 'postcopy-active') await new Promise((r) => setTimeout(r, 20));
      }
      expect(snapshot).toMatchObject({ status: 'postcopy-active', 'pages-total': 2048 });
      expect(snapshot!['postcopy-vcpu-blocktime']).toHaveLength(1);
      expect(snapshot!['vcpu-fault-messages']).toHaveLength(1);
      expect((snapshot!.ram as Record<string, number>).total).toBe(8 * 1024 * 1024);
      const notFound = await fetch(url.replace('/status', '/nope'));
      expect(notFound.status).toBe(404);
      const code = await new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
      expect(code).toBe(0);
    } finally {
      clearTimeout(killer);
      child.kill('SIGKILL');
    }
  });
});
