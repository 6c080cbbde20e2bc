/**
 * DMA dirty tracking on the source, in process: who tracks which device
 * (QEMU's rule per container, and the user's override), what the
 * untracked-DMA policies do, a report error counting all memory dirty, and
 * whole precopy runs against a fake destination in which a scripted device
 * (not timed: it writes a few pages by DMA every frame the source sends)
 * writes behind the vCPU dirty log: its pages are re-sent under `device`
 * and `iommu` tracking and the destination ends equal to the source, while
 * nobody tracking them leaves stale pages there. Switchover-ack holds the
 * switchover until the destination acknowledges the devices' initial data.
 */
import { describe, expect, it } from 'vitest';
import {
  DEFAULT_MDEV_CATALOG,
  DEVICE_STATE,
  UsageError,
  decode,
  makeLayout,
  parseDevices,
  type DeviceSpec,
  type GuestLayout,
  type Message,
} from '@postcopy/shared';
import { DirtyLog } from '../dirty-log.js';
import { GuestImage } from '../image.js';
import type { Channel } from '../migration.js';
import { Precopy } from '../precopy.js';
import { DeviceHardware, DEVICE_CONTROL, RUN_LEVEL } from './hardware.js';
import { SourceDevices } from './source-devices.js';
import { planPolicy, planTracking, type DirtyTrackingMode, type UntrackedDmaPolicy } from './tracking.js';

const layout = makeLayout(2 * 1024 * 1024, 4096);
const specs = (...args: string[]): DeviceSpec[] => parseDevices({ device: args, layout, types: ['mgpu-128M'], defaultType: 'mgpu-128M' });
const providers = (mode: DirtyTrackingMode, ...args: string[]): Record<string, string> => Object.fromEntries(planTracking(specs(...args), mode).provider);

describe("who tracks a device's DMA (QEMU: per container, device logging only if every device has it, else the IOMMU, else none)", () => {
  it('auto, for mixed devices', () => {
    // One container: not every device logs, so its IOMMU tracks them all.
    expect(providers('auto', 'nic0:tracking=device,container=c', 'gpu0:tracking=iommu,container=c')).toEqual({ nic0: 'iommu', gpu0: 'iommu' });
    // Every device of the container logs its DMA: device logging.
    expect(providers('auto', 'nic0:tracking=device,container=c', 'nic1:tracking=device,container=c')).toEqual({ nic0: 'device', nic1: 'device' });
    // Each in its own container (the default): each its own.
    expect(providers('auto', 'nic0:tracking=device', 'gpu0:tracking=iommu', 'fpga0:tracking=none')).toEqual({ nic0: 'device', gpu0: 'iommu', fpga0: 'none' });
    // A device behind an IOMMU that cannot dirty-track takes the container's IOMMU tracking away from all.
    expect(providers('auto', 'nic0:tracking=device,container=c', 'fpga0:tracking=none,container=c')).toEqual({ nic0: 'none', fpga0: 'none' });
    expect(planTracking(specs('nic0:tracking=device,container=c', 'fpga0:tracking=none,container=c'), 'auto').why.get('nic0')).toMatch(/fpga0 in container c has neither DMA logging nor an IOMMU that tracks dirty pages/);
  });

  it('the user overrides it: device, or iommu; a device that cannot use the provider asked for is untracked', () => {
    expect(providers('device', 'nic0:tracking=device,container=c', 'gpu0:tracking=iommu,container=c')).toEqual({ nic0: 'device', gpu0: 'none' });
    expect(providers('iommu', 'nic0:tracking=device', 'gpu0:tracking=iommu', 'fpga0:tracking=none')).toEqual({ nic0: 'iommu', gpu0: 'iommu', fpga0: 'none' });
  });
});

describe('the untracked-DMA policy', () => {
  const plan = (policy: UntrackedDmaPolicy, ...args: string[]) => {
    const s = specs(...args);
    return planPolicy(s, planTracking(s, 'auto'), policy, false, layout);
  };

  it('block refuses to start, naming the device, unless it has enable-migration=on (then all RAM it reaches counts dirty)', () => {
    expect(() => plan('block', 'nic0:tracking=device', 'gpu0:tracking=none')).toThrow(UsageError);
    expect(() => plan('block', 'nic0:tracking=device', 'gpu0:tracking=none')).toThrow(/--device gpu0: its DMA cannot be tracked .* --untracked-dma block refuses to migrate it .* expected enable-migration=on on the device/);
    const through = plan('block', 'gpu0:tracking=none,enable-migration=on,dma-range=0-1MiB');
    expect(through).toMatchObject({ policy: 'block', untracked: ['gpu0'], allDirty: ['gpu0'], skipPrecopy: false });
    expect(through.reason).toMatch(/enable-migration=on lets it through .* every sync counts the 1MiB it reaches as dirty/);
    expect(plan('block', 'nic0:tracking=device')).toMatchObject({ untracked: [], warning: undefined });
    expect(() => plan('all-dirty', 'nic0:enable-migration=off')).toThrow(/migration is disabled for this device \(enable-migration=off/);
  });

  it('all-dirty and skip-precopy act on the untracked devices only, and say why', () => {
    expect(plan('all-dirty', 'nic0', 'gpu0:tracking=none')).toMatchObject({ policy: 'all-dirty', untracked: ['gpu0'], allDirty: ['gpu0'], skipPrecopy: false });
    const skip = plan('skip-precopy', 'nic0', 'gpu0:tracking=none');
    expect(skip).toMatchObject({ policy: 'skip-precopy', untracked: ['gpu0'], allDirty: [], skipPrecopy: true });
    expect(skip.warning).toMatch(/^device gpu0: DMA untracked .*: --untracked-dma skip-precopy: no precopy rounds$/);
    const s = specs('gpu0:tracking=none');
    expect(planPolicy(s, planTracking(s, 'auto'), 'block', true, layout)).toMatchObject({ policy: 'unsafe-untracked-dma', untracked: ['gpu0'], allDirty: [], skipPrecopy: false });
  });
});

/** A destination that applies precopy's pages and answers the device messages as a destination would (the ack on demand). */
class FakeDestination implements Channel {
  readonly label = 'fake-main';
  isOpen = true;
  readonly bufferedAmount = 0;
  readonly memory: Uint8Array;
  readonly types: string[] = [];
  onFrame: (() => void) | undefined;
  onMessage: ((m: Message) => void) | undefined;
  constructor(private readonly layout: GuestLayout) {
    this.memory = new Uint8Array(layout.guestBytes);
  }
  send(frame: Uint8Array, sent?: (err?: Error) => void): void {
    this.onFrame?.();
    const m = decode(frame, { layout: this.layout });
    this.types.push(m.type);
    const size = this.layout.pageSize;
    if (m.type === 'precopy-pages') this.memory.set(m.data, m.page * size);
    else if (m.type === 'precopy-zero') this.memory.fill(0, m.page * size, (m.page + 1) * size);
    this.onMessage?.(m);
    setImmediate(() => sent?.());
  }
}

/** A guest whose vCPUs write nothing: only the device's DMA changes memory. */
const idleGuest = { throttlePercent: 0, setThrottle: () => {}, stop: async () => performance.now() };

interface ScriptedRun {
  stale: number[];
  devices: SourceDevices;
  dest: FakeDestination;
  precopy: Precopy;
}

/**
 * A precopy run whose one device writes `perFrame` pages of a hot set of 64
 * pages by DMA every frame the source sends, while the device runs (its RUN
 * level: the switchover stops it, as it would the device's thread).
 */
async function scriptedDmaRun(arg: string, options: { policy?: UntrackedDmaPolicy; unsafe?: boolean; mode?: DirtyTrackingMode; ack?: boolean; onWait?: (dest: FakeDestination, devices: SourceDevices) => void } = {}): Promise<ScriptedRun> {
  const image = new GuestImage(layout, { seed: 9, zeroFraction: 0 });
  const s = specs(arg);
  const tracking = planTracking(s, options.mode ?? 'auto');
  const policy = planPolicy(s, tracking, options.policy ?? 'all-dirty', options.unsafe ?? false, layout);
  const devices = new SourceDevices(image, { specs: s, tracking, policy, switchoverAck: options.ack ?? false, catalog: DEFAULT_MDEV_CATALOG });
  const dev = devices.devices[0]!;
  const hw = new DeviceHardware(dev.buffers);
  const ctl = new Int32Array(dev.buffers.control);
  const log = new DirtyLog(layout.totalPages);
  const precopy = new Precopy(image, log, idleGuest, new Uint8Array(layout.totalPages), { mode: 'precopy', batchBytes: 16 * 4096, downtimeLimitMs: 300 }, devices);
  const dest = new FakeDestination(layout);
  let cursor = 0;
  dest.onFrame = () => {
    if (Atomics.load(ctl, DEVICE_CONTROL.RUN) !== RUN_LEVEL.RUNNING) return;
    for (let i = 0; i < 4; i++) hw.dmaWrite(0, 100 + (cursor++ % 64));
    hw.stateWrite(cursor);
  };
  if (options.onWait) {
    // The destination's ack comes when the source waits for it (not after some time): the run is scripted.
    const wait = devices.waitForAck.bind(devices);
    devices.waitForAck = (ms) => {
      options.onWait!(dest, devices);
      return wait(ms);
    };
  }
  const decision = await precopy.run(dest, performance.now());
  await precopy.switchover(dest, decision);
  const stale: number[] = [];
  for (let p = 0; p < layout.totalPages; p++) {
    if (Buffer.compare(Buffer.from(dest.memory.subarray(p * 4096, (p + 1) * 4096)), Buffer.from(image.pageBytes(p))) !== 0) stale.push(p);
  }
  return { stale, devices, dest, precopy };
}

describe('DMA dirty tracking through precopy (a scripted device against a fake destination)', () => {
  it.each([
    ['device', 'nic0:tracking=device,state=16KiB'],
    ['iommu', 'gpu0:tracking=iommu,state=16KiB'],
  ] as const)('under %s tracking the pages the device wrote are re-sent: the destination equals the source', async (provider, arg) => {
    const run = await scriptedDmaRun(arg);
    expect(run.stale).toEqual([]);
    const figures = run.devices.tracking.providerFigures();
    expect(figures[provider].syncs).toBeGreaterThanOrEqual(2);
    expect(figures[provider].pagesDirty).toBeGreaterThan(0);
    expect(figures[provider].bitmapBytes).toBeGreaterThan(0);
    const s = run.precopy.summary(1);
    expect(s.pagesResent).toBeGreaterThan(0);
    // The device stopped at the switchover, its state went in STOP_COPY, then device-end.
    expect(run.devices.devices[0]!.fsm.state).toBe(DEVICE_STATE.STOP_COPY);
    expect(run.dest.types.filter((t) => t === 'device-end')).toHaveLength(1);
    expect(run.precopy.switchoverDeviceMs).toBeGreaterThan(0);
  });

  it('IOMMU tracking reads the whole guest at every sync, device logging only the ranges the device reaches', async () => {
    const logged = (await scriptedDmaRun('nic0:tracking=device,state=4KiB,dma-range=0-1MiB')).devices.tracking.providerFigures().device;
    const iommu = (await scriptedDmaRun('gpu0:tracking=iommu,state=4KiB,dma-range=0-1MiB')).devices.tracking.providerFigures().iommu;
    expect(logged.bitmapBytes / logged.syncs).toBe(256 / 8);
    expect(iommu.bitmapBytes / iommu.syncs).toBe(512 / 8);
  });

  it('all-dirty counts the whole range dirty at every sync: no stale page, and every page of it re-sent', async () => {
    const run = await scriptedDmaRun('gpu0:tracking=none,state=4KiB,dma-range=0-1MiB', { policy: 'all-dirty' });
    expect(run.stale).toEqual([]);
    expect(run.devices.tracking.providerFigures().none.pagesDirty).toBe(256 * run.devices.tracking.providerFigures().none.syncs);
  });

  it('nobody tracking it (testing only: --unsafe-untracked-dma) leaves stale pages, all of them pages the device wrote', async () => {
    const run = await scriptedDmaRun('gpu0:tracking=none,state=4KiB', { unsafe: true });
    expect(run.stale.length).toBeGreaterThan(0);
    expect(run.stale.every((p) => p >= 100 && p < 164)).toBe(true);
  });

  it('a DMA_LOGGING_REPORT error counts all memory dirty and restarts logging', () => {
    const image = new GuestImage(layout, { seed: 9, zeroFraction: 0 });
    const s = specs('nic0:tracking=device,dma-range=0-64KiB');
    const tracking = planTracking(s, 'auto');
    const devices = new SourceDevices(image, { specs: s, tracking, policy: planPolicy(s, tracking, 'block', false, layout), switchoverAck: false, catalog: DEFAULT_MDEV_CATALOG });
    devices.setup();
    const dev = devices.devices[0]!;
    dev.failNextReport = true;
    const into = new Int32Array(layout.totalPages / 32);
    expect(devices.syncDirty(into)).toBe(layout.totalPages);
    expect(devices.tracking.errors[0]).toMatch(/device nic0: DMA_LOGGING_REPORT failed with errno 5: all memory counted dirty, logging restarted/);
    expect(dev.logPageSize).toBe(4096);
    expect(devices.syncDirty(new Int32Array(layout.totalPages / 32))).toBe(0);
  });
});

describe('switchover-ack', () => {
  it("holds the switchover until the destination acknowledges every PRE_COPY device's initial data", async () => {
    let waits = 0;
    let sentBeforeWait: string[] = [];
    const run = await scriptedDmaRun('nic0:tracking=device,state=64KiB,pre-copy', {
      ack: true,
      onWait: (dest, devices) => {
        waits++;
        sentBeforeWait = [...dest.types];
        // The destination has loaded the initial data: it acks, a turn later as over a link.
        setImmediate(() => devices.switchoverAcked());
      },
    });
    // It waited once, after the device said its initial data was sent, and switched over only after the ack.
    expect(waits).toBe(1);
    expect(sentBeforeWait).toContain('device-init-data-sent');
    expect(sentBeforeWait).not.toContain('device-end');
    expect(run.stale).toEqual([]);
    const summary = run.devices.summary({ ramMs: 0, deviceMs: 0 });
    expect(summary.switchoverAck.needed).toBe(true);
    expect(summary.devices[0]!.precopy.initialBytesAtStart).toBe(64 * 1024);
    expect(summary.devices[0]!.statePath).toEqual(['RUNNING', 'PRE_COPY', 'STOP_COPY']);
    expect(() => run.devices.switchoverAcked()).toThrow(/expected one switchover-ack, got a second/);
  });

  it('with --no-switchover-ack, no device-init-data-sent goes and nothing waits', async () => {
    const run = await scriptedDmaRun('nic0:tracking=device,state=64KiB,pre-copy', { ack: false });
    expect(run.dest.types).not.toContain('device-init-data-sent');
    expect(run.devices.summary({ ramMs: 0, deviceMs: 0 }).switchoverAck.needed).toBe(false);
  });
});
