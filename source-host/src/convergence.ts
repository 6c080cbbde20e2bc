/**
 * When precopy may stop, computed as QEMU does (migration/migration.c,
 * migration_iteration_run and migration_update_counters):
 *
 *   threshold          = bandwidth × downtime-limit
 *   expected downtime  = pending bytes / bandwidth
 *
 * and precopy switches over once the pending bytes fit the threshold. The
 * bandwidth is what the last round achieved (bytes sent over its time), or
 * `avail-switchover-bandwidth` when the user says how much the switchover may
 * use.
 *
 * Auto-converge (migration/ram.c, migration_trigger_throttle and
 * mig_throttle_guest_down): when, in a sync period, the guest dirtied more
 * than `throttle-trigger-threshold` (50 %) of what was sent, for the second
 * time, the vCPUs are throttled: `cpu-throttle-initial` (20 %) the first time,
 * then `cpu-throttle-increment` (10 %) more each time, up to
 * `max-cpu-throttle` (99 %).
 */

export const AUTO_CONVERGE = {
  /** QEMU's throttle-trigger-threshold: percent of the bytes sent in a period. */
  triggerThresholdPercent: 50,
  /** Periods over the threshold before each step (QEMU's dirty_rate_high_cnt >= 2). */
  periodsPerStep: 2,
  initialPercent: 20,
  incrementPercent: 10,
  maxPercent: 99,
} as const;

/** Bytes per millisecond; a round that took no measurable time is clamped to 1 µs. */
export function bandwidthBytesPerMs(bytes: number, ms: number): number {
  return bytes / Math.max(ms, 0.001);
}

export interface Convergence {
  /** bandwidth × downtime limit, bytes. */
  thresholdBytes: number;
  /** pending / bandwidth, ms. */
  expectedDowntimeMs: number;
  converged: boolean;
}

/** Whether `pendingBytes` fit the downtime limit at `bytesPerMs`. */
export function convergence(pendingBytes: number, bytesPerMs: number, downtimeLimitMs: number): Convergence {
  if (!(bytesPerMs > 0)) return { thresholdBytes: 0, expectedDowntimeMs: pendingBytes > 0 ? Infinity : 0, converged: pendingBytes === 0 };
  const thresholdBytes = bytesPerMs * downtimeLimitMs;
  return { thresholdBytes, expectedDowntimeMs: pendingBytes / bytesPerMs, converged: pendingBytes <= thresholdBytes };
}

/** Auto-converge's state across sync periods. */
export class AutoConverge {
  private highPeriods = 0;
  private percent = 0;

  get throttlePercent(): number {
    return this.percent;
  }

  /**
   * One sync period: `dirtiedBytes` written by the guest, `sentBytes` sent.
   * Returns the new throttle if it changed, else undefined.
   */
  period(dirtiedBytes: number, sentBytes: number): number | undefined {
    const limit = (sentBytes * AUTO_CONVERGE.triggerThresholdPercent) / 100;
    if (dirtiedBytes <= limit) return undefined;
    if (++this.highPeriods < AUTO_CONVERGE.periodsPerStep) return undefined;
    this.highPeriods = 0;
    const next = this.percent === 0 ? AUTO_CONVERGE.initialPercent : Math.min(AUTO_CONVERGE.maxPercent, this.percent + AUTO_CONVERGE.incrementPercent);
    if (next === this.percent) return undefined;
    this.percent = next;
    return next;
  }
}
