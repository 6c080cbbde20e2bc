/**
 * Who tracks each device's DMA writes, and what the migration does when
 * nobody can.
 *
 * The provider, as QEMU picks it for the devices of one container
 * (hw/vfio/container.c, vfio_container_query_dirty_bitmap and
 * vfio_container_devices_dirty_tracking_is_supported): DMA logging of the
 * devices themselves only if **every** device of the container supports it;
 * else the container's IOMMU dirty tracking if the container supports it
 * (bcontainer->dirty_pages_supported); else nobody, and QEMU marks the whole
 * range dirty at every sync (QEMU 8.0's cpu_physical_memory_set_dirty_range).
 * `--dirty-tracking device|iommu` overrides the choice (the operator's call):
 * devices that cannot use the provider asked for are untracked.
 *
 * The untracked-DMA policy (`--untracked-dma`):
 * - all-dirty: every sync counts all RAM the device can reach as dirty
 *   (QEMU 8.0), so precopy cannot converge on it;
 * - skip-precopy: no precopy rounds (the 2022 VFIO proposal): straight to
 *   stop-and-copy (precopy) or postcopy (hybrid);
 * - block (default): refuse, naming the device (QEMU 8.1's migration
 *   blocker, hw/vfio/migration.c vfio_migration_realize: "VFIO device
 *   doesn't support device dirty tracking"), unless it has
 *   enable-migration=on, which QEMU lets through with a warning and then, as
 *   nothing tracks the device, the container's sync marks all dirty: the
 *   device acts as under all-dirty. enable-migration=off blocks whatever
 *   tracks it ("Migration is disabled for VFIO device").
 *
 * The trackers are read at every dirty sync and ORed into the RAM dirty
 * bitmap, as QEMU's vfio_listener_log_sync does into its RAM dirty bitmap.
 */
import { UsageError, emptyProviders, formatBytes, rangePages, type DeviceSpec, type GuestLayout, type ProviderFigures, type ProviderName } from '@postcopy/shared';
import type { SourceDevice } from './device.js';
import { popcount32, type IommuContainer } from './iommu.js';

export const DIRTY_TRACKING_MODES = ['auto', 'device', 'iommu'] as const;
export type DirtyTrackingMode = (typeof DIRTY_TRACKING_MODES)[number];

export const UNTRACKED_DMA_POLICIES = ['all-dirty', 'skip-precopy', 'block'] as const;
export type UntrackedDmaPolicy = (typeof UNTRACKED_DMA_POLICIES)[number];

export interface TrackingPlan {
  /** Each device's provider. */
  provider: Map<string, ProviderName>;
  /** Why, in words, per device. */
  why: Map<string, string>;
  /** Containers: their devices, and whether their IOMMU can track dirty pages. */
  containers: Map<string, { devices: string[]; iommuDirty: boolean }>;
}

/** A container's IOMMU can dirty-track when every device in it sits behind an IOMMU that can (tracking device or iommu). */
function containersOf(specs: readonly DeviceSpec[]): Map<string, { devices: string[]; iommuDirty: boolean }> {
  const containers = new Map<string, { devices: string[]; iommuDirty: boolean }>();
  for (const d of specs) {
    const c = containers.get(d.container) ?? { devices: [], iommuDirty: true };
    c.devices.push(d.name);
    if (d.tracking === 'none') c.iommuDirty = false;
    containers.set(d.container, c);
  }
  return containers;
}

/** The provider of each device under `mode` (see the rule above). */
export function planTracking(specs: readonly DeviceSpec[], mode: DirtyTrackingMode): TrackingPlan {
  const containers = containersOf(specs);
  const provider = new Map<string, ProviderName>();
  const why = new Map<string, string>();
  const byName = new Map(specs.map((d) => [d.name, d]));
  for (const [name, c] of containers) {
    const members = c.devices.map((n) => byName.get(n)!);
    const allLog = members.every((d) => d.tracking === 'device');
    for (const d of members) {
      let p: ProviderName;
      let w: string;
      if (mode === 'auto') {
        if (allLog) {
          p = 'device';
          w = `every device of container ${name} logs its own DMA`;
        } else if (c.iommuDirty) {
          p = 'iommu';
          w = `not every device of container ${name} logs its DMA (${members.filter((m) => m.tracking !== 'device').map((m) => m.name).join(', ')}), so its IOMMU tracks them all`;
        } else {
          p = 'none';
          w = `${members.filter((m) => m.tracking === 'none').map((m) => m.name).join(', ')} in container ${name} has neither DMA logging nor an IOMMU that tracks dirty pages`;
        }
      } else if (mode === 'device') {
        p = d.tracking === 'device' ? 'device' : 'none';
        w = d.tracking === 'device' ? '--dirty-tracking device' : `--dirty-tracking device, and ${d.name} has no DMA logging (tracking=${d.tracking})`;
      } else {
        p = c.iommuDirty ? 'iommu' : 'none';
        w = c.iommuDirty ? `--dirty-tracking iommu (container ${name})` : `--dirty-tracking iommu, and container ${name}'s IOMMU cannot track dirty pages (${members.filter((m) => m.tracking === 'none').map((m) => m.name).join(', ')} has tracking=none)`;
      }
      provider.set(d.name, p);
      why.set(d.name, w);
    }
  }
  return { provider, why, containers };
}

export interface PolicyPlan {
  /** The policy named in the report: the one asked for, or `unsafe-untracked-dma`. */
  policy: UntrackedDmaPolicy | 'unsafe-untracked-dma';
  /** Devices nobody tracks. */
  untracked: string[];
  /** Devices whose RAM counts dirty at every sync (all-dirty, or block with enable-migration=on). */
  allDirty: string[];
  /** No precopy rounds. */
  skipPrecopy: boolean;
  /** Why, for the report (empty when no device is untracked). */
  reason: string;
  /** The one warning of the migration, if the policy acts. */
  warning: string | undefined;
}

/**
 * What the policy does with the untracked devices; throws UsageError when
 * it refuses (block), naming the device and what would let it through.
 */
export function planPolicy(specs: readonly DeviceSpec[], tracking: TrackingPlan, policy: UntrackedDmaPolicy, unsafe: boolean, layout: GuestLayout): PolicyPlan {
  for (const d of specs) {
    if (d.enableMigration === 'off') {
      throw new UsageError(`--device ${d.name}: migration is disabled for this device (enable-migration=off, QEMU's "Migration is disabled for VFIO device"): expected enable-migration=auto or on`);
    }
  }
  const untracked = specs.filter((d) => tracking.provider.get(d.name) === 'none');
  const names = untracked.map((d) => d.name);
  const why = (d: DeviceSpec): string => tracking.why.get(d.name)!;
  if (untracked.length === 0) return { policy: unsafe ? 'unsafe-untracked-dma' : policy, untracked: [], allDirty: [], skipPrecopy: false, reason: 'every device\'s DMA is tracked', warning: undefined };
  if (unsafe) {
    return {
      policy: 'unsafe-untracked-dma',
      untracked: names,
      allDirty: [],
      skipPrecopy: false,
      reason: `testing only: nobody tracks the DMA of ${names.join(', ')} and precopy runs anyway, so pages it writes after they were sent are stale on the destination`,
      warning: `--unsafe-untracked-dma: the DMA of ${names.join(', ')} is tracked by nobody and precopy runs anyway (testing only: the content check must fail)`,
    };
  }
  const reach = (ds: readonly DeviceSpec[]): string => formatBytes(ds.reduce((n, d) => n + rangePages(d.dmaRanges), 0) * layout.pageSize);
  switch (policy) {
    case 'block': {
      const blocked = untracked.filter((d) => d.enableMigration !== 'on');
      if (blocked.length > 0) {
        const d = blocked[0]!;
        throw new UsageError(
          `--device ${d.name}: its DMA cannot be tracked (${why(d)}), and --untracked-dma block refuses to migrate it (QEMU 8.1's migration blocker: "VFIO device doesn't support device dirty tracking"): ` +
            `expected enable-migration=on on the device (migrate it anyway, all the RAM it reaches counted dirty at every sync), a device or container that can track its DMA, or --untracked-dma all-dirty or skip-precopy`,
        );
      }
      return {
        policy,
        untracked: names,
        allDirty: names,
        skipPrecopy: false,
        reason: `nobody can track the DMA of ${names.join(', ')} (${untracked.map(why).join('; ')}); enable-migration=on lets ${names.length > 1 ? 'them' : 'it'} through (QEMU 8.1 warns and migrates), so every sync counts the ${reach(untracked)} ${names.length > 1 ? 'they reach' : 'it reaches'} as dirty`,
        warning: `device ${names.join(', ')}: no device or IOMMU dirty tracking; migrating anyway (enable-migration=on): every sync counts the ${reach(untracked)} ${names.length > 1 ? 'they reach' : 'it reaches'} as dirty`,
      };
    }
    case 'all-dirty':
      return {
        policy,
        untracked: names,
        allDirty: names,
        skipPrecopy: false,
        reason: `nobody can track the DMA of ${names.join(', ')} (${untracked.map(why).join('; ')}): every sync counts all ${reach(untracked)} of RAM ${names.length > 1 ? 'they reach' : 'it reaches'} as dirty (QEMU 8.0), so precopy cannot converge on ${names.length > 1 ? 'them' : 'it'}`,
        warning: `device ${names.join(', ')}: DMA untracked (${untracked.map(why).join('; ')}): --untracked-dma all-dirty counts the ${reach(untracked)} ${names.length > 1 ? 'they reach' : 'it reaches'} as dirty at every sync`,
      };
    case 'skip-precopy':
      return {
        policy,
        untracked: names,
        allDirty: [],
        skipPrecopy: true,
        reason: `nobody can track the DMA of ${names.join(', ')} (${untracked.map(why).join('; ')}): no precopy rounds (the 2022 VFIO proposal), so nothing it writes can be sent stale`,
        warning: `device ${names.join(', ')}: DMA untracked (${untracked.map(why).join('; ')}): --untracked-dma skip-precopy: no precopy rounds`,
      };
  }
}

/** What the migration's dirty sync asks of the DMA trackers (precopy.ts calls it after the vCPU log). */
export interface DmaDirtySync {
  /** ORs every page a tracker found into `into`; returns how many of them `into` did not have yet. */
  sync(into: Int32Array): number;
}

/**
 * The trackers of one migration: per device DMA logging, per container IOMMU
 * dirty tracking, and the devices whose RAM counts all dirty. Each sync reads
 * them all into a scratch bitmap and ORs it into the RAM bitmap.
 */
export class DmaTracking implements DmaDirtySync {
  private readonly scratch: Int32Array;
  private readonly figures = emptyProviders();
  private started = false;
  /** Report errors (each made all of memory count dirty). */
  readonly errors: string[] = [];
  private readonly logged: SourceDevice[];
  private readonly iommus: IommuContainer[];

  constructor(
    private readonly devices: readonly SourceDevice[],
    containers: ReadonlyMap<string, IommuContainer>,
    private readonly plan: TrackingPlan,
    private readonly allDirty: readonly SourceDevice[],
    private readonly layout: GuestLayout,
  ) {
    this.scratch = new Int32Array(Math.ceil(layout.totalPages / 32));
    this.logged = devices.filter((d) => plan.provider.get(d.name) === 'device');
    const iommuContainers = new Set(devices.filter((d) => plan.provider.get(d.name) === 'iommu').map((d) => d.spec.container));
    this.iommus = [...containers.values()].filter((c) => iommuContainers.has(c.name));
  }

  /** Dirty logging starts (QEMU's log_global_start): each device's DMA log over its ranges, each container's IOMMU. */
  start(): void {
    if (this.started) return;
    this.started = true;
    for (const d of this.logged) this.startLog(d);
    for (const c of this.iommus) {
      const r = c.setDirtyTracking(true);
      if (r < 0) throw new Error(`container ${c.name}: expected IOMMU_HWPT_SET_DIRTY_TRACKING to succeed, got errno ${-r}`);
    }
  }

  private startLog(d: SourceDevice): void {
    const r = d.logStart(this.layout.pageSize, d.spec.dmaRanges);
    if (typeof r === 'number') throw new Error(`device ${d.name}: expected DMA_LOGGING_START of ${d.spec.dmaRanges.length} range(s) to succeed, got errno ${-r}`);
  }

  stop(): void {
    if (!this.started) return;
    this.started = false;
    for (const d of this.logged) d.logStop();
    for (const c of this.iommus) c.setDirtyTracking(false);
  }

  sync(into: Int32Array): number {
    if (!this.started) return 0;
    const scratch = this.scratch;
    scratch.fill(0);
    const pages = this.layout.totalPages;
    const add = (p: ProviderName, t0: number, bitmapBytes: number, pagesDirty: number): void => {
      const f = this.figures[p];
      f.bitmapBytes += bitmapBytes;
      f.pagesDirty += pagesDirty;
      f.ms += performance.now() - t0;
    };
    if (this.logged.length > 0) {
      this.figures.device.syncs++;
      for (const d of this.logged) {
        const t0 = performance.now();
        let bytes = 0;
        let found = 0;
        for (const r of d.spec.dmaRanges) {
          const got = d.logReport(r.first, r.count, this.layout.pageSize, scratch);
          if (typeof got === 'number') {
            // vfio.h: after any report error the log is corrupted; consider all memory dirty and restart tracking.
            this.errors.push(`device ${d.name}: DMA_LOGGING_REPORT failed with errno ${-got}: all memory counted dirty, logging restarted`);
            setAll(scratch, pages);
            found = pages;
            d.logStop();
            this.startLog(d);
            break;
          }
          bytes += got.bitmapBytes;
          found += got.pagesDirty;
        }
        add('device', t0, bytes, found);
      }
    }
    if (this.iommus.length > 0) {
      this.figures.iommu.syncs++;
      for (const c of this.iommus) {
        const t0 = performance.now();
        const got = c.getDirtyBitmap(0, pages, scratch);
        if (typeof got === 'number') {
          this.errors.push(`container ${c.name}: IOMMU_HWPT_GET_DIRTY_BITMAP failed with errno ${-got}: all memory counted dirty`);
          setAll(scratch, pages);
          add('iommu', t0, 0, pages);
        } else add('iommu', t0, got.bitmapBytes, got.pagesDirty);
      }
    }
    if (this.allDirty.length > 0) {
      this.figures.none.syncs++;
      for (const d of this.allDirty) {
        const t0 = performance.now();
        let n = 0;
        for (const r of d.spec.dmaRanges) {
          for (let p = r.first; p < r.first + r.count; p++) scratch[p >>> 5]! |= 1 << (p & 31);
          n += r.count;
        }
        add('none', t0, 0, n);
      }
    }
    let newly = 0;
    for (let w = 0; w < scratch.length; w++) {
      const v = scratch[w]!;
      if (v === 0) continue;
      newly += popcount32(v & ~into[w]!);
      into[w]! |= v;
    }
    return newly;
  }

  /** Pages counted dirty at every sync whatever was written (all-dirty). */
  get forcedPages(): number {
    return this.allDirty.reduce((n, d) => n + rangePages(d.spec.dmaRanges), 0);
  }

  providerFigures(): Record<ProviderName, ProviderFigures> {
    const out = emptyProviders();
    for (const p of ['device', 'iommu', 'none'] as const) out[p] = { ...this.figures[p], ms: Math.round(this.figures[p].ms * 1000) / 1000 };
    return out;
  }

  get deviceCount(): number {
    return this.devices.length;
  }
}

function setAll(bits: Int32Array, pages: number): void {
  for (let p = 0; p < pages; p += 32) bits[p >>> 5] = pages - p >= 32 ? -1 : (1 << (pages - p)) - 1;
}
