/**
 * `--trace PATH` end to end: real two-process migrations whose timeline
 * must parse, hold one slice per fault on the faulting thread's track (as
 * many as the report counts, every one with its page and a known
 * resolution, agreeing with the report's counters), its counters, and a
 * pause after an injected drop; bad paths fail before anything starts.
 */
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import type { Report } from '@postcopy/shared';
import { FAULT_RESOLUTIONS, type TraceDocument } from '@postcopy/dest-host';
import { DEST, LAUNCHER, TEST_SOURCE_WARM_UP, TEST_WARM_UP, expectVerified, migrate, runNode, within } from './run.js';

const EXPERIMENT = fileURLToPath(new URL('../dist/experiment/cli.js', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'postcopy-trace-e2e-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface Slice {
  ph: 'X';
  name: string;
  cat: string;
  tid: number;
  ts: number;
  dur: number;
  args: Record<string, unknown>;
}

/** A migration with --trace; returns the verified report and the parsed timeline. */
async function traced(name: string, args: string[]): Promise<{ report: Report; doc: TraceDocument; stderr: string }> {
  const path = join(dir, `${name}.json`);
  const result = await within(migrate([...args, '--trace', path], 60_000), 70_000, `npm start ${args.join(' ')} --trace`);
  const report = expectVerified(result);
  expect(existsSync(path), result.stderr).toBe(true);
  const doc = JSON.parse(readFileSync(path, 'utf8')) as TraceDocument;
  return { report, doc, stderr: result.stderr };
}

/** What every timeline must show, checked against its run's report. */
function expectTimeline(doc: TraceDocument, report: Report): Slice[] {
  expect(doc.displayTimeUnit).toBe('ms');
  expect(Array.isArray(doc.traceEvents)).toBe(true);
  const threadNames = new Map<number, string>();
  for (const e of doc.traceEvents) if (e.ph === 'M' && e.name === 'thread_name') threadNames.set(e.tid, (e.args as { name: string }).name);
  expect(doc.traceEvents.some((e) => e.ph === 'M' && e.name === 'process_name')).toBe(true);
  const faults = doc.traceEvents.filter((e) => e.ph === 'X' && e.cat === 'fault') as unknown as Slice[];

  // As many fault slices as the report counts faults (vCPU and non-vCPU), each on its thread's own track.
  expect(faults).toHaveLength(report.counters.faults);
  for (const f of faults) expect(threadNames.get(f.tid)).toMatch(/^(vCPU \d+|I\/O thread \d+|device \S+)$/);
  for (const v of report.perVcpu) {
    const own = faults.filter((f) => threadNames.get(f.tid) === `vCPU ${v.vcpu}`);
    expect(own).toHaveLength(v.faults);
    // µs: the slices add up to the report's blocktime in ms (the same intervals; 1 ns of rounding a slice).
    expect(Math.abs(own.reduce((s, f) => s + f.dur, 0) / 1000 - v.blocktimeMs)).toBeLessThan(0.01 + v.faults * 2e-6);
  }
  // I/O threads' and devices' DMA faults are the non-vCPU ones.
  expect(faults.filter((f) => /^(I\/O thread|device) /.test(threadNames.get(f.tid)!))).toHaveLength(report.counters.nonVcpuFaults);

  // Each with its page, read or write, and a known resolution; the bookkeeping never lost one.
  const pages = report.guestBytes / report.pageSize;
  const count = (r: string): number => faults.filter((f) => f.args.resolution === r).length;
  for (const f of faults) {
    expect(Number.isInteger(f.args.page)).toBe(true);
    expect(f.args.page as number).toBeGreaterThanOrEqual(0);
    expect(f.args.page as number).toBeLessThan(pages);
    expect(['read', 'write']).toContain(f.args.access);
    expect(FAULT_RESOLUTIONS).toContain(f.args.resolution);
    expect(f.name).toBe(f.args.resolution);
    expect(f.dur).toBeGreaterThanOrEqual(0);
  }
  expect(count('unknown')).toBe(0);
  expect(count('precopy')).toBe(0);

  // The resolutions agree with the report's counters: every request ended one way, every suppressed duplicate and WAKE is a fault's.
  const c = report.counters;
  expect(count('demand') + count('eexist') + count('eexist-wake') + count('already-sent') + count('sent-on-main')).toBe(c.requests);
  expect(count('duplicate-suppressed')).toBe(c.duplicateRequestsSuppressed);
  expect(count('already-sent')).toBe(c.alreadySent);
  expect(count('sent-on-main')).toBe(c.repliesOnMain);
  expect(faults.filter((f) => f.args.wake === true)).toHaveLength(c.wakes);

  // Counter tracks.
  const counters = doc.traceEvents.filter((e) => e.ph === 'C');
  const received = counters.filter((e) => e.name === 'received').map((e) => (e.args as { pages: number }).pages);
  expect(received.length).toBeGreaterThan(0);
  expect(counters.some((e) => e.name === 'push throughput' && typeof (e.args as Record<string, unknown>)['MiB/s'] === 'number')).toBe(true);
  if (report.push) {
    // With push every page comes: by the last sample the counter has them all, and some faults went to the push.
    expect(Math.max(...received)).toBe(pages);
  }
  return faults;
}

describe('--trace: the run as a Chrome trace-event timeline', () => {
  const GUEST = ['--memory', '8MiB', '--vcpus', '2'];

  it('shared-uffd, push on, an I/O thread: the slices match the report, the counter reaches every page', async () => {
    const { report, doc, stderr } = await traced('shared-uffd', [...GUEST, '--strategy', 'shared-uffd', '--io-threads', '1', '--io-accesses', '64']);
    expectTimeline(doc, report);
    expect(stderr).toMatch(/dest: trace: wrote .*shared-uffd\.json \(\d+ events, \d+ fault slices/);
    // The resolver track: a slice per fault message it read.
    expect(doc.traceEvents.some((e) => e.ph === 'X' && e.cat === 'resolver')).toBe(true);
    expect(doc.traceEvents.some((e) => e.ph === 'X' && e.cat === 'push')).toBe(true);
  });

  it('per-thread-uffd, push on, shared-hot: resolvers owe WAKEs, and each is on its fault', async () => {
    const { report, doc } = await traced('per-thread-uffd', [...GUEST, '--strategy', 'per-thread-uffd', '--workload', 'shared-hot']);
    const faults = expectTimeline(doc, report);
    expect(faults.filter((f) => f.args.wake === true).length).toBe(report.counters.wakes);
  });

  it('per-region-uffd on the kernel userfaultfd, no push, shared-hot: vCPUs collide, duplicates are suppressed', { skip: process.platform !== 'linux' }, async () => {
    const { report, doc } = await traced('per-region-uffd', ['--memory', '4MiB', '--vcpus', '2', '--memory-backend', 'uffd', '--strategy', 'per-region-uffd', '--workload', 'shared-hot', '--no-push']);
    const faults = expectTimeline(doc, report);
    expect(report.counters.duplicateRequestsSuppressed).toBeGreaterThan(0);
    expect(faults.some((f) => f.args.resolution === 'duplicate-suppressed')).toBe(true);
  });

  it('kvm-exit, no push, --preempt, an I/O thread: vCPUs resolve their own faults by demand; the I/O thread through its resolver', async () => {
    const { report, doc } = await traced('kvm-exit', [...GUEST, '--strategy', 'kvm-exit', '--no-push', '--preempt', '--io-threads', '1', '--io-accesses', '64']);
    const faults = expectTimeline(doc, report);
    const vcpu = faults.filter((f) => String(f.args.handledBy).startsWith('vCPU'));
    expect(vcpu.length).toBeGreaterThan(0);
    expect(vcpu.some((f) => f.args.resolution === 'demand')).toBe(true);
    expect(faults.some((f) => f.args.handledBy === 'io-resolver')).toBe(true);
  });

  it('kvm-exit on the kernel userfaultfd, push on, with an injected drop: the pause is a slice', { skip: process.platform !== 'linux' }, async () => {
    const { report, doc } = await traced('kvm-exit-drop', [...GUEST, '--memory-backend', 'uffd', '--strategy', 'kvm-exit', '--io-threads', '1', '--inject', 'drop@300']);
    expectTimeline(doc, report);
    expect(report.recovery.pauses).toBe(1);
    const pauses = doc.traceEvents.filter((e) => e.ph === 'X' && e.cat === 'recovery') as unknown as Slice[];
    expect(pauses).toHaveLength(1);
    expect(pauses[0]!.name).toBe('postcopy-paused');
    expect(pauses[0]!.args.reason).toMatch(/drop@300/);
    expect(Math.abs(pauses[0]!.dur / 1000 - report.recovery.pausedMs)).toBeLessThan(0.01);
  });

  it('hybrid with a device: its DMA faults after the switchover are slices on the device\'s own track', async () => {
    const { report, doc } = await traced('hybrid-device', [
      '--memory', '16MiB', '--vcpus', '2', '--mode', 'hybrid', '--no-push', '--device', 'nic0:tracking=device,dma-rate=4000,state=1MiB',
    ]);
    const faults = expectTimeline(doc, report);
    const names = new Map<number, string>();
    for (const e of doc.traceEvents) if (e.ph === 'M' && e.name === 'thread_name') names.set(e.tid, (e.args as { name: string }).name);
    expect([...names.values()]).toContain('device nic0');
    const dma = report.devices.find((d) => d.name === 'nic0')!;
    expect(dma.destDma.faults).toBeGreaterThan(0);
    expect(faults.filter((f) => names.get(f.tid) === "device nic0")).toHaveLength(dma.destDma.faults);
  });

  it('npm run experiment -- --trace DIR: one timeline per run, named after it', async () => {
    const out = join(dir, 'sweep');
    const traces = join(dir, 'sweep-traces');
    const r = await runNode(EXPERIMENT, ['--strategies', 'kvm-exit,shared-uffd', '--memory', '4MiB', '--vcpus', '1', '--no-push', ...TEST_WARM_UP, ...TEST_SOURCE_WARM_UP, '--out', out, '--trace', traces], { timeoutMs: 60_000 });
    expect(r.code, r.stderr).toBe(0);
    expect(readdirSync(traces).sort()).toEqual(['strategy=kvm-exit_r1.trace.json', 'strategy=shared-uffd_r1.trace.json']);
    for (const strategy of ['kvm-exit', 'shared-uffd']) {
      const doc = JSON.parse(readFileSync(join(traces, `strategy=${strategy}_r1.trace.json`), 'utf8')) as TraceDocument;
      const report = JSON.parse(readFileSync(join(out, 'runs', `strategy=${strategy}_r1.json`), 'utf8')) as Report;
      expect(doc.otherData.strategy).toBe(strategy);
      expectTimeline(doc, report);
    }
  });
});

describe('--trace: a path that cannot be written fails before the migration starts (exit 2)', () => {
  const file = join(dir, 'a-file');
  writeFileSync(file, '');
  const unwritable = join(file, 'trace.json'); // under a file: ENOTDIR, for root too

  it('npm start: before the source starts', async () => {
    const r = await runNode(LAUNCHER, ['--memory', '4MiB', '--trace', unwritable], { timeoutMs: 20_000 });
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(`--trace: cannot write the timeline to ${unwritable}: ENOTDIR`);
    expect(r.stderr).not.toMatch(/listening/);
  });

  it('npm run dest: before it connects (a source that is not there is never tried)', async () => {
    const r = await runNode(DEST, ['--source', 'ws://127.0.0.1:9', '--token', 't', '--memory', '4MiB', '--trace', unwritable], { timeoutMs: 20_000 });
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('--trace: cannot write the timeline to');
    expect(r.stderr).not.toMatch(/ECONNREFUSED|could not connect/i);
  });

  it('npm start: a directory is not a file', async () => {
    const r = await runNode(LAUNCHER, ['--memory', '4MiB', '--trace', dir], { timeoutMs: 20_000 });
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('--trace: expected a file path to write the timeline to, got the directory');
  });

  it('npm run experiment: before any run', async () => {
    const out = join(dir, 'bad-sweep');
    const r = await runNode(EXPERIMENT, ['--memory', '4MiB', '--out', out, '--trace', join(file, 'traces')], { timeoutMs: 20_000 });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--trace: cannot make the directory .*a-file\/traces/);
    expect(existsSync(join(out, 'runs'))).toBe(false);
  });
});
