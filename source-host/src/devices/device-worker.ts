/**
 * An emulated assigned device on the source, as its own thread: while it
 * runs it writes guest RAM by DMA (`dmaRate` pages per second, at random
 * pages of its DMA ranges) and changes its internal state (`stateDirtyRate`
 * bytes per second, a chunk at a time), in timeslices of 10 ms as the source's
 * vCPUs do. Its driver changes what it may do through RUN (hardware.ts) and
 * waits for ACK.
 *
 * The handshake with the driver: the driver stores RUN, then bumps REQUEST,
 * and waits until ACK reaches its REQUEST. Each step here reads REQUEST
 * first and RUN second, acts on that RUN (a DMA write only at RUN_LEVEL
 * RUNNING), and only then stores ACK = the REQUEST it read. Atomics are
 * sequentially consistent, so a REQUEST this step read was bumped before the
 * RUN it read next was stored: an ACK of it comes after a step that saw the
 * new RUN, and every write of the old level is complete before it (the P2P
 * arc's "complete any outstanding operations", vfio.h).
 */
import { workerData } from 'node:worker_threads';
import { rng } from '@postcopy/shared';
import { DEVICE_CONTROL, DeviceHardware, RUN_LEVEL, type DeviceHardwareBuffers } from './hardware.js';
import { serveGuestWorker } from '../guest/worker-entry.js';

const TIMESLICE_MS = 10;

const data = workerData as DeviceHardwareBuffers;
const hw = new DeviceHardware(data);
const ctl = hw.ctl;

function run(): void {
  const random = rng(data.seed ^ 0x0d3a0d3a);
  const pages = data.dmaRanges.reduce((n, r) => n + r.count, 0);
  const pickPage = (): [number, number] => {
    let k = Math.floor(random() * pages);
    for (let i = 0; i < data.dmaRanges.length; i++) {
      const r = data.dmaRanges[i]!;
      if (k < r.count) return [i, r.first + k];
      k -= r.count;
    }
    return [0, data.dmaRanges[0]!.first];
  };
  const dmaPerSlice = (data.dmaRate * TIMESLICE_MS) / 1000;
  const statePerSlice = (data.stateDirtyRate / 4096) * (TIMESLICE_MS / 1000);
  let dmaCredit = 0;
  let stateCredit = 0;
  let stateChunk = 0;
  let acked = -1;
  Atomics.store(ctl, DEVICE_CONTROL.STARTED, 1);
  Atomics.notify(ctl, DEVICE_CONTROL.STARTED);
  while (Atomics.load(ctl, DEVICE_CONTROL.EXIT) === 0) {
    const sliceEnd = performance.now() + TIMESLICE_MS;
    dmaCredit = Math.min(dmaCredit + dmaPerSlice, 2 * Math.max(1, dmaPerSlice));
    stateCredit = Math.min(stateCredit + statePerSlice, 2 * Math.max(1, statePerSlice));
    let level: number = RUN_LEVEL.STOPPED;
    for (;;) {
      const request = Atomics.load(ctl, DEVICE_CONTROL.REQUEST);
      level = Atomics.load(ctl, DEVICE_CONTROL.RUN);
      let did = false;
      if (level === RUN_LEVEL.RUNNING && dmaCredit >= 1) {
        const [range, page] = pickPage();
        hw.dmaWrite(range, page);
        dmaCredit--;
        did = true;
      }
      if (level >= RUN_LEVEL.P2P_QUIESCED && stateCredit >= 1) {
        hw.stateWrite(stateChunk++);
        stateCredit--;
        did = true;
      }
      if (request !== acked) {
        Atomics.store(ctl, DEVICE_CONTROL.ACK, request);
        Atomics.notify(ctl, DEVICE_CONTROL.ACK);
        acked = request;
      }
      if (!did || performance.now() >= sliceEnd) break;
    }
    // The rest of the slice asleep; a change of RUN (or EXIT, which notifies RUN) wakes it at once.
    const left = sliceEnd - performance.now();
    if (level === RUN_LEVEL.STOPPED) Atomics.wait(ctl, DEVICE_CONTROL.RUN, level, 100);
    else if (left > 0) Atomics.wait(ctl, DEVICE_CONTROL.RUN, level, left);
  }
}

serveGuestWorker(run);
