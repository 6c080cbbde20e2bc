/**
 * Devices in the migration (issue 11), end to end with two real processes:
 * hybrid with a device-tracked device and an untracked one under
 * skip-precopy (every check passing, the devices' DMA on the destination
 * faulting and resolved); precopy with DMA tracked by a device and by an
 * IOMMU, PRE_COPY data and switchover-ack (and hybrid without it); each untracked-DMA policy
 * (all-dirty does not converge and says why, block refuses naming the
 * device, enable-migration=on lets it through); the proof that the content
 * check sees DMA; the mdev refusals before any page moves (no instance
 * available, an incompatible version); the mdev tree;
 * and the bad inputs, each exit 2 saying what is accepted.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { exitCode, listeningUrl } from '../src/launcher.js';
import { DEST, LAUNCHER, SOURCE, TEST_SOURCE_WARM_UP, expectVerified, migrate, runNode } from './run.js';

const cleanups: (() => void)[] = [];
afterEach(() => {
  while (cleanups.length) cleanups.pop()!();
});

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

describe('devices, end to end', () => {
  it('hybrid with a device-tracked and an untracked device under skip-precopy: every check passes, and their DMA on the destination faults and is resolved', { timeout: 90_000 }, async () => {
    const result = await migrate([
      '--memory', '16MiB', '--vcpus', '2', '--mode', 'hybrid', '--strategy', 'kvm-exit', '--no-push',
      '--device', 'nic0:tracking=device,dma-rate=2000,state=4MiB,pre-copy,p2p',
      '--device', 'gpu0:type=mgpu-512M,tracking=none,state=1MiB',
      '--untracked-dma', 'skip-precopy',
    ]);
    const report = expectVerified(result);
    expect(result.stderr).toMatch(/source: warning: device gpu0: DMA untracked \(.*\): --untracked-dma skip-precopy: no precopy rounds/);
    expect(report.switchover.reason).toBe('skip-precopy');
    expect(report.precopy.rounds).toBe(0);
    expect(report.policy).toMatchObject({ untrackedDma: 'skip-precopy', actedOn: ['gpu0'] });
    expect(report.dirtyTracking.provider).toEqual({ nic0: 'device', gpu0: 'none' });
    const [nic, gpu] = report.devices;
    expect(nic).toMatchObject({ name: 'nic0', type: 'mgpu-128M', tracking: 'device', stateDigestMatch: true, capabilities: ['stop-copy', 'p2p', 'pre-copy'] });
    expect(gpu).toMatchObject({ name: 'gpu0', type: 'mgpu-512M', tracking: 'none', stateDigestMatch: true });
    expect(nic!.mdevUuid).toMatch(UUID);
    expect(gpu!.mdevUuid).toMatch(UUID);
    // No precopy: nothing entered PRE_COPY; P2P quiesced nic0's DMA before either stopped; all state went in the downtime.
    expect(nic!.statePath.source).toEqual(['RUNNING', 'RUNNING_P2P', 'STOP', 'STOP_COPY', 'STOP']);
    expect(nic!.statePath.destination).toEqual(['RUNNING', 'RUNNING_P2P', 'STOP', 'RESUMING', 'STOP', 'RUNNING_P2P', 'RUNNING']);
    expect(gpu!.statePath.destination).toEqual(['RUNNING', 'STOP', 'RESUMING', 'STOP', 'RUNNING']);
    expect(nic!.stopCopyBytes).toBe(4 * 1024 * 1024);
    expect(report.checks.find((c) => c.name === 'device-state')!.ok).toBe(true);
    // Postcopy with nothing on the destination yet: the devices' DMA faults through the userfaultfd; the resolver installs, or WAKEs after the page came another way.
    expect(nic!.destDma.accesses + gpu!.destDma.accesses).toBe(2 * 256);
    expect(nic!.destDma.faults + gpu!.destDma.faults).toBeGreaterThan(0);
    expect(report.counters.nonVcpuFaults).toBe(nic!.destDma.faults + gpu!.destDma.faults);
    expect(report.downtimeSplit.deviceMs).toBeGreaterThan(0);
    expect(result.stdout).toMatch(/^device nic0: mgpu-128M [0-9a-f-]{36}, stop-copy\+p2p\+pre-copy, DMA tracked by device; states RUNNING→RUNNING_P2P→STOP→STOP_COPY→STOP \|/m);
  });

  it('precopy with DMA tracked by the device and by its IOMMU: the DMA-written pages are re-sent, PRE_COPY data waits for switchover-ack, verified', { timeout: 90_000 }, async () => {
    const result = await migrate([
      '--memory', '16MiB', '--vcpus', '1', '--mode', 'precopy', '--dirty-rate', '200', '--link-bandwidth', '400mbit',
      '--device', 'nic0:tracking=device,dma-rate=2000,state=2MiB,state-dirty-rate=256KiB,pre-copy,p2p',
      '--device', 'gpu0:tracking=iommu,dma-rate=2000,state=1MiB,dma-range=0-8MiB',
    ]);
    const report = expectVerified(result);
    const { device, iommu } = report.dirtyTracking.perProvider;
    expect(device.syncs).toBeGreaterThanOrEqual(2);
    expect(iommu.syncs).toBe(device.syncs);
    expect(device.pagesDirty).toBeGreaterThan(0);
    expect(iommu.pagesDirty).toBeGreaterThan(0);
    // The IOMMU reads a bitmap of the whole guest at every sync; nic0 logs its whole range (all of it, here) too.
    expect(iommu.bitmapBytes).toBe(iommu.syncs * (4096 / 8));
    expect(report.precopy.pagesResent).toBeGreaterThan(0);
    const nic = report.devices[0]!;
    expect(nic.statePath.source).toEqual(['RUNNING', 'PRE_COPY', 'PRE_COPY_P2P', 'STOP_COPY', 'STOP']);
    expect(nic.precopy.initialBytesAtStart).toBe(2 * 1024 * 1024);
    expect(nic.precopy.bytesSent).toBeGreaterThanOrEqual(nic.precopy.initialBytesAtStart);
    expect(report.devices[1]!.stopCopyBytes).toBe(1024 * 1024);
    expect(report.switchoverAck.needed).toBe(true);
    expect(report.devices.every((d) => d.stateDigestMatch)).toBe(true);
    expect(report.downtimeSplit.ramMs + report.downtimeSplit.deviceMs).toBeLessThanOrEqual(report.downtimeMs);
  });

  it('hybrid with --no-switchover-ack: nothing waits for the initial data, what is left goes in STOP_COPY, the state still verifies', { timeout: 90_000 }, async () => {
    const result = await migrate([
      '--memory', '16MiB', '--vcpus', '1', '--mode', 'hybrid', '--no-switchover-ack', '--link-bandwidth', '200mbit',
      '--device', 'nic0:tracking=device,dma-rate=1000,state=8MiB,state-dirty-rate=1MiB,pre-copy',
    ]);
    const report = expectVerified(result);
    expect(report.switchoverAck).toEqual({ needed: false, waitedMs: 0 });
    const nic = report.devices[0]!;
    expect(nic.statePath.source).toEqual(['RUNNING', 'PRE_COPY', 'STOP_COPY', 'STOP']);
    expect(nic.precopy.initialBytesAtStart).toBe(8 * 1024 * 1024);
    expect(nic.stateDigestMatch).toBe(true);
    expect(report.downtimeSplit.deviceMs).toBeGreaterThan(0);
  });

  it("all-dirty in precopy does not converge, and says it is the device's untracked DMA", { timeout: 90_000 }, async () => {
    const result = await migrate(['--memory', '8MiB', '--vcpus', '1', '--mode', 'precopy', '--link-bandwidth', '100mbit', '--max-precopy-rounds', '3', '--device', 'gpu0:tracking=none', '--untracked-dma', 'all-dirty']);
    expect(result.code).toBe(1);
    expect(result.report).toBeUndefined();
    const said = /precopy did not converge in 3 rounds: .* over the 300 ms limit; the DMA of gpu0 is untracked \(--untracked-dma all-dirty\): every sync counts its 2048 pages dirty, which alone forces an expected downtime of \d+ ms/;
    expect(result.stderr).toMatch(new RegExp(`source: migration failed: ${said.source}`));
    expect(result.stderr).toMatch(new RegExp(`dest: the source reported: ${said.source}`));
  });

  it('block (the default) refuses to start, naming the device; enable-migration=on lets it through, all it reaches counted dirty', { timeout: 90_000 }, async () => {
    const refused = await runNode(LAUNCHER, ['--memory', '8MiB', '--mode', 'hybrid', '--device', 'nic0', '--device', 'gpu0:tracking=none']);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toMatch(/postcopy: --device gpu0: its DMA cannot be tracked \(.*\), and --untracked-dma block refuses to migrate it .*expected enable-migration=on on the device/);
    const result = await migrate(['--memory', '8MiB', '--vcpus', '1', '--mode', 'hybrid', '--device', 'gpu0:tracking=none,enable-migration=on,dma-range=0-1MiB,dma-rate=3000']);
    const report = expectVerified(result);
    expect(report.policy).toMatchObject({ untrackedDma: 'block', actedOn: ['gpu0'] });
    expect(report.policy.reason).toMatch(/enable-migration=on lets it through/);
    expect(report.dirtyTracking.perProvider.none.pagesDirty).toBe(256 * report.dirtyTracking.perProvider.none.syncs);
    expect(report.discard.pages).toBeGreaterThanOrEqual(256);
  });

  it('the content check sees DMA: nobody tracking it while precopy runs (testing only: --unsafe-untracked-dma) fails it; the same run with skip-precopy passes', { timeout: 90_000 }, async () => {
    const args = ['--memory', '16MiB', '--vcpus', '1', '--mode', 'hybrid', '--dirty-rate', '100', '--link-bandwidth', '200mbit', '--device', 'gpu0:tracking=none,dma-rate=3000'];
    const unsafe = await migrate([...args, '--unsafe-untracked-dma']);
    expect(unsafe.code).not.toBe(0);
    const digest = unsafe.report!.checks.find((c) => c.name === 'digest')!;
    expect(digest.ok).toBe(false);
    expect(digest.detail).toMatch(/\d+ page\(s\) differ from the source's memory as its vCPUs stopped, first \d+ \(last sent by precopy round 1\)/);
    expect(unsafe.report!.policy.untrackedDma).toBe('unsafe-untracked-dma');
    const skipped = expectVerified(await migrate([...args, '--untracked-dma', 'skip-precopy']));
    expect(skipped.switchover.reason).toBe('skip-precopy');
  });

  it('an mdev instance the destination cannot create refuses the migration before any page moves, naming the type and what is available', { timeout: 60_000 }, async () => {
    const result = await migrate(['--memory', '8MiB', '--mode', 'precopy', '--device', 'a:type=mgpu-512M', '--device', 'b:type=mgpu-1G']);
    expect(result.code).toBe(1);
    expect(result.report).toBeUndefined();
    expect(result.stderr).toMatch(/dest: the migration is refused before any page moved: device b needs an instance of mdev type mgpu-1G, and none can be created \(EDQUOT\): .*available_instances: mgpu-128M 4, mgpu-256M 2, mgpu-512M 1, mgpu-1G 0/);
    expect(result.stderr).toMatch(/source: migration failed: the destination refused the migration before any page was sent: device b needs an instance of mdev type mgpu-1G/);
  });

  it("a destination whose type is another major version refuses before any page moves (hosts run apart, each with its own --mdev-types)", { timeout: 60_000 }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'postcopy-mdev-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const catalog = (version: string): string => {
      const file = join(dir, `v${version}.json`);
      writeFileSync(file, JSON.stringify({ parents: [{ name: '0000:65:00.0', driver: 'nvgpu', resource: { name: 'vram', total: '4GiB' }, types: [{ id: 'nvgpu-1Q', version, cost: '1GiB' }] }] }));
      return file;
    };
    const env = { ...process.env, POSTCOPY_TOKEN: 'devices-test-token' };
    const source: ChildProcess = spawn(process.execPath, [SOURCE, '--port', '0', ...TEST_SOURCE_WARM_UP, '--memory', '8MiB', '--mode', 'precopy', '--mdev-types', catalog('1.4'), '--device', 'gpu0:type=nvgpu-1Q'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    cleanups.push(() => source.kill('SIGKILL'));
    let sourceStderr = '';
    source.stderr!.on('data', (d: Buffer) => (sourceStderr += d.toString()));
    const sourceExit = exitCode(source);
    const url = await listeningUrl(source, sourceExit, 'the source', 30_000, () => sourceStderr);
    const dest = await runNode(DEST, ['--source', url, '--memory', '8MiB', '--mdev-types', catalog('2.0')], { env, timeoutMs: 30_000 });
    expect(dest.code).toBe(1);
    expect(dest.stderr).toMatch(/dest: the migration is refused before any page moved: device gpu0 is mdev type nvgpu-1Q version 1.4, and this host's nvgpu-1Q is version 2.0: expected the same major version and a minor version at least the source's/);
    expect(await sourceExit).toBe(1);
    expect(sourceStderr).toMatch(/source: migration failed: the destination refused the migration before any page was sent: device gpu0 is mdev type nvgpu-1Q version 1.4/);
  });

  it('npm run dest -- --list-mdev-types prints the sysfs tree with the counts', async () => {
    const result = await runNode(DEST, ['--list-mdev-types']);
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/^\/sys\/class\/mdev_bus\/0000:00:02.0\/mdev_supported_types\//);
    expect(result.stdout).toMatch(/├── mgpu-256M\/\n│ {3}├── name {17}MGPU-256M\n│ {3}├── description {10}256MiB of framebuffer/);
    expect(result.stdout).toMatch(/└── mgpu-1G\/[\s\S]*available_instances {2}1/);
  });

  it.each([
    ['an unknown field', ['--device', 'nic0:colour=red'], /expected keys among type, tracking, dma-rate/],
    ['an unknown type', ['--device', 'nic0:type=vgpu'], /type: expected an mdev type the parent offers \(mgpu-128M, mgpu-256M, mgpu-512M, mgpu-1G\), got "vgpu"/],
    ['an unknown tracking value', ['--device', 'nic0:tracking=psychic'], /tracking: expected one of device, iommu, none/],
    ['an unknown policy', ['--device', 'nic0', '--untracked-dma', 'ignore'], /--untracked-dma: expected one of all-dirty, skip-precopy, block, got "ignore"/],
    ['an unknown --dirty-tracking', ['--device', 'nic0', '--dirty-tracking', 'magic'], /--dirty-tracking: expected one of auto, device, iommu, got "magic"/],
    ['a device range outside the guest', ['--device', 'nic0:dma-range=0-64MiB'], /dma-range: expected a range inside the guest's 8MiB, got "0-64MiB"/],
    ['more logging ranges than the device allows', ['--device', 'nic0:log-max-ranges=1,dma-range=0-4KiB+8KiB-12KiB'], /expected at most 1 range \(log-max-ranges/],
    ['a device state smaller than 0', ['--device', 'nic0:state=-4KiB'], /state: expected a size of 0 or more/],
    ['two devices with one name', ['--device', 'nic0', '--device', 'nic0'], /expected each device name once, got nic0 again/],
    ['devices with --mode postcopy', ['--mode', 'postcopy', '--device', 'nic0'], /--device: expected --mode precopy or hybrid with devices/],
    [
      'skip-precopy whose stop-and-copy cannot fit the downtime limit',
      ['--mode', 'precopy', '--link-bandwidth', '100mbit', '--device', 'gpu0:tracking=none', '--untracked-dma', 'skip-precopy'],
      /--untracked-dma skip-precopy: with --mode precopy the whole migration is one stop-and-copy: 8MiB of RAM and 1MiB of device state over 100 Mbit\/s is an estimated downtime of 755 ms, over the 300 ms --downtime-limit/,
    ],
  ])('%s exits 2 saying what is accepted', async (_, extra, pattern) => {
    const result = await runNode(LAUNCHER, ['--memory', '8MiB', '--mode', 'hybrid', ...extra]);
    expect(result.code, result.stderr).toBe(2);
    expect(result.stderr).toMatch(pattern);
  });
});
