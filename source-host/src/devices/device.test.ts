/**
 * One device on the source, driven by hand (its hardware scripted, not
 * timed): PRE_COPY info (initial_bytes falling as it is read, dirty_bytes
 * rising as the running device changes its state and falling as that is
 * read, ENOMSG with both at 0, stop_copy_length), the STOP_COPY stream to its
 * end, DMA logging (page size hint and answer, at most N ranges,
 * read-and-clear reports), the container's IOMMU bitmap, and, with the
 * device's real thread, a P2P arc that completes only once its DMA stopped.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { DEVICE_STATE, STATE_CHUNK_BYTES, makeLayout, parseDevices, stateDigest, counterWord, type DeviceSpec } from '@postcopy/shared';
import { GuestImage } from '../image.js';
import { E2BIG, EBUSY, ENOMSG, SourceDevice, type DeviceRecord } from './device.js';
import { DeviceHardware } from './hardware.js';
import { EINVAL, ENOTTY, EOPNOTSUPP, IommuContainer } from './iommu.js';

const layout = makeLayout(2 * 1024 * 1024, 4096);
const image = new GuestImage(layout, { seed: 5, zeroFraction: 0.5 });
const TYPES = ['mgpu-128M'];

function spec(arg: string): DeviceSpec {
  return parseDevices({ device: [arg], layout, types: TYPES, defaultType: 'mgpu-128M' })[0]!;
}

const closers: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  while (closers.length) await closers.pop()!();
});

function device(arg: string, container = new IommuContainer('c', layout.totalPages, true)): { dev: SourceDevice; hw: DeviceHardware } {
  const dev = new SourceDevice(spec(arg), 0, image, container, 77);
  closers.push(() => dev.close());
  return { dev, hw: new DeviceHardware(dev.buffers) };
}

const record = (r: DeviceRecord | number): DeviceRecord => {
  if (typeof r === 'number') throw new Error(`expected a record, got errno ${-r}`);
  return r;
};

describe('PRE_COPY info and the data stream', () => {
  it('initial_bytes starts at the whole state and falls as it is read; dirty_bytes rises as the device changes what was read; both 0 is ENOMSG', () => {
    const { dev, hw } = device('nic0:state=16KiB,pre-copy');
    expect(dev.precopyInfo()).toBe(EINVAL); // RUNNING: no PRE_COPY info
    expect(dev.read(4096)).toBe(EINVAL); // no data stream
    expect(dev.stopCopyLength()).toBe(16384);
    dev.fsm.setStateOrThrow(DEVICE_STATE.PRE_COPY, 'nic0');
    expect(dev.precopyInfo()).toEqual({ initialBytes: 16384, dirtyBytes: 0 });
    expect(record(dev.read(4096))).toMatchObject({ offset: 0 });
    expect(dev.precopyInfo()).toEqual({ initialBytes: 12288, dirtyBytes: 0 });
    // The running device changes a chunk it has read (dirty) and one it has not (still initial).
    hw.stateWrite(0);
    hw.stateWrite(3);
    expect(dev.precopyInfo()).toEqual({ initialBytes: 12288, dirtyBytes: 4096 });
    expect(dev.stopCopyLength()).toBe(12288 + 4096);
    const rest = record(dev.read(64 * 1024));
    expect(rest.offset).toBe(4096);
    expect(rest.data.length).toBe(12288);
    expect(dev.precopyInfo()).toEqual({ initialBytes: 0, dirtyBytes: 4096 });
    const again = record(dev.read(64 * 1024));
    expect(again.offset).toBe(0);
    expect(new Uint32Array(again.data.buffer, again.data.byteOffset, 1024)[counterWord(STATE_CHUNK_BYTES)]).not.toBe(0);
    expect(dev.precopyInfo()).toEqual({ initialBytes: 0, dirtyBytes: 0 });
    // Nothing to read now: the kernel's temporary end of stream.
    expect(dev.read(4096)).toBe(ENOMSG);
    hw.stateWrite(1);
    hw.stateWrite(2);
    expect(dev.precopyInfo()).toEqual({ initialBytes: 0, dirtyBytes: 8192 });
    expect(record(dev.read(4096))).toMatchObject({ offset: 4096 });
    expect(dev.precopyInfo()).toEqual({ initialBytes: 0, dirtyBytes: 4096 });
    expect(dev.dirtyBytesMax).toBe(8192);
    expect(dev.precopyBytes).toBe(16384 + 4096 + 4096);
  });

  it('STOP_COPY gives the rest, then end of stream (0, never ENOMSG); the digest is of the state as it stopped', () => {
    const { dev, hw } = device('nic0:state=12KiB,pre-copy');
    dev.fsm.setStateOrThrow(DEVICE_STATE.PRE_COPY, 'nic0');
    record(dev.read(64 * 1024));
    hw.stateWrite(2);
    dev.fsm.setStateOrThrow(DEVICE_STATE.STOP_COPY, 'nic0');
    expect(dev.precopyInfo()).toBe(EINVAL);
    expect(dev.stopCopyLength()).toBe(4096);
    expect(record(dev.read(64 * 1024))).toMatchObject({ offset: 8192 });
    expect(dev.read(64 * 1024)).toBe(0);
    expect(dev.read(64 * 1024)).toBe(0);
    expect(dev.stopCopyBytes).toBe(4096);
    const state = new Uint8Array(dev.buffers.state);
    expect(dev.digest).toBe(stateDigest(state));
    expect(dev.fsm.path).toEqual(['RUNNING', 'PRE_COPY', 'STOP_COPY']);
  });

  it('a device without PRE_COPY sends its whole state in STOP_COPY', () => {
    const { dev } = device('gpu0:state=10KiB');
    expect(dev.fsm.setState(DEVICE_STATE.PRE_COPY)).toBe(EINVAL);
    dev.fsm.setStateOrThrow(DEVICE_STATE.STOP_COPY, 'gpu0');
    const a = record(dev.read(8192));
    const b = record(dev.read(8192));
    expect([a.offset, a.data.length, b.offset, b.data.length]).toEqual([0, 8192, 8192, 2048]);
    expect(dev.read(8192)).toBe(0);
    expect(dev.fsm.path).toEqual(['RUNNING', 'STOP', 'STOP_COPY']);
  });
});

describe('DMA logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_*)', () => {
  it('answers the page size it uses, allows at most its ranges, and reports read-and-clear; DMA never touches the vCPU log', () => {
    const { dev, hw } = device('nic0:tracking=device,dma-range=0-64KiB+128KiB-192KiB,log-max-ranges=2,log-page-size=8KiB');
    const ranges = dev.spec.dmaRanges;
    expect(dev.logStart(4096, [...ranges, { first: 100, count: 1 }])).toBe(E2BIG);
    expect(dev.logStart(4096, ranges)).toEqual({ pageSize: 8192 });
    expect(dev.logStart(4096, ranges)).toBe(EBUSY);
    const into = new Int32Array(layout.totalPages / 32);
    // Page 5 lies in the 8 KiB logging page of pages 4 and 5; page 33 in range 1's first.
    const before = new Uint32Array(image.pageBytes(5).buffer, image.pageBytes(5).byteOffset, 1024)[1023];
    hw.dmaWrite(0, 5);
    hw.dmaWrite(1, 33);
    expect(new Uint32Array(image.pageBytes(5).buffer, image.pageBytes(5).byteOffset, 1024)[1023]).toBe(((before ?? 0) + 1) >>> 0);
    expect(image.isZero(5)).toBe(false);
    expect(dev.logReport(0, 16, 4096, into)).toEqual({ bitmapBytes: 2, pagesDirty: 2 });
    expect(dev.logReport(32, 16, 4096, into)).toEqual({ bitmapBytes: 2, pagesDirty: 2 });
    expect(into[0]).toBe((1 << 4) | (1 << 5));
    expect(into[1]).toBe(0b11);
    // Read and cleared: a second report finds nothing.
    expect(dev.logReport(0, 16, 4096, into)).toEqual({ bitmapBytes: 2, pagesDirty: 0 });
    expect(dev.logStop()).toBe(0);
    expect(dev.logReport(0, 16, 4096, into)).toBe(EINVAL);
    // Logging off: DMA is recorded nowhere by the device.
    hw.dmaWrite(0, 6);
    expect(dev.logStart(4096, ranges)).toEqual({ pageSize: 8192 });
    expect(dev.logReport(0, 16, 4096, new Int32Array(16))).toEqual({ bitmapBytes: 2, pagesDirty: 0 });
  });

  it('a device without it refuses with ENOTTY', () => {
    const { dev } = device('gpu0:tracking=iommu');
    expect(dev.logStart(4096, dev.spec.dmaRanges)).toBe(ENOTTY);
  });
});

describe("the container's IOMMU dirty bitmap", () => {
  it('records every DMA through the domain while enabled; get-dirty-bitmap reads and clears (or not, with NO_CLEAR)', () => {
    const container = new IommuContainer('c', layout.totalPages, true);
    const { hw } = device('gpu0:tracking=iommu', container);
    const into = new Int32Array(layout.totalPages / 32);
    expect(container.getDirtyBitmap(0, layout.totalPages, into)).toBe(EINVAL);
    hw.dmaWrite(0, 7); // before dirty tracking: not recorded
    expect(container.setDirtyTracking(true)).toBe(0);
    hw.dmaWrite(0, 40);
    hw.dmaWrite(0, 41);
    expect(container.getDirtyBitmap(0, layout.totalPages, into, true)).toEqual({ bitmapBytes: 64, pagesDirty: 2 });
    expect(container.getDirtyBitmap(0, layout.totalPages, into)).toEqual({ bitmapBytes: 64, pagesDirty: 2 });
    expect(container.getDirtyBitmap(0, layout.totalPages, into)).toEqual({ bitmapBytes: 64, pagesDirty: 0 });
    expect(into[1]).toBe(0b1100000000);
    expect(into[0]).toBe(0);
    expect(new IommuContainer('n', 64, false).setDirtyTracking(true)).toBe(EOPNOTSUPP);
  });
});

describe("the device's thread", () => {
  it('RUNNING -> RUNNING_P2P completes only once its DMA stopped; its state still changes; STOP stops that too', { timeout: 20_000 }, async () => {
    // Fast enough that a DMA write may well be in progress when the arc begins.
    const { dev } = device('nic0:dma-rate=10000000,state=64KiB,state-dirty-rate=1MiB,p2p');
    await dev.start((err) => {
      throw err;
    });
    while (dev.dmaWrites === 0) await new Promise((r) => setTimeout(r, 5));
    dev.fsm.setStateOrThrow(DEVICE_STATE.RUNNING_P2P, 'nic0');
    const writes = dev.dmaWrites;
    const stateWrites = dev.stateWrites;
    await new Promise((r) => setTimeout(r, 50));
    expect(dev.dmaWrites).toBe(writes);
    while (dev.stateWrites === stateWrites) await new Promise((r) => setTimeout(r, 5));
    dev.fsm.setStateOrThrow(DEVICE_STATE.STOP, 'nic0');
    const stopped = dev.stateWrites;
    await new Promise((r) => setTimeout(r, 50));
    expect(dev.stateWrites).toBe(stopped);
    expect(dev.dmaWrites).toBe(writes);
  });
});
