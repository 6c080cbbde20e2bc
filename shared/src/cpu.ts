/**
 * CPU time from the processes' and threads' own accounting, for the report's
 * CPU microseconds per fault (issue 9).
 *
 * - A process: `process.cpuUsage()` (getrusage(RUSAGE_SELF): user + system
 *   time of every thread of the process, V8's GC and compiler threads and
 *   libuv's pool included), in µs.
 * - One thread (the main thread, a worker): Node 20 has no
 *   `process.threadCpuUsage()` (it came in Node 23.9), so on Linux the
 *   thread reads its own `/proc/thread-self/schedstat`, whose first field is
 *   the time the scheduler ran it, in ns (sum_exec_runtime, the same clock
 *   as `CLOCK_THREAD_CPUTIME_ID`). The read is synchronous on purpose: a
 *   synchronous fs call runs on the calling thread, so `thread-self` is that
 *   thread (an asynchronous one would run on a libuv pool thread). It costs
 *   about 12 µs, and each thread reads it twice a run. `/proc/<pid>/stat`'s
 *   utime and stime would do too, but count in clock ticks (10 ms).
 *   `performance.eventLoopUtilization()` measures time an event loop was not
 *   idle, which is not CPU time (a thread blocked in `Atomics.wait` or a
 *   synchronous syscall counts as busy), so it is not used.
 * Where the schedstat file cannot be read (not Linux, no CONFIG_SCHED_INFO),
 * per-thread figures are `null`: unknown, never guessed.
 */
import { readFileSync } from 'node:fs';

const SCHEDSTAT = '/proc/thread-self/schedstat';

let schedstatWorks: boolean | undefined;

/** The calling thread's CPU time so far in µs, or undefined where the platform cannot tell. */
export function threadCpuUs(): number | undefined {
  if (schedstatWorks === false) return undefined;
  try {
    const text = readFileSync(SCHEDSTAT, 'latin1');
    const ns = Number(text.slice(0, text.indexOf(' ')));
    if (!Number.isFinite(ns) || ns < 0) throw new Error(`unexpected ${SCHEDSTAT}: ${JSON.stringify(text)}`);
    schedstatWorks = true;
    return ns / 1000;
  } catch {
    schedstatWorks = false;
    return undefined;
  }
}

/** How per-thread CPU time is read here: `schedstat`, or `none` (process totals only). */
export function threadAccounting(): 'schedstat' | 'none' {
  return threadCpuUs() === undefined ? 'none' : 'schedstat';
}

/** This process's CPU time so far (user + system, every thread), in µs. */
export function processCpuUs(): number {
  const u = process.cpuUsage();
  return u.user + u.system;
}

/** CPU spent since the meter started: by the whole process, and by the thread that started it. */
export interface CpuSpent {
  processUs: number;
  /** The starting thread's own time; null where per-thread accounting is unavailable. */
  threadUs: number | null;
}

/**
 * Measures the CPU a window of work costs. Start it and read it on the same
 * thread: its thread figure is that thread's.
 */
export class CpuMeter {
  private readonly process0 = processCpuUs();
  private readonly thread0 = threadCpuUs();

  spent(): CpuSpent {
    const thread = this.thread0 === undefined ? undefined : threadCpuUs();
    return {
      processUs: Math.round(processCpuUs() - this.process0),
      threadUs: thread === undefined || this.thread0 === undefined ? null : Math.round(thread - this.thread0),
    };
  }
}

/** The CPU groups of a run, in the report's order. */
export const CPU_GROUPS = ['source', 'sourceMainThread', 'dest', 'destMainThread', 'destVcpus', 'destResolvers', 'destIoThreads', 'destOther'] as const;
export type CpuGroup = (typeof CPU_GROUPS)[number];

/**
 * CPU per fault (issue 9): what each process and thread group of the
 * destination spent over the run, and per fault. Null where the platform
 * cannot tell per-thread time.
 */
export interface CpuFigures {
  /** How per-thread time was read (see cpu.ts): `schedstat`, or `none` (process totals only). */
  threadAccounting: 'schedstat' | 'none';
  /** The denominator: the run's faults (vCPU and I/O threads). */
  faults: number;
  /**
   * CPU over the run, µs. Source: from its `start` (or resume) to the
   * destination's `finish`; destination: from the start of postcopy to the
   * last vCPU done (and, with push, the last page installed); its workers
   * each over their own part of it (`destOther`: the rest of the process,
   * V8's GC and compiler threads and libuv's pool).
   */
  totalUs: Record<CpuGroup, number | null>;
  perFaultUs: Record<CpuGroup, number | null>;
  /**
   * The fault rate this run's CPU alone would allow with a core for every
   * thread (a 64-core host, say): each single thread (the source's and the
   * destination's main threads) can give 1e6 / its µs per fault, a group of
   * n threads sharing faults n times that; the least of them, and which it
   * is. An upper bound from CPU alone: round trips and the wire still count.
   */
  cpuBound: { pagesPerSec: number; limitedBy: CpuGroup } | null;
}

export interface CpuInputs {
  threadAccounting: 'schedstat' | 'none';
  faults: number;
  source: { processUs: number; mainThreadUs: number | null };
  dest: { processUs: number; mainThreadUs: number | null };
  /** Each worker's own thread time (null: unknown), by kind. */
  vcpus: (number | null)[];
  resolvers: (number | null)[];
  ioThreads: (number | null)[];
}

const sumKnown = (xs: (number | null)[]): number | null => (xs.length === 0 ? 0 : xs.some((x) => x === null) ? null : (xs as number[]).reduce((a, b) => a + b, 0));

/** The report's CPU figures from what the processes and threads measured. */
export function cpuFigures(inp: CpuInputs): CpuFigures {
  const vcpus = sumKnown(inp.vcpus);
  const resolvers = sumKnown(inp.resolvers);
  const io = sumKnown(inp.ioThreads);
  const main = inp.dest.mainThreadUs;
  const known = [main, vcpus, resolvers, io];
  const other = known.every((x) => x !== null) ? Math.max(0, inp.dest.processUs - (known as number[]).reduce((a, b) => a + b, 0)) : null;
  const totalUs: Record<CpuGroup, number | null> = {
    source: inp.source.processUs,
    sourceMainThread: inp.source.mainThreadUs,
    dest: inp.dest.processUs,
    destMainThread: main,
    destVcpus: vcpus,
    destResolvers: resolvers,
    destIoThreads: io,
    destOther: other,
  };
  const perFaultUs = {} as Record<CpuGroup, number | null>;
  for (const g of CPU_GROUPS) {
    const t = totalUs[g];
    perFaultUs[g] = t === null || inp.faults === 0 ? null : Math.round((t / inp.faults) * 100) / 100;
  }
  // Threads that share faults: a group of n threads can do n times what one does.
  const threads: Partial<Record<CpuGroup, number>> = {
    sourceMainThread: 1,
    destMainThread: 1,
    destVcpus: inp.vcpus.length,
    destResolvers: inp.resolvers.length,
    destIoThreads: inp.ioThreads.length,
  };
  let cpuBound: CpuFigures['cpuBound'] = null;
  for (const [group, n] of Object.entries(threads) as [CpuGroup, number][]) {
    const us = perFaultUs[group];
    if (us === null || us <= 0 || n === 0) continue;
    const pagesPerSec = Math.round((n * 1e6) / us);
    if (cpuBound === null || pagesPerSec < cpuBound.pagesPerSec) cpuBound = { pagesPerSec, limitedBy: group };
  }
  return { threadAccounting: inp.threadAccounting, faults: inp.faults, totalUs, perFaultUs, cpuBound };
}
