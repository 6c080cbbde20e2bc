/**
 * The source's device options (issue 11): the devices (`--device`,
 * `--devices`), who tracks their DMA (`--dirty-tracking`), what happens when
 * nobody can (`--untracked-dma`), switchover-ack, the mdev types this host
 * offers, and the testing-only `--unsafe-untracked-dma`. `npm start` takes
 * the same and hands them to the source (and `--mdev-types` to both hosts).
 */
import { Command, Option } from 'commander';
import {
  DEFAULT_MDEV_CATALOG,
  DeviceRefusedError,
  UsageError,
  defaultMdevType,
  formatBytes,
  mdevTypeIds,
  parseChoice,
  parseDevices,
  readMdevCatalog,
  type GuestLayout,
  type MigrationMode,
} from '@postcopy/shared';
import type { SourceDevicesOptions } from './source-devices.js';
import { DIRTY_TRACKING_MODES, UNTRACKED_DMA_POLICIES, planPolicy, planTracking } from './tracking.js';

export { DeviceRefusedError };

export const DEVICE_OPTION_DEFAULTS = {
  dirtyTracking: 'auto',
  untrackedDma: 'block',
} as const;

/** The option keys (camelCase) these options use, for the launcher. */
export const DEVICE_FLAGS = ['device', 'devices', 'dirtyTracking', 'untrackedDma', 'switchoverAck', 'unsafeUntrackedDma', 'mdevTypes'] as const;

function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

export function addDeviceOptions(cmd: Command): Command {
  return cmd
    .option(
      '--device <spec>',
      'an assigned device NAME:key=value,... (repeatable); keys: type (an mdev type), tracking=device|iommu|none, dma-rate (pages/s), dma-range (START-END+...), state (size), state-dirty-rate (bytes/s), pre-copy, p2p, container, enable-migration=auto|on|off, log-max-ranges, log-page-size',
      collect,
    )
    .option('--devices <file>', 'more devices from a JSON file: {"devices": [{"name": "nic0", "tracking": "device", ...}]} with the keys of --device')
    .option('--dirty-tracking <mode>', "who tracks the devices' DMA: auto (QEMU's rule: device logging if every device of a container has it, else the container's IOMMU, else none), device or iommu", DEVICE_OPTION_DEFAULTS.dirtyTracking)
    .option('--untracked-dma <policy>', 'when nobody can track a device\'s DMA: all-dirty (QEMU 8.0), skip-precopy (no precopy rounds) or block (QEMU 8.1: refuse unless the device has enable-migration=on)', DEVICE_OPTION_DEFAULTS.untrackedDma)
    .option('--no-switchover-ack', "switch over without waiting for the destination to acknowledge every device's initial data (QEMU's switchover-ack off)")
    .option('--mdev-types <file>', 'the mdev parents and types of this host, as JSON (default: a built-in GPU whose 1GiB of framebuffer is shared by mgpu-128M, -256M, -512M and -1G)')
    .addOption(new Option('--unsafe-untracked-dma', 'testing only: devices nobody tracks do DMA while precopy runs anyway (the content check must fail)').default(false));
}

export interface DeviceCliOptions {
  /** What the controller needs; undefined without devices. */
  controller: SourceDevicesOptions | undefined;
  /** Said once, when the migration starts (the policy acts). */
  warnings: string[];
}

export interface DeviceParseContext {
  layout: GuestLayout;
  mode: MigrationMode;
  downtimeLimitMs: number;
  /** The bandwidth the switchover may count on, bits/s (--avail-switchover-bandwidth, else the link's), 0 if unknown. */
  bandwidthBps: number;
}

/** Parses and checks the device options against the guest, the mode and each other (throws UsageError). */
export function parseDeviceOptions(raw: Record<string, unknown>, ctx: DeviceParseContext): DeviceCliOptions {
  const catalog = raw.mdevTypes === undefined ? DEFAULT_MDEV_CATALOG : readMdevCatalog(String(raw.mdevTypes));
  const mode = parseChoice('--dirty-tracking', String(raw.dirtyTracking ?? DEVICE_OPTION_DEFAULTS.dirtyTracking), DIRTY_TRACKING_MODES);
  const policy = parseChoice('--untracked-dma', String(raw.untrackedDma ?? DEVICE_OPTION_DEFAULTS.untrackedDma), UNTRACKED_DMA_POLICIES);
  const device = raw.device === undefined ? [] : Array.isArray(raw.device) ? raw.device.map(String) : [String(raw.device)];
  const specs = parseDevices({ device, devicesFile: raw.devices === undefined ? undefined : String(raw.devices), layout: ctx.layout, types: mdevTypeIds(catalog), defaultType: defaultMdevType(catalog) });
  if (specs.length === 0) return { controller: undefined, warnings: [] };
  if (ctx.mode === 'postcopy') {
    throw new UsageError(`--device: expected --mode precopy or hybrid with devices (a device runs with the guest on the source until the switchover, and its state migrates then), got --mode postcopy`);
  }
  const tracking = planTracking(specs, mode);
  const unsafe = raw.unsafeUntrackedDma === true;
  const plan = planPolicy(specs, tracking, policy, unsafe, ctx.layout);
  const stateBytes = specs.reduce((n, d) => n + d.stateBytes, 0);
  if (plan.skipPrecopy && ctx.mode === 'precopy' && ctx.bandwidthBps > 0) {
    // Straight to stop-and-copy: all of RAM and every device's state in the downtime.
    const bytes = ctx.layout.guestBytes + stateBytes;
    const estimateMs = (bytes * 8 * 1000) / ctx.bandwidthBps;
    if (estimateMs > ctx.downtimeLimitMs) {
      throw new UsageError(
        `--untracked-dma skip-precopy: with --mode precopy the whole migration is one stop-and-copy: ${formatBytes(ctx.layout.guestBytes)} of RAM and ${formatBytes(stateBytes)} of device state over ${(ctx.bandwidthBps / 1e6).toFixed(0)} Mbit/s ` +
          `is an estimated downtime of ${Math.round(estimateMs)} ms, over the ${ctx.downtimeLimitMs} ms --downtime-limit; expected a larger --downtime-limit, more bandwidth, --mode hybrid (postcopy instead of stop-and-copy), or another --untracked-dma`,
      );
    }
  }
  return {
    controller: { specs, tracking, policy: plan, switchoverAck: raw.switchoverAck !== false, catalog },
    warnings: plan.warning ? [plan.warning] : [],
  };
}

/** The source's arguments for these options, from the launcher's parsed ones. */
export function deviceSourceArgs(raw: Record<string, unknown>): string[] {
  const args: string[] = [];
  const device = raw.device === undefined ? [] : Array.isArray(raw.device) ? raw.device : [raw.device];
  for (const d of device) args.push('--device', String(d));
  if (raw.devices !== undefined) args.push('--devices', String(raw.devices));
  if (raw.dirtyTracking !== undefined) args.push('--dirty-tracking', String(raw.dirtyTracking));
  if (raw.untrackedDma !== undefined) args.push('--untracked-dma', String(raw.untrackedDma));
  if (raw.switchoverAck === false) args.push('--no-switchover-ack');
  if (raw.unsafeUntrackedDma === true) args.push('--unsafe-untracked-dma');
  if (raw.mdevTypes !== undefined) args.push('--mdev-types', String(raw.mdevTypes));
  return args;
}
