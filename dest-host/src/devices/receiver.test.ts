/**
 * The destination's devices, fed messages by hand: mdev instances created
 * by UUID before the first page (or the migration refused before anything
 * moved, naming the type and what is available, or an incompatible
 * version), RESUMING, the stream loaded record by record (a device it does
 * not have, a record out of order, beyond the announced size or with the
 * wrong content: rejected, the run fails clearly), switchover-ack once every
 * PRE_COPY device's initial data is in, and at the switchover the state
 * verified by digest before the device runs. Instances go when it ends.
 */
import { describe, expect, it } from 'vitest';
import {
  DEFAULT_MDEV_CATALOG,
  DeviceError,
  DeviceRefusedError,
  MIGRATION_FLAG,
  initialState,
  parseMdevCatalog,
  stateDigest,
  stateSeed,
  type DeviceAnnouncement,
  type MdevCatalog,
  type Message,
} from '@postcopy/shared';
import { DeviceReceiver, type DeviceThreadSpec } from './receiver.js';

const SEED = 3;
const ALL = MIGRATION_FLAG.STOP_COPY | MIGRATION_FLAG.P2P | MIGRATION_FLAG.PRE_COPY;

function announce(name: string, type = 'mgpu-128M', flags = ALL, stateBytes = 8192): DeviceAnnouncement {
  return { name, type, version: '1.0', flags, stateBytes, dmaRanges: [{ first: 0, count: 16 }] };
}

function stateOf(name: string, bytes: number): Uint8Array {
  const s = new Uint8Array(bytes);
  initialState(stateSeed(SEED, name), bytes, s);
  return s;
}

function receiver(catalog: MdevCatalog = DEFAULT_MDEV_CATALOG, installed = 0) {
  const sent: Message[] = [];
  const failures: Error[] = [];
  const threads: DeviceThreadSpec[] = [];
  const r = new DeviceReceiver({
    catalog,
    imageSeed: SEED,
    send: (m) => sent.push(m),
    fail: (e) => failures.push(e),
    installed: () => installed,
    addDeviceThreads: async (d) => void threads.push(...d),
  });
  return { r, sent, failures, threads };
}

const settle = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe('device-setup', () => {
  it('creates one mdev instance per device by UUID, puts each in RESUMING, starts their DMA threads, then says devices-ready', async () => {
    const { r, sent, failures, threads } = receiver();
    r.onMessage({ type: 'device-setup', devices: [announce('nic0'), announce('gpu0', 'mgpu-512M', MIGRATION_FLAG.STOP_COPY)] });
    await settle();
    expect(failures).toEqual([]);
    expect(threads.map((t) => t.name)).toEqual(['nic0', 'gpu0']);
    const ready = sent.find((m) => m.type === 'devices-ready') as Extract<Message, { type: 'devices-ready' }>;
    expect(ready.uuids).toHaveLength(2);
    expect(r.mdev.devicesOf('mgpu-512M').map((i) => i.uuid)).toEqual([ready.uuids[1]]);
    expect(r.mdev.availableInstances('mgpu-512M')).toBe(0);
    expect(r.devices.map((d) => d.fsm.path)).toEqual([
      ['RUNNING', 'RUNNING_P2P', 'STOP', 'RESUMING'],
      ['RUNNING', 'STOP', 'RESUMING'],
    ]);
    r.destroy();
    expect(r.mdev.instanceCount).toBe(0);
    expect(r.mdev.availableInstances('mgpu-1G')).toBe(1);
  });

  it('refuses before anything moves when an instance cannot be created, naming the type and what is available', async () => {
    const { r, sent, failures, threads } = receiver();
    r.onMessage({ type: 'device-setup', devices: [announce('a', 'mgpu-512M'), announce('b', 'mgpu-1G')] });
    await settle();
    expect(failures[0]).toBeInstanceOf(DeviceRefusedError);
    expect(failures[0]!.message).toMatch(
      /^the migration is refused before any page moved: device b needs an instance of mdev type mgpu-1G, and none can be created \(EDQUOT\): .*has available_instances 0: parent 0000:00:02.0 has 512MiB of 1GiB framebuffer free; available_instances: mgpu-128M 4, mgpu-256M 2, mgpu-512M 1, mgpu-1G 0$/,
    );
    expect(sent).toEqual([{ type: 'error', code: 'ERR_POSTCOPY_DEVICE_REFUSED', message: expect.stringMatching(/^device b needs an instance of mdev type mgpu-1G/) }]);
    expect(threads).toEqual([]);
    // What it created for `a` is gone again.
    expect(r.mdev.instanceCount).toBe(0);
  });

  it('refuses a type it does not offer, or an incompatible version of one', async () => {
    const unknown = receiver();
    unknown.r.onMessage({ type: 'device-setup', devices: [announce('a', 'nvgpu-2Q')] });
    await settle();
    expect(unknown.failures[0]!.message).toMatch(/device a needs mdev type nvgpu-2Q, which no parent here offers: no parent offers it; the types here are mgpu-128M, mgpu-256M, mgpu-512M, mgpu-1G/);
    const newer = parseMdevCatalog({ parents: [{ name: 'p', resource: { total: '1GiB' }, types: [{ id: 'mgpu-128M', version: '2.0', cost: '128MiB' }] }] }, 'test');
    const incompatible = receiver(newer);
    incompatible.r.onMessage({ type: 'device-setup', devices: [announce('a')] });
    await settle();
    expect(incompatible.failures[0]!.message).toMatch(/device a is mdev type mgpu-128M version 1.0, and this host's mgpu-128M is version 2.0: expected the same major version/);
  });

  it('must come before the first page', async () => {
    const { r, failures } = receiver(DEFAULT_MDEV_CATALOG, 3);
    r.onMessage({ type: 'device-setup', devices: [announce('a')] });
    await settle();
    expect(failures[0]!.message).toMatch(/expected device-setup before the first page, got it after 3 pages/);
  });
});

describe('device data', () => {
  async function ready() {
    const t = receiver();
    t.r.onMessage({ type: 'device-setup', devices: [announce('nic0'), announce('gpu0', 'mgpu-128M', MIGRATION_FLAG.STOP_COPY, 4096)] });
    await settle();
    return t;
  }

  it.each([
    ['for a device it does not have', { type: 'device-data', device: 2, seq: 0, offset: 0, data: new Uint8Array(4096) }, /device-data for device 2: expected a device from 0 to 1 \(this destination has nic0, gpu0\), got one it does not have/],
    ['out of order', { type: 'device-data', device: 0, seq: 1, offset: 0, data: stateOf('nic0', 4096) }, /device-data for device nic0 out of order: expected record 0, got record 1/],
    ['beyond its announced size', { type: 'device-data', device: 1, seq: 0, offset: 4096, data: new Uint8Array(4096) }, /device-data for device gpu0 beyond its announced size: expected bytes within its 4096-byte state, got bytes 4096 to 8191/],
    ['off a chunk boundary', { type: 'device-data', device: 0, seq: 0, offset: 100, data: new Uint8Array(400) }, /expected whole 4096-byte chunks from a chunk boundary, got 400 bytes at offset 100/],
    ['with content that is not its seeded state', { type: 'device-data', device: 0, seq: 0, offset: 0, data: new Uint8Array(4096) }, /device-data for device nic0: chunk 0 of its state does not match its seeded content \(word 1 differs\)/],
    ['an init-data-sent of a device without PRE_COPY', { type: 'device-init-data-sent', device: 1 }, /device-init-data-sent for device gpu0: expected it only of a device with PRE_COPY, got it of one with stop-copy/],
    ['an end that does not count what arrived', { type: 'device-end', device: 0, records: 2, bytes: 8192, digest: 'a'.repeat(64) }, /device-end for device nic0: expected 0 records of 0 bytes, as arrived, got an end after 2 records of 8192 bytes/],
  ] as const)('rejects a message %s: the run fails clearly', async (_, message, pattern) => {
    const { r, failures } = await ready();
    r.onMessage(message as Message & { type: 'device-data' });
    expect(failures).toHaveLength(1);
    expect(failures[0]).toBeInstanceOf(DeviceError);
    expect(failures[0]!.message).toMatch(pattern);
  });

  it('loads the stream; acks once every PRE_COPY device has sent its initial data; at the switchover verifies each state by digest and runs', async () => {
    const { r, sent, failures } = await ready();
    const nic = stateOf('nic0', 8192);
    const gpu = stateOf('gpu0', 4096);
    r.onMessage({ type: 'device-data', device: 0, seq: 0, offset: 0, data: nic.subarray(0, 4096) });
    r.onMessage({ type: 'device-data', device: 0, seq: 1, offset: 4096, data: nic.subarray(4096) });
    r.onMessage({ type: 'device-init-data-sent', device: 0 });
    expect(sent.filter((m) => m.type === 'switchover-ack')).toHaveLength(1);
    // A chunk changed while the device ran (its counter word): sent again, and it overwrites.
    const changed = new Uint8Array(nic.subarray(0, 4096));
    new Uint32Array(changed.buffer)[1023]! += 1;
    nic.set(changed, 0);
    r.onMessage({ type: 'device-data', device: 0, seq: 2, offset: 0, data: changed });
    r.onMessage({ type: 'device-end', device: 0, records: 3, bytes: 12288, digest: stateDigest(nic) });
    r.onMessage({ type: 'device-data', device: 1, seq: 0, offset: 0, data: gpu });
    r.onMessage({ type: 'device-end', device: 1, records: 1, bytes: 4096, digest: stateDigest(gpu) });
    expect(failures).toEqual([]);
    r.resume();
    expect(r.devices.map((d) => [d.digestMatch, d.fsm.path.slice(-3)])).toEqual([
      [true, ['STOP', 'RUNNING_P2P', 'RUNNING']],
      [true, ['RESUMING', 'STOP', 'RUNNING']],
    ]);
  });

  it('a state whose digest differs fails the RESUMING -> STOP arc: the device is in ERROR and the switchover fails, naming it', async () => {
    const { r } = await ready();
    r.onMessage({ type: 'device-data', device: 1, seq: 0, offset: 0, data: stateOf('gpu0', 4096) });
    r.onMessage({ type: 'device-end', device: 1, records: 1, bytes: 4096, digest: 'b'.repeat(64) });
    r.onMessage({ type: 'device-end', device: 0, records: 0, bytes: 0, digest: stateDigest(new Uint8Array(8192)) });
    expect(() => r.resume()).toThrow(/device gpu0: its state does not verify on arrival: SHA-256 [0-9a-f]{16}… of the 4096 bytes loaded differs from the source's bbbbbbbbbbbbbbbb… \(RESUMING -> STOP failed, errno 22; the device is in ERROR\)/);
  });

  it('a switchover before every stream ended names the devices still missing', async () => {
    const { r } = await ready();
    expect(() => r.resume()).toThrow(/expected every device's state before the switchover, got none of the end of nic0, gpu0's/);
  });
});
