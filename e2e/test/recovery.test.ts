/**
 * Postcopy recovery end to end (QEMU's postcopy-paused / postcopy-recover):
 * the destination cuts its connections (`--inject drop@PAGES`), the launcher
 * kills and restarts the source (`--inject kill-source@PAGES`), or the
 * destination dies; each run ends verified with nothing lost, or with the
 * expected clear failure.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterEach, describe, expect, it } from 'vitest';
import type { Report } from '@postcopy/shared';
import { exitCode, listeningUrl } from '../src/launcher.js';
import { DEST, SOURCE, TEST_SOURCE_WARM_UP, TEST_WARM_UP, failedChecks, migrate, runNode } from './run.js';

/** A recovered run: verified, every pause resumed, exactly-once intact. */
function expectRecovered(result: Awaited<ReturnType<typeof migrate>>, pauses: number): Report {
  expect(result.code, result.stderr + result.stdout).toBe(0);
  const report = result.report!;
  expect(failedChecks(report)).toEqual([]);
  expect(report.verified).toBe(true);
  expect(result.stdout).toContain('verified: true');
  expect(report.recovery.pauses).toBe(pauses);
  expect(report.recovery.resumes).toBe(pauses);
  expect(report.checks.map((c) => c.name)).toContain('recovered');
  expect(report.digest.dest).toBe(report.digest.source);
  expect(report.counters.replies).toBe(report.counters.requests);
  expect(report.counters.pagesInstalled).toBe(report.counters.pagesSentBySource);
  expect(report.checks.find((c) => c.name === 'no-page-sent-twice')!.ok).toBe(true);
  expect(result.stdout).toMatch(new RegExp(`recovery: ${pauses} pauses?, ${pauses} resumes?`));
  return report;
}

const SMALL = ['--memory', '16MiB', '--vcpus', '2'];
/** Slows the push so that a kill lands in the middle of the migration, even on a loaded machine (16 MiB at 50 Mbit/s is about 2.7 s). */
const SLOW_PUSH = ['--max-postcopy-bandwidth', '50mbit'];

describe('recovery: the destination drops every connection (--inject drop@PAGES)', () => {
  it('drop once (shared-uffd, push): pauses, resumes, ends verified', { timeout: 60_000 }, async () => {
    const result = await migrate([...SMALL, '--inject', 'drop@1000']);
    const report = expectRecovered(result, 1);
    expect(report.recovery.dropsInjected).toBe(1);
    expect(report.recovery.sourceRestarts).toBe(0);
    expect(report.counters.pagesInstalled).toBe(4096);
    expect(result.stderr).toMatch(/dest: connection lost \(injected drop@1000 at \d+ pages installed\): postcopy paused/);
    expect(result.stderr).toMatch(/dest: resumed after \d+ ms/);
    expect(result.stderr).toMatch(/source: connection to the destination lost during postcopy \(the destination's main channel closed before the migration finished\): paused/);
  });

  it('drop twice (kvm-exit, push, preempt): two pauses, two resumes', { timeout: 60_000 }, async () => {
    const result = await migrate([...SMALL, '--strategy', 'kvm-exit', '--preempt', '--inject', 'drop@800,drop@2500']);
    const report = expectRecovered(result, 2);
    expect(report.recovery.dropsInjected).toBe(2);
  });

  it('drop twice (per-thread-uffd, no push, random workload): blocked vCPUs get their pages after the resume', { timeout: 60_000 }, async () => {
    const result = await migrate([...SMALL, '--strategy', 'per-thread-uffd', '--workload', 'random', '--no-push', '--inject', 'drop@300,drop@900']);
    const report = expectRecovered(result, 2);
    expect(report.counters.pagesPushed).toBe(0);
    expect(report.digest.scope).toBe('received-pages');
  });

  it('drop with the emulated link (delay and bandwidth) and I/O threads', { timeout: 60_000 }, async () => {
    const result = await migrate([...SMALL, '--link-delay-us', '100', '--link-bandwidth', '1gbit', '--io-threads', '1', '--inject', 'drop@1500']);
    expectRecovered(result, 1);
  });

  it('a drop at the last page still goes off and the run ends verified', { timeout: 60_000 }, async () => {
    const result = await migrate([...SMALL, '--inject', 'drop@4095']);
    const report = expectRecovered(result, 1);
    expect(report.recovery.dropsInjected).toBe(1);
  });
});

describe('recovery: the source process dies and is restarted with --resume (--inject kill-source@PAGES)', () => {
  it('kill-source once: the restarted source completes the migration, verified', { timeout: 60_000 }, async () => {
    const result = await migrate([...SMALL, ...SLOW_PUSH, '--inject', 'kill-source@1000']);
    const report = expectRecovered(result, 1);
    expect(report.recovery.sourceRestarts).toBe(1);
    expect(report.counters.pagesInstalled).toBe(4096);
    expect(result.stderr).toMatch(/postcopy: --inject kill-source@1000: killed the source \(SIGKILL\); restarting it with --resume/);
    expect(result.stderr).toMatch(/source: restarted with --resume: waiting for the destination to resume/);
    expect(result.stderr).toMatch(/dest: resumed after \d+ ms \(source restarted\)/);
  });

  it('kill-source and a drop in one run (kvm-exit, no preempt)', { timeout: 60_000 }, async () => {
    const result = await migrate([...SMALL, ...SLOW_PUSH, '--strategy', 'kvm-exit', '--inject', 'kill-source@700,drop@2000']);
    const report = expectRecovered(result, 2);
    expect(report.recovery.sourceRestarts).toBe(1);
    expect(report.recovery.dropsInjected).toBe(1);
  });
});

// ---- hosts started by hand

const children: ChildProcess[] = [];
const dirs: string[] = [];
afterEach(() => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** A temporary folder of this test's own, removed after it. */
function tmpDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-recovery-'));
  dirs.push(dir);
  return dir;
}

interface Host {
  child: ChildProcess;
  stderr: () => string;
  exit: Promise<number | null>;
}

function startHost(script: string, args: string[], onLine?: (line: string, stream: 'stdout' | 'stderr') => void): Host {
  const child = spawn(process.execPath, [script, ...args], { env: { ...process.env, POSTCOPY_TOKEN: 'recovery-test' }, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let stderr = '';
  createInterface({ input: child.stdout! }).on('line', (line) => onLine?.(line, 'stdout'));
  createInterface({ input: child.stderr! }).on('line', (line) => {
    stderr += line + '\n';
    onLine?.(line, 'stderr');
  });
  const exit = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, stderr: () => stderr, exit };
}

async function startSource(args: string[]): Promise<{ host: Host; url: string }> {
  const host = startHost(SOURCE, ['--host', '127.0.0.1', ...TEST_SOURCE_WARM_UP, ...args]);
  return { host, url: await listeningUrl(host.child, exitCode(host.child), 'the source', 20_000, host.stderr) };
}

/** Starts the destination with a status server; resolves once pages-received reaches `pages`. */
async function startDestUntil(url: string, args: string[], pages: number): Promise<Host & { status: string }> {
  let resolveStatus!: (url: string) => void;
  const statusUrl = new Promise<string>((resolve) => (resolveStatus = resolve));
  const dest = startHost(DEST, ['--source', url, ...TEST_WARM_UP, '--status-port', '0', ...args], (line) => {
    const m = /^status (http:\/\/\S+)$/.exec(line);
    if (m) resolveStatus(m[1]!);
  });
  const status = await statusUrl;
  for (;;) {
    const body = (await (await fetch(status)).json()) as { 'pages-received': number };
    if (body['pages-received'] >= pages) return { ...dest, status };
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

describe('recovery: hosts that die for good', () => {
  it('the destination dies: the source says so and exits non-zero once it has waited --resume-timeout-ms', { timeout: 60_000 }, async () => {
    const { host: source, url } = await startSource(['--memory', '16MiB', ...SLOW_PUSH, '--resume-timeout-ms', '1000']);
    const dest = await startDestUntil(url, ['--memory', '16MiB', '--vcpus', '2'], 500);
    dest.child.kill('SIGKILL');
    const killedAt = performance.now();
    expect(await source.exit).toBe(1);
    const waited = performance.now() - killedAt;
    expect(waited).toBeGreaterThanOrEqual(900);
    expect(source.stderr()).toMatch(/source: connection to the destination lost during postcopy \(.*\): paused, waiting up to 1000 ms/);
    expect(source.stderr()).toMatch(/source: destination lost: .*did not resume within 1000 ms/);
  });

  it('the source restarted without --resume: the destination gives up with a clear message', { timeout: 60_000 }, async () => {
    const { host: source, url } = await startSource(['--memory', '16MiB', ...SLOW_PUSH]);
    const dest = await startDestUntil(url, ['--memory', '16MiB', '--vcpus', '2', '--reconnect-timeout-ms', '3000'], 500);
    source.child.kill('SIGKILL');
    await source.exit;
    // QEMU's name for the state: the destination's GET /status says it is paused.
    let state: unknown;
    for (let i = 0; i < 200 && state !== 'postcopy-paused'; i++) {
      state = ((await (await fetch(dest.status)).json()) as { status: unknown }).status;
      if (state !== 'postcopy-paused') await new Promise((resolve) => setTimeout(resolve, 10));
    }
    expect(state).toBe('postcopy-paused');
    const port = new URL(url).port;
    await startSource(['--memory', '16MiB', '--port', port]);
    expect(await dest.exit).toBe(1);
    expect(dest.stderr()).toMatch(/could not be resumed within 3000 ms/);
    // A fresh source holds no migration: the destination's hello with its migration's secret is refused at once.
    expect(dest.stderr()).toMatch(/the source refused the handshake: expected no migration secret \(this source has no migration to resume; to continue a migration whose source died, start the source with --resume and the dead source's --secret-file\)/);
  });

  it('the source restarted with another image: the destination refuses to resume from it', { timeout: 60_000 }, async () => {
    const secretFile = join(tmpDir(), 'secret');
    const { host: source, url } = await startSource(['--memory', '16MiB', ...SLOW_PUSH, '--seed', '1', '--secret-file', secretFile]);
    const dest = await startDestUntil(url, ['--memory', '16MiB', '--vcpus', '2', '--reconnect-timeout-ms', '3000'], 500);
    source.child.kill('SIGKILL');
    await source.exit;
    await startSource(['--memory', '16MiB', '--seed', '2', '--resume', '--secret-file', secretFile, '--port', new URL(url).port]);
    expect(await dest.exit).toBe(1);
    expect(dest.stderr()).toMatch(/expected the source's image [0-9a-f]{16}…, got [0-9a-f]{16}…/);
  });
});

describe('--inject: faults that cannot go off are reported, not silently skipped', () => {
  it('thresholds the run never reaches (a small hot set, no push): the run ends verified and says so', { timeout: 60_000 }, async () => {
    const result = await migrate(['--memory', '4MiB', '--vcpus', '2', '--no-push', '--workload', 'shared-hot', '--inject', 'kill-source@1000,drop@1000']);
    expect(result.code, result.stderr).toBe(0);
    expect(result.report!.recovery).toMatchObject({ pauses: 0, dropsInjected: 0, sourceRestarts: 0 });
    expect(result.stderr).toMatch(/dest: --inject: 1 drop\(s\) did not go off: only \d+ pages were installed/);
    expect(result.stderr).toMatch(/postcopy: --inject: 1 kill-source fault\(s\) did not go off: the migration ended first/);
  });
});

describe('--inject: bad values exit 2 and say what is accepted', () => {
  it('an unknown fault kind', async () => {
    const r = await runNode(DEST, ['--source', 'ws://127.0.0.1:1', '--token', 't', '--inject', 'explode@3']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--inject: expected drop@PAGES, drop-postcopy@PAGES or kill-source@PAGES \(separated by commas or \+\), got "explode@3"/);
  });

  it('a threshold past the guest', async () => {
    const r = await migrate(['--memory', '4MiB', '--inject', 'drop@1024']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--inject: expected drop@PAGES below the guest's 1024 pages, got drop@1024/);
  });

  it('kill-source given to the destination alone', async () => {
    const r = await runNode(DEST, ['--source', 'ws://127.0.0.1:1', '--token', 't', '--inject', 'kill-source@5']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/kill-source@PAGES is done by the launcher/);
  });
});
