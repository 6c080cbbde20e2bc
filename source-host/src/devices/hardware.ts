/**
 * An emulated assigned device's hardware, as shared memory between its
 * worker thread (the device doing DMA and changing its state) and the
 * source's main thread (its driver and the migration): every field index is
 * named here, and every race the ordering of Atomics prevents is explained
 * where it happens.
 *
 * A DMA write is not a vCPU write: it changes a guest page (the counter word,
 * as a vCPU does, so that a missed page shows on the destination) and clears
 * the page's zero flag, but never sets the vCPU dirty log. Whoever tracks it
 * records it: the device's own DMA log (VFIO_DEVICE_FEATURE_DMA_LOGGING_*)
 * when logging is on, and its container's IOMMU dirty bitmap when the
 * container's dirty tracking is on (IOMMU_HWPT_SET_DIRTY_TRACKING); with
 * neither, nobody.
 */
import { counterWord, stateCounterWord, STATE_CHUNK_BYTES, type PageRange } from '@postcopy/shared';
import type { GuestImageBuffers } from '../image.js';

/** The device's control block (Int32 fields of one SharedArrayBuffer). */
export const DEVICE_CONTROL = {
  /**
   * What the device may do now (RUN_LEVEL): 2 running (DMA and state
   * changes: RUNNING, PRE_COPY), 1 P2P-quiesced (RUNNING_P2P, PRE_COPY_P2P:
   * it cannot tell P2P DMA from other DMA, so it initiates none, vfio.h; its
   * internal state still changes), 0 stopped (STOP, STOP_COPY, RESUMING, ERROR).
   */
  RUN: 0,
  /** Bumped by the driver with every change of RUN. */
  REQUEST: 1,
  /** The worker's copy of REQUEST, stored once it acts on RUN: its write in progress is complete. */
  ACK: 2,
  /** 1: the worker ends. */
  EXIT: 3,
  /** 1 while DMA logging is started. */
  LOG_ON: 4,
  /** log2 of the page size the device logs at (chosen at DMA_LOGGING_START). */
  LOG_PAGE_SHIFT: 5,
  /** DMA writes so far (modulo 2^32). */
  DMA_WRITES: 6,
  /** State chunk writes so far (modulo 2^32). */
  STATE_WRITES: 7,
  /** 1 once the worker runs its loop. */
  STARTED: 8,
  LENGTH: 9,
} as const;

export const RUN_LEVEL = { STOPPED: 0, P2P_QUIESCED: 1, RUNNING: 2 } as const;

/** A container's IOMMU control block. */
export const IOMMU_CONTROL = {
  /** 1 while the domain's dirty tracking is enabled: the IOMMU sets a page's dirty bit on every DMA write through it. */
  DIRTY_ON: 0,
  LENGTH: 1,
} as const;

/** What the device's worker gets (structured-cloned). */
export interface DeviceHardwareBuffers {
  name: string;
  control: SharedArrayBuffer;
  /** The device's internal state, and one dirty bit per 4 KiB chunk of it. */
  state: SharedArrayBuffer;
  stateDirty: SharedArrayBuffer;
  /** The device's DMA log: for each DMA range, a bitmap (at the device's finest log page size), from bit `logBase[i]`, word-aligned. */
  log: SharedArrayBuffer;
  logBase: number[];
  /** Its container's IOMMU: control block and dirty bitmap (one bit a guest page). */
  iommuControl: SharedArrayBuffer;
  iommuBitmap: SharedArrayBuffer;
  image: GuestImageBuffers;
  dmaRanges: PageRange[];
  /** Pages per second of DMA, bytes per second of state changes. */
  dmaRate: number;
  stateDirtyRate: number;
  seed: number;
}

/** Bits each DMA range needs in the log at the finest page size, rounded up to whole words, and where each starts. */
export function logLayout(ranges: readonly PageRange[], pageSize: number, logPageSize: number): { base: number[]; bits: number } {
  const base: number[] = [];
  let bits = 0;
  for (const r of ranges) {
    base.push(bits);
    const n = Math.ceil((r.count * pageSize) / logPageSize);
    bits += Math.ceil(n / 32) * 32;
  }
  return { base, bits };
}

/**
 * The device's side of the hardware: its DMA and its state changes. The
 * worker runs it; unit tests drive it directly (scripted, not timed).
 */
export class DeviceHardware {
  readonly ctl: Int32Array;
  private readonly state: Uint32Array;
  private readonly stateDirty: Int32Array;
  private readonly log: Int32Array;
  private readonly iommuCtl: Int32Array;
  private readonly iommuBitmap: Int32Array;
  private readonly chunks: Uint32Array[];
  private readonly zero: Uint8Array;
  private readonly wordsPerPage: number;
  private readonly counter: number;
  private readonly pagesPerChunk: number;
  private readonly pageSize: number;
  private readonly stateChunks: number;

  constructor(readonly b: DeviceHardwareBuffers) {
    this.ctl = new Int32Array(b.control);
    this.state = new Uint32Array(b.state);
    this.stateDirty = new Int32Array(b.stateDirty);
    this.log = new Int32Array(b.log);
    this.iommuCtl = new Int32Array(b.iommuControl);
    this.iommuBitmap = new Int32Array(b.iommuBitmap);
    this.chunks = b.image.chunks.map((c) => new Uint32Array(c));
    this.zero = new Uint8Array(b.image.zero);
    this.pageSize = b.image.layout.pageSize;
    this.wordsPerPage = this.pageSize >>> 2;
    this.counter = counterWord(this.pageSize);
    this.pagesPerChunk = b.image.pagesPerChunk;
    this.stateChunks = Math.ceil(b.state.byteLength / STATE_CHUNK_BYTES);
  }

  /**
   * One DMA write to guest page `page` of DMA range `range`: the store, the
   * zero flag, then the trackers' bits, in that order. As with the vCPU dirty
   * log (dirty-log.ts), a reader that read-and-clears a bit with an atomic
   * exchange and then copies the page sees this write, or the bit is set
   * again after the exchange and the page is dirty at the next sync: no
   * write is lost between a tracker's report and the copy.
   */
  dmaWrite(range: number, page: number): void {
    const chunk = Math.floor(page / this.pagesPerChunk);
    const words = this.chunks[chunk]!;
    const i = (page - chunk * this.pagesPerChunk) * this.wordsPerPage + this.counter;
    words[i] = (words[i]! + 1) >>> 0;
    if (this.zero[page] !== 0) Atomics.store(this.zero, page, 0);
    if (Atomics.load(this.ctl, DEVICE_CONTROL.LOG_ON) === 1) {
      const r = this.b.dmaRanges[range]!;
      const shift = Atomics.load(this.ctl, DEVICE_CONTROL.LOG_PAGE_SHIFT);
      const bit = this.b.logBase[range]! + Math.floor(((page - r.first) * this.pageSize) / 2 ** shift);
      Atomics.or(this.log, bit >>> 5, 1 << (bit & 31));
    }
    if (Atomics.load(this.iommuCtl, IOMMU_CONTROL.DIRTY_ON) === 1) Atomics.or(this.iommuBitmap, page >>> 5, 1 << (page & 31));
    Atomics.add(this.ctl, DEVICE_CONTROL.DMA_WRITES, 1);
  }

  /**
   * The device changes chunk `chunk` of its state: its counter word goes up,
   * then the chunk's dirty bit. The reader clears a chunk's bit before it
   * copies the chunk, so a change racing the copy sets the bit again and the
   * chunk is read again (dirty_bytes); a torn copy is always followed by a
   * whole one.
   */
  stateWrite(chunk: number): void {
    const c = chunk % this.stateChunks;
    const wordsInChunk = Math.min(STATE_CHUNK_BYTES, this.b.state.byteLength - c * STATE_CHUNK_BYTES) >>> 2;
    if (wordsInChunk === 0) return;
    const i = c * (STATE_CHUNK_BYTES >>> 2) + stateCounterWord(wordsInChunk);
    this.state[i] = (this.state[i]! + 1) >>> 0;
    Atomics.or(this.stateDirty, c >>> 5, 1 << (c & 31));
    Atomics.add(this.ctl, DEVICE_CONTROL.STATE_WRITES, 1);
  }

  get stateChunkCount(): number {
    return this.stateChunks;
  }
}
