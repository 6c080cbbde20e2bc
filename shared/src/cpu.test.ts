import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { CpuMeter, cpuFigures, threadAccounting, threadCpuUs } from './cpu.js';

/** Burns `ms` of this thread's own CPU (by its own clock: a busy machine may preempt it), for at most 5 s. */
function spin(ms: number): void {
  const until = threadCpuUs()! + ms * 1000;
  const giveUp = performance.now() + 5000;
  while (threadCpuUs()! < until && performance.now() < giveUp);
}

describe('CPU accounting', () => {
  it.runIf(process.platform === 'linux')('reads this thread\'s own time from /proc/thread-self/schedstat, rising while it works and not while it sleeps', async () => {
    expect(threadAccounting()).toBe('schedstat');
    const meter = new CpuMeter();
    spin(30);
    const busy = meter.spent();
    expect(busy.threadUs).toBeGreaterThanOrEqual(30_000);
    // The process's window holds the thread's (read after it), and the process's time holds the thread's.
    expect(busy.processUs).toBeGreaterThanOrEqual(busy.threadUs! - 1);
    const before = threadCpuUs()!;
    await new Promise((r) => setTimeout(r, 50));
    expect(threadCpuUs()! - before).toBeLessThan(20_000);
  });

  it.runIf(process.platform === 'linux')("a worker's figure is its own thread's, not the main thread's", async () => {
    const mainBefore = threadCpuUs()!;
    const code = `
      const { parentPort } = require('node:worker_threads');
      const { readFileSync } = require('node:fs');
      const us = () => Number(readFileSync('/proc/thread-self/schedstat', 'latin1').split(' ')[0]) / 1000;
      const t0 = us(); const giveUp = performance.now() + 5000;
      while (us() - t0 < 60000 && performance.now() < giveUp);
      parentPort.postMessage(us() - t0);`;
    const workerUs = await new Promise<number>((resolve, reject) => {
      const w = new Worker(code, { eval: true });
      w.once('message', resolve);
      w.once('error', reject);
    });
    expect(workerUs).toBeGreaterThanOrEqual(60_000);
    // The main thread waited meanwhile (and started the worker): it did not spend the worker's 60 ms.
    expect(threadCpuUs()! - mainBefore).toBeLessThan(workerUs);
  });
});

describe('CPU per fault', () => {
  it('divides each group by the faults and gives the rest of the process to "other"', () => {
    const c = cpuFigures({
      threadAccounting: 'schedstat',
      faults: 1000,
      source: { processUs: 50_000, mainThreadUs: 40_000 },
      dest: { processUs: 200_000, mainThreadUs: 20_000 },
      vcpus: [30_000, 30_000],
      resolvers: [60_000],
      ioThreads: [],
    });
    expect(c.totalUs).toEqual({ source: 50_000, sourceMainThread: 40_000, dest: 200_000, destMainThread: 20_000, destVcpus: 60_000, destResolvers: 60_000, destIoThreads: 0, destOther: 60_000 });
    expect(c.perFaultUs).toMatchObject({ source: 50, sourceMainThread: 40, dest: 200, destVcpus: 60, destResolvers: 60, destOther: 60 });
    // One resolver at 60 µs a fault: 16.7 k/s; the source's thread at 40: 25 k/s; two vCPUs at 60 between them: 33 k/s.
    expect(c.cpuBound).toEqual({ pagesPerSec: 16_667, limitedBy: 'destResolvers' });
  });

  it('says null, never a guess, where a thread cannot tell its time', () => {
    const c = cpuFigures({
      threadAccounting: 'none',
      faults: 10,
      source: { processUs: 100, mainThreadUs: null },
      dest: { processUs: 300, mainThreadUs: null },
      vcpus: [null],
      resolvers: [null],
      ioThreads: [],
    });
    expect(c.perFaultUs).toMatchObject({ source: 10, sourceMainThread: null, dest: 30, destMainThread: null, destVcpus: null, destOther: null });
    expect(c.cpuBound).toBeNull();
    expect(cpuFigures({ ...{ threadAccounting: 'none', source: { processUs: 1, mainThreadUs: 1 }, dest: { processUs: 1, mainThreadUs: 1 }, vcpus: [], resolvers: [], ioThreads: [] }, faults: 0 }).perFaultUs.source).toBeNull();
  });
});
