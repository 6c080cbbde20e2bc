import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import type { Report } from '@postcopy/shared';
import { csvField, parseCsv, toCsv } from '../src/experiment/csv.js';
import { combinations, expandRuns, parseList, runName, type SweptParam } from '../src/experiment/matrix.js';
import { EXIT_CODE_METRIC, METRICS } from '../src/experiment/metrics.js';
import { experimentCommand, parseExperimentOptions, rawOptions, validateMatrix } from '../src/experiment/options.js';
import { formatSpread, median, spread } from '../src/experiment/summary.js';
import { linearScale, logScale } from '../src/experiment/svg.js';
import { launcherCommand, splitArgs } from '../src/options.js';
import { TEST_SOURCE_WARM_UP, TEST_WARM_UP, runNode } from './run.js';

const EXPERIMENT = fileURLToPath(new URL('../dist/experiment/cli.js', import.meta.url));

const param = (key: string, flag: string, values: string[]): SweptParam => ({ key, flag, column: flag.slice(2).replace(/-/g, '_'), values });

const dirs: string[] = [];
function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-experiment-'));
  dirs.push(dir);
  return dir;
}
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

describe('matrix', () => {
  const strategy = param('strategy', '--strategy', ['shared-uffd', 'kvm-exit']);
  const vcpus = param('vcpus', '--vcpus', ['1', '2', '4']);

  it('parses comma lists: trimmed, duplicates dropped, empty items rejected', () => {
    expect(parseList('--vcpus', '1, 2,4,2')).toEqual(['1', '2', '4']);
    expect(parseList('--memory', '64MiB')).toEqual(['64MiB']);
    expect(() => parseList('--vcpus', '1,,2')).toThrow(/--vcpus: .*"1,,2"/);
    expect(() => parseList('--vcpus', '')).toThrow(/--vcpus/);
  });

  it('expands every combination, the last parameter fastest', () => {
    const combos = combinations([strategy, vcpus]);
    expect(combos.map((c) => c.values)).toEqual([
      { strategy: 'shared-uffd', vcpus: '1' },
      { strategy: 'shared-uffd', vcpus: '2' },
      { strategy: 'shared-uffd', vcpus: '4' },
      { strategy: 'kvm-exit', vcpus: '1' },
      { strategy: 'kvm-exit', vcpus: '2' },
      { strategy: 'kvm-exit', vcpus: '4' },
    ]);
    expect(combos.map((c) => c.index)).toEqual([0, 1, 2, 3, 4, 5]);
    expect(combinations([])).toEqual([{ index: 0, values: {} }]);
  });

  it('runs repeat by repeat over all combinations, each with a distinct name encoding its values', () => {
    const runs = expandRuns([strategy, vcpus], 3);
    expect(runs).toHaveLength(18);
    expect(runs.map((r) => r.index)).toEqual([...Array(18).keys()]);
    expect(runs.slice(0, 6).every((r) => r.repeat === 1)).toBe(true);
    expect(runs[6]!.repeat).toBe(2);
    expect(runs[6]!.combination.index).toBe(0);
    expect(runs[4]!.name).toBe('strategy=kvm-exit_vcpus=2_r1');
    expect(new Set(runs.map((r) => r.name)).size).toBe(18);
    expect(expandRuns([], 2).map((r) => r.name)).toEqual(['r1', 'r2']);
    expect(() => expandRuns([strategy], 0)).toThrow(/--repeat/);
  });

  it('keeps file names safe', () => {
    const odd = param('memory', '--memory', ['64 MiB/x']);
    expect(runName([odd], { index: 0, values: { memory: '64 MiB/x' } }, 1)).toBe('memory=64-MiB-x_r1');
  });
});

describe('options', () => {
  const parse = (args: string[]) => {
    const cmd = experimentCommand().exitOverride();
    cmd.parse(['node', 'experiment', ...args]);
    return parseExperimentOptions(cmd.opts());
  };

  it('offers every run option of the launcher, except the per-run output files', () => {
    const ours = new Set(experimentCommand().options.map((o) => o.attributeName()));
    for (const o of launcherCommand().options) {
      if (o.attributeName() === 'json' || o.attributeName() === 'hgrm') expect(ours.has(o.attributeName())).toBe(false);
      else expect(ours.has(o.attributeName()), o.flags).toBe(true);
    }
  });

  it('sweeps lists, passes single values and flags through, and takes the plural aliases', () => {
    const o = parse(['--vcpus', '1,2', '--strategies', 'kvm-exit,shared-uffd', '--memory', '4MiB', '--no-push', '--preempt', '--out', '/tmp/x', '--repeat', '2']);
    expect(o.params.map((p) => [p.key, p.values])).toEqual([
      ['strategy', ['kvm-exit', 'shared-uffd']],
      ['vcpus', ['1', '2']],
    ]);
    expect(o.params.map((p) => p.column)).toEqual(['strategy', 'vcpus']);
    expect(o.fixed).toMatchObject({ memory: '4MiB', push: false, preempt: true, pageSize: '4KiB' });
    expect(o.repeat).toBe(2);
    expect(parse(['--workloads', 'random', '--out', 'd']).fixed.workload).toBe('random');
    expect(parse(['--link-delay-us', '0,200', '--out', 'd']).params[0]).toMatchObject({ key: 'linkDelayUs', column: 'link_delay_us' });
  });

  it('sweeps --inject by commas; faults of one run join with +, and kill-source reaches the launcher', () => {
    const o = parse(['--inject', 'drop@100+drop@900,kill-source@300', '--memory', '4MiB', '--out', 'd']);
    expect(o.params.map((p) => [p.key, p.values])).toEqual([['inject', ['drop@100+drop@900', 'kill-source@300']]]);
    const [twoDrops, kill] = combinations(o.params).map((c) => splitArgs(rawOptions(o, c.values)));
    expect(twoDrops!.destArgs.join(' ')).toContain('--inject drop@100,drop@900');
    expect(twoDrops!.killSourceAt).toEqual([]);
    expect(kill!.killSourceAt).toEqual([300]);
    expect(kill!.destArgs).not.toContain('--inject');
  });

  it('validates every combination with the launcher before running, naming the combination', () => {
    expect(() => validateMatrix(parse(['--vcpus', '1,0', '--out', 'd']))).toThrow('--vcpus: expected a whole number from 1 to 256, got "0" (in the combination vcpus=0)');
    expect(() => validateMatrix(parse(['--strategies', 'kvm-exit,bogus', '--out', 'd']))).toThrow(/expected one of shared-uffd, per-thread-uffd, per-region-uffd, kvm-exit, got "bogus"/);
    expect(() => parse(['--repeat', '0', '--out', 'd'])).toThrow('--repeat: expected a whole number from 1');
    expect(() => validateMatrix(parse(['--vcpus', '1,2', '--memory', '4MiB', '--out', 'd']))).not.toThrow();
  });
});

describe('csv', () => {
  it('quotes fields with commas, quotes, line breaks and edge spaces, and nothing else', () => {
    expect(csvField('plain')).toBe('plain');
    expect(csvField(12.5)).toBe('12.5');
    expect(csvField(Number.NaN)).toBe('');
    expect(csvField('a,b')).toBe('"a,b"');
    expect(csvField('say "hi"')).toBe('"say ""hi"""');
    expect(csvField('two\nlines')).toBe('"two\nlines"');
    expect(csvField(' pad')).toBe('" pad"');
    expect(toCsv([['a', 'b,c'], [1, '"']])).toBe('a,"b,c"\r\n1,""""\r\n');
  });

  it('parses what it writes', () => {
    const rows = [['x', 'a,b', 'say "hi"', 'two\r\nlines', ''], ['1', '2', '3', '4', '5']];
    expect(parseCsv(toCsv(rows))).toEqual(rows);
    expect(parseCsv('a,b\n1,2\n')).toEqual([['a', 'b'], ['1', '2']]);
    expect(parseCsv('a,"b\nc"\n')).toEqual([['a', 'b\nc']]);
  });
});

describe('median and spread', () => {
  it('median of odd and even counts, unsorted input left alone', () => {
    const xs = [5, 1, 3];
    expect(median(xs)).toBe(3);
    expect(xs).toEqual([5, 1, 3]);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([7])).toBe(7);
    expect(median([])).toBeNaN();
  });

  it('spread is median with min and max over the finite values', () => {
    expect(spread([10, 30, 20])).toEqual({ median: 20, min: 10, max: 30, n: 3 });
    expect(spread([2, Number.NaN, 4])).toEqual({ median: 3, min: 2, max: 4, n: 2 });
    expect(spread([])).toBeUndefined();
    expect(formatSpread(spread([398, 412, 430.4]))).toBe('412 (398–430)');
    expect(formatSpread(spread([1.234]))).toBe('1.23');
    expect(formatSpread(undefined)).toBe('–');
  });
});

describe('scales', () => {
  it('linear ticks are round and cover the data from 0', () => {
    const s = linearScale(0, 1234, [100, 0]);
    expect(s.ticks[0]).toBe(0);
    expect(s.ticks[s.ticks.length - 1]).toBeGreaterThanOrEqual(1234);
    expect(s(0)).toBe(100);
    expect(s(s.domain[1])).toBe(0);
  });

  it('log ticks are 1-2-5 values covering the data', () => {
    const s = logScale(37, 4200, [100, 0]);
    expect(s.domain[0]).toBeLessThanOrEqual(37);
    expect(s.domain[1]).toBeGreaterThanOrEqual(4200);
    for (const t of s.ticks) expect(String(t)).toMatch(/^[1235]0*$/);
    expect(s(s.domain[0])).toBe(100);
  });
});

describe('a tiny real sweep through the built CLI', () => {
  it('2 strategies × 2 vCPU counts: every file, a long-format CSV, one plot per figure, nothing external', async () => {
    const out = tempDir();
    const r = await runNode(EXPERIMENT, ['--strategies', 'shared-uffd,kvm-exit', '--vcpus', '1,2', '--memory', '4MiB', '--no-push', '--repeat', '1', ...TEST_WARM_UP, ...TEST_SOURCE_WARM_UP, '--out', out], { timeoutMs: 50_000 });
    expect(r.code, r.stderr).toBe(0);
    // Piped: no progress lines.
    expect(r.stderr).not.toMatch(/run \d+\/\d+/);
    // The comparison table: a header and one line per combination.
    expect(r.stdout).toMatch(/strategy\s+vcpus\s+runs ok\s+p50 µs\s+p99 µs\s+pages\/s\s+blocktime ms/);
    expect(r.stdout.match(/^(shared-uffd|kvm-exit)\s+[12]\s+1\/1\s/gm)).toHaveLength(4);

    const names = ['shared-uffd', 'kvm-exit'].flatMap((s) => ['1', '2'].map((v) => `strategy=${s}_vcpus=${v}_r1`));
    const files = readdirSync(join(out, 'runs')).sort();
    expect(files).toEqual(names.flatMap((n) => [`${n}.hgrm`, `${n}.json`]).sort());
    for (const name of names) {
      const report = JSON.parse(readFileSync(join(out, 'runs', `${name}.json`), 'utf8')) as Report;
      expect(report.verified).toBe(true);
      expect(`strategy=${report.strategy}_vcpus=${report.vcpus}_r1`).toBe(name);
      expect(readFileSync(join(out, 'runs', `${name}.hgrm`), 'utf8')).toMatch(/Value\s+Percentile\s+TotalCount/);
    }

    const rows = parseCsv(readFileSync(join(out, 'summary.csv'), 'utf8'));
    expect(rows[0]).toEqual(['strategy', 'vcpus', 'repeat', 'metric', 'value']);
    const body = rows.slice(1);
    const metricsPerRun = METRICS.length + 1;
    expect(body).toHaveLength(4 * metricsPerRun);
    for (const row of body) {
      expect(row).toHaveLength(5);
      expect(Number.isFinite(Number(row[4])), row.join(',')).toBe(true);
    }
    const required = ['latency_p50_us', 'latency_p90_us', 'latency_p99_us', 'latency_p999_us', 'latency_max_us', 'latency_mean_us', 'demand_paging_rate', 'blocktime_total_ms', 'vcpu_blocktime_mean_ms', 'faults', 'requests', 'duplicate_requests_suppressed', 'eexist', 'wakes', 'elapsed_ms', 'push_throughput_mibs', 'verified', EXIT_CODE_METRIC];
    for (const s of ['shared-uffd', 'kvm-exit']) {
      for (const v of ['1', '2']) {
        const run = body.filter((row) => row[0] === s && row[1] === v && row[2] === '1');
        expect(run.map((row) => row[3]).sort()).toEqual([...METRICS.map((m) => m.name), EXIT_CODE_METRIC].sort());
        for (const m of required) expect(run.some((row) => row[3] === m)).toBe(true);
        expect(run.find((row) => row[3] === 'verified')![4]).toBe('1');
        expect(run.find((row) => row[3] === 'exit_code')![4]).toBe('0');
        expect(Number(run.find((row) => row[3] === 'faults')![4])).toBeGreaterThan(0);
      }
    }

    const html = readFileSync(join(out, 'report.html'), 'utf8');
    const figures = html.match(/<figure[\s>][^]*?<\/figure>/g) ?? [];
    expect(figures).toHaveLength(3);
    for (const f of figures) {
      expect(f.match(/<svg/g)).toHaveLength(1);
      expect(f).toMatch(/<figcaption>[^]+<\/figcaption>/);
      expect(f).toContain('shared-uffd');
      expect(f).toContain('kvm-exit');
    }
    expect(html.match(/<svg/g)).toHaveLength(3);
    expect(html).not.toMatch(/https?:\/\//);
    expect(html).not.toMatch(/<script|<link|@import|url\(/i);
  }, 60_000);

  it('a failed run is recorded and the sweep goes on; the exit code says so', async () => {
    const out = tempDir();
    // Without the owed WAKE, per-thread-uffd leaves a vCPU blocked on a shared page; kvm-exit owes none.
    const r = await runNode(
      EXPERIMENT,
      ['--strategies', 'per-thread-uffd,kvm-exit', '--workload', 'shared-hot', '--vcpus', '4', '--memory', '4MiB', '--no-push', '--unsafe-skip-owed-wake', '--watchdog-ms', '500', ...TEST_WARM_UP, ...TEST_SOURCE_WARM_UP, '--out', out],
      { timeoutMs: 50_000 },
    );
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('experiment: 1 of 2 runs failed');
    expect(r.stderr).toContain('strategy=per-thread-uffd_r1');
    expect(existsSync(join(out, 'runs', 'strategy=kvm-exit_r1.json'))).toBe(true);
    const rows = parseCsv(readFileSync(join(out, 'summary.csv'), 'utf8')).slice(1);
    const failed = rows.filter((row) => row[0] === 'per-thread-uffd');
    expect(failed.find((row) => row[2] === 'verified')?.[3]).toBe('0');
    expect(failed.find((row) => row[2] === 'exit_code')?.[3]).not.toBe('0');
    expect(rows.filter((row) => row[0] === 'kvm-exit').find((row) => row[2] === 'verified')?.[3]).toBe('1');
    const html = readFileSync(join(out, 'report.html'), 'utf8');
    expect(html).toContain('1 of 2 runs failed');
    expect(html).toMatch(/<div class="failure"><h3>strategy=per-thread-uffd_r1<\/h3>[^]*watchdog/);
  }, 60_000);

  it('bad values exit 2 before anything runs', async () => {
    const out = tempDir();
    const bad = await runNode(EXPERIMENT, ['--vcpus', '1,0', '--out', out]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain('--vcpus: expected a whole number from 1 to 256, got "0"');
    expect(existsSync(join(out, 'runs'))).toBe(false);
    const repeat = await runNode(EXPERIMENT, ['--repeat', '0', '--out', out]);
    expect(repeat.code).toBe(2);
    expect(repeat.stderr).toContain('--repeat: expected a whole number from 1');
    const noOut = await runNode(EXPERIMENT, ['--vcpus', '1']);
    expect(noOut.code).toBe(2);
    expect(noOut.stderr).toContain('--out');
  });
});
