/**
 * The report's device fields (issue 11): each device's type, mdev instance,
 * capabilities, tracking provider, the states it went through on both hosts,
 * its precopy data and what went in the downtime, whether its state arrived
 * intact; what each dirty-tracking provider cost per sync; which
 * untracked-DMA policy acted, on which device and why; and the downtime
 * split into its RAM and device parts.
 */
import type { ProviderName } from './wire.js';

export interface DeviceReport {
  name: string;
  type: string;
  /** The instance the destination created for it (by UUID). */
  mdevUuid: string;
  capabilities: string[];
  /** Who tracked its DMA: device (DMA logging), iommu (its container), none. */
  tracking: ProviderName;
  statePath: { source: string[]; destination: string[] };
  precopy: { initialBytesAtStart: number; bytesSent: number; dirtyBytesMax: number };
  stopCopyBytes: number;
  /** Its state on the destination equals the source's as it stopped (SHA-256 of the whole state). */
  stateDigestMatch: boolean;
  /** Its DMA on the destination after the switchover: accesses made, and faults they took (missing pages, through the userfaultfd). */
  destDma: { accesses: number; faults: number };
}

export interface ProviderReport {
  syncs: number;
  bitmapBytes: number;
  pagesDirty: number;
  msPerSync: number;
}

export interface DirtyTrackingReport {
  /** Each device's provider. */
  provider: Record<string, ProviderName>;
  perProvider: Record<ProviderName, ProviderReport>;
}

export interface PolicyReport {
  /** all-dirty, skip-precopy, block, or the testing-only unsafe-untracked-dma. */
  untrackedDma: string;
  actedOn: string[];
  reason: string;
  /** all-dirty: the expected downtime its perpetually dirty pages force at the last decision (ms). */
  forcedDowntimeMs: number;
}

export interface DowntimeSplit {
  /** The last dirty sync and the last RAM: stop-and-copy pages, or the discard set. */
  ramMs: number;
  /** The devices: P2P quiesce, STOP_COPY and the rest of their state on the source, then loading and RUNNING on the destination. */
  deviceMs: number;
  /** The rest: the link's trip, the destination starting its vCPUs. */
  otherMs: number;
}

/** The lines `npm start` prints about devices (none without devices). */
export function formatDevices(r: { devices: DeviceReport[]; dirtyTracking: DirtyTrackingReport; policy: PolicyReport; downtimeSplit: DowntimeSplit; downtimeMs: number }): string[] {
  if (r.devices.length === 0) return [];
  const lines: string[] = [];
  const mib = (b: number): string => `${(b / 1048576).toFixed(2)} MiB`;
  for (const d of r.devices) {
    lines.push(
      `device ${d.name}: ${d.type} ${d.mdevUuid || '(no instance)'}, ${d.capabilities.join('+')}, DMA tracked by ${d.tracking}; ` +
        `states ${d.statePath.source.join('→')} | ${d.statePath.destination.join('→')}; ` +
        `precopy ${mib(d.precopy.bytesSent)} (initial ${mib(d.precopy.initialBytesAtStart)}, dirty at most ${mib(d.precopy.dirtyBytesMax)}), stop-copy ${mib(d.stopCopyBytes)}; ` +
        `state ${d.stateDigestMatch ? 'verified' : 'DIFFERS'}; DMA here ${d.destDma.accesses} accesses, ${d.destDma.faults} faults`,
    );
  }
  const p = r.dirtyTracking.perProvider;
  const used = (['device', 'iommu', 'none'] as const).filter((k) => p[k].syncs > 0);
  lines.push(
    used.length === 0
      ? 'dirty tracking: no sync read a device tracker'
      : `dirty tracking per provider: ${used.map((k) => `${k} ${p[k].syncs} syncs, ${p[k].bitmapBytes} bitmap bytes, ${p[k].pagesDirty} pages dirty, ${p[k].msPerSync.toFixed(3)} ms/sync`).join('; ')}`,
  );
  if (r.policy.actedOn.length > 0) lines.push(`untracked DMA: --untracked-dma ${r.policy.untrackedDma} acted on ${r.policy.actedOn.join(', ')}: ${r.policy.reason}`);
  lines.push(`downtime ${r.downtimeMs.toFixed(1)} ms: RAM ${r.downtimeSplit.ramMs.toFixed(1)} ms, devices ${r.downtimeSplit.deviceMs.toFixed(1)} ms, the rest ${r.downtimeSplit.otherMs.toFixed(1)} ms`);
  return lines;
}
