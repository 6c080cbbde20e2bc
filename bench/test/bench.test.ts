import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { runNode, type ProcessResult } from '../../e2e/test/run.js';
import { freePageReporting } from '../src/machine.js';
import { TINY_ARGS } from '../src/options.js';

/** The built bench (`npm test` builds first; run `npm run build` before running this file alone). */
const BENCH = fileURLToPath(new URL('../dist/cli.js', import.meta.url));
/** The whole code path, tiny: every run is a real two-process migration of a few MiB (throughput runs: 2 vCPUs x 1 MiB). */
const TINY = [...TINY_ARGS, '--memory-backends', 'none', '--device-section', 'off'];
const TIMEOUT_MS = 110_000;

/** Every ratio the tiny bench computes (its throughput runs have 2 vCPUs: names end in 2). */
const RATIOS = [
  'kvmExitP50OverFloor',
  'perThreadP50OverFloor',
  'sharedUffdP50OverFloor',
  'sharedUffdRateOverNative2',
  'perThreadRateOverNative2',
  'kvmExitRateOverNative2',
  'urgentUnderPushPreemptOverIdle',
  'urgentUnderCappedPushPreemptOverIdle',
  'pushOverNetCeiling',
  'pushOverBulk',
  'largePushOverIdlePush',
  'largePushOverLargeIdlePush',
  'largeElapsedOverPushTime',
  'largeWallOverElapsed',
  'destRssOverBudget',
  'sourceRssOverBudget',
  'tlsFaultP50OverPlain',
  'tlsPushOverPlain',
  'traceFaultP50OverOff',
  'tracePushOverOff',
  'traceRateOverOff',
  'precopyRoundOverPush',
  'precopyDowntimeOverLimit',
];
/** Every ratio with a target (rankingInversions2 is one, and may be 0). */
const TARGETED = RATIOS.filter((r) => !['sharedUffdP50OverFloor', 'urgentUnderCappedPushPreemptOverIdle', 'largePushOverLargeIdlePush'].includes(r)).concat('rankingInversions2');

/** The built bench as a real process (the e2e tests' runner: killed and failed after TIMEOUT_MS). */
function runBench(args: string[]): Promise<ProcessResult> {
  return runNode(BENCH, args, { timeoutMs: TIMEOUT_MS });
}

/** The value at a dotted path of the JSON, e.g. `floor.roundTripUs.p50`. */
function at(json: unknown, path: string): unknown {
  return path.split('.').reduce<unknown>((v, key) => (v !== null && typeof v === 'object' ? (v as Record<string, unknown>)[key] : undefined), json);
}

describe('npm run bench (tiny)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-bench-test-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('measures every figure and ratio, prints each ratio, and writes them as JSON', { timeout: TIMEOUT_MS + 10_000 }, async () => {
    const file = join(dir, 'nested', 'bench.json');
    const run = await runBench([...TINY, '--json', file]);
    expect(run.code, `stdout:\n${run.stdout}\nstderr:\n${run.stderr}`).toBe(0);
    expect(existsSync(file)).toBe(true);
    const json: unknown = JSON.parse(readFileSync(file, 'utf8'));
    // The net ceiling is measured right before the idle push it is held to (the same state of the machine's memory).
    const started = run.stderr.split('\n').filter((line) => /^bench: \[\d+\/\d+\] .* \.\.\.$/.test(line)).map((line) => line.replace(/^bench: \[\d+\/\d+\] /, ''));
    const push = started.indexOf('push throughput ...');
    expect(started.slice(push - 3, push + 1)).toEqual([
      'net ceiling (onread, sender image, 4 MiB) ...',
      'net ceiling (data, sender stream, 4 MiB) ...',
      'net ceiling (onread, sender stream, 4 MiB) ...',
      'push throughput ...',
    ]);

    const figures = [
      'floor.roundTripUs.p50',
      'floor.roundTripUs.p99',
      'floor.bulkMiBs',
      'netCeiling.onreadMiBs',
      'netCeiling.dataMiBs',
      'netCeiling.onreadImageMiBs',
      'throughput.tool.shared-uffd.2.pagesPerSec',
      'throughput.tool.per-thread-uffd.2.pagesPerSec',
      'throughput.tool.kvm-exit.2.pagesPerSec',
      'throughput.toolDefaults.shared-uffd.2.pagesPerSec',
      'throughput.toolDefaults.kvm-exit.2.pagesPerSec',
      'throughput.native.shared-uffd.2.pagesPerSec',
      'throughput.native.per-thread-uffd.2.pagesPerSec',
      'throughput.native.kvm-exit.2.pagesPerSec',
      'strategies.kvm-exit.cpuPerFaultUs.source',
      'strategies.kvm-exit.cpuPerFaultUs.dest',
      'throughput.tool.shared-uffd.2.cpuPerFaultUs.dest',
      'throughput.tool.kvm-exit.2.cpuPerFaultUs.destVcpus',
      'large.elapsedMs',
      'large.wallMs',
      'large.pushThroughputMiBs',
      'large.idlePushThroughputMiBs',
      'strategies.shared-uffd.p50',
      'strategies.shared-uffd.p99',
      'strategies.per-thread-uffd.p50',
      'strategies.per-thread-uffd.p99',
      'strategies.kvm-exit.p50',
      'strategies.kvm-exit.p99',
      'urgent.pushOff.p50',
      'urgent.pushOn.p50',
      'urgent.pushOnPreempt.p50',
      'urgent.pushCappedPreempt.p50',
      'large.destPeakRssBytes',
      'large.sourcePeakRssBytes',
      'pushThroughputMiBs',
      'tls.fault.p50',
      'tls.fault.p99',
      'tls.pushThroughputMiBs',
      'trace.fault.p50',
      'trace.fault.p99',
      'trace.pushThroughputMiBs',
      'trace.rate.pagesPerSec',
      'phases.modes.precopy.totalTimeMs',
      'phases.modes.precopy.downtimeMs',
      'phases.modes.precopy.round1MiBs',
      'phases.modes.hybrid.totalTimeMs',
      'phases.modes.hybrid.downtimeMs',
      'phases.modes.postcopy.totalTimeMs',
      'recovery.drop.pausedMs',
      'recovery.drop.elapsedMs',
      'recovery.killSource.pausedMs',
      'recovery.killSource.elapsedMs',
      ...RATIOS.map((r) => `ratios.${r}`),
    ];
    for (const path of figures) {
      const value = at(json, path);
      expect(typeof value, path).toBe('number');
      expect(Number.isFinite(value) && (value as number) > 0, `${path} = ${String(value)}`).toBe(true);
    }
    // Every target has a verdict (met or not: the bench checks targets, this test does not).
    for (const name of TARGETED) expect(typeof at(json, `targets.${name}.met`), name).toBe('boolean');
    // The ranking: a count of inverted pairs of three strategies.
    expect([0, 1, 2, 3]).toContain(at(json, 'ratios.rankingInversions2'));
    expect(run.stdout).toMatch(/^ {2}ranking at 2 vCPUs: tool \S+ > \S+ > \S+ \(without --preempt \S+ > \S+ > \S+\); native \S+ > \S+ > \S+ \(a pair whose native runs overlap is a tie\)$/m);
    // Each native counterpart ran once, in its mode, with the throughput runs' shape.
    const native = at(json, 'samples.native') as { mode: string; vcpus: number; pagesPerVcpu: number }[];
    expect(native.map((n) => n.mode).sort()).toEqual(['exit', 'per-region', 'shared']);
    for (const n of native) expect(n).toMatchObject({ vcpus: 2, pagesPerVcpu: 256 });
    // Whether this VM hands freed memory back to its host is said, where it can be told, and printed when so.
    const reporting = at(json, 'machine.freePageReporting');
    expect([true, false, null]).toContain(reporting);
    if (process.platform === 'linux') expect(reporting).toBe(freePageReporting());
    if (reporting === true) expect(run.stdout).toContain('reports free pages to its host');
    else expect(run.stdout).not.toContain('reports free pages to its host');
    // The whole process takes at least as long as the migration inside it.
    expect(at(json, 'large.wallMs') as number).toBeGreaterThan(at(json, 'large.elapsedMs') as number);

    // Recovery: counts may be 0 (a restarted source resends nothing it knows of), never negative or missing.
    for (const path of ['recovery.drop.pagesResent', 'recovery.drop.requestsReplayed', 'recovery.killSource.pagesResent', 'recovery.killSource.requestsReplayed']) {
      const value = at(json, path);
      expect(typeof value, path).toBe('number');
      expect(Number.isFinite(value) && (value as number) >= 0, `${path} = ${String(value)}`).toBe(true);
    }
    // Every recovery run paused once and resumed once (the bench throws otherwise; this holds it to that).
    const samples = at(json, 'samples.runs') as Record<string, { recovery?: { pauses: number; resumes: number; pausedMs: number } }[] | undefined>;
    for (const key of ['recovery:drop', 'recovery:kill-source']) {
      expect(samples[key], key).toHaveLength(1);
      for (const sample of samples[key]!) {
        expect(sample.recovery, key).toMatchObject({ pauses: 1, resumes: 1 });
        expect(sample.recovery!.pausedMs, key).toBeGreaterThan(0);
      }
    }
    expect(typeof at(json, 'method.recovery')).toBe('string');
    expect(run.stdout).toMatch(/^recovery: .*no target/m);
    expect(run.stdout).toContain('paused ms (per pause)');
    expect(run.stdout).toMatch(/kill-source \(source SIGKILLed/);

    // The memory-backends section has its own test (backends.test.ts): skipped here to keep the tiny run short.
    expect(run.stdout).toContain('memory backends: not measured (--memory-backends none)');
    // So is the devices section (devices.test.ts).
    expect(run.stdout).toContain('devices: not measured (--device-section off)');
    for (const name of [...RATIOS, 'rankingInversions2']) expect(run.stdout).toContain(name);
    expect(run.stdout).toMatch(new RegExp(`targets met: \\d+ of ${TARGETED.length}$`, 'm'));
    expect(run.stdout).toMatch(/^phases before postcopy: the same guest, 1 source vCPU dirtying 1000 pages\/s/m);
    expect(run.stdout).toMatch(/^TLS \(--tls: /m);
    expect(run.stdout).toMatch(/^--trace \(the timeline recorded/m);
    expect(run.stdout).toMatch(/^CPU per fault \(µs;/m);
    expect(run.stdout).toMatch(/^ {2}kvm-exit, 2 vCPUs +\d/m);
  });

  it('rejects a bad option with exit code 2 and a message naming it', async () => {
    const run = await runBench(['--repeat', '0']);
    expect(run.code).toBe(2);
    expect(run.stderr).toContain('--repeat');
  });
});
