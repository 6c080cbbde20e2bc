/**
 * One assigned device on the source, as its variant driver and the VFIO core
 * present it to the migration (include/uapi/linux/vfio.h):
 *
 * - VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: its VFIO v2 state machine
 *   (vfio-fsm.ts); each arc sets what the hardware may do (RUN in
 *   hardware.ts) and, when it does less (P2P, STOP), waits until the device
 *   has finished the write in progress, as the P2P arc must;
 * - the data stream (the data_fd): read() gives the state in records, first
 *   the initial pass (initial_bytes), then the chunks the running device
 *   changed since they were read (dirty_bytes); ENOMSG in PRE_COPY when both
 *   are 0 (a temporary end of stream), 0 (end of stream) in STOP_COPY once
 *   all is read; VFIO_MIG_GET_PRECOPY_INFO and
 *   VFIO_DEVICE_FEATURE_MIG_DATA_SIZE (stop_copy_length);
 * - DMA logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_START / _REPORT / _STOP),
 *   when the device has it.
 */
import type { Worker } from 'node:worker_threads';
import {
  DEVICE_STATE,
  MAX_LOG_RANGES,
  STATE_CHUNK_BYTES,
  VfioDeviceFsm,
  chunkBytes,
  chunkCount,
  deviceFlags,
  initialState,
  inSavingGroup,
  startWorker,
  stateDigest,
  type DeviceSpec,
  type DeviceState,
  type PageRange,
} from '@postcopy/shared';
import type { GuestImage } from '../image.js';
import { DEVICE_CONTROL, RUN_LEVEL, logLayout, type DeviceHardwareBuffers } from './hardware.js';
import { EINVAL, ENOTTY, type BitmapRead, type IommuContainer } from './iommu.js';

export const ENOMSG = -42;
export const E2BIG = -7;
export const EBUSY = -16;
export const EIO = -5;
export const ETIMEDOUT = -110;

/** How long a quiescing arc waits for the device to finish its write in progress. */
const QUIESCE_TIMEOUT_MS = 5000;

/** One record read from the data stream. */
export interface DeviceRecord {
  offset: number;
  data: Uint8Array;
}

/** struct vfio_precopy_info. */
export interface PrecopyInfo {
  initialBytes: number;
  dirtyBytes: number;
}

function runLevel(state: DeviceState): number {
  if (state === DEVICE_STATE.RUNNING || state === DEVICE_STATE.PRE_COPY) return RUN_LEVEL.RUNNING;
  if (state === DEVICE_STATE.RUNNING_P2P || state === DEVICE_STATE.PRE_COPY_P2P) return RUN_LEVEL.P2P_QUIESCED;
  return RUN_LEVEL.STOPPED;
}

export class SourceDevice {
  readonly fsm: VfioDeviceFsm;
  readonly flags: number;
  readonly buffers: DeviceHardwareBuffers;
  private readonly ctl: Int32Array;
  private readonly state: Uint8Array;
  private readonly stateDirty: Int32Array;
  private readonly log: Int32Array;
  private readonly chunks: number;
  private readonly pageSize: number;
  /** The initial pass of the open stream: chunks below it were read once. */
  private cursor = 0;
  private worker: Worker | undefined;
  private failure: Error | undefined;
  /** Figures for the report. */
  initialBytesAtStart = 0;
  precopyBytes = 0;
  dirtyBytesMax = 0;
  stopCopyBytes = 0;
  digest = '';
  /** Testing only: the next DMA_LOGGING_REPORT fails with EIO (the log must then count as lost). */
  failNextReport = false;

  constructor(
    readonly spec: DeviceSpec,
    readonly index: number,
    image: GuestImage,
    readonly container: IommuContainer,
    readonly stateSeed: number,
  ) {
    this.flags = deviceFlags(spec);
    this.pageSize = image.layout.pageSize;
    this.chunks = chunkCount(spec.stateBytes);
    const state = new SharedArrayBuffer(spec.stateBytes);
    this.state = new Uint8Array(state);
    initialState(stateSeed, spec.stateBytes, this.state);
    const stateDirty = new SharedArrayBuffer(Math.max(4, Math.ceil(this.chunks / 32) * 4));
    this.stateDirty = new Int32Array(stateDirty);
    const { base, bits } = logLayout(spec.dmaRanges, this.pageSize, spec.logPageSize);
    const log = new SharedArrayBuffer(Math.max(4, (bits / 32) * 4));
    this.log = new Int32Array(log);
    const control = new SharedArrayBuffer(DEVICE_CONTROL.LENGTH * 4);
    this.ctl = new Int32Array(control);
    Atomics.store(this.ctl, DEVICE_CONTROL.RUN, RUN_LEVEL.RUNNING);
    this.buffers = {
      name: spec.name,
      control,
      state,
      stateDirty,
      log,
      logBase: base,
      iommuControl: container.control,
      iommuBitmap: container.bitmap,
      image: image.toBuffers(),
      dmaRanges: spec.dmaRanges,
      dmaRate: spec.dmaRate,
      stateDirtyRate: spec.stateDirtyRate,
      seed: stateSeed,
    };
    this.fsm = new VfioDeviceFsm(
      this.flags,
      (from, to) => this.arc(from, to),
      (event) => {
        if (event === 'open') this.cursor = 0;
      },
    );
  }

  get name(): string {
    return this.spec.name;
  }

  /** Starts the device's thread (it runs: RUNNING). */
  async start(onError: (err: Error) => void): Promise<void> {
    const worker = startWorker(import.meta.url, 'device-worker', { workerData: this.buffers });
    this.worker = worker;
    await new Promise<void>((resolve, reject) => {
      worker.on('message', (m: { type: string; message?: string }) => {
        if (m.type === 'ready') {
          worker.postMessage('go');
          resolve();
        } else if (m.type === 'error') {
          const err = new Error(`device ${this.name}: ${m.message}`);
          this.failure ??= err;
          onError(err);
        }
      });
      worker.once('error', (err) => {
        const e = new Error(`device ${this.name}: ${err.message}`);
        this.failure ??= e;
        reject(e);
        onError(e);
      });
    });
    for (;;) {
      if (Atomics.load(this.ctl, DEVICE_CONTROL.STARTED) === 1) return;
      if (this.failure) throw this.failure;
      const wait = Atomics.waitAsync(this.ctl, DEVICE_CONTROL.STARTED, 0, 100);
      if (wait.async) await wait.value;
    }
  }

  /** DMA writes and state changes so far. */
  get dmaWrites(): number {
    return Atomics.load(this.ctl, DEVICE_CONTROL.DMA_WRITES) >>> 0;
  }

  get stateWrites(): number {
    return Atomics.load(this.ctl, DEVICE_CONTROL.STATE_WRITES) >>> 0;
  }

  /**
   * The driver's side of one arc: what the hardware may do in `to`. Doing
   * less waits (synchronously, as the SET_STATE ioctl blocks) until the
   * device thread acknowledges, so no DMA of the old state is still in
   * flight when the arc completes; a device that does not answer fails the arc.
   */
  private arc(_from: DeviceState, to: DeviceState): number {
    const level = runLevel(to);
    const was = Atomics.load(this.ctl, DEVICE_CONTROL.RUN);
    if (level === was) return 0;
    Atomics.store(this.ctl, DEVICE_CONTROL.RUN, level);
    const request = Atomics.add(this.ctl, DEVICE_CONTROL.REQUEST, 1) + 1;
    Atomics.notify(this.ctl, DEVICE_CONTROL.RUN);
    if (level > was || this.worker === undefined) return 0;
    const deadline = performance.now() + QUIESCE_TIMEOUT_MS;
    for (;;) {
      const ack = Atomics.load(this.ctl, DEVICE_CONTROL.ACK);
      if (((ack - request) | 0) >= 0) return 0;
      const left = deadline - performance.now();
      if (left <= 0) return ETIMEDOUT;
      Atomics.wait(this.ctl, DEVICE_CONTROL.ACK, ack, left);
    }
  }

  /** VFIO_MIG_GET_PRECOPY_INFO: only in PRE_COPY and PRE_COPY_P2P (EINVAL otherwise). */
  precopyInfo(): PrecopyInfo | number {
    const s = this.fsm.state;
    if (s !== DEVICE_STATE.PRE_COPY && s !== DEVICE_STATE.PRE_COPY_P2P) return EINVAL;
    const info = { initialBytes: this.unreadInitialBytes(), dirtyBytes: this.dirtyReadBytes() };
    if (info.dirtyBytes > this.dirtyBytesMax) this.dirtyBytesMax = info.dirtyBytes;
    return info;
  }

  /** VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: what STOP_COPY would still carry (the rest of an open stream, or the whole state). */
  stopCopyLength(): number {
    if (!this.fsm.streamOpen || !inSavingGroup(this.fsm.state)) return this.spec.stateBytes;
    return this.unreadInitialBytes() + this.dirtyReadBytes();
  }

  private unreadInitialBytes(): number {
    return this.spec.stateBytes - Math.min(this.spec.stateBytes, this.cursor * STATE_CHUNK_BYTES);
  }

  /** Bytes of chunks read once and changed since (their dirty bits, read without clearing). */
  private dirtyReadBytes(): number {
    let bytes = 0;
    const words = Math.ceil(this.cursor / 32);
    for (let w = 0; w < words; w++) {
      let v = Atomics.load(this.stateDirty, w);
      if (v === 0) continue;
      const valid = Math.min(32, this.cursor - w * 32);
      if (valid < 32) v &= (1 << valid) - 1;
      while (v !== 0) {
        const bit = 31 - Math.clz32(v & -v);
        bytes += chunkBytes(this.spec.stateBytes, w * 32 + bit);
        v &= v - 1;
      }
    }
    return bytes;
  }

  /**
   * read(2) on the data stream: a record of at most `maxBytes` (whole
   * chunks), or ENOMSG (PRE_COPY with nothing to read now), 0 (STOP_COPY: end
   * of stream), EINVAL (no saving stream open). Each chunk's dirty bit is
   * cleared before the chunk is copied (see hardware.ts).
   */
  read(maxBytes: number): DeviceRecord | number {
    const s = this.fsm.state;
    if (!this.fsm.streamOpen || !inSavingGroup(s)) return EINVAL;
    const stopCopy = s === DEVICE_STATE.STOP_COPY;
    const most = Math.max(1, Math.floor(maxBytes / STATE_CHUNK_BYTES));
    let first: number;
    let end: number;
    if (this.cursor < this.chunks) {
      first = this.cursor;
      end = Math.min(this.chunks, first + most);
      for (let c = first; c < end; c++) Atomics.and(this.stateDirty, c >>> 5, ~(1 << (c & 31)));
      this.cursor = end;
    } else {
      const found = this.nextDirty();
      if (found < 0) {
        if (stopCopy && !this.digest) this.digest = stateDigest(this.state);
        return stopCopy ? 0 : ENOMSG;
      }
      first = found;
      end = first;
      while (end < this.chunks && end - first < most) {
        const old = Atomics.and(this.stateDirty, end >>> 5, ~(1 << (end & 31)));
        if ((old & (1 << (end & 31))) === 0) break;
        end++;
      }
    }
    const offset = first * STATE_CHUNK_BYTES;
    const data = this.state.slice(offset, Math.min(this.spec.stateBytes, end * STATE_CHUNK_BYTES));
    if (stopCopy) this.stopCopyBytes += data.length;
    else this.precopyBytes += data.length;
    return { offset, data };
  }

  private nextDirty(): number {
    for (let w = 0; w < this.stateDirty.length; w++) {
      const v = Atomics.load(this.stateDirty, w);
      if (v !== 0) {
        const c = w * 32 + (31 - Math.clz32(v & -v));
        if (c < this.chunks) return c;
      }
    }
    return -1;
  }

  // ------------------------------------------------------------ DMA logging

  /** The page size logging was started at (0: not started). */
  get logPageSize(): number {
    return Atomics.load(this.ctl, DEVICE_CONTROL.LOG_ON) === 1 ? 2 ** Atomics.load(this.ctl, DEVICE_CONTROL.LOG_PAGE_SHIFT) : 0;
  }

  /**
   * VFIO_DEVICE_FEATURE_DMA_LOGGING_START: `pageSizeHint` in, the page size
   * the device uses out (the hint, or its finest if that is coarser); at most
   * its own number of ranges (E2BIG beyond, as beyond the kernel's 256);
   * ranges aligned to the hint, not overlapping (EINVAL); ENOTTY without DMA
   * logging; EBUSY when started already (one start, then a stop).
   */
  logStart(pageSizeHint: number, ranges: readonly PageRange[]): { pageSize: number } | number {
    if (this.spec.tracking !== 'device') return ENOTTY;
    if (Atomics.load(this.ctl, DEVICE_CONTROL.LOG_ON) === 1) return EBUSY;
    if (ranges.length === 0) return EINVAL;
    if (ranges.length > MAX_LOG_RANGES || ranges.length > this.spec.logMaxRanges) return E2BIG;
    if (pageSizeHint < 4096 || (pageSizeHint & (pageSizeHint - 1)) !== 0) return EINVAL;
    let end = 0;
    for (const r of [...ranges].sort((a, b) => a.first - b.first)) {
      if ((r.first * this.pageSize) % pageSizeHint !== 0 || (r.count * this.pageSize) % pageSizeHint !== 0 || r.first < end) return EINVAL;
      end = r.first + r.count;
    }
    const pageSize = Math.max(pageSizeHint, this.spec.logPageSize);
    for (let i = 0; i < this.log.length; i++) Atomics.store(this.log, i, 0);
    // The shift before the switch: a DMA write that sees LOG_ON reads the shift of this start.
    Atomics.store(this.ctl, DEVICE_CONTROL.LOG_PAGE_SHIFT, Math.log2(pageSize));
    Atomics.store(this.ctl, DEVICE_CONTROL.LOG_ON, 1);
    return { pageSize };
  }

  /** VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP. */
  logStop(): number {
    if (this.spec.tracking !== 'device') return ENOTTY;
    Atomics.store(this.ctl, DEVICE_CONTROL.LOG_ON, 0);
    return 0;
  }

  /**
   * VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT over guest pages [first, first +
   * count): reads and clears the log there and sets, in `into` (one bit a
   * page of `reportPageSize`, here the guest's), every page a logged DMA
   * wrote, replicating a bit over the pages it covers when the device logs
   * coarser. EINVAL when logging is off.
   */
  logReport(first: number, count: number, reportPageSize: number, into: Int32Array): BitmapRead | number {
    if (this.spec.tracking !== 'device') return ENOTTY;
    if (Atomics.load(this.ctl, DEVICE_CONTROL.LOG_ON) !== 1) return EINVAL;
    if (reportPageSize !== this.pageSize) return EINVAL;
    if (this.failNextReport) {
      this.failNextReport = false;
      return EIO;
    }
    const logPage = this.logPageSize;
    const pagesPerBit = logPage / this.pageSize;
    const end = first + count;
    let pagesDirty = 0;
    this.spec.dmaRanges.forEach((r, i) => {
      const lo = Math.max(first, r.first);
      const hi = Math.min(end, r.first + r.count);
      if (lo >= hi) return;
      const base = this.buffers.logBase[i]!;
      const bitLo = base + Math.floor((lo - r.first) / pagesPerBit);
      const bitHi = base + Math.ceil((hi - r.first) / pagesPerBit);
      for (let w = bitLo >>> 5; w << 5 < bitHi; w++) {
        const a = Math.max(bitLo, w << 5);
        const b = Math.min(bitHi, (w + 1) << 5);
        const mask = b - a === 32 ? -1 : (((1 << (b - a)) - 1) << (a & 31)) | 0;
        const found = Atomics.and(this.log, w, ~mask) & mask;
        if (found === 0) continue;
        let v = found;
        while (v !== 0) {
          const bit = (w << 5) + (31 - Math.clz32(v & -v));
          v &= v - 1;
          const p0 = r.first + (bit - base) * pagesPerBit;
          for (let p = Math.max(lo, p0); p < Math.min(hi, p0 + pagesPerBit); p++) {
            into[p >>> 5]! |= 1 << (p & 31);
            pagesDirty++;
          }
        }
      }
    });
    return { bitmapBytes: Math.ceil(count / 8), pagesDirty };
  }

  /** The device's thread ends (after the migration; a stopped device does nothing more). */
  async close(): Promise<void> {
    Atomics.store(this.ctl, DEVICE_CONTROL.EXIT, 1);
    Atomics.notify(this.ctl, DEVICE_CONTROL.RUN);
    await this.worker?.terminate();
    this.worker = undefined;
  }
}
