/**
 * End to end on the kernel's userfaultfd (`--memory-backend uffd`): the same
 * two-process migrations, checks and report, with guest memory that is real
 * anonymous memory where a vCPU's plain load of a missing page blocks in the
 * kernel. Runs on Linux, and there it must run: a machine that cannot open a
 * userfaultfd fails these tests, it does not skip them.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import type { Report } from '@postcopy/shared';
import { DEST, LAUNCHER, failedChecks, migrate, runNode } from './run.js';

const UFFD = ['--memory-backend', 'uffd'];
/** A small guest in four memslots (views of the one mapping on uffd), a quarter of its pages zero. */
const GUEST = ['--memory', '4MiB', '--memslot-size', '1MiB', '--zero-fraction', '0.25'];
const EXPERIMENT = fileURLToPath(new URL('../dist/experiment/cli.js', import.meta.url));

function expectVerified(result: Awaited<ReturnType<typeof migrate>>): Report {
  expect(result.code, result.stderr + result.stdout).toBe(0);
  const report = result.report!;
  expect(report).toBeDefined();
  expect(failedChecks(report)).toEqual([]);
  expect(report.verified).toBe(true);
  expect(report.memoryBackend).toBe('uffd');
  expect(report.digest.dest).toBe(report.digest.source);
  expect(report.counters.replies).toBe(report.counters.requests);
  expect(report.counters.pagesInstalled).toBe(report.counters.pagesSentBySource);
  expect(result.stdout).toContain("on the kernel's userfaultfd (--memory-backend uffd)");
  expect(result.stdout).toContain('verified: true');
  return report;
}

describe.runIf(process.platform === 'linux')('migrations on the kernel userfaultfd (--memory-backend uffd)', () => {
  for (const strategy of ['shared-uffd', 'per-region-uffd', 'kvm-exit']) {
    it(`${strategy} × sequential: push on, 2 I/O threads, zero pages, 4 memslots`, async () => {
      const report = expectVerified(
        await migrate([...UFFD, ...GUEST, '--strategy', strategy, '--workload', 'sequential', '--vcpus', '2', '--io-threads', '2', '--io-accesses', '200']),
      );
      expect(report.memslots).toBe(4);
      expect(report.digest.scope).toBe('all-pages');
      expect(report.counters.pagesInstalled).toBe(1024);
      expect(report.counters.pagesZero).toBeGreaterThan(100);
      expect(report.counters.faults).toBeGreaterThan(0);
      expect(report.nonVcpuLatencyUs.count).toBe(report.counters.nonVcpuFaults);
      expect(report.latencyUs.p50).toBeGreaterThan(0);
    });

    it(`${strategy} × shared-hot: no push, 4 vCPUs colliding on one hot set, 2 I/O threads, zero pages, 4 memslots`, async () => {
      const report = expectVerified(
        await migrate([...UFFD, ...GUEST, '--strategy', strategy, '--workload', 'shared-hot', '--vcpus', '4', '--io-threads', '2', '--io-accesses', '200', '--no-push']),
      );
      expect(report.digest.scope).toBe('received-pages');
      expect(report.counters.pagesPushed).toBe(0);
      // Every vCPU walks the same hot set in the same order: more faults than pages fetched.
      expect(report.counters.faults).toBeGreaterThan(report.counters.requests);
      for (const v of report.perVcpu) expect(v.faults).toBeGreaterThan(0);
      // I/O threads read random pages, most of them never installed: they fault through the real userfaultfd.
      expect(report.counters.nonVcpuFaults).toBeGreaterThan(0);
      expect(report.counters.pagesZero).toBeGreaterThan(0);
    });
  }

  it('shared-uffd with two reader threads polling the one userfaultfd', async () => {
    const report = expectVerified(await migrate([...UFFD, '--memory', '4MiB', '--strategy', 'shared-uffd', '--readers', '2', '--vcpus', '2', '--workload', 'random', '--no-push']));
    expect(report.readers).toBe(2);
  });

  for (const [strategy, extra] of [
    ['per-region-uffd', ['--workload', 'random', '--no-push', '--inject', 'drop@200,drop@600']],
    ['kvm-exit', ['--io-threads', '1', '--preempt', '--max-postcopy-bandwidth', '50mbit', '--inject', 'drop@1500']],
  ] as const) {
    it(`drop and recover (${strategy}, ${extra.join(' ')}): threads blocked in the kernel get their pages after the resume`, { timeout: 60_000 }, async () => {
      const result = await migrate([...UFFD, '--memory', '8MiB', '--vcpus', '2', '--strategy', strategy, ...extra]);
      const report = expectVerified(result);
      const drops = extra.at(-1)!.split(',').length;
      expect(report.recovery.pauses).toBe(drops);
      expect(report.recovery.resumes).toBe(drops);
      expect(report.recovery.dropsInjected).toBe(drops);
      expect(report.checks.find((c) => c.name === 'recovered')?.ok).toBe(true);
      expect(result.stderr).toMatch(/dest: connection lost \(injected drop@\d+ at \d+ pages installed\): postcopy paused/);
    });
  }

  it('2 MiB pages need hugetlbfs pages: without them exit 2 naming vm.nr_hugepages, with them a verified run', async () => {
    const free = Number(/HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
    const args = [...UFFD, '--memory', '16MiB', '--page-size', '2MiB', '--memslot-size', '8MiB', '--vcpus', '2', '--no-push', '--zero-fraction', '0.5'];
    if (free >= 8) {
      const report = expectVerified(await migrate(args));
      expect(report.pageSize).toBe(2 * 1024 * 1024);
      return;
    }
    const r = await runNode(LAUNCHER, args, { timeoutMs: 20_000 });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--memory-backend uffd: 2 MiB pages on uffd need hugetlbfs pages: .*expected 8 free 2 MiB huge pages, got \d+ \(HugePages_Free\)\. Reserve them with `sysctl vm\.nr_hugepages=8`/);
    expect(r.stderr).not.toContain('listening');
  });
});

describe.runIf(process.platform === 'linux')('what uffd refuses, and why (exit 2 before anything starts)', () => {
  it('per-thread-uffd: the kernel has no per-thread userfaultfd; the message names per-region-uffd (npm start and npm run dest)', async () => {
    const start = await runNode(LAUNCHER, [...UFFD, '--strategy', 'per-thread-uffd', '--memory', '4MiB'], { timeoutMs: 20_000 });
    expect(start.code).toBe(2);
    expect(start.stderr).toMatch(/^postcopy: --strategy per-thread-uffd on --memory-backend uffd: the kernel has no per-thread userfaultfd .*--strategy per-region-uffd/m);
    expect(start.stderr).not.toContain('source listening');
    // The destination alone refuses before it connects (nothing listens on port 9).
    const dest = await runNode(DEST, ['--source', 'ws://127.0.0.1:9', '--token', 't', ...UFFD, '--strategy', 'per-thread-uffd', '--memory', '4MiB'], { timeoutMs: 20_000 });
    expect(dest.code).toBe(2);
    expect(dest.stderr).toMatch(/^dest: --strategy per-thread-uffd on --memory-backend uffd: the kernel has no per-thread userfaultfd/m);
    // The emulation keeps it.
    const emulated = await migrate(['--memory-backend', 'emulated', '--strategy', 'per-thread-uffd', '--memory', '4MiB', '--vcpus', '2']);
    expect(emulated.code, emulated.stderr).toBe(0);
    expect(emulated.report?.memoryBackend).toBe('emulated');
  });

  it('no permission: the destination run as nobody (vm.unprivileged_userfaultfd=0, /dev/userfaultfd root-only) says so and how to allow it', (context) => {
    const sysctl = readFileSync('/proc/sys/vm/unprivileged_userfaultfd', 'utf8').trim();
    // Only root can run a child as another user, and only with the sysctl at 0 is that child refused.
    if (process.getuid?.() !== 0) context.skip('needs root, to run the destination as nobody');
    if (sysctl !== '0') context.skip(`needs vm.unprivileged_userfaultfd=0, got ${sysctl}`);
    const child = spawnSync(process.execPath, [DEST, '--source', 'ws://127.0.0.1:9', '--token', 't', ...UFFD, '--memory', '4MiB'], {
      cwd: tmpdir(),
      uid: 65534, // nobody
      gid: 65534,
      encoding: 'utf8',
      timeout: 30_000,
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: '/tmp' },
    });
    expect(child.error).toBeUndefined();
    expect(child.status, child.stderr).toBe(2);
    expect(child.stderr).toMatch(/^dest: --memory-backend uffd: no permission to open a userfaultfd: userfaultfd\(2\) gave EPERM/m);
    expect(child.stderr).toContain('vm.unprivileged_userfaultfd is 0');
    expect(child.stderr).toContain('/dev/userfaultfd failed (EACCES)');
    expect(child.stderr).toContain('sysctl vm.unprivileged_userfaultfd=1');
    expect(child.stderr).toContain('--memory-backend emulated');
  });
});

describe.runIf(process.platform === 'linux')('a sweep over both backends (npm run experiment --memory-backend emulated,uffd)', () => {
  const dirs: string[] = [];
  afterAll(() => {
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  it('runs each strategy on each backend; per-thread-uffd on uffd is a recorded failure (exit 2), the rest verified', async () => {
    const out = mkdtempSync(join(tmpdir(), 'postcopy-uffd-sweep-'));
    dirs.push(out);
    const r = await runNode(
      EXPERIMENT,
      ['--strategies', 'per-thread-uffd,per-region-uffd', '--memory-backend', 'emulated,uffd', '--memory', '2MiB', '--vcpus', '2', '--no-push', '--out', out],
      { timeoutMs: 60_000 },
    );
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toContain('experiment: 1 of 4 runs failed');
    const rows = readFileSync(join(out, 'summary.csv'), 'utf8').trim().split(/\r?\n/).map((line) => line.split(','));
    expect(rows[0]!.slice(0, 2)).toEqual(['strategy', 'memory_backend']);
    const value = (strategy: string, backend: string, metric: string): string | undefined =>
      rows.find((row) => row[0] === strategy && row[1] === backend && row[3] === metric)?.[4];
    expect(value('per-thread-uffd', 'uffd', 'exit_code')).toBe('2');
    expect(value('per-thread-uffd', 'emulated', 'verified')).toBe('1');
    expect(value('per-region-uffd', 'emulated', 'verified')).toBe('1');
    expect(value('per-region-uffd', 'uffd', 'verified')).toBe('1');
    const report = JSON.parse(readFileSync(join(out, 'runs', 'strategy=per-region-uffd_memory-backend=uffd_r1.json'), 'utf8')) as Report;
    expect(report.memoryBackend).toBe('uffd');
    expect(readFileSync(join(out, 'report.html'), 'utf8')).toMatch(/no per-thread userfaultfd/);
  }, 70_000);
});
