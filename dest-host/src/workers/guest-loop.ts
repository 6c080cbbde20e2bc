import { rng, verifyPage, type AccessPattern, type ImageSpec } from '@postcopy/shared/core';
import type { GuestThread } from '../memory/backend.js';
import type { GuestPages } from '../memory/pages.js';
import { FaultLog } from '../trace/thread-logs.js';
import { COUNTER, type VmmState } from '../vmm/state.js';
import type { GuestThreadResult } from './protocol.js';

export interface GuestLoop {
  /** Thread slot: the fault queue this thread's faults go in. */
  slot: number;
  /** This thread's accesses: a load of a missing page faults through the backend and blocks. */
  thread: GuestThread;
  /** Views of installed pages, for the first-touch check. */
  pages: GuestPages;
  pageSize: number;
  totalPages: number;
  vmm: VmmState;
  image: ImageSpec;
  /** The word the first-touch check skips (SharedState.ignoreWord). */
  ignoreWord: number;
  pattern: AccessPattern;
  writeFraction: number;
  seed: number;
  /** ms to add to performance.now() to get ms since the run's epoch. */
  clockOffset: number;
  /**
   * kvm-exit: called on a page missing from the userfault bitmap; returns
   * its Resolution once the page is installed (or a promise of it, on the
   * event-loop fault channel). Absent: the thread
   * faults through the userfaultfd and blocks in it.
   */
  exitOnMissing?: (page: number) => number | Promise<number>;
  /** --trace: also log each fault's page, access and (kvm-exit) resolution. */
  trace?: boolean;
}

/**
 * A guest thread's run: touch pages in the pattern's order; a missing page is
 * a fault, timed from detection to resumption. The first thread to touch a
 * page verifies its content against the generator (outside the timed part).
 *
 * Whether a page is missing is the destination's own bookkeeping, the
 * receivedmap (KVM's userfault bitmap), the same on either backend: the
 * thread cannot ask the kernel whether a load will fault. A page not in it
 * is a fault: entered in this thread's fault queue (what the watchdog
 * reads), then touched, which blocks in the backend's userfaultfd until a
 * COPY, ZEROPAGE or WAKE of its context (or, for kvm-exit, fetched and
 * installed first). A page installed between the check and the load is a
 * fault that did not block, timed as such.
 */
export async function runGuestLoop(loop: GuestLoop): Promise<Omit<GuestThreadResult, 'cpuUs'>> {
  const { slot, thread, pages, vmm, pattern, clockOffset } = loop;
  const wordsPerPage = loop.pageSize >>> 2;
  const random = rng(loop.seed * 31 + slot + 17);
  let intervals = new Float64Array(Math.min(pattern.length, loop.totalPages, 1 << 16) * 2 + 2);
  let faults = 0;
  const exit = loop.exitOnMissing;
  // Without --trace there is no log, and a fault costs one more branch.
  const log = loop.trace === true ? new FaultLog(intervals.length >>> 1) : undefined;
  const startMs = performance.now() + clockOffset;
  for (let i = 0; i < pattern.length; i++) {
    const page = pattern.next();
    const write = random() < loop.writeFraction;
    const word = (i * 7 + slot) % wordsPerPage;
    let value: number;
    if (!vmm.isReceived(page)) {
      const t0 = performance.now() + clockOffset;
      vmm.pushFault(slot, page, t0);
      let own = -1;
      if (exit) {
        const resolved = exit(page);
        // A blocking fault channel resolves before it returns: no await, no turn of the event loop.
        own = typeof resolved === 'number' ? resolved : await resolved;
      }
      // The fault itself (on kvm-exit the page is in by now, so no fault).
      value = thread.load(page, word);
      const t1 = performance.now() + clockOffset;
      vmm.popFault(slot, t1);
      if (faults * 2 + 2 > intervals.length) {
        const grown = new Float64Array(intervals.length * 2);
        grown.set(intervals);
        intervals = grown;
      }
      intervals[faults * 2] = t0;
      intervals[faults * 2 + 1] = t1;
      if (log !== undefined) log.record(faults, page, write, own);
      faults++;
    } else {
      value = thread.load(page, word);
    }
    // The access itself: a load, and for a write a store of the same value
    // (the final digest must still equal the source's).
    if (write) thread.store(page, word, value);
    if (vmm.firstToTouch(page) && verifyPage(loop.image, page, pages.pageWords(page), loop.ignoreWord) !== -1) vmm.recordBadPage(page);
    if ((i & 63) === 63) vmm.count(COUNTER.ACCESSES, 64);
  }
  vmm.count(COUNTER.ACCESSES, pattern.length & 63);
  const endMs = performance.now() + clockOffset;
  return { faults, accesses: pattern.length, intervals: intervals.slice(0, faults * 2), startMs, endMs, ...(log !== undefined ? { trace: log.take(faults) } : {}) };
}
