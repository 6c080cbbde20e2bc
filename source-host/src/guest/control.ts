/**
 * The control block the source's vCPU threads and the migration share (one
 * Int32Array over a SharedArrayBuffer). Every field index is named here.
 */
export const CONTROL = {
  /** 1 while the guest runs; the migration stores 0 to stop it (and notifies). */
  RUN: 0,
  /** vCPUs that saw RUN = 0 and stopped: the stop is complete when it equals the vCPU count. */
  STOPPED: 1,
  /** The vCPUs' throttle in percent (auto-converge): each 10 ms timeslice of running is followed by pct/(100-pct) of one asleep. */
  THROTTLE: 2,
  /** vCPUs that have started their run loop. */
  STARTED: 3,
  /** First of the per-vCPU write counters (pages written, modulo 2^32). */
  WRITES: 4,
} as const;

export function controlLength(vcpus: number): number {
  return CONTROL.WRITES + vcpus;
}

/** QEMU's CPU_THROTLE_TIMESLICE_NS: a throttled vCPU runs this long, then sleeps its share. */
export const TIMESLICE_MS = 10;

/** What a source vCPU thread gets in its workerData. */
export interface SourceVcpuData {
  index: number;
  control: SharedArrayBuffer;
  image: import('../image.js').GuestImageBuffers;
  dirtyLog: SharedArrayBuffer;
  /** The dirty set (the first `dirtySetPages` pages) and the vCPUs sharing it: each walks its partition, as the sequential workload does. */
  dirtySetPages: number;
  vcpus: number;
  /** Pages per second it writes; 0 = as fast as it can. */
  dirtyRate: number;
}
