/**
 * Device specs (`--device NAME:key=value,...`, `--devices FILE.json`): every
 * field, its default, and every bad input the issue lists, each a
 * UsageError that says what is accepted.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { UsageError } from '../errors.js';
import { makeLayout } from '../layout.js';
import { DEFAULT_MDEV_CATALOG, mdevTypeIds } from './mdev.js';
import { DEVICE_DEFAULTS, deviceFlags, parseDevices, type DeviceSpec } from './spec.js';
import { MIGRATION_FLAG } from './vfio-fsm.js';

const layout = makeLayout(16 * 1024 * 1024, 4096);
const DEFAULT_DEVICE_TYPES = mdevTypeIds(DEFAULT_MDEV_CATALOG);
const parseWith = (device: string[]): DeviceSpec[] => parseDevices({ device, layout, types: DEFAULT_DEVICE_TYPES, defaultType: 'mgpu-128M' });

describe('--device', () => {
  it('takes every field, with defaults for the rest', () => {
    const [nic, gpu] = parseWith(['nic0:tracking=device,dma-rate=2000,state=8MiB', 'gpu0:type=mgpu-512M,tracking=none,state=256KiB,pre-copy,p2p=on,dma-range=0-4MiB+8MiB-12MiB,container=c1,enable-migration=on,state-dirty-rate=1MiB,log-max-ranges=2,log-page-size=8KiB']);
    expect(nic).toEqual({
      name: 'nic0',
      type: 'mgpu-128M',
      tracking: 'device',
      dmaRate: 2000,
      dmaRanges: [{ first: 0, count: 4096 }],
      stateBytes: 8 * 1024 * 1024,
      stateDirtyRate: DEVICE_DEFAULTS.stateDirtyRate,
      preCopy: false,
      p2p: false,
      container: 'nic0',
      enableMigration: 'auto',
      logMaxRanges: DEVICE_DEFAULTS.logMaxRanges,
      logPageSize: 4096,
    });
    expect(gpu).toMatchObject({
      type: 'mgpu-512M',
      tracking: 'none',
      stateBytes: 256 * 1024,
      preCopy: true,
      p2p: true,
      dmaRanges: [
        { first: 0, count: 1024 },
        { first: 2048, count: 1024 },
      ],
      container: 'c1',
      enableMigration: 'on',
      stateDirtyRate: 1024 * 1024,
      logMaxRanges: 2,
      logPageSize: 8192,
    });
    expect(deviceFlags(gpu!)).toBe(MIGRATION_FLAG.STOP_COPY | MIGRATION_FLAG.P2P | MIGRATION_FLAG.PRE_COPY);
    expect(deviceFlags(nic!)).toBe(MIGRATION_FLAG.STOP_COPY);
    expect(parseWith(['empty:state=0'])[0]!.stateBytes).toBe(0);
  });

  it.each([
    ['an unknown field', 'nic0:speed=10', /--device nic0: expected keys among type, tracking, dma-rate, dma-range, state, state-dirty-rate, pre-copy, p2p, container, enable-migration, log-max-ranges, log-page-size, got an unknown key "speed"/],
    ['an unknown type', 'nic0:type=vgpu-9', /--device nic0: type: expected an mdev type the parent offers \(mgpu-128M, mgpu-256M, mgpu-512M, mgpu-1G\), got "vgpu-9"/],
    ['an unknown tracking value', 'nic0:tracking=magic', /--device nic0: tracking: expected one of device, iommu, none \(who can track its DMA writes\), got "magic"/],
    ['a range outside the guest', 'nic0:dma-range=8MiB-32MiB', /--device nic0: dma-range: expected a range inside the guest's 16MiB, got "8MiB-32MiB", which ends at 32MiB/],
    ['a range off page boundaries', 'nic0:dma-range=100-8192', /dma-range: expected ranges on 4KiB page boundaries, got "100-8192"/],
    ['overlapping ranges', 'nic0:dma-range=0-8MiB+4MiB-12MiB', /dma-range: expected ranges that do not overlap/],
    ['more logging ranges than the device allows', 'nic0:tracking=device,log-max-ranges=1,dma-range=0-4KiB+8KiB-12KiB', /--device nic0: dma-range: expected at most 1 range \(log-max-ranges: the most its DMA logging can track\), got 2/],
    ['a state smaller than 0', 'nic0:state=-1', /--device nic0: state: expected a size of 0 or more \(such as 0, 64KiB or 8MiB\), got "-1"/],
    ['a state that is no whole number of words', 'nic0:state=1001', /state: expected a whole number of 32-bit words \(a multiple of 4 bytes\), got 1001 bytes/],
    ['a bad flag value', 'nic0:pre-copy=maybe', /--device nic0: pre-copy: expected the bare flag, or =on or =off, got "maybe"/],
    ['a bad name', '9lives:state=1MiB', /--device 9lives: expected a device name of a letter then up to 31 letters, digits, - or _/],
    ['a bad enable-migration', 'nic0:enable-migration=force', /enable-migration: expected one of auto, on, off \(QEMU's enable-migration\), got "force"/],
    ['a log page size that is no power of two', 'nic0:log-page-size=12KiB', /log-page-size: expected a power of two from 4KiB/],
    ['a negative dma-rate', 'nic0:dma-rate=-5', /dma-rate: expected a whole number from 0 to 10000000 \(pages per second\), got "-5"/],
  ])('refuses %s, saying what is accepted', (_, arg, message) => {
    expect(() => parseWith([arg])).toThrow(UsageError);
    expect(() => parseWith([arg])).toThrow(message);
  });

  it('refuses two devices with one name', () => {
    expect(() => parseWith(['nic0', 'nic0:state=1MiB'])).toThrow(/--device nic0: expected each device name once, got nic0 again \(it is --device nic0 too\)/);
  });
});

describe('--devices FILE.json', () => {
  it('reads the same keys, and checks them as strictly', () => {
    const dir = mkdtempSync(join(tmpdir(), 'postcopy-devices-'));
    try {
      const file = join(dir, 'devices.json');
      writeFileSync(file, JSON.stringify({ devices: [{ name: 'nic1', tracking: 'iommu', 'dma-rate': 10, 'pre-copy': true, 'dma-range': ['0-1MiB', '2MiB-3MiB'], state: 4096 }] }));
      const specs = parseDevices({ device: ['nic0'], devicesFile: file, layout, types: DEFAULT_DEVICE_TYPES, defaultType: 'mgpu-128M' });
      expect(specs.map((d) => d.name)).toEqual(['nic0', 'nic1']);
      expect(specs[1]).toMatchObject({ tracking: 'iommu', dmaRate: 10, preCopy: true, stateBytes: 4096, dmaRanges: [{ first: 0, count: 256 }, { first: 512, count: 256 }] });
      writeFileSync(file, JSON.stringify([{ name: 'nic0', colour: 'red' }]));
      expect(() => parseDevices({ device: [], devicesFile: file, layout, types: DEFAULT_DEVICE_TYPES, defaultType: 'mgpu-128M' })).toThrow(/device 0 \(nic0\): expected keys among .* got an unknown key "colour"/);
      writeFileSync(file, JSON.stringify([{ name: 'nic0' }]));
      expect(() => parseDevices({ device: ['nic0'], devicesFile: file, layout, types: DEFAULT_DEVICE_TYPES, defaultType: 'mgpu-128M' })).toThrow(/expected each device name once/);
      writeFileSync(file, '{ not json');
      expect(() => parseDevices({ device: [], devicesFile: file, layout, types: DEFAULT_DEVICE_TYPES, defaultType: 'mgpu-128M' })).toThrow(/expected JSON, got text that does not parse/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
