/**
 * Devices in the migration stream (protocol version 5): message types 30 to
 * 35 and the source's device figures in its summary. Every field is
 * validated here as the rest of the codec validates its own; what only the
 * destination can judge (a device it does not have, a record out of order or
 * beyond the announced size) is checked by its device receiver.
 *
 * The flow, in QEMU's terms (hw/vfio/migration.c):
 *   after `start`:   device-setup (save_setup: what the destination must
 *                    re-create) → devices-ready (the mdev instances made, by UUID);
 *   precopy rounds:  device-data (vfio_save_iterate: the PRE_COPY stream),
 *                    device-init-data-sent (VFIO_MIG_FLAG_DEV_INIT_DATA_SENT,
 *                    once initial_bytes reached 0) → switchover-ack
 *                    (MIG_RP_MSG_SWITCHOVER_ACK, once every device's initial data is in);
 *   switchover:      device-data (vfio_save_complete_precopy: STOP_COPY until
 *                    end of stream), device-end (the record count, bytes and
 *                    the state's digest as the source's device stopped).
 */
import { ProtocolError, describe } from '../errors.js';
import type { GuestLayout } from '../layout.js';
import { decodeRanges, encodeRanges, type PageRange } from '../precopy.js';
import { DeviceMessageType } from './message-types.js';
import { MAX_DEVICES, MAX_DEVICE_STATE_BYTES } from './spec.js';
import { MIGRATION_FLAG } from './vfio-fsm.js';

export { DeviceMessageType };

/** Bytes of device state one device-data frame carries at most (as a pushed frame's pages). */
export const MAX_DEVICE_DATA_BYTES = 64 * 1024;

/** What the destination must re-create for one device, in device-setup (index = its place in the list). */
export interface DeviceAnnouncement {
  name: string;
  /** The mdev type id, and the version of its migration data. */
  type: string;
  version: string;
  /** VFIO_MIGRATION_* flags. */
  flags: number;
  stateBytes: number;
  /** The guest RAM it may reach by DMA (it runs on the destination after the switchover). */
  dmaRanges: PageRange[];
}

export interface DeviceSetup {
  type: 'device-setup';
  devices: DeviceAnnouncement[];
}

/** Destination to source: every instance is created (one UUID per device, in order); pages may come. */
export interface DevicesReady {
  type: 'devices-ready';
  uuids: string[];
}

/**
 * One record of a device's data stream: `data` is the state from byte
 * `offset` (whole chunks; the last chunk of the state may be short). `seq`
 * counts the device's records from 0, so a record out of order shows.
 */
export interface DeviceData {
  type: 'device-data';
  device: number;
  seq: number;
  offset: number;
  data: Uint8Array;
}

/** QEMU's VFIO_MIG_FLAG_DEV_INIT_DATA_SENT: this device's initial_bytes reached 0. */
export interface DeviceInitDataSent {
  type: 'device-init-data-sent';
  device: number;
}

/** Destination to source: QEMU's MIG_RP_MSG_SWITCHOVER_ACK (every device's initial data has been loaded). */
export interface SwitchoverAck {
  type: 'switchover-ack';
}

/** The device's stream ended (STOP_COPY read end of stream): `records` records, `bytes` bytes, its state's SHA-256. */
export interface DeviceEnd {
  type: 'device-end';
  device: number;
  records: number;
  bytes: number;
  digest: string;
}

export type DeviceMessage = DeviceSetup | DevicesReady | DeviceData | DeviceInitDataSent | SwitchoverAck | DeviceEnd;

export const DEVICE_MESSAGE_TYPES = ['device-setup', 'devices-ready', 'device-data', 'device-init-data-sent', 'switchover-ack', 'device-end'] as const;

export function isDeviceMessage(m: { type: string }): m is DeviceMessage {
  return (DEVICE_MESSAGE_TYPES as readonly string[]).includes(m.type);
}

/** The positional array of a device message (the codec packs it). */
export function deviceFrame(m: DeviceMessage): unknown[] {
  switch (m.type) {
    case 'device-setup':
      return [DeviceMessageType.DeviceSetup, m.devices.map((d) => [d.name, d.type, d.version, d.flags, d.stateBytes, encodeRanges(d.dmaRanges)])];
    case 'devices-ready':
      return [DeviceMessageType.DevicesReady, m.uuids];
    case 'device-data':
      return [DeviceMessageType.DeviceData, m.device, m.seq, m.offset, m.data];
    case 'device-init-data-sent':
      return [DeviceMessageType.DeviceInitDataSent, m.device];
    case 'switchover-ack':
      return [DeviceMessageType.SwitchoverAck];
    case 'device-end':
      return [DeviceMessageType.DeviceEnd, m.device, m.records, m.bytes, m.digest];
  }
}

const NAMES: Record<number, string> = {
  30: 'device-setup',
  31: 'devices-ready',
  32: 'device-data',
  33: 'device-init-data-sent',
  34: 'switchover-ack',
  35: 'device-end',
};
const NAME_PATTERN = /^[A-Za-z][A-Za-z0-9_-]{0,31}$/;
const TYPE_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/;
const VERSION_PATTERN = /^\d{1,4}\.\d{1,4}$/;
const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const ALL_MIGRATION_FLAGS = MIGRATION_FLAG.STOP_COPY | MIGRATION_FLAG.P2P | MIGRATION_FLAG.PRE_COPY;
const MAX_U32 = 0xffffffff;

function length(f: unknown[], n: number): void {
  if (f.length !== n) throw new ProtocolError(`${NAMES[f[0] as number]}: expected ${n - 1} fields, got ${f.length - 1}`);
}

function uint(value: unknown, at: string, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > max) throw new ProtocolError(`${at}: expected a whole number from 0 to ${max}, got ${describe(value)}`);
  return value;
}

function text(value: unknown, at: string, pattern: RegExp, what: string): string {
  if (typeof value !== 'string' || !pattern.test(value)) throw new ProtocolError(`${at}: expected ${what}, got ${describe(value)}`);
  return value;
}

/** Decodes a device message's fields (`f[0]` is its type, 30 to 35). Throws ProtocolError. */
export function decodeDeviceFrame(f: unknown[], layout: GuestLayout | undefined): DeviceMessage {
  const name = NAMES[f[0] as number]!;
  if (!layout) throw new ProtocolError(`${name}: expected the handshake (hello, welcome) first, got ${name} before it`);
  switch (f[0]) {
    case DeviceMessageType.DeviceSetup: {
      length(f, 2);
      const list = f[1];
      if (!Array.isArray(list) || list.length > MAX_DEVICES) throw new ProtocolError(`device-setup.devices: expected an array of at most ${MAX_DEVICES} devices, got ${describe(list)}`);
      return {
        type: 'device-setup',
        devices: list.map((entry: unknown, i): DeviceAnnouncement => {
          const at = `device-setup.devices[${i}]`;
          if (!Array.isArray(entry) || entry.length !== 6) throw new ProtocolError(`${at}: expected [name, type, version, flags, stateBytes, dmaRanges], got ${describe(entry)}`);
          const flags = uint(entry[3], `${at}.flags`, ALL_MIGRATION_FLAGS);
          if ((flags & MIGRATION_FLAG.STOP_COPY) === 0) throw new ProtocolError(`${at}.flags: expected VFIO_MIGRATION_STOP_COPY (1) among the flags, got ${flags}`);
          const stateBytes = uint(entry[4], `${at}.stateBytes`, MAX_DEVICE_STATE_BYTES);
          if (stateBytes % 4 !== 0) throw new ProtocolError(`${at}.stateBytes: expected a multiple of 4, got ${stateBytes}`);
          const ranges = entry[5];
          if (!(ranges instanceof Uint8Array) || ranges.length === 0 || ranges.length > 256 * 8) throw new ProtocolError(`${at}.dmaRanges: expected 1 to 256 ranges of 8 bytes, got ${describe(ranges)}`);
          return {
            name: text(entry[0], `${at}.name`, NAME_PATTERN, 'a device name (a letter, then up to 31 letters, digits, - or _)'),
            type: text(entry[1], `${at}.type`, TYPE_PATTERN, 'an mdev type id'),
            version: text(entry[2], `${at}.version`, VERSION_PATTERN, 'a version MAJOR.MINOR'),
            flags,
            stateBytes,
            dmaRanges: decodeRanges(ranges, layout.totalPages, `${at}.dmaRanges`),
          };
        }),
      };
    }
    case DeviceMessageType.DevicesReady: {
      length(f, 2);
      const uuids = f[1];
      if (!Array.isArray(uuids) || uuids.length > MAX_DEVICES) throw new ProtocolError(`devices-ready.uuids: expected an array of at most ${MAX_DEVICES} UUIDs, got ${describe(uuids)}`);
      return { type: 'devices-ready', uuids: uuids.map((u: unknown, i) => text(u, `devices-ready.uuids[${i}]`, UUID_PATTERN, 'a lowercase UUID')) };
    }
    case DeviceMessageType.DeviceData: {
      length(f, 5);
      const data = f[4];
      if (!(data instanceof Uint8Array) || data.length === 0 || data.length > MAX_DEVICE_DATA_BYTES) {
        throw new ProtocolError(`device-data.data: expected 1 to ${MAX_DEVICE_DATA_BYTES} bytes of device state, got ${describe(data)}`);
      }
      return {
        type: 'device-data',
        device: uint(f[1], 'device-data.device', MAX_DEVICES - 1),
        seq: uint(f[2], 'device-data.seq', MAX_U32),
        offset: uint(f[3], 'device-data.offset', MAX_DEVICE_STATE_BYTES),
        data,
      };
    }
    case DeviceMessageType.DeviceInitDataSent:
      length(f, 2);
      return { type: 'device-init-data-sent', device: uint(f[1], 'device-init-data-sent.device', MAX_DEVICES - 1) };
    case DeviceMessageType.SwitchoverAck:
      length(f, 1);
      return { type: 'switchover-ack' };
    case DeviceMessageType.DeviceEnd:
      length(f, 5);
      return {
        type: 'device-end',
        device: uint(f[1], 'device-end.device', MAX_DEVICES - 1),
        records: uint(f[2], 'device-end.records', MAX_U32),
        bytes: uint(f[3], 'device-end.bytes', Number.MAX_SAFE_INTEGER),
        digest: text(f[4], 'device-end.digest', /^[0-9a-f]{64}$/, '64 hex digits (SHA-256)'),
      };
    default:
      throw new ProtocolError(`expected a device message type from 30 to 35, got ${describe(f[0])}`);
  }
}

// ------------------------------------------------------------ the summary's device figures

export const PROVIDERS = ['device', 'iommu', 'none'] as const;
export type ProviderName = (typeof PROVIDERS)[number];

/** What one provider cost over the migration: its syncs, the bitmap bytes it read, the pages it found dirty, its time. */
export interface ProviderFigures {
  syncs: number;
  bitmapBytes: number;
  pagesDirty: number;
  ms: number;
}

/** One device as the source saw it migrate. */
export interface SourceDeviceFigures {
  name: string;
  type: string;
  capabilities: string[];
  /** The provider that tracked its DMA (`none`: nobody; see the policy). */
  tracking: ProviderName;
  /** Every state it went through, from RUNNING. */
  statePath: string[];
  precopy: { initialBytesAtStart: number; bytesSent: number; dirtyBytesMax: number };
  /** Bytes its stream carried in STOP_COPY (in the downtime). */
  stopCopyBytes: number;
  /** SHA-256 of its state as it stopped. */
  stateDigest: string;
}

export interface DevicesSummary {
  devices: SourceDeviceFigures[];
  providers: Record<ProviderName, ProviderFigures>;
  /** The untracked-DMA policy: which one, which devices it acted on and why, and the downtime it forces (all-dirty). */
  policy: { untrackedDma: string; actedOn: string[]; reason: string; forcedDowntimeMs: number };
  /** The source's part of the downtime: the last RAM (sync, stop-and-copy or discard) and the devices' (P2P, STOP_COPY, their data). */
  downtime: { ramMs: number; deviceMs: number };
  /** Switchover-ack: whether a device needed it, and how long the switchover waited for it (ms). */
  switchoverAck: { needed: boolean; waitedMs: number };
}

export function emptyProviders(): Record<ProviderName, ProviderFigures> {
  return { device: { syncs: 0, bitmapBytes: 0, pagesDirty: 0, ms: 0 }, iommu: { syncs: 0, bitmapBytes: 0, pagesDirty: 0, ms: 0 }, none: { syncs: 0, bitmapBytes: 0, pagesDirty: 0, ms: 0 } };
}

/** The summary of a migration without devices. */
export function noDevicesSummary(): DevicesSummary {
  return { devices: [], providers: emptyProviders(), policy: { untrackedDma: 'block', actedOn: [], reason: 'no device', forcedDowntimeMs: 0 }, downtime: { ramMs: 0, deviceMs: 0 }, switchoverAck: { needed: false, waitedMs: 0 } };
}

function obj(v: unknown, at: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v) || v instanceof Uint8Array) throw new ProtocolError(`${at}: expected an object, got ${describe(v)}`);
  return v as Record<string, unknown>;
}

function count(v: unknown, at: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new ProtocolError(`${at}: expected a number >= 0, got ${describe(v)}`);
  return v;
}

function str(v: unknown, at: string, max = 512): string {
  if (typeof v !== 'string' || v.length > max) throw new ProtocolError(`${at}: expected a string of at most ${max} characters, got ${describe(v)}`);
  return v;
}

function strings(v: unknown, at: string, max: number): string[] {
  if (!Array.isArray(v) || v.length > max) throw new ProtocolError(`${at}: expected an array of at most ${max} strings, got ${describe(v)}`);
  return v.map((s: unknown, i) => str(s, `${at}[${i}]`, 64));
}

/** Validates the summary's `devices` object field by field. */
export function decodeDevicesSummary(value: unknown): DevicesSummary {
  const root = obj(value, 'summary.devices');
  const list = root.devices;
  if (!Array.isArray(list) || list.length > MAX_DEVICES) throw new ProtocolError(`summary.devices.devices: expected an array of at most ${MAX_DEVICES}, got ${describe(list)}`);
  const devices = list.map((d: unknown, i): SourceDeviceFigures => {
    const at = `summary.devices.devices[${i}]`;
    const o = obj(d, at);
    const tracking = o.tracking;
    if (!(PROVIDERS as readonly unknown[]).includes(tracking)) throw new ProtocolError(`${at}.tracking: expected one of ${PROVIDERS.join(', ')}, got ${describe(tracking)}`);
    const pre = obj(o.precopy, `${at}.precopy`);
    return {
      name: text(o.name, `${at}.name`, NAME_PATTERN, 'a device name'),
      type: text(o.type, `${at}.type`, TYPE_PATTERN, 'an mdev type id'),
      capabilities: strings(o.capabilities, `${at}.capabilities`, 3),
      tracking: tracking as ProviderName,
      statePath: strings(o.statePath, `${at}.statePath`, 64),
      precopy: {
        initialBytesAtStart: count(pre.initialBytesAtStart, `${at}.precopy.initialBytesAtStart`),
        bytesSent: count(pre.bytesSent, `${at}.precopy.bytesSent`),
        dirtyBytesMax: count(pre.dirtyBytesMax, `${at}.precopy.dirtyBytesMax`),
      },
      stopCopyBytes: count(o.stopCopyBytes, `${at}.stopCopyBytes`),
      stateDigest: text(o.stateDigest, `${at}.stateDigest`, /^([0-9a-f]{64})?$/, 'a SHA-256 (64 hex digits) or nothing'),
    };
  });
  const providersIn = obj(root.providers, 'summary.devices.providers');
  const providers = emptyProviders();
  for (const p of PROVIDERS) {
    const f = obj(providersIn[p], `summary.devices.providers.${p}`);
    providers[p] = {
      syncs: count(f.syncs, `summary.devices.providers.${p}.syncs`),
      bitmapBytes: count(f.bitmapBytes, `summary.devices.providers.${p}.bitmapBytes`),
      pagesDirty: count(f.pagesDirty, `summary.devices.providers.${p}.pagesDirty`),
      ms: count(f.ms, `summary.devices.providers.${p}.ms`),
    };
  }
  const policy = obj(root.policy, 'summary.devices.policy');
  const downtime = obj(root.downtime, 'summary.devices.downtime');
  const ack = obj(root.switchoverAck, 'summary.devices.switchoverAck');
  if (typeof ack.needed !== 'boolean') throw new ProtocolError(`summary.devices.switchoverAck.needed: expected a boolean, got ${describe(ack.needed)}`);
  return {
    devices,
    providers,
    policy: {
      untrackedDma: str(policy.untrackedDma, 'summary.devices.policy.untrackedDma', 64),
      actedOn: strings(policy.actedOn, 'summary.devices.policy.actedOn', MAX_DEVICES),
      reason: str(policy.reason, 'summary.devices.policy.reason', 2048),
      forcedDowntimeMs: count(policy.forcedDowntimeMs, 'summary.devices.policy.forcedDowntimeMs'),
    },
    downtime: { ramMs: count(downtime.ramMs, 'summary.devices.downtime.ramMs'), deviceMs: count(downtime.deviceMs, 'summary.devices.downtime.deviceMs') },
    switchoverAck: { needed: ack.needed, waitedMs: count(ack.waitedMs, 'summary.devices.switchoverAck.waitedMs') },
  };
}
