/**
 * What a user says about the guest's assigned devices: `--device
 * NAME:key=value,...` (repeatable) and `--devices FILE.json`. Both hosts
 * know the result (the source runs the devices; the destination re-creates
 * each as a mediated device of its type), so the parsing lives here. Every
 * value is checked against the guest and the rest of the devices; a bad one
 * is a UsageError that says what is accepted.
 */
import { readFileSync } from 'node:fs';
import { UsageError, describe } from '../errors.js';
import type { GuestLayout } from '../layout.js';
import type { PageRange } from '../precopy.js';
import { formatBytes, parseSize } from '../sizes.js';
import { MIGRATION_FLAG } from './vfio-fsm.js';

/** Who can record a device's DMA writes: the device itself (DMA logging), its container's IOMMU, or nobody. */
export const TRACKING_CAPABILITIES = ['device', 'iommu', 'none'] as const;
export type TrackingCapability = (typeof TRACKING_CAPABILITIES)[number];

/** QEMU's `enable-migration` property of a vfio-pci device (OnOffAuto). */
export const ENABLE_MIGRATION = ['auto', 'on', 'off'] as const;
export type EnableMigration = (typeof ENABLE_MIGRATION)[number];

/** At most this many devices in one guest. */
export const MAX_DEVICES = 16;
/** The largest internal state a device may have (one SharedArrayBuffer). */
export const MAX_DEVICE_STATE_BYTES = 1024 ** 3;
/** The kernel guarantees at least the ranges that fit in one page (vfio_main.c LOG_MAX_RANGES): 4096 / 16. */
export const MAX_LOG_RANGES = 256;

export interface DeviceSpec {
  name: string;
  /** The mdev type it is (and must be re-created as on the destination). */
  type: string;
  /** What can track its DMA writes (see {@link TRACKING_CAPABILITIES}). */
  tracking: TrackingCapability;
  /** Pages per second it writes into guest RAM by DMA while it runs (0 = none). */
  dmaRate: number;
  /** The guest RAM it may reach (its DMA mappings), as sorted, non-overlapping page ranges. */
  dmaRanges: PageRange[];
  /** Bytes of internal state (what migrates through its data stream). */
  stateBytes: number;
  /** Bytes per second of its state that change while it runs. */
  stateDirtyRate: number;
  preCopy: boolean;
  p2p: boolean;
  /** Devices naming one container share one IOMMU domain (one dirty bitmap). Default: its own. */
  container: string;
  enableMigration: EnableMigration;
  /** DMA logging: the most ranges the device can log at once (its driver's limit). */
  logMaxRanges: number;
  /** DMA logging: the finest granularity it logs at (a power of two from 4 KiB). */
  logPageSize: number;
}

/** VFIO_MIGRATION_* flags of a device. */
export function deviceFlags(spec: Pick<DeviceSpec, 'preCopy' | 'p2p'>): number {
  return MIGRATION_FLAG.STOP_COPY | (spec.p2p ? MIGRATION_FLAG.P2P : 0) | (spec.preCopy ? MIGRATION_FLAG.PRE_COPY : 0);
}

export const DEVICE_DEFAULTS = {
  tracking: 'device' as TrackingCapability,
  dmaRate: 1000,
  stateBytes: 1024 * 1024,
  stateDirtyRate: 64 * 1024,
  enableMigration: 'auto' as EnableMigration,
  logMaxRanges: 4,
  logPageSize: 4096,
} as const;

/** The keys a device takes, on the command line and in a devices file. */
export const DEVICE_KEYS = [
  'type',
  'tracking',
  'dma-rate',
  'dma-range',
  'state',
  'state-dirty-rate',
  'pre-copy',
  'p2p',
  'container',
  'enable-migration',
  'log-max-ranges',
  'log-page-size',
] as const;
type DeviceKey = (typeof DEVICE_KEYS)[number];

const NAME_PATTERN = /^[A-Za-z][A-Za-z0-9_-]{0,31}$/;

/** A raw device: its name and values as text (command line) or JSON values (file). */
interface RawDevice {
  name: string;
  values: Map<string, unknown>;
  /** How to name it in messages: `--device nic0` or `--devices FILE: device 2 (nic0)`. */
  where: string;
}

/** `NAME:key=value,...` (a bare key is a flag set to on). */
function splitDeviceArg(text: string): RawDevice {
  const colon = text.indexOf(':');
  const name = colon < 0 ? text : text.slice(0, colon);
  const where = `--device ${name === '' ? JSON.stringify(text) : name}`;
  checkName(name, where);
  const values = new Map<string, unknown>();
  if (colon >= 0 && colon < text.length - 1) {
    for (const item of text.slice(colon + 1).split(',')) {
      const eq = item.indexOf('=');
      const key = (eq < 0 ? item : item.slice(0, eq)).trim();
      if (key === '') throw new UsageError(`${where}: expected key=value pairs separated by commas, got an empty one in ${JSON.stringify(text)}`);
      if (values.has(key)) throw new UsageError(`${where}: expected each key once, got ${key} twice`);
      values.set(key, eq < 0 ? true : item.slice(eq + 1).trim());
    }
  }
  return { name, values, where };
}

function checkName(name: string, where: string): void {
  if (!NAME_PATTERN.test(name)) {
    throw new UsageError(`${where}: expected a device name of a letter then up to 31 letters, digits, - or _ (NAME:key=value,...), got ${describe(name)}`);
  }
}

/** The devices of a `--devices FILE.json`: `{"devices": [{"name": ..., key: value}]}` or a bare array. */
function readDevicesFile(path: string): RawDevice[] {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new UsageError(`--devices: expected a readable JSON file, got ${JSON.stringify(path)} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new UsageError(`--devices ${path}: expected JSON, got text that does not parse (${(err as Error).message})`);
  }
  const list = Array.isArray(json) ? json : typeof json === 'object' && json !== null && !Array.isArray(json) ? (json as Record<string, unknown>).devices : undefined;
  if (!Array.isArray(list)) throw new UsageError(`--devices ${path}: expected {"devices": [...]} or an array of devices, got ${describe(json)}`);
  return list.map((entry: unknown, i) => {
    const at = `--devices ${path}: device ${i}`;
    if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) throw new UsageError(`${at}: expected an object with a name and keys such as tracking, got ${describe(entry)}`);
    const { name, ...rest } = entry as Record<string, unknown>;
    if (typeof name !== 'string') throw new UsageError(`${at}: expected a "name" string, got ${describe(name)}`);
    const where = `${at} (${name})`;
    checkName(name, where);
    return { name, values: new Map(Object.entries(rest)), where };
  });
}

export interface ParseDevicesInput {
  /** `--device` values, in order. */
  device: readonly string[];
  /** `--devices FILE.json`. */
  devicesFile?: string | undefined;
  layout: GuestLayout;
  /** The mdev types a device may be (the catalog's type ids) and the one a device without `type` gets. */
  types: readonly string[];
  defaultType: string;
}

/** Parses and checks every device (throws UsageError). */
export function parseDevices(input: ParseDevicesInput): DeviceSpec[] {
  const raws = [...input.device.map(splitDeviceArg), ...(input.devicesFile !== undefined ? readDevicesFile(input.devicesFile) : [])];
  if (raws.length > MAX_DEVICES) throw new UsageError(`--device: expected at most ${MAX_DEVICES} devices, got ${raws.length}`);
  const specs: DeviceSpec[] = [];
  const seen = new Map<string, string>();
  for (const raw of raws) {
    const before = seen.get(raw.name);
    if (before !== undefined) throw new UsageError(`${raw.where}: expected each device name once, got ${raw.name} again (it is ${before} too): name one of them otherwise`);
    seen.set(raw.name, raw.where);
    specs.push(parseOne(raw, input));
  }
  return specs;
}

function parseOne(raw: RawDevice, input: ParseDevicesInput): DeviceSpec {
  const { layout } = input;
  for (const key of raw.values.keys()) {
    if (!(DEVICE_KEYS as readonly string[]).includes(key)) {
      throw new UsageError(`${raw.where}: expected keys among ${DEVICE_KEYS.join(', ')}, got an unknown key ${JSON.stringify(key)}`);
    }
  }
  const get = (key: DeviceKey): unknown => raw.values.get(key);
  const at = (key: DeviceKey): string => `${raw.where}: ${key}`;
  const text = (key: DeviceKey, value: unknown): string => {
    if (typeof value === 'string') return value;
    if (typeof value === 'number' && Number.isFinite(value)) return String(value);
    throw new UsageError(`${at(key)}: expected a value, got ${describe(value)}`);
  };

  const typeValue = get('type');
  const type = typeValue === undefined ? input.defaultType : text('type', typeValue);
  if (!input.types.includes(type)) throw new UsageError(`${at('type')}: expected an mdev type the parent offers (${input.types.join(', ')}), got ${JSON.stringify(type)}`);

  const trackingValue = get('tracking');
  const tracking = trackingValue === undefined ? DEVICE_DEFAULTS.tracking : text('tracking', trackingValue);
  if (!(TRACKING_CAPABILITIES as readonly string[]).includes(tracking)) {
    throw new UsageError(`${at('tracking')}: expected one of ${TRACKING_CAPABILITIES.join(', ')} (who can track its DMA writes), got ${JSON.stringify(tracking)}`);
  }

  const dmaRate = intValue(get('dma-rate'), DEVICE_DEFAULTS.dmaRate, 0, 10_000_000, at('dma-rate'), 'pages per second');
  const dmaRanges = get('dma-range') === undefined ? [{ first: 0, count: layout.totalPages }] : parseRanges(get('dma-range'), layout, at('dma-range'));

  const stateBytes = sizeValue(get('state'), DEVICE_DEFAULTS.stateBytes, at('state'), MAX_DEVICE_STATE_BYTES);
  if (stateBytes % 4 !== 0) throw new UsageError(`${at('state')}: expected a whole number of 32-bit words (a multiple of 4 bytes), got ${stateBytes} bytes`);
  const stateDirtyRate = sizeValue(get('state-dirty-rate'), DEVICE_DEFAULTS.stateDirtyRate, at('state-dirty-rate'), MAX_DEVICE_STATE_BYTES);
  const preCopy = flagValue(get('pre-copy'), at('pre-copy'));
  const p2p = flagValue(get('p2p'), at('p2p'));

  const containerValue = get('container');
  const container = containerValue === undefined ? raw.name : text('container', containerValue);
  if (!NAME_PATTERN.test(container)) throw new UsageError(`${at('container')}: expected a container name of a letter then up to 31 letters, digits, - or _, got ${describe(container)}`);

  const enableValue = get('enable-migration');
  const enableMigration = enableValue === undefined ? DEVICE_DEFAULTS.enableMigration : text('enable-migration', enableValue);
  if (!(ENABLE_MIGRATION as readonly string[]).includes(enableMigration)) {
    throw new UsageError(`${at('enable-migration')}: expected one of ${ENABLE_MIGRATION.join(', ')} (QEMU's enable-migration), got ${JSON.stringify(enableMigration)}`);
  }

  const logMaxRanges = intValue(get('log-max-ranges'), DEVICE_DEFAULTS.logMaxRanges, 1, MAX_LOG_RANGES, at('log-max-ranges'), 'ranges');
  const logPageSize = sizeValue(get('log-page-size'), DEVICE_DEFAULTS.logPageSize, at('log-page-size'), 1024 ** 3);
  if (logPageSize < 4096 || (logPageSize & (logPageSize - 1)) !== 0) {
    throw new UsageError(`${at('log-page-size')}: expected a power of two from 4KiB (the granularity the device logs DMA at), got ${formatBytes(logPageSize)}`);
  }
  if (tracking === 'device' && dmaRanges.length > logMaxRanges) {
    throw new UsageError(
      `${at('dma-range')}: expected at most ${logMaxRanges} range${logMaxRanges === 1 ? '' : 's'} (log-max-ranges: the most its DMA logging can track), got ${dmaRanges.length}; merge ranges or raise log-max-ranges`,
    );
  }
  return { name: raw.name, type, tracking: tracking as TrackingCapability, dmaRate, dmaRanges, stateBytes, stateDirtyRate, preCopy, p2p, container, enableMigration: enableMigration as EnableMigration, logMaxRanges, logPageSize };
}

function intValue(value: unknown, fallback: number, min: number, max: number, at: string, what: string): number {
  if (value === undefined) return fallback;
  const n = typeof value === 'number' ? value : typeof value === 'string' && /^\s*-?\d+\s*$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) throw new UsageError(`${at}: expected a whole number from ${min} to ${max} (${what}), got ${describe(value)}`);
  return n;
}

/** A size in bytes from 0 (`0`, `8MiB`, or a number of bytes in a file). */
function sizeValue(value: unknown, fallback: number, at: string, max: number): number {
  if (value === undefined) return fallback;
  let bytes: number;
  if (typeof value === 'number') bytes = value;
  else if (typeof value === 'string') {
    if (/^\s*-/.test(value)) throw new UsageError(`${at}: expected a size of 0 or more (such as 0, 64KiB or 8MiB), got ${JSON.stringify(value)}`);
    if (/^\s*0+\s*[a-zA-Z]*\s*$/.test(value)) bytes = 0;
    else {
      try {
        bytes = parseSize(at, value);
      } catch {
        throw new UsageError(`${at}: expected a size of 0 or more such as 0, 64KiB or 8MiB (units B, KiB, MiB, GiB), got ${JSON.stringify(value)}`);
      }
    }
  } else throw new UsageError(`${at}: expected a size such as 64KiB or 8MiB, got ${describe(value)}`);
  if (!Number.isSafeInteger(bytes) || bytes < 0) throw new UsageError(`${at}: expected a size of 0 or more (such as 0, 64KiB or 8MiB), got ${describe(value)}`);
  if (bytes > max) throw new UsageError(`${at}: expected at most ${formatBytes(max)}, got ${formatBytes(bytes)}`);
  return bytes;
}

function flagValue(value: unknown, at: string): boolean {
  if (value === undefined) return false;
  if (value === true || value === 'on' || value === 'true' || value === 'yes') return true;
  if (value === false || value === 'off' || value === 'false' || value === 'no') return false;
  throw new UsageError(`${at}: expected the bare flag, or =on or =off, got ${describe(value)}`);
}

/**
 * `START-END` ranges of guest memory (END exclusive), joined by `+` on the
 * command line (`0-8MiB+12MiB-16MiB`) or an array of them in a file. Each must
 * lie inside the guest, on page boundaries; they are sorted and must not overlap.
 */
function parseRanges(value: unknown, layout: GuestLayout, at: string): PageRange[] {
  const items = Array.isArray(value) ? value : typeof value === 'string' ? value.split('+') : undefined;
  const accepted = `ranges START-END inside the guest's ${formatBytes(layout.guestBytes)} on ${formatBytes(layout.pageSize)} page boundaries, joined by + (such as 0-8MiB or 0-4MiB+8MiB-12MiB)`;
  if (!items || items.length === 0) throw new UsageError(`${at}: expected ${accepted}, got ${describe(value)}`);
  const ranges: PageRange[] = [];
  for (const item of items) {
    const m = typeof item === 'string' ? /^\s*([^-\s]+)\s*-\s*([^-\s]+)\s*$/.exec(item) : null;
    if (!m) throw new UsageError(`${at}: expected ${accepted}, got ${describe(item)}`);
    const start = m[1] === '0' ? 0 : sizeOr(m[1]!);
    const end = sizeOr(m[2]!);
    if (start === undefined || end === undefined || end <= start) throw new UsageError(`${at}: expected ${accepted}, got ${JSON.stringify(item)}`);
    if (end > layout.guestBytes) {
      throw new UsageError(`${at}: expected a range inside the guest's ${formatBytes(layout.guestBytes)}, got ${JSON.stringify(item)}, which ends at ${formatBytes(end)}`);
    }
    if (start % layout.pageSize !== 0 || end % layout.pageSize !== 0) throw new UsageError(`${at}: expected ranges on ${formatBytes(layout.pageSize)} page boundaries, got ${JSON.stringify(item)}`);
    ranges.push({ first: start / layout.pageSize, count: (end - start) / layout.pageSize });
  }
  ranges.sort((a, b) => a.first - b.first);
  for (let i = 1; i < ranges.length; i++) {
    const prev = ranges[i - 1]!;
    if (ranges[i]!.first < prev.first + prev.count) throw new UsageError(`${at}: expected ranges that do not overlap, got ${describe(value)}`);
  }
  return ranges;
}

function sizeOr(text: string): number | undefined {
  try {
    return parseSize('range', text);
  } catch {
    return undefined;
  }
}

/** Pages a device may reach. */
export function rangePages(ranges: readonly PageRange[]): number {
  return ranges.reduce((n, r) => n + r.count, 0);
}
