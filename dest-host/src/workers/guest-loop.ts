import { verifyPage, type ImageSpec } from '@postcopy/shared/core';
import type { GuestMemory } from '../memory/guest-memory.js';
import type { Userfaultfd } from '../uffd/userfaultfd.js';
import { COUNTER, type VmmState } from '../vmm/state.js';
import { rng, type AccessPattern } from '../workload/workloads.js';
import type { GuestThreadResult } from './protocol.js';

export interface GuestLoop {
  tid: number;
  memory: GuestMemory;
  uffd: Userfaultfd;
  vmm: VmmState;
  image: ImageSpec;
  pattern: AccessPattern;
  writeFraction: number;
  seed: number;
  /** ms to add to performance.now() to get ms since the run's epoch. */
  clockOffset: number;
  /**
   * kvm-exit: called on a page missing from the userfault bitmap; resolves
   * once the page is installed. Absent: the thread faults through the
   * userfaultfd and blocks in it.
   */
  exitOnMissing?: (page: number) => Promise<unknown>;
}

/**
 * A guest thread's run: touch pages in the pattern's order; a missing page is
 * a fault, timed from detection to resumption. The first thread to touch a
 * page verifies its content against the generator (outside the timed part).
 */
export async function runGuestLoop(loop: GuestLoop): Promise<Omit<GuestThreadResult, 'cpuUs'>> {
  const { tid, memory, uffd, vmm, pattern, clockOffset } = loop;
  const wordsPerPage = memory.layout.pageSize >>> 2;
  const random = rng(loop.seed * 31 + tid + 17);
  let intervals = new Float64Array(Math.min(pattern.length, memory.layout.totalPages, 1 << 16) * 2 + 2);
  let faults = 0;
  const exit = loop.exitOnMissing;
  const startMs = performance.now() + clockOffset;
  for (let i = 0; i < pattern.length; i++) {
    const page = pattern.next();
    const write = random() < loop.writeFraction;
    const missing = exit ? !vmm.isReceived(page) : !uffd.isPresent(page);
    if (missing) {
      const t0 = performance.now() + clockOffset;
      vmm.pushFault(tid, page, t0);
      if (exit) {
        await exit(page);
      } else {
        while (!uffd.isPresent(page)) uffd.handleFault(tid, page, write);
      }
      const t1 = performance.now() + clockOffset;
      vmm.popFault(tid, t1);
      if (faults * 2 + 2 > intervals.length) {
        const grown = new Float64Array(intervals.length * 2);
        grown.set(intervals);
        intervals = grown;
      }
      intervals[faults * 2] = t0;
      intervals[faults * 2 + 1] = t1;
      faults++;
    }
    // The access itself: a load, and for a write a store of the same value
    // (the final digest must still equal the source's).
    const word = (i * 7 + tid) % wordsPerPage;
    const value = memory.load(page, word);
    if (write) memory.store(page, word, value);
    if (vmm.firstToTouch(page) && verifyPage(loop.image, page, memory.pageWords(page)) !== -1) vmm.recordBadPage(page);
    if ((i & 63) === 63) vmm.count(COUNTER.ACCESSES, 64);
  }
  vmm.count(COUNTER.ACCESSES, pattern.length & 63);
  const endMs = performance.now() + clockOffset;
  return { faults, accesses: pattern.length, intervals: intervals.slice(0, faults * 2), startMs, endMs };
}
