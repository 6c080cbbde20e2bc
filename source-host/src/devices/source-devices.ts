/**
 * The guest's devices on the source, as the migration drives them (QEMU's
 * hw/vfio/migration.c, one device at a time, all devices together here):
 *
 *   setup      device-setup to the destination, which creates an mdev
 *              instance of each device's type and answers devices-ready
 *              (nothing else moves before: QEMU's setup state);
 *   precopy    dirty logging starts (log_global_start) and each device
 *              with PRE_COPY enters it (vfio_save_setup); after each RAM
 *              round its pending data goes (vfio_save_iterate), and once its
 *              initial_bytes is 0, device-init-data-sent; the switchover
 *              waits for the destination's switchover-ack (unless
 *              --no-switchover-ack); the devices' stop_copy_length counts
 *              in the pending bytes precopy decides on;
 *   switchover every device with P2P goes to RUNNING_P2P (or PRE_COPY_P2P)
 *              first, so that no device does DMA while another stops
 *              (vfio_vmstate_change_prepare), then STOP_COPY (PRE_COPY
 *              devices) or STOP (vfio_vmstate_change); after the final
 *              dirty sync and the last RAM, each device's stream is read to
 *              its end in STOP_COPY (vfio_save_complete_precopy), with
 *              device-end carrying the state's digest;
 *   cleanup    STOP_COPY → STOP (vfio_save_cleanup, after the downtime),
 *              dirty logging stops.
 *
 * QEMU refuses VFIO migration with postcopy (vfio_save_prepare); here the
 * device's state goes in the switchover's downtime either way, and after a
 * switch to postcopy the device runs on the destination, where its DMA into
 * pages not there yet faults like an I/O thread's.
 */
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';
import {
  DEVICE_STATE,
  MAX_DEVICE_DATA_BYTES,
  MIGRATION_FLAG,
  encode,
  flagNames,
  noDevicesSummary,
  stateSeed,
  type DeviceAnnouncement,
  type DeviceSpec,
  type DevicesSummary,
  type MdevCatalog,
  type ProviderName,
} from '@postcopy/shared';
import type { GuestImage } from '../image.js';
import type { Channel } from '../migration.js';
import type { PrecopyDevices } from '../precopy.js';
import { ENOMSG, SourceDevice } from './device.js';
import { IommuContainer } from './iommu.js';
import { DmaTracking, type PolicyPlan, type TrackingPlan } from './tracking.js';

export interface SourceDevicesOptions {
  specs: DeviceSpec[];
  tracking: TrackingPlan;
  policy: PolicyPlan;
  /** QEMU's switchover-ack capability (on unless --no-switchover-ack). */
  switchoverAck: boolean;
  /** The mdev types of this host: a device's type version comes from it. */
  catalog: MdevCatalog;
}

/** Frames on the channel beyond which sending waits (as precopy's rounds). */
const HIGH_WATER_BYTES = 512 * 1024;

export class SourceDevices implements PrecopyDevices {
  readonly devices: SourceDevice[];
  readonly containers = new Map<string, IommuContainer>();
  readonly tracking: DmaTracking;
  private ready: { resolve: (uuids: string[]) => void; reject: (err: Error) => void } | undefined;
  private acked = false;
  private ackWaiters: (() => void)[] = [];
  private readonly initSent = new Set<number>();
  private seq: number[];
  private bytes: number[];
  private setupDone = false;
  private forcedDowntimeMs = 0;
  private ackNeeded = false;
  private ackWaitStarted: number | undefined;
  private ackWaitedMs = 0;
  /** The destination's instance of each device (devices-ready). */
  uuids: string[] = [];

  constructor(
    private readonly image: GuestImage,
    private readonly o: SourceDevicesOptions,
  ) {
    const { totalPages } = image.layout;
    for (const [name, c] of o.tracking.containers) this.containers.set(name, new IommuContainer(name, totalPages, c.iommuDirty));
    this.devices = o.specs.map((spec, i) => new SourceDevice(spec, i, image, this.containers.get(spec.container)!, stateSeed(image.spec.seed, spec.name)));
    for (const d of this.devices) this.containers.get(d.spec.container)!.devices.push(d.name);
    const allDirty = this.devices.filter((d) => o.policy.allDirty.includes(d.name));
    this.tracking = new DmaTracking(this.devices, this.containers, o.tracking, allDirty, image.layout);
    this.seq = this.devices.map(() => 0);
    this.bytes = this.devices.map(() => 0);
  }

  get skipPrecopy(): boolean {
    return this.o.policy.skipPrecopy;
  }

  /** The devices run with the guest, from the source's start. */
  async start(onError: (err: Error) => void): Promise<void> {
    await Promise.all(this.devices.map((d) => d.start(onError)));
  }

  // ------------------------------------------------------------ setup

  private versionOf(type: string): string {
    for (const p of this.o.catalog.parents) for (const t of p.types) if (t.id === type) return t.version;
    return '1.0';
  }

  /** device-setup on the main channel; resolves with the destination's instances, or rejects with its refusal. */
  announce(main: Channel): Promise<string[]> {
    const devices: DeviceAnnouncement[] = this.devices.map((d) => ({
      name: d.name,
      type: d.spec.type,
      version: this.versionOf(d.spec.type),
      flags: d.flags,
      stateBytes: d.spec.stateBytes,
      dmaRanges: d.spec.dmaRanges,
    }));
    const answer = new Promise<string[]>((resolve, reject) => (this.ready = { resolve, reject }));
    main.send(encode({ type: 'device-setup', devices }));
    return answer;
  }

  /** devices-ready from the destination. */
  devicesReady(uuids: string[]): void {
    if (!this.ready) throw new Error(`expected devices-ready only in answer to device-setup, got it unasked`);
    if (uuids.length !== this.devices.length) throw new Error(`expected devices-ready with ${this.devices.length} instance UUID(s), one per device, got ${uuids.length}`);
    this.uuids = uuids;
    this.ready.resolve(uuids);
    this.ready = undefined;
  }

  /** The destination refused the devices (its error), or went away before answering. */
  refused(err: Error): void {
    this.ready?.reject(err);
    this.ready = undefined;
  }

  get awaitingReady(): boolean {
    return this.ready !== undefined;
  }

  /** switchover-ack from the destination. */
  switchoverAcked(): void {
    if (!this.ackNeeded) throw new Error(`expected no switchover-ack (no device needs one${this.o.switchoverAck ? '' : ': --no-switchover-ack'}), got one`);
    if (this.acked) throw new Error(`expected one switchover-ack, got a second`);
    this.acked = true;
    if (this.ackWaitStarted !== undefined) this.ackWaitedMs = performance.now() - this.ackWaitStarted;
    for (const w of this.ackWaiters.splice(0)) w();
  }

  // ------------------------------------------------------------ precopy

  setup(): void {
    if (this.setupDone) return;
    this.setupDone = true;
    this.tracking.start();
    for (const d of this.devices) {
      if ((d.flags & MIGRATION_FLAG.PRE_COPY) === 0) continue;
      d.fsm.setStateOrThrow(DEVICE_STATE.PRE_COPY, `device ${d.name}`);
      const info = d.precopyInfo();
      if (typeof info !== 'number') d.initialBytesAtStart = info.initialBytes;
      if (this.o.switchoverAck) this.ackNeeded = true;
    }
  }

  syncDirty(into: Int32Array): number {
    return this.tracking.sync(into);
  }

  async iterate(channel: Channel): Promise<number> {
    let sent = 0;
    for (const d of this.devices) {
      const info = d.precopyInfo();
      if (typeof info === 'number') continue;
      let budget = info.initialBytes + info.dirtyBytes;
      while (budget > 0) {
        const r = d.read(MAX_DEVICE_DATA_BYTES);
        if (r === ENOMSG) break;
        if (typeof r === 'number') throw new Error(`device ${d.name}: expected a read of its PRE_COPY stream to succeed, got errno ${-r}`);
        await this.sendRecord(channel, d.index, r.offset, r.data);
        budget -= r.data.length;
        sent += r.data.length;
      }
      const after = d.precopyInfo();
      if (this.ackNeeded && typeof after !== 'number' && after.initialBytes === 0 && !this.initSent.has(d.index)) {
        this.initSent.add(d.index);
        channel.send(encode({ type: 'device-init-data-sent', device: d.index }));
      }
    }
    return sent;
  }

  private async sendRecord(channel: Channel, device: number, offset: number, data: Uint8Array): Promise<void> {
    if (!channel.isOpen) throw new Error(`the destination's main channel closed while device data was being sent`);
    const seq = this.seq[device]!;
    this.seq[device] = seq + 1;
    this.bytes[device]! += data.length;
    const sent = new Promise<void>((resolve) => channel.send(encode({ type: 'device-data', device, seq, offset, data }), () => resolve()));
    if (channel.bufferedAmount > HIGH_WATER_BYTES) await sent;
    else await yieldToEventLoop();
  }

  pendingBytes(): number {
    return this.devices.reduce((n, d) => n + d.stopCopyLength(), 0);
  }

  canSwitchover(): boolean {
    return !this.ackNeeded || this.acked;
  }

  waitForAck(ms: number): Promise<void> {
    if (this.canSwitchover()) return Promise.resolve();
    // The switchover waits from the first time it could have happened.
    this.ackWaitStarted ??= performance.now();
    return new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.ackWaiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  noteDecision(bytesPerMs: number): void {
    const forced = this.tracking.forcedPages * this.image.layout.pageSize;
    this.forcedDowntimeMs = forced > 0 && bytesPerMs > 0 ? forced / bytesPerMs : 0;
  }

  notConvergedDetail(): string {
    if (this.o.policy.allDirty.length === 0) {
      return this.ackNeeded && !this.acked ? '; the destination has not acknowledged every device\'s initial data yet (switchover-ack)' : '';
    }
    return `; the DMA of ${this.o.policy.allDirty.join(', ')} is untracked (--untracked-dma ${this.o.policy.policy}): every sync counts its ${this.tracking.forcedPages} pages dirty, which alone forces an expected downtime of ${Math.round(this.forcedDowntimeMs)} ms`;
  }

  // ------------------------------------------------------------ switchover

  /**
   * The guest stopped: DMA quiesces across every device before any stops
   * (P2P first), then each stops. Returns the ms it took.
   */
  stop(): number {
    const t0 = performance.now();
    for (const d of this.devices) {
      if ((d.flags & MIGRATION_FLAG.P2P) === 0) continue;
      d.fsm.setStateOrThrow(d.fsm.state === DEVICE_STATE.PRE_COPY ? DEVICE_STATE.PRE_COPY_P2P : DEVICE_STATE.RUNNING_P2P, `device ${d.name}`);
    }
    for (const d of this.devices) {
      const s = d.fsm.state;
      d.fsm.setStateOrThrow(s === DEVICE_STATE.PRE_COPY || s === DEVICE_STATE.PRE_COPY_P2P ? DEVICE_STATE.STOP_COPY : DEVICE_STATE.STOP, `device ${d.name}`);
    }
    return performance.now() - t0;
  }

  /** Every device's stream to its end in STOP_COPY, then device-end; returns the ms it took. */
  async saveComplete(channel: Channel): Promise<number> {
    const t0 = performance.now();
    let last: Promise<void> | undefined;
    for (const d of this.devices) {
      d.fsm.setStateOrThrow(DEVICE_STATE.STOP_COPY, `device ${d.name}`);
      for (;;) {
        const r = d.read(MAX_DEVICE_DATA_BYTES);
        if (r === 0) break;
        if (typeof r === 'number') throw new Error(`device ${d.name}: expected a read of its STOP_COPY stream to succeed, got errno ${-r}`);
        await this.sendRecord(channel, d.index, r.offset, r.data);
      }
      last = new Promise<void>((resolve) => channel.send(encode({ type: 'device-end', device: d.index, records: this.seq[d.index]!, bytes: this.bytes[d.index]!, digest: d.digest }), () => resolve()));
    }
    // The downtime's device part ends once the last of it has left.
    await last;
    return performance.now() - t0;
  }

  /** After the downtime: STOP_COPY → STOP (vfio_save_cleanup), dirty logging stops. */
  cleanup(): void {
    this.tracking.stop();
    for (const d of this.devices) if (d.fsm.state === DEVICE_STATE.STOP_COPY) d.fsm.setState(DEVICE_STATE.STOP);
  }

  /** The source's device figures for the summary. */
  summary(downtime: { ramMs: number; deviceMs: number }): DevicesSummary {
    const base = noDevicesSummary();
    return {
      devices: this.devices.map((d) => ({
        name: d.name,
        type: d.spec.type,
        capabilities: flagNames(d.flags),
        tracking: this.o.tracking.provider.get(d.name)! as ProviderName,
        statePath: [...d.fsm.path],
        precopy: { initialBytesAtStart: d.initialBytesAtStart, bytesSent: d.precopyBytes, dirtyBytesMax: d.dirtyBytesMax },
        stopCopyBytes: d.stopCopyBytes,
        stateDigest: d.digest,
      })),
      providers: this.tracking.providerFigures(),
      policy: {
        untrackedDma: this.o.policy.policy,
        actedOn: this.o.policy.untracked,
        reason: this.o.policy.reason + (this.tracking.errors.length > 0 ? `; ${this.tracking.errors.join('; ')}` : ''),
        forcedDowntimeMs: Math.round(this.forcedDowntimeMs * 1000) / 1000,
      },
      downtime: { ramMs: round3(downtime.ramMs), deviceMs: round3(downtime.deviceMs) },
      switchoverAck: { needed: this.ackNeeded, waitedMs: round3(this.ackWaitedMs) },
      ...(this.devices.length === 0 ? { policy: base.policy } : {}),
    };
  }

  /**
   * The migration failed or was cancelled: the guest stays here, and its
   * devices run on (QEMU's MIG_EVENT_PRECOPY_FAILED puts them back in
   * RUNNING, vfio_migration_state_notifier); dirty logging stops.
   */
  abandon(): void {
    this.tracking.stop();
    for (const d of this.devices) if (d.fsm.state !== DEVICE_STATE.RUNNING) d.fsm.setState(DEVICE_STATE.RUNNING);
  }

  async close(): Promise<void> {
    this.refused(new Error('the source is closing'));
    await Promise.all(this.devices.map((d) => d.close()));
  }
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}
