/**
 * The native floor, tiny (1-2 vCPUs x 1 MiB): the build and its cache, each
 * mode's output, the content check (and that it fails when the server
 * corrupts a page), timeouts, and that no process outlives a run. Speeds are
 * the bench's business, never asserted here.
 */
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runNode } from '../../e2e/test/run.js';
import { UffdUnavailableError } from '../src/errors.js';
import { NATIVE_CFLAGS, buildKey, buildNative, findCompiler } from '../src/native-build.js';
import {
  NATIVE_FLOOR_MODES,
  NATIVE_FLOOR_SOURCE,
  buildNativeFloor,
  parseNativeFloorLine,
  runNativeFloorBinary,
  summarizeNativeFloor,
  type NativeFloorResult,
} from '../src/native-floor.js';
import { eventually, processesMatching } from './processes.js';

/** The built CLI (run `npm run build` before this file alone). */
const CLI = fileURLToPath(new URL('../dist/native-floor-cli.js', import.meta.url));
const RUN_TIMEOUT_MS = 20_000;

/** Rejects with what `promise` rejected with (fails if it resolved). */
async function rejection(promise: Promise<unknown>): Promise<Error & { code?: string }> {
  try {
    await promise;
  } catch (err) {
    return err as Error & { code?: string };
  }
  throw new Error('expected a rejection, got a result');
}

describe('native-build', () => {
  it('says clearly when there is no C compiler', () => {
    const err = (() => {
      try {
        findCompiler({ PATH: '/nonexistent' });
      } catch (e) {
        return e as Error & { code?: string };
      }
      throw new Error('expected findCompiler to throw');
    })();
    expect(err.code).toBe('ERR_POSTCOPY_NO_COMPILER');
    expect(err.message).toMatch(/expected a C compiler .*got none/);
  });

  it('keys a build by source, compiler and flags', () => {
    const cc = { command: 'cc', args: [], version: 'cc 12' };
    const key = buildKey('int main(void){}', cc, NATIVE_CFLAGS);
    expect(key).toMatch(/^[0-9a-f]{16}$/);
    expect(buildKey('int main(void){}', cc, NATIVE_CFLAGS)).toBe(key);
    expect(buildKey('int main(void){return 0;}', cc, NATIVE_CFLAGS)).not.toBe(key);
    expect(buildKey('int main(void){}', { ...cc, version: 'cc 13' }, NATIVE_CFLAGS)).not.toBe(key);
    expect(buildKey('int main(void){}', cc, ['-O0'])).not.toBe(key);
  });

  it('builds once per key, and a new key removes the old binary', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'postcopy-native-build-'));
    try {
      const src = join(dir, 'tiny.c');
      const out = join(dir, 'out');
      writeFileSync(src, 'int main(void) { return 0; }\n');
      const first = await buildNative(src, { buildDir: out });
      expect(first.cached).toBe(false);
      expect(await buildNative(src, { buildDir: out })).toEqual({ ...first, cached: true });
      writeFileSync(src, 'int main(void) { return 1; }\n');
      const second = await buildNative(src, { buildDir: out });
      expect(second.cached).toBe(false);
      expect(second.key).not.toBe(first.key);
      expect(readdirSync(out)).toEqual([`tiny-${second.key}`]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('reports a failed build with the compiler\'s message', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'postcopy-native-build-'));
    try {
      const src = join(dir, 'broken.c');
      writeFileSync(src, 'int main(void) { return undefined_thing; }\n');
      const err = await rejection(buildNative(src, { buildDir: join(dir, 'out') }));
      expect(err.code).toBe('ERR_POSTCOPY_NATIVE_BUILD');
      expect(err.message).toContain('undefined_thing');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('native floor (tiny)', () => {
  // A build directory of this file's own: its binary's path names only our processes.
  const buildDir = mkdtempSync(join(tmpdir(), 'postcopy-native-floor-test-'));
  let binary = '';
  /** Set when this machine (not Linux) gives no userfaultfd: the run tests are then skipped, saying why. */
  let noUffd: string | undefined;

  beforeAll(async () => {
    const first = await buildNativeFloor({ buildDir });
    expect(first.cached).toBe(false);
    binary = first.path;
    try {
      await runNativeFloorBinary(binary, { mode: 'exit', vcpus: 1, mibPerVcpu: 1, timeoutMs: RUN_TIMEOUT_MS });
    } catch (err) {
      // Linux (and CI, as root) must give one: there, no userfaultfd is a failure, not a skip.
      if (err instanceof UffdUnavailableError && process.platform !== 'linux') noUffd = err.message;
      else throw err;
    }
  }, 150_000);
  afterAll(() => rmSync(buildDir, { recursive: true, force: true }));

  it('reuses the cached binary for the same source', async () => {
    const again = await buildNativeFloor({ buildDir });
    expect(again).toEqual({ path: binary, key: again.key, cached: true });
    expect(existsSync(binary)).toBe(true);
    expect(binary).toContain(again.key);
  });

  for (const mode of NATIVE_FLOOR_MODES) {
    for (const vcpus of [1, 2]) {
      it(`${mode}, ${vcpus} vCPU(s) x 1 MiB: a well-formed, verified result`, async (ctx) => {
        if (noUffd) ctx.skip(noUffd);
        const r: NativeFloorResult = await runNativeFloorBinary(binary, { mode, vcpus, mibPerVcpu: 1, timeoutMs: RUN_TIMEOUT_MS });
        expect(r).toMatchObject({ floor: 'native', mode, vcpus, pageSize: 4096, pagesPerVcpu: 256, pages: 256 * vcpus, verified: true });
        expect(r.elapsedMs).toBeGreaterThan(0);
        expect(r.pagesPerSec).toBeGreaterThan(0);
        expect(Number.isFinite(r.pagesPerSec)).toBe(true);
        expect(r.latencyUs.p50).toBeGreaterThan(0);
        expect(r.latencyUs.p50).toBeLessThanOrEqual(r.latencyUs.p90);
        expect(r.latencyUs.p90).toBeLessThanOrEqual(r.latencyUs.p99);
        expect(r.latencyUs.p99).toBeLessThanOrEqual(r.latencyUs.max);
        expect(Number.isInteger(r.eexist) && Number.isInteger(r.wakes)).toBe(true);
        // Handlers owe a WAKE for each EEXIST; the exit path owes none (nobody waits).
        expect(r.wakes).toBe(mode === 'exit' ? 0 : r.eexist);
        expect(processesMatching(binary)).toEqual([]);
      });
    }
  }

  for (const mode of NATIVE_FLOOR_MODES) {
    it(`${mode}: a page the server corrupts fails the content check`, async (ctx) => {
      if (noUffd) ctx.skip(noUffd);
      const err = await rejection(runNativeFloorBinary(binary, { mode, vcpus: 2, mibPerVcpu: 1, corruptPage: 300, timeoutMs: RUN_TIMEOUT_MS }));
      expect(err.code).toBe('ERR_POSTCOPY_CHECK');
      expect(err.message).toMatch(/got 1 mismatched \(first: page 300, byte 100\)/);
    });
  }

  it('times out by its own timer when the server never answers, and leaves no process', async (ctx) => {
    if (noUffd) ctx.skip(noUffd);
    let pid = 0;
    const err = await rejection(
      runNativeFloorBinary(binary, { mode: 'shared', vcpus: 2, mibPerVcpu: 1, stallServer: true, timeoutMs: 300, onSpawn: (p) => (pid = p) }),
    );
    expect(err.code).toBe('ERR_POSTCOPY_FLOOR_TIMEOUT');
    expect(err.message).toMatch(/expected the native floor \(shared, 2 vCPUs\) to finish within 300 ms, got no result: fault-floor: timed out/);
    expect(pid).toBeGreaterThan(0);
    expect(await eventually(() => processesMatching(binary).length === 0)).toBe(true);
  });

  it('is killed (with its server) when its own timer would come too late', async (ctx) => {
    if (noUffd) ctx.skip(noUffd);
    const started = Date.now();
    const err = await rejection(
      runNativeFloorBinary(binary, { mode: 'exit', vcpus: 1, mibPerVcpu: 1, stallServer: true, timeoutMs: 200, programTimeoutMs: 600_000 }),
    );
    expect(err.code).toBe('ERR_POSTCOPY_FLOOR_TIMEOUT');
    expect(Date.now() - started).toBeLessThan(15_000);
    // The forked server dies with its parent (PR_SET_PDEATHSIG).
    expect(await eventually(() => processesMatching(binary).length === 0)).toBe(true);
  });

  it('is killed when aborted', async (ctx) => {
    if (noUffd) ctx.skip(noUffd);
    const ac = new AbortController();
    const run = runNativeFloorBinary(binary, {
      mode: 'per-region',
      vcpus: 2,
      mibPerVcpu: 1,
      stallServer: true,
      timeoutMs: 600_000,
      signal: ac.signal,
      onSpawn: () => setTimeout(() => ac.abort(), 100),
    });
    const err = await rejection(run);
    expect(err.code).toBe('ERR_POSTCOPY_FLOOR_RUN');
    expect(err.message).toContain('aborted');
    expect(await eventually(() => processesMatching(binary).length === 0)).toBe(true);
  });

  it('rejects bad run options before starting anything', async () => {
    const err = await rejection(runNativeFloorBinary(binary, { mode: 'exit', vcpus: 0 }));
    expect(err.code).toBe('ERR_POSTCOPY_USAGE');
    expect(err.message).toBe('expected vcpus from 1 to 1024, got 0 (number)');
  });
});

describe('parseNativeFloorLine', () => {
  const good = {
    floor: 'native',
    mode: 'shared',
    vcpus: 2,
    pageSize: 4096,
    pagesPerVcpu: 256,
    pages: 512,
    elapsedMs: 10,
    pagesPerSec: 51200,
    latencyUs: { p50: 20, p90: 30, p99: 40, max: 50 },
    eexist: 0,
    wakes: 0,
    verified: true,
  };
  const bad = (patch: Record<string, unknown>): string => JSON.stringify({ ...good, ...patch });

  it('takes a well-formed line', () => {
    expect(parseNativeFloorLine(JSON.stringify(good))).toEqual(good);
  });

  it.each([
    ['not JSON', 'oops', /expected one line of JSON/],
    ['another floor', bad({ floor: 'ws' }), /expected floor "native", got "ws"/],
    ['an unknown mode', bad({ mode: 'per-thread' }), /expected mode shared, per-region, exit, got "per-thread"/],
    ['a missing figure', bad({ pagesPerSec: undefined }), /expected pagesPerSec to be a finite number >= 0/],
    ['a negative figure', bad({ elapsedMs: -1 }), /expected elapsedMs .*got -1 \(number\)/],
    ['a bad latency', bad({ latencyUs: { p50: 1, p90: 2, p99: 'x', max: 4 } }), /expected latencyUs\.p99/],
    ['pages that do not add up', bad({ pages: 513 }), /expected pages = vcpus x pagesPerVcpu = 512, got 513/],
    ['no verdict', bad({ verified: 'yes' }), /expected verified to be a boolean/],
  ])('rejects %s', (_name, line, message) => {
    expect(() => parseNativeFloorLine(line)).toThrow(message);
  });

  it('summarizes repeats by mode and vCPUs', () => {
    const r = (mode: 'shared' | 'exit', pagesPerSec: number): NativeFloorResult => ({ ...good, mode, pagesPerSec, floor: 'native' }) as NativeFloorResult;
    const s = summarizeNativeFloor([r('shared', 10), r('exit', 30), r('shared', 20), r('exit', 50), r('shared', 60)]);
    expect(s.map((x) => [x.mode, x.runs, x.pagesPerSec])).toEqual([
      ['shared', 3, { median: 20, min: 10, max: 60 }],
      ['exit', 2, { median: 40, min: 30, max: 50 }],
    ]);
  });
});

describe('native-floor-cli (tiny)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-native-floor-cli-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('prints a table and writes every run as JSON', async () => {
    const file = join(dir, 'native.json');
    const run = await runNode(CLI, ['--vcpus', '1,2', '--modes', 'shared,exit', '--mib-per-vcpu', '1', '--repeat', '1', '--json', file], { timeoutMs: 150_000 });
    if (process.platform !== 'linux' && run.code === 1 && run.stderr.includes('cannot open a userfaultfd')) return; // no userfaultfd off Linux: the skips above say so
    expect(run.code, `stdout:\n${run.stdout}\nstderr:\n${run.stderr}`).toBe(0);
    expect(run.stdout).toMatch(/^mode\s+vCPUs\s+pages\/s median/m);
    for (const row of [/^shared\s+1\s/m, /^exit\s+1\s/m, /^shared\s+2\s/m, /^exit\s+2\s/m]) expect(run.stdout).toMatch(row);
    const doc = JSON.parse(readFileSync(file, 'utf8')) as { runs: unknown[]; summary: unknown[]; options: unknown };
    expect(doc.runs).toHaveLength(4);
    expect(doc.summary).toHaveLength(4);
    for (const r of doc.runs) expect(parseNativeFloorLine(JSON.stringify(r)).verified).toBe(true);
    expect(doc.options).toEqual({ vcpus: [1, 2], modes: ['shared', 'exit'], mibPerVcpu: 1, repeat: 1 });
  }, 160_000);

  it('rejects a bad value with exit code 2 and a message naming it', async () => {
    const run = await runNode(CLI, ['--vcpus', '1,0'], { timeoutMs: 20_000 });
    expect(run.code).toBe(2);
    expect(run.stderr).toContain('--vcpus: expected a whole number from 1 to 1024, got "0"');
    const modes = await runNode(CLI, ['--modes', 'shared,per-thread'], { timeoutMs: 20_000 });
    expect(modes.code).toBe(2);
    expect(modes.stderr).toContain('--modes: expected one of shared, per-region, exit, got "per-thread"');
  });
});

// The source the bench builds is the one in the repository.
it('builds bench/native/fault-floor.c', () => {
  expect(NATIVE_FLOOR_SOURCE.endsWith(join('bench', 'native', 'fault-floor.c'))).toBe(true);
  expect(existsSync(NATIVE_FLOOR_SOURCE)).toBe(true);
});
