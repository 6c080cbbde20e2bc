/**
 * The bench's section on devices (issue 11; no target): the same guest and
 * the same device, whose DMA is tracked by the device itself
 * (tracking=device), by its container's IOMMU (tracking=iommu), or by nobody
 * under `--untracked-dma all-dirty` or `skip-precopy`, migrated by precopy:
 * total time, downtime (and its RAM and device parts), and what the dirty
 * tracking cost per sync (bitmap bytes read, pages found, time). Kept apart
 * from bench.ts (a small hook), as the phases and memory-backends sections are.
 */
import type { Report } from '@postcopy/shared';
import { runMigration, type RunSpec, type RunWarmUp } from './migrations.js';
import type { Step } from './steps.js';

export const DEVICE_VARIANTS = ['tracking=device', 'tracking=iommu', 'all-dirty', 'skip-precopy'] as const;
export type DeviceVariant = (typeof DEVICE_VARIANTS)[number];

/** The device's DMA, pages per second; the guest's own dirty rate is phases.ts's. */
export const DEVICE_DMA_RATE = 2000;
/** A downtime limit all-dirty can converge under on a busy 2-core machine (its range is an eighth of the guest). */
export const DEVICE_DOWNTIME_LIMIT_MS = 1000;

/** The part of the guest the device reaches: its first eighth (at least one page). */
export function deviceRangeBytes(memoryBytes: number): number {
  return Math.max(4096, Math.floor(memoryBytes / 8 / 4096) * 4096);
}

export function deviceRun(variant: DeviceVariant, memoryBytes: number): RunSpec {
  const tracking = variant === 'tracking=device' ? 'device' : variant === 'tracking=iommu' ? 'iommu' : 'none';
  const device = `bench0:tracking=${tracking},dma-rate=${DEVICE_DMA_RATE},state=8MiB,pre-copy,dma-range=0-${deviceRangeBytes(memoryBytes)}`;
  return {
    key: `devices:${variant}`,
    label: `device, ${variant}: total time, downtime and the dirty-tracking cost per sync`,
    args: [
      '--mode', 'precopy', '--strategy', 'kvm-exit', '--vcpus', '1', '--accesses', '1', '--zero-fraction', '0', '--dirty-rate', '1000',
      '--downtime-limit', String(DEVICE_DOWNTIME_LIMIT_MS), '--device', device,
      ...(variant === 'all-dirty' || variant === 'skip-precopy' ? ['--untracked-dma', variant] : []),
    ],
  };
}

export interface DeviceFigures {
  totalTimeMs: number;
  downtimeMs: number;
  downtimeRamMs: number;
  downtimeDeviceMs: number;
  rounds: number;
  switchover: string;
  /** The provider that tracked the device (none: all-dirty, or skip-precopy's single sync). */
  provider: string;
  syncs: number;
  bitmapBytesPerSync: number;
  pagesDirtyPerSync: number;
  msPerSync: number;
  /** all-dirty: the expected downtime its perpetually dirty range forced at the last decision. */
  forcedDowntimeMs: number;
}

export interface DevicesResult {
  dmaRate: number;
  rangeBytes: number;
  downtimeLimitMs: number;
  variants: Record<DeviceVariant, DeviceFigures>;
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

const round3 = (x: number): number => Math.round(x * 1000) / 1000;

function sample(report: Report): DeviceFigures {
  const d = report.devices[0];
  const provider = d?.tracking ?? 'none';
  const p = report.dirtyTracking.perProvider[provider];
  return {
    totalTimeMs: report.totalTimeMs,
    downtimeMs: report.downtimeMs,
    downtimeRamMs: report.downtimeSplit.ramMs,
    downtimeDeviceMs: report.downtimeSplit.deviceMs,
    rounds: report.precopy.rounds,
    switchover: report.switchover.reason,
    provider,
    syncs: p.syncs,
    bitmapBytesPerSync: p.syncs > 0 ? p.bitmapBytes / p.syncs : 0,
    pagesDirtyPerSync: p.syncs > 0 ? p.pagesDirty / p.syncs : 0,
    msPerSync: p.msPerSync,
    forcedDowntimeMs: report.policy.forcedDowntimeMs,
  };
}

export class DevicesBench {
  private readonly samples = new Map<DeviceVariant, DeviceFigures[]>(DEVICE_VARIANTS.map((v) => [v, []]));

  constructor(
    private readonly memoryBytes: number,
    private readonly warmUp: RunWarmUp = {},
  ) {}

  /** One repeat: each variant once. */
  steps(): Step[] {
    return DEVICE_VARIANTS.map((variant) => {
      const spec = deviceRun(variant, this.memoryBytes);
      return {
        label: spec.label,
        run: async () => {
          const { report } = await runMigration(spec, this.memoryBytes, this.warmUp);
          const s = sample(report);
          this.samples.get(variant)!.push(s);
          return `total ${s.totalTimeMs.toFixed(0)} ms, downtime ${s.downtimeMs.toFixed(1)} ms (RAM ${s.downtimeRamMs.toFixed(1)}, device ${s.downtimeDeviceMs.toFixed(1)}), ${s.rounds} round(s), ${s.provider} ${s.bitmapBytesPerSync.toFixed(0)} bitmap bytes and ${s.pagesDirtyPerSync.toFixed(0)} pages per sync`;
        },
      };
    });
  }

  result(): DevicesResult {
    const variants = {} as Record<DeviceVariant, DeviceFigures>;
    for (const v of DEVICE_VARIANTS) {
      const runs = this.samples.get(v)!;
      if (runs.length === 0) throw new Error(`expected runs of ${v}, got none`);
      const med = (pick: (s: DeviceFigures) => number): number => round3(median(runs.map(pick)));
      variants[v] = {
        totalTimeMs: med((s) => s.totalTimeMs),
        downtimeMs: med((s) => s.downtimeMs),
        downtimeRamMs: med((s) => s.downtimeRamMs),
        downtimeDeviceMs: med((s) => s.downtimeDeviceMs),
        rounds: med((s) => s.rounds),
        switchover: runs[runs.length - 1]!.switchover,
        provider: runs[runs.length - 1]!.provider,
        syncs: med((s) => s.syncs),
        bitmapBytesPerSync: med((s) => s.bitmapBytesPerSync),
        pagesDirtyPerSync: med((s) => s.pagesDirtyPerSync),
        msPerSync: med((s) => s.msPerSync),
        forcedDowntimeMs: med((s) => s.forcedDowntimeMs),
      };
    }
    return { dmaRate: DEVICE_DMA_RATE, rangeBytes: deviceRangeBytes(this.memoryBytes), downtimeLimitMs: DEVICE_DOWNTIME_LIMIT_MS, variants };
  }
}

/** The section of the printed bench. */
export function formatDevices(r: DevicesResult | undefined): string {
  if (!r) return 'devices: not measured (--device-section off)';
  const rows = [['variant', 'total ms', 'downtime ms', 'RAM ms', 'device ms', 'rounds', 'switchover', 'provider', 'bitmap B/sync', 'pages/sync', 'ms/sync', 'forced ms']];
  for (const v of DEVICE_VARIANTS) {
    const f = r.variants[v];
    rows.push([
      v,
      f.totalTimeMs.toFixed(0),
      f.downtimeMs.toFixed(1),
      f.downtimeRamMs.toFixed(1),
      f.downtimeDeviceMs.toFixed(1),
      String(f.rounds),
      f.switchover,
      f.provider,
      f.bitmapBytesPerSync.toFixed(0),
      f.pagesDirtyPerSync.toFixed(0),
      f.msPerSync.toFixed(3),
      f.forcedDowntimeMs.toFixed(0),
    ]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  const table = rows.map((row) => '  ' + row.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('   ')).join('\n');
  return (
    `devices (no target): the same guest (1 source vCPU dirtying 1000 pages/s) and device (DMA ${r.dmaRate} pages/s over its first ${(r.rangeBytes / 1048576).toFixed(1)} MiB, 8 MiB of state with PRE_COPY), ` +
    `--mode precopy --downtime-limit ${r.downtimeLimitMs}; the dirty-tracking cost per sync of the provider that tracked it\n` +
    table
  );
}
