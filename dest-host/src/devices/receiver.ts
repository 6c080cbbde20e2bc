/**
 * The guest's devices on the destination (QEMU's incoming side of
 * hw/vfio/migration.c): on device-setup, before any page, one mdev instance
 * of each source device's type is created by UUID, after checking that the
 * type is offered here in a compatible version (mdev.ts); if one cannot be,
 * the migration is refused before anything moves, naming the type and what
 * is available. Each device then goes to RESUMING (vfio_load_setup) and
 * loads its stream as it comes (device-data, in order, within its announced
 * size, every chunk checked against its seeded content); once every device
 * with PRE_COPY said its initial data is sent, the switchover-ack goes back
 * (qemu_loadvm_approve_switchover). At the switchover each device leaves
 * RESUMING (RESUMING → STOP is where a driver validates what it loaded: here
 * the record count and the SHA-256 of the whole state against the source's;
 * a mismatch fails the arc, the device lands in ERROR and the run fails) and
 * goes RUNNING; its DMA then runs with the guest (a thread that faults like
 * an I/O thread). The instances are destroyed when the run ends.
 */
import {
  DEVICE_STATE,
  DeviceError,
  DeviceRefusedError,
  MIGRATION_FLAG,
  MdevHost,
  STATE_CHUNK_BYTES,
  VfioDeviceFsm,
  flagNames,
  stateDigest,
  stateName,
  stateSeed,
  verifyStateChunk,
  versionCompatible,
  type DeviceAnnouncement,
  type DeviceMessage,
  type MdevCatalog,
  type Message,
  type PageRange,
} from '@postcopy/shared';

/** A device's DMA thread on the destination. */
export interface DeviceThreadSpec {
  name: string;
  index: number;
  dmaRanges: PageRange[];
}

export interface DeviceReceiverDeps {
  catalog: MdevCatalog;
  imageSeed: number;
  /** To the source, on the main channel. */
  send: (m: Message) => void;
  /** Fails the run. */
  fail: (err: Error) => void;
  /** Pages installed so far: device-setup must come before the first. */
  installed: () => number;
  /** Starts the devices' DMA threads (ready, waiting for the guest to run). */
  addDeviceThreads: (devices: DeviceThreadSpec[]) => Promise<void>;
  /** What `devices-ready` waits for besides the threads (nothing, in tests). */
  onReady?: (uuids: string[]) => void;
}

class DestDevice {
  readonly fsm: VfioDeviceFsm;
  readonly state: Uint8Array;
  readonly seed: number;
  nextSeq = 0;
  bytes = 0;
  /** device-end arrived: the source's record count and digest. */
  end: { records: number; digest: string } | undefined;
  initDataSent = false;
  digestMatch = false;
  constructor(
    readonly a: DeviceAnnouncement,
    readonly index: number,
    readonly uuid: string,
    imageSeed: number,
  ) {
    this.state = new Uint8Array(a.stateBytes);
    this.seed = stateSeed(imageSeed, a.name);
    // RESUMING -> STOP: the driver checks what it loaded; an incomplete or wrong state fails the arc (and the device is in ERROR).
    this.fsm = new VfioDeviceFsm(a.flags, (from, to) => {
      if (from !== DEVICE_STATE.RESUMING || to !== DEVICE_STATE.STOP) return 0;
      if (!this.end) return -22;
      this.digestMatch = stateDigest(this.state) === this.end.digest;
      return this.digestMatch ? 0 : -22;
    });
  }
}

export class DeviceReceiver {
  readonly mdev: MdevHost;
  readonly devices: DestDevice[] = [];
  private setupDone = false;
  private ackSent = false;
  /** ms the devices took at the switchover: leaving RESUMING (the check of their state) and RUNNING. */
  restoreMs = 0;
  destroyed = false;

  constructor(private readonly d: DeviceReceiverDeps) {
    this.mdev = new MdevHost(d.catalog);
  }

  get count(): number {
    return this.devices.length;
  }

  onMessage(m: DeviceMessage): void {
    try {
      switch (m.type) {
        case 'device-setup':
          void this.setup(m.devices).catch((err: Error) => this.d.fail(err));
          return;
        case 'device-data':
          this.data(m.device, m.seq, m.offset, m.data);
          return;
        case 'device-init-data-sent':
          this.initDataSent(m.device);
          return;
        case 'device-end':
          this.end(m.device, m.records, m.bytes, m.digest);
          return;
        default:
          throw new DeviceError(`expected device-setup, device-data, device-init-data-sent or device-end from the source, got ${m.type}`);
      }
    } catch (err) {
      this.d.fail(err instanceof DeviceError ? err : new DeviceError((err as Error).message));
    }
  }

  /** Creates the instances (or refuses, naming the type and what is available), RESUMING, the DMA threads; then devices-ready. */
  private async setup(list: DeviceAnnouncement[]): Promise<void> {
    if (this.setupDone) throw new DeviceError(`expected one device-setup, got a second`);
    this.setupDone = true;
    if (this.d.installed() > 0) throw new DeviceError(`expected device-setup before the first page, got it after ${this.d.installed()} pages`);
    const refusal = this.create(list);
    if (refusal !== undefined) {
      this.d.send({ type: 'error', code: 'ERR_POSTCOPY_DEVICE_REFUSED', message: refusal.slice(0, 4000) });
      this.destroy();
      throw new DeviceRefusedError(`the migration is refused before any page moved: ${refusal}`);
    }
    for (const dev of this.devices) dev.fsm.setStateOrThrow(DEVICE_STATE.RESUMING, `device ${dev.a.name} (${dev.uuid})`);
    await this.d.addDeviceThreads(this.devices.map((dev) => ({ name: dev.a.name, index: dev.index, dmaRanges: dev.a.dmaRanges })));
    const uuids = this.devices.map((dev) => dev.uuid);
    this.d.onReady?.(uuids);
    this.d.send({ type: 'devices-ready', uuids });
  }

  /** One instance per device, or why not (then none is kept). */
  private create(list: DeviceAnnouncement[]): string | undefined {
    for (const [i, a] of list.entries()) {
      const found = this.mdev.find(a.type);
      if (!found) return `device ${a.name} needs mdev type ${a.type}, which no parent here offers: ${this.mdev.describeAvailability(a.type)}`;
      if (!versionCompatible(a.version, found.type.version)) {
        return `device ${a.name} is mdev type ${a.type} version ${a.version}, and this host's ${a.type} is version ${found.type.version}: expected the same major version and a minor version at least the source's`;
      }
      const r = this.mdev.create(a.type);
      if (!r.ok) return `device ${a.name} needs an instance of mdev type ${a.type}, and none can be created (${r.errno}): ${r.message}`;
      this.devices.push(new DestDevice(a, i, r.instance.uuid, this.d.imageSeed));
    }
    return undefined;
  }

  private device(index: number, what: string): DestDevice {
    const dev = this.devices[index];
    if (!dev) {
      throw new DeviceError(
        `${what} for device ${index}: expected a device from 0 to ${this.devices.length - 1} (this destination has ${this.devices.map((d) => d.a.name).join(', ') || 'no device'}), got one it does not have`,
      );
    }
    if (dev.fsm.state !== DEVICE_STATE.RESUMING) {
      throw new DeviceError(`${what} for device ${dev.a.name}: expected it only while the device is RESUMING (before its device-end), got it in ${stateName(dev.fsm.state)}`);
    }
    return dev;
  }

  private data(index: number, seq: number, offset: number, data: Uint8Array): void {
    const dev = this.device(index, 'device-data');
    const name = dev.a.name;
    if (dev.end) throw new DeviceError(`device-data for device ${name}: expected none after its device-end, got record ${seq}`);
    if (seq !== dev.nextSeq) throw new DeviceError(`device-data for device ${name} out of order: expected record ${dev.nextSeq}, got record ${seq}`);
    const size = dev.a.stateBytes;
    if (offset + data.length > size) {
      throw new DeviceError(`device-data for device ${name} beyond its announced size: expected bytes within its ${size}-byte state, got bytes ${offset} to ${offset + data.length - 1}`);
    }
    if (offset % STATE_CHUNK_BYTES !== 0 || (data.length % STATE_CHUNK_BYTES !== 0 && offset + data.length !== size) || data.length % 4 !== 0) {
      throw new DeviceError(`device-data for device ${name}: expected whole ${STATE_CHUNK_BYTES}-byte chunks from a chunk boundary, got ${data.length} bytes at offset ${offset}`);
    }
    // Seeded content: each chunk as the generator made it, but for the counter word the running device changes.
    // A decoded frame's bytes need not be 4-byte aligned in their buffer: copy them when not (a Buffer's slice is a view).
    const aligned = data.byteOffset % 4 === 0 ? data : new Uint8Array(data);
    const words = new Uint32Array(aligned.buffer, aligned.byteOffset, aligned.length >>> 2);
    for (let at = 0; at < data.length; at += STATE_CHUNK_BYTES) {
      const n = Math.min(STATE_CHUNK_BYTES, data.length - at) >>> 2;
      const chunk = (offset + at) / STATE_CHUNK_BYTES;
      const bad = verifyStateChunk(dev.seed, chunk, words.subarray(at >>> 2, (at >>> 2) + n));
      if (bad !== -1) throw new DeviceError(`device-data for device ${name}: chunk ${chunk} of its state does not match its seeded content (word ${bad} differs)`);
    }
    dev.state.set(data, offset);
    dev.nextSeq++;
    dev.bytes += data.length;
  }

  private initDataSent(index: number): void {
    const dev = this.device(index, 'device-init-data-sent');
    if ((dev.a.flags & MIGRATION_FLAG.PRE_COPY) === 0) {
      throw new DeviceError(`device-init-data-sent for device ${dev.a.name}: expected it only of a device with PRE_COPY, got it of one with ${flagNames(dev.a.flags).join(', ')}`);
    }
    if (dev.initDataSent) throw new DeviceError(`device-init-data-sent for device ${dev.a.name}: expected it once, got it again`);
    dev.initDataSent = true;
    // QEMU's qemu_loadvm_approve_switchover: the ack once every device that needs one has its initial data here.
    const pending = this.devices.filter((x) => (x.a.flags & MIGRATION_FLAG.PRE_COPY) !== 0 && !x.initDataSent);
    if (pending.length === 0 && !this.ackSent) {
      this.ackSent = true;
      this.d.send({ type: 'switchover-ack' });
    }
  }

  private end(index: number, records: number, bytes: number, digest: string): void {
    const dev = this.device(index, 'device-end');
    if (dev.end) throw new DeviceError(`device-end for device ${dev.a.name}: expected it once, got it again`);
    if (records !== dev.nextSeq || bytes !== dev.bytes) {
      throw new DeviceError(`device-end for device ${dev.a.name}: expected ${dev.nextSeq} records of ${dev.bytes} bytes, as arrived, got an end after ${records} records of ${bytes} bytes`);
    }
    dev.end = { records, digest };
  }

  /**
   * The switchover: every device's stream must have ended; each leaves
   * RESUMING (its state checked) and runs. Throws a DeviceError that names
   * the device and what was wrong.
   */
  resume(): void {
    const t0 = performance.now();
    const missing = this.devices.filter((dev) => !dev.end).map((dev) => dev.a.name);
    if (missing.length > 0) throw new DeviceError(`expected every device's state before the switchover, got none of the end of ${missing.join(', ')}'s`);
    for (const dev of this.devices) {
      const r = dev.fsm.setState(DEVICE_STATE.RUNNING);
      if (r !== 0) {
        throw new DeviceError(
          `device ${dev.a.name}: its state does not verify on arrival: SHA-256 ${stateDigest(dev.state).slice(0, 16)}… of the ${dev.a.stateBytes} bytes loaded differs from the source's ${dev.end!.digest.slice(0, 16)}… (RESUMING -> STOP failed, errno ${-r}; the device is in ${stateName(dev.fsm.state)})`,
        );
      }
    }
    this.restoreMs = performance.now() - t0;
  }

  /** Every instance removed (when the run ends, whatever happened). */
  destroy(): void {
    for (const dev of this.devices) this.mdev.remove(dev.uuid);
    this.destroyed = true;
  }
}
