/**
 * A source vCPU: runs the guest on the source during precopy. Each write
 * increments the page's counter word (QEMU's migration test guest increments
 * a byte of every page, walking memory), so that a page the migration missed
 * cannot look right on the destination; then it clears the page's zero flag
 * and marks it in the dirty log, in that order (see dirty-log.ts: the store
 * must come before the bit).
 *
 * It walks its share of the dirty set page after page (the guest's
 * sequential workload, shared/src/guest, which the destination's vCPUs run
 * too; with fewer pages than vCPUs each walks all of them), at `dirtyRate` pages
 * per second of running (0: as fast as it can), in timeslices of 10 ms; a throttle
 * (auto-converge) adds sleep after each slice as QEMU's cpu_throttle_thread
 * does: pct / (1 - pct) of a timeslice. It stops when RUN goes to 0, after
 * finishing the write in progress (so the final sync sees it), and says so.
 */
import { workerData } from 'node:worker_threads';
import { accessPattern, counterWord, type AccessPattern } from '@postcopy/shared';
import { DirtyLog } from '../dirty-log.js';
import { CONTROL, TIMESLICE_MS, type SourceVcpuData } from './control.js';
import { serveGuestWorker } from './worker-entry.js';

const data = workerData as SourceVcpuData;
const ctl = new Int32Array(data.control);
const { layout, pagesPerChunk } = data.image;
const wordsPerPage = layout.pageSize >>> 2;
const chunks = data.image.chunks.map((b) => new Uint32Array(b));
const zero = new Uint8Array(data.image.zero);
const dirty = new DirtyLog(layout.totalPages, data.dirtyLog);
const cw = counterWord(layout.pageSize);

/** One guest write: the counter word goes up by one; then the zero flag and the dirty bit. */
function write(page: number): void {
  const chunk = Math.floor(page / pagesPerChunk);
  const words = chunks[chunk]!;
  const i = (page - chunk * pagesPerChunk) * wordsPerPage + cw;
  words[i] = (words[i]! + 1) >>> 0;
  if (zero[page] !== 0) Atomics.store(zero, page, 0);
  dirty.mark(page);
}

function sleep(ms: number): void {
  // Wakes early when the migration stops the guest (it notifies RUN).
  if (ms > 0) Atomics.wait(ctl, CONTROL.RUN, 1, ms);
}

/** Its walk over the dirty set, for ever. */
function walk(): AccessPattern {
  if (data.dirtySetPages >= data.vcpus) {
    return accessPattern({ name: 'sequential', totalPages: data.dirtySetPages, vcpus: data.vcpus, seed: 0, accesses: 1, writeFraction: 1 }, data.index);
  }
  let i = 0;
  return { length: Infinity, next: () => i++ % data.dirtySetPages };
}

function run(): void {
  const writesSlot = CONTROL.WRITES + data.index;
  const pattern = walk();
  // The rate is kept per timeslice of running (a credit of rate × 10 ms each),
  // not over the whole run: a throttled vCPU's sleep is lost to it, as in
  // QEMU, instead of being caught up afterwards.
  const perSlice = (data.dirtyRate * TIMESLICE_MS) / 1000;
  let credit = 0;
  Atomics.add(ctl, CONTROL.STARTED, 1);
  Atomics.notify(ctl, CONTROL.STARTED);
  while (Atomics.load(ctl, CONTROL.RUN) === 1) {
    const sliceEnd = performance.now() + TIMESLICE_MS;
    if (data.dirtyRate > 0) credit = Math.min(credit + perSlice, 2 * Math.max(1, perSlice));
    let inSlice = 0;
    for (;;) {
      if (data.dirtyRate > 0) {
        if (credit < 1) break;
        credit--;
      }
      write(pattern.next());
      inSlice++;
      if ((inSlice & 63) === 0) {
        Atomics.add(ctl, writesSlot, 64);
        if (performance.now() >= sliceEnd || Atomics.load(ctl, CONTROL.RUN) !== 1) break;
      }
    }
    Atomics.add(ctl, writesSlot, inSlice & 63);
    const pct = Atomics.load(ctl, CONTROL.THROTTLE);
    const left = sliceEnd - performance.now();
    // The rest of a slice the rate left idle, then the throttle's share of sleep.
    sleep(Math.max(0, left) + (pct > 0 ? (pct / (100 - pct)) * TIMESLICE_MS : 0));
  }
  Atomics.add(ctl, CONTROL.STOPPED, 1);
  Atomics.notify(ctl, CONTROL.STOPPED);
}

serveGuestWorker(run);
