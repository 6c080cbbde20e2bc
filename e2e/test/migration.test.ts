import { describe, expect, it } from 'vitest';
import { STRATEGIES, WORKLOADS, type Report } from '@postcopy/shared';
import { expectVerified as expectVerifiedRun, migrate } from './run.js';

/** What every verified run must show, whatever the strategy and workload; and nothing failed on the way. */
function expectVerified(result: Awaited<ReturnType<typeof migrate>>): Report {
  expect(result.stderr).not.toMatch(/failed|error/i);
  return expectVerifiedRun(result);
}

/** CPU per fault: every process spent some; on Linux each thread group its own, and they add up to no more than the process. */
function expectCpu(report: Report): void {
  const c = report.cpu;
  expect(c.faults).toBe(report.counters.faults);
  expect(c.perFaultUs.source).toBeGreaterThan(0);
  expect(c.perFaultUs.dest).toBeGreaterThan(0);
  if (process.platform !== 'linux') return;
  expect(c.threadAccounting).toBe('schedstat');
  const t = c.totalUs;
  expect(t.sourceMainThread).toBeGreaterThan(0);
  expect(t.sourceMainThread!).toBeLessThanOrEqual(t.source!);
  expect(t.destVcpus).toBeGreaterThan(0);
  if (report.strategy !== 'kvm-exit') expect(t.destResolvers).toBeGreaterThan(0);
  expect(t.destOther).toBeGreaterThanOrEqual(0);
  expect(c.cpuBound?.pagesPerSec).toBeGreaterThan(0);
}

describe('two-process migration: every strategy with every workload', () => {
  for (const strategy of STRATEGIES) {
    for (const workload of WORKLOADS) {
      const push = workload !== 'shared-hot';
      it(`${strategy} × ${workload}${push ? '' : ' (no push)'}`, async () => {
        const result = await migrate([
          '--strategy', strategy,
          '--workload', workload,
          '--vcpus', '2',
          '--memory', '8MiB',
          ...(push ? [] : ['--no-push']),
        ]);
        const report = expectVerified(result);
        expect(report.strategy).toBe(strategy);
        expect(report.workload).toBe(workload);
        expect(report.perVcpu).toHaveLength(2);
        expect(report.counters.faults).toBeGreaterThan(0);
        expect(report.counters.faults).toBe(report.perVcpu.reduce((s, v) => s + v.faults, 0));
        expect(report.latencyUs.p50).toBeGreaterThan(0);
        expect(report.demandPagingRate.overall).toBeGreaterThan(0);
        expectCpu(report);
        if (push) {
          expect(report.digest.scope).toBe('all-pages');
          expect(report.counters.pagesSentBySource).toBe(report.counters.totalPages);
          expect(report.counters.pagesInstalled).toBe(2048);
        } else {
          expect(report.counters.pagesPushed).toBe(0);
          expect(report.digest.scope).toBe('received-pages');
          expect(report.counters.pagesDemand).toBe(report.counters.requests - report.counters.alreadySent);
        }
      });
    }
  }
});

describe('--fault-channel: the threads that block on their fault fetch on either channel', () => {
  for (const strategy of ['kvm-exit', 'per-thread-uffd'] as const) {
    for (const channel of ['blocking', 'event-loop'] as const) {
      it(`${strategy} on the ${channel} fault channel: colliding vCPUs, push and preempt, verified`, async () => {
        const report = expectVerified(
          await migrate(['--strategy', strategy, '--fault-channel', channel, '--workload', 'shared-hot', '--vcpus', '3', '--memory', '8MiB', '--preempt']),
        );
        expect(report.faultChannel).toBe(channel);
        expect(report.counters.faults).toBeGreaterThan(0);
      });
    }
  }

  it('auto is blocking for a ws:// source', async () => {
    const report = expectVerified(await migrate(['--strategy', 'kvm-exit', '--vcpus', '2', '--memory', '4MiB', '--no-push']));
    expect(report.faultChannel).toBe('blocking');
  });
});

describe('concurrent faults on one page (shared-hot)', () => {
  for (const strategy of STRATEGIES) {
    it(`${strategy}: faults collide and every vCPU finishes`, async () => {
      const report = expectVerified(
        await migrate(['--strategy', strategy, '--workload', 'shared-hot', '--vcpus', '4', '--memory', '8MiB', '--no-push']),
      );
      // Every vCPU walks the same hot set in the same order: more faults than pages fetched.
      expect(report.counters.faults).toBeGreaterThan(report.counters.requests);
      expect(report.counters.duplicateRequestsSuppressed + report.counters.eexist).toBeGreaterThan(0);
      for (const v of report.perVcpu) expect(v.faults).toBeGreaterThan(0);
      if (strategy === 'per-thread-uffd') {
        // Pages installed through another vCPU's context: the owed WAKEs were paid.
        expect(report.counters.wakes).toBeGreaterThan(0);
      }
    });
  }

  it('per-thread-uffd without the owed WAKE leaves a vCPU blocked and the watchdog names it', async () => {
    const result = await migrate([
      '--strategy', 'per-thread-uffd',
      '--workload', 'shared-hot',
      '--vcpus', '4',
      '--memory', '8MiB',
      '--no-push',
      '--unsafe-skip-owed-wake',
      '--watchdog-ms', '1500',
    ]);
    expect(result.code).not.toBe(0);
    expect(result.report).toBeUndefined();
    expect(result.stderr).toMatch(/watchdog: no progress for \d+ ms; blocked: vCPU \d on page \d+/);
    expect(result.stderr).toContain('(blocked in userfaultfd)');
  });
});

describe('guest layouts', () => {
  it('several memslots', async () => {
    const report = expectVerified(await migrate(['--memory', '8MiB', '--memslot-size', '1MiB', '--vcpus', '2', '--workload', 'random']));
    expect(report.memslots).toBe(8);
  });

  it('a large guest: 512 MiB in 64 MiB memslots, peak RSS of both hosts reported', async () => {
    const report = expectVerified(
      await migrate(['--memory', '512MiB', '--memslot-size', '64MiB', '--vcpus', '4', '--workload', 'random', '--accesses', '2000'], 90_000),
    );
    expect(report.memslots).toBe(8);
    expect(report.counters.pagesInstalled).toBe(131072);
    // Every page is installed on the destination and the whole image lives on the source.
    expect(report.memory.destPeakRssBytes).toBeGreaterThan(512 * 1024 * 1024);
    expect(report.memory.sourcePeakRssBytes).toBeGreaterThan(512 * 1024 * 1024);
  }, 120_000);

  it('2 MiB pages, with zero pages installed by a zeroed COPY', async () => {
    const report = expectVerified(
      await migrate(['--memory', '32MiB', '--page-size', '2MiB', '--memslot-size', '8MiB', '--vcpus', '2', '--zero-fraction', '0.5', '--no-push']),
    );
    expect(report.pageSize).toBe(2 * 1024 * 1024);
    expect(report.counters.totalPages).toBe(16);
    expect(report.counters.pagesZero).toBeGreaterThan(0);
  });

  it('zero pages travel as notices and are verified', async () => {
    const report = expectVerified(await migrate(['--memory', '8MiB', '--zero-fraction', '0.5', '--vcpus', '2']));
    expect(report.counters.pagesZero).toBeGreaterThan(512);
    expect(report.counters.pagesZero).toBeLessThan(1536);
  });

  it('I/O threads fault through the userfaultfd under kvm-exit', async () => {
    const report = expectVerified(
      await migrate(['--strategy', 'kvm-exit', '--io-threads', '2', '--io-accesses', '300', '--vcpus', '2', '--memory', '8MiB', '--no-push']),
    );
    expect(report.counters.nonVcpuFaults).toBeGreaterThan(0);
    expect(report.nonVcpuLatencyUs.count).toBe(report.counters.nonVcpuFaults);
    expect(report.qemu['postcopy-non-vcpu-latency']).toBeGreaterThan(0);
  });

  it('shared-uffd with two reader threads', async () => {
    const report = expectVerified(await migrate(['--strategy', 'shared-uffd', '--readers', '2', '--vcpus', '2', '--memory', '8MiB', '--workload', 'random', '--no-push']));
    expect(report.readers).toBe(2);
  });

  it('reports QEMU figures with QEMU names', async () => {
    const report = expectVerified(await migrate(['--vcpus', '2', '--memory', '4MiB', '--no-push']));
    expect(report.qemu['postcopy-latency-dist']).toHaveLength(24);
    expect(report.qemu['postcopy-latency-dist'].reduce((a, b) => a + b, 0)).toBe(report.counters.faults);
    expect(report.qemu['postcopy-vcpu-blocktime']).toHaveLength(2);
    expect(report.qemu['postcopy-latency']).toBeGreaterThan(0);
  });
});

describe('the warm-up: every thread runs its fault path on scratch memory before the guest runs', () => {
  for (const strategy of STRATEGIES) {
    it(`${strategy}: each vCPU faults on its warm-up pages, and nothing of it reaches the run's books`, async () => {
      const result = await migrate(['--strategy', strategy, '--workload', 'sequential', '--vcpus', '2', '--memory', '4MiB', '--no-push', '--warm-up-pages', '100']);
      const report = expectVerified(result);
      // Sequential: each vCPU touches each of its 100 scratch pages once, and each is a fault:
      // 50 in each of two rounds, on scratch memory of their own.
      expect(report.warmUp.faults).toBe(200);
      expect(report.warmUp.rounds).toBe(2);
      expect(report.warmUp.ms).toBeGreaterThan(0);
      // The source warmed up too (the tests' 64 requests), on a scratch server of its own.
      expect(report.warmUp.sourceRequests).toBe(64);
      // The run's own faults and requests only: a scratch page asked of the source would break exactly-once,
      // and a warm-up request counted by the migration's source would break replies-equal-requests.
      expect(report.counters.faults).toBe(1024);
      expect(report.counters.requests).toBe(report.counters.faults - report.counters.duplicateRequestsSuppressed);
      expect(report.counters.pagesSentBySource).toBe(report.counters.pagesDemand);
    });
  }

  it('is capped at each vCPU\'s share of the guest, and one page a vCPU is one round, --warm-up-pages and --warm-up-requests 0 turn it off', async () => {
    const capped = expectVerified(await migrate(['--strategy', 'kvm-exit', '--vcpus', '2', '--memory', '1MiB', '--no-push'], undefined, { defaults: true }));
    // The default 1024 a vCPU, but the guest has 256 pages: 128 each.
    expect(capped.warmUp.faults).toBe(256);
    // The source's default, whatever the guest's size (its scratch image is its own).
    expect(capped.warmUp.sourceRequests).toBe(2048);
    expect(capped.warmUp.sourceMs).toBeGreaterThan(0);
    expect(capped.counters.requests).toBe(capped.counters.faults - capped.counters.duplicateRequestsSuppressed);
    const off = expectVerified(await migrate(['--strategy', 'kvm-exit', '--vcpus', '2', '--memory', '1MiB', '--no-push', '--warm-up-pages', '0', '--warm-up-requests', '0']));
    expect(off.warmUp).toEqual({ faults: 0, ms: 0, rounds: 0, sourceRequests: 0, sourceMs: 0 });
    expect(off.counters.faults).toBe(256);
    // A page a vCPU cannot be halved: one round.
    const one = expectVerified(await migrate(['--strategy', 'shared-uffd', '--vcpus', '2', '--memory', '1MiB', '--no-push', '--warm-up-pages', '1']));
    expect(one.warmUp).toMatchObject({ faults: 2, rounds: 1 });
  });

  it('its watchdog starts once every thread is ready: their start is no stall, even at --watchdog-ms 100', async () => {
    // Booting four isolates and connecting them takes 200-300 ms on a quiet
    // 2-core VM, over 500 ms on a loaded one: a watchdog started before it
    // failed the run ("warm-up: watchdog: no progress for 106 ms").
    const result = await migrate(['--strategy', 'kvm-exit', '--vcpus', '4', '--memory', '1MiB', '--no-push', '--warm-up-pages', '32', '--watchdog-ms', '100']);
    const report = expectVerified(result);
    expect(report.warmUp.faults).toBe(4 * 32);
  });
});
