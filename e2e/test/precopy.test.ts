/**
 * The phases before postcopy (issue 10), end to end with two real processes:
 * precopy that converges and one that does not (and converges when
 * auto-converge throttles the guest), hybrid with a hot dirty set whose
 * discarded pages fault in again, migrate-start-postcopy on the control
 * endpoint, a connection lost before the switchover (cancelled) and after
 * it (recovered), every strategy in hybrid, the kernel's userfaultfd, and
 * the faults the content check must catch (a lost dirty bit, a skipped
 * discard).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterEach, describe, expect, it } from 'vitest';
import { STRATEGIES, type Report } from '@postcopy/shared';
import { exitCode, listeningUrl } from '../src/launcher.js';
import { DEST, SOURCE, TEST_SOURCE_WARM_UP, expectVerified, failedChecks, migrate, runNode } from './run.js';


/** A small guest on a slowed link: precopy rounds take long enough for the guest to dirty pages during each. */
const SLOW = ['--memory', '4MiB', '--vcpus', '1', '--link-bandwidth', '20mbit'];

describe('precopy', () => {
  it('at a low dirty rate converges within the downtime limit, stops and copies; the destination runs with all of its memory, verified', { timeout: 60_000 }, async () => {
    const result = await migrate(['--memory', '16MiB', '--vcpus', '2', '--mode', 'precopy', '--dirty-rate', '500']);
    const report = expectVerified(result);
    expect(report.mode).toBe('precopy');
    expect(report.switchover.reason).toBe('converged');
    expect(report.precopy.rounds).toBeGreaterThanOrEqual(1);
    expect(report.precopy.dirtySyncCount).toBe(report.precopy.rounds + 1);
    expect(report.precopy.perRound[0]).toMatchObject({ round: 1, pagesSent: report.counters.totalPages });
    expect(report.precopy.pagesSent).toBeGreaterThanOrEqual(report.counters.totalPages);
    // The guest really wrote on the source, and what it wrote arrived.
    expect(report.precopy.dirtyPagesRate).toBeGreaterThan(0);
    // Nothing to fault for: every page came before the guest ran here.
    expect(report.counters).toMatchObject({ faults: 0, requests: 0, pagesDemand: 0, pagesPushed: 0, pagesPrecopy: report.counters.totalPages, pagesInstalled: report.counters.totalPages });
    // No emulated link: every precopy page (rounds and stop-and-copy) came on the push channel.
    expect(report.counters.pagesPrecopyOnPushChannel).toBe(report.counters.pagesPrecopy + report.counters.precopyRewrites);
    expect(report.counters.pagesPrecopyOnPushChannel).toBe(report.precopy.pagesSent);
    expect(report.downtimeMs).toBeGreaterThan(0);
    expect(report.expectedDowntimeMs).toBeLessThanOrEqual(report.downtimeLimitMs);
    expect(result.stdout).toMatch(/^precopy: \d+ rounds? .*switchover: converged; downtime/m);
  });

  it('at a dirty rate above what the link carries does not converge: after --max-precopy-rounds both hosts fail clearly', { timeout: 60_000 }, async () => {
    const result = await migrate([...SLOW, '--mode', 'precopy', '--dirty-rate', '1000', '--dirty-set', '1MiB', '--max-precopy-rounds', '3']);
    expect(result.code).toBe(1);
    expect(result.report).toBeUndefined();
    const said = /precopy did not converge in 3 rounds: the guest dirties \d+ pages\/s \([\d.]+ MiB\/s\) against a bandwidth of [\d.]+ MiB\/s, so the expected downtime is \d+ ms over the 300 ms limit; expected a dirty rate below the bandwidth: try --auto-converge/;
    expect(result.stderr).toMatch(new RegExp(`source: migration failed: ${said.source}`));
    expect(result.stderr).toMatch(new RegExp(`dest: the source reported: ${said.source}`));
  });

  it('the same guest converges with --auto-converge: the vCPUs are throttled in steps', { timeout: 60_000 }, async () => {
    const result = await migrate([...SLOW, '--mode', 'precopy', '--dirty-rate', '800', '--dirty-set', '1MiB', '--max-precopy-rounds', '3', '--auto-converge']);
    const report = expectVerified(result);
    expect(report.switchover.reason).toBe('auto-converge');
    expect(report.precopy.throttlePercent).toBeGreaterThanOrEqual(20);
    expect(report.precopy.rounds).toBeGreaterThan(3);
  });

  it('a connection lost during precopy cancels the migration: the guest stays on the source, nothing is verified', { timeout: 60_000 }, async () => {
    const result = await migrate(['--memory', '16MiB', '--vcpus', '2', '--mode', 'precopy', '--link-bandwidth', '50mbit', '--inject', 'drop@1000']);
    expect(result.code).toBe(1);
    expect(result.report).toBeUndefined();
    expect(result.stdout).not.toContain('verified: true');
    expect(result.stderr).toMatch(/dest: the connection to the source was lost during precopy \(main channel: injected drop@1000 at \d+ pages installed\): the migration is cancelled, and the guest stays on the source/);
    expect(result.stderr).toMatch(/source: migration cancelled: the destination's main channel closed during precopy .*: the migration is cancelled and the guest stays on the source/);
  });

  it('the testing-only --unsafe-lose-dirty-bits makes the content check fail and name the pages; the same run without it passes', { timeout: 60_000 }, async () => {
    // The guest writes each page about once a second while a round takes most of a second (a 200 Mbit/s link):
    // a bit lost is a page written after it was sent and never sent again.
    const args = ['--memory', '16MiB', '--vcpus', '2', '--mode', 'precopy', '--dirty-rate', '2000', '--link-bandwidth', '200mbit'];
    const lossy = await migrate([...args, '--unsafe-lose-dirty-bits', '3']);
    expect(lossy.code).not.toBe(0);
    const digest = lossy.report!.checks.find((c) => c.name === 'digest')!;
    expect(digest.ok).toBe(false);
    expect(digest.detail).toMatch(/\d+ page\(s\) differ from the source's memory as its vCPUs stopped, first (\d+ \(last sent by (precopy round \d+|stop-and-copy)\)(, )?)+/);
    expect(lossy.stderr).toMatch(/check digest failed/);
    expectVerified(await migrate(args));
  });
});

describe('precopy on the push channel (no emulated link) and on the main channel (--no-push-channel)', () => {
  for (const mode of ['precopy', 'hybrid'] as const) {
    it(`${mode}: every precopy page on the push channel, verified; with --no-push-channel all of them on the main channel, verified`, { timeout: 60_000 }, async () => {
      // A hot set written as fast as the guest can: pages re-sent (precopy) or discarded (hybrid) while records are in flight.
      const args = ['--memory', '16MiB', '--vcpus', '2', '--mode', mode, '--dirty-rate', mode === 'hybrid' ? '0' : '2000', '--dirty-set', '1MiB'];
      const onPush = expectVerified(await migrate(args));
      const c = onPush.counters;
      expect(c.pagesPrecopy).toBeGreaterThanOrEqual(c.totalPages - (mode === 'hybrid' ? onPush.discard.pages : 0));
      expect(c.pagesPrecopyOnPushChannel).toBe(c.pagesPrecopy + c.precopyRewrites);
      expect(c.pagesPrecopyOnPushChannel).toBe(onPush.precopy.pagesSent);
      if (mode === 'hybrid') {
        expect(onPush.discard.pages).toBeGreaterThan(0);
        // Postcopy's push after the switchover: on the push channel once the destination runs (some may go on main before).
        expect(c.pagesPushedOnPushChannel).toBeLessThanOrEqual(c.pagesPushed);
      }
      const onMain = expectVerified(await migrate([...args, '--no-push-channel']));
      expect(onMain.counters.pagesPrecopyOnPushChannel).toBe(0);
      expect(onMain.counters.pagesPrecopy + onMain.counters.precopyRewrites).toBe(onMain.precopy.pagesSent);
      expect(onMain.counters.pagesPushedOnPushChannel).toBe(0);
    });
  }

  it('an emulated link keeps precopy on the main channel', { timeout: 60_000 }, async () => {
    const report = expectVerified(await migrate(['--memory', '8MiB', '--vcpus', '1', '--mode', 'precopy', '--link-bandwidth', '400mbit']));
    expect(report.counters.pagesPrecopyOnPushChannel).toBe(0);
    expect(report.counters.pagesPrecopy).toBe(report.counters.totalPages);
  });

  it('a connection lost during precopy with the push channel in use cancels the migration cleanly', { timeout: 60_000 }, async () => {
    const result = await migrate(['--memory', '16MiB', '--vcpus', '2', '--mode', 'precopy', '--inject', 'drop@1000']);
    expect(result.code).toBe(1);
    expect(result.report).toBeUndefined();
    expect(result.stdout).not.toContain('verified: true');
    expect(result.stderr).toMatch(/dest: the connection to the source was lost during precopy \((main|push) channel: .*\): the migration is cancelled, and the guest stays on the source/);
    expect(result.stderr).toMatch(/source: migration cancelled: the destination's (main|push) channel closed during precopy.*: the migration is cancelled and the guest stays on the source/);
  });

  it('--unsafe-lose-dirty-bits with precopy on the push channel makes the content check fail and name the pages', { timeout: 60_000 }, async () => {
    const lossy = await migrate(['--memory', '64MiB', '--vcpus', '2', '--mode', 'precopy', '--dirty-rate', '5000', '--unsafe-lose-dirty-bits', '2']);
    expect(lossy.code).not.toBe(0);
    expect(lossy.report!.counters.pagesPrecopyOnPushChannel).toBeGreaterThan(0);
    const digest = lossy.report!.checks.find((c) => c.name === 'digest')!;
    expect(digest.ok).toBe(false);
    expect(digest.detail).toMatch(/\d+ page\(s\) differ from the source's memory as its vCPUs stopped, first (\d+ \(last sent by (precopy round \d+|stop-and-copy)\)(, )?)+/);
  });
});

describe('hybrid (precopy, then postcopy)', () => {
  it('a hot dirty set sends a non-empty discard set, and those very pages fault in again (counted); verified', { timeout: 60_000 }, async () => {
    // A 200 Mbit/s link makes round 1 last most of a second, however busy the machine: the hot set is written again after it is sent.
    const result = await migrate(['--memory', '16MiB', '--vcpus', '2', '--mode', 'hybrid', '--dirty-rate', '0', '--dirty-set', '1MiB', '--no-push', '--workload', 'sequential', '--link-bandwidth', '200mbit']);
    const report = expectVerified(result);
    expect(report.mode).toBe('hybrid');
    expect(report.switchover.reason).toBe('rounds');
    expect(report.discard.pages).toBeGreaterThan(0);
    expect(report.discard.pages).toBeLessThanOrEqual(256);
    expect(report.discard.ranges).toBeGreaterThanOrEqual(1);
    expect(report.counters.pagesDiscarded).toBe(report.discard.pages);
    // The sequential workload touches every page, so every discarded page faulted in again.
    expect(report.counters.discardedDemanded).toBe(report.discard.pages);
    expect(report.counters.pagesDemand).toBeGreaterThanOrEqual(report.discard.pages);
    // Exactly once after the switchover: each request answered once, each page sent once.
    expect(report.counters.replies).toBe(report.counters.requests);
    expect(report.checks.find((c) => c.name === 'no-page-sent-twice')!.ok).toBe(true);
  });

  it('a skipped discard (testing only: --unsafe-skip-discard) fails the content check', { timeout: 60_000 }, async () => {
    const result = await migrate(['--memory', '16MiB', '--vcpus', '2', '--mode', 'hybrid', '--dirty-rate', '0', '--dirty-set', '256KiB', '--unsafe-skip-discard', '--link-bandwidth', '200mbit']);
    expect(result.code).not.toBe(0);
    const digest = result.report!.checks.find((c) => c.name === 'digest')!;
    expect(digest.ok).toBe(false);
    expect(digest.detail).toMatch(/page\(s\) differ from the source's memory as its vCPUs stopped/);
  });

  it('a drop after the switchover pauses and recovers, verified', { timeout: 60_000 }, async () => {
    // Half the guest is hot: about 2048 pages are discarded, and postcopy brings them again; the drop comes after 500 of those.
    const result = await migrate(['--memory', '16MiB', '--vcpus', '2', '--mode', 'hybrid', '--dirty-rate', '0', '--dirty-set', '8MiB', '--link-bandwidth', '400mbit', '--max-postcopy-bandwidth', '50mbit', '--inject', 'drop-postcopy@500']);
    const report = expectVerified(result);
    expect(report.recovery).toMatchObject({ pauses: 1, resumes: 1, dropsInjected: 1 });
    expect(report.discard.pages).toBeGreaterThan(1000);
  });

  it.each(STRATEGIES.map((s) => [s]))('%s runs hybrid verified', { timeout: 60_000 }, async (strategy) => {
    const report = expectVerified(await migrate(['--memory', '8MiB', '--vcpus', '2', '--mode', 'hybrid', '--strategy', strategy, '--dirty-set', '1MiB', '--dirty-rate', '5000', '--workload', 'random', '--link-bandwidth', '200mbit']));
    expect(report.strategy).toBe(strategy);
    expect(report.discard.pages).toBeGreaterThan(0);
  });

  it.each([['shared-uffd'], ['per-region-uffd'], ['kvm-exit']])('on the kernel\'s userfaultfd (%s): discard is MADV_DONTNEED, and the discarded pages fault again', { timeout: 60_000 }, async (strategy) => {
    const report = expectVerified(
      await migrate(['--memory', '8MiB', '--vcpus', '2', '--mode', 'hybrid', '--memory-backend', 'uffd', '--strategy', strategy, '--dirty-rate', '0', '--dirty-set', '512KiB', '--no-push', '--link-bandwidth', '200mbit']),
    );
    expect(report.memoryBackend).toBe('uffd');
    expect(report.discard.pages).toBeGreaterThan(0);
    expect(report.counters.discardedDemanded).toBe(report.discard.pages);
  });
});

// ---- hosts started by hand: the control endpoint

const children: ChildProcess[] = [];
const dirs: string[] = [];
afterEach(() => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

interface Host {
  child: ChildProcess;
  stderr: () => string;
  exit: Promise<number>;
  line: (pattern: RegExp) => Promise<RegExpExecArray>;
}

function startHost(script: string, args: string[]): Host {
  const child = spawn(process.execPath, [script, ...args], { env: { ...process.env, POSTCOPY_TOKEN: 'precopy-test' }, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let stderr = '';
  const waiters: { pattern: RegExp; resolve: (m: RegExpExecArray) => void }[] = [];
  createInterface({ input: child.stderr! }).on('line', (line) => {
    stderr += line + '\n';
    for (const w of [...waiters]) {
      const m = w.pattern.exec(line);
      if (m) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(m);
      }
    }
  });
  child.stdout!.resume();
  return {
    child,
    stderr: () => stderr,
    exit: exitCode(child),
    line: (pattern) =>
      new Promise((resolve, reject) => {
        const found = stderr.split('\n').map((l) => pattern.exec(l)).find((m) => m);
        if (found) resolve(found);
        else waiters.push({ pattern, resolve });
        setTimeout(() => reject(new Error(`no line matching ${pattern} within 20 s; stderr: ${stderr}`)), 20_000).unref();
      }),
  };
}

async function status(url: string): Promise<Record<string, unknown>> {
  return (await (await fetch(url)).json()) as Record<string, unknown>;
}

describe('the source\'s control endpoint', () => {
  it('POST /migrate-start-postcopy switches a running hybrid precopy; GET /status on both hosts shows the phase and the device state; 409 outside it', { timeout: 60_000 }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'postcopy-precopy-'));
    dirs.push(dir);
    // Precopy would go on for a long time: a slow link and many rounds before the switch.
    const source = startHost(SOURCE, [
      ...TEST_SOURCE_WARM_UP,
      '--host', '127.0.0.1', '--port', '0', '--memory', '8MiB', '--mode', 'hybrid', '--postcopy-after-rounds', '1000', '--link-bandwidth', '20mbit', '--control-port', '0',
      '--device', 'nic0:tracking=device,state=1MiB,pre-copy',
    ]);
    const url = await listeningUrl(source.child, source.exit, 'the source', 20_000, source.stderr);
    const control = (await source.line(/^control (http:\/\/\S+)$/))[1]!;
    expect(await status(`${control}/status`)).toMatchObject({ status: 'setup', mode: 'hybrid' });
    const json = join(dir, 'report.json');
    const dest = startHost(DEST, ['--source', url, '--memory', '8MiB', '--vcpus', '2', '--status-port', '0', '--json', json]);
    const destStatus = (await dest.line(/^status (http:\/\/\S+)$/))[1]!;
    // Precopy runs: both hosts say active, with the round and what remains.
    let s: Record<string, unknown> = {};
    for (let i = 0; i < 400 && (s.status !== 'active' || (s.round as number) < 1); i++) {
      s = await status(`${control}/status`);
      await new Promise((r) => setTimeout(r, 10));
    }
    expect(s).toMatchObject({ status: 'active', mode: 'hybrid' });
    expect(s.round).toBeGreaterThanOrEqual(1);
    expect(typeof s['pages-remaining']).toBe('number');
    expect(typeof s['dirty-pages-rate']).toBe('number');
    let d: Record<string, unknown> = {};
    for (let i = 0; i < 400 && !((d.round as number) >= 1); i++) {
      d = await status(destStatus);
      await new Promise((r) => setTimeout(r, 10));
    }
    expect(d.status).toBe('active');
    expect(d.round).toBeGreaterThanOrEqual(1);
    expect(d['pages-remaining']).toBeGreaterThan(0);
    // The device: PRE_COPY on the source, with what is left of its state; RESUMING in its mdev instance here.
    const [nic] = s.devices as Record<string, unknown>[];
    expect(nic).toMatchObject({ name: 'nic0', 'device-state': 'PRE_COPY' });
    expect(nic!['initial-bytes']).toBeLessThanOrEqual(1024 * 1024);
    expect(typeof nic!['dirty-bytes']).toBe('number');
    expect(nic!['stop-copy-length']).toBeGreaterThanOrEqual(0);
    expect(d.devices).toEqual([{ name: 'nic0', type: expect.any(String), 'mdev-uuid': expect.stringMatching(/^[0-9a-f-]{36}$/), 'device-state': 'RESUMING' }]);
    // The user's switch.
    const res = await fetch(`${control}/migrate-start-postcopy`, { method: 'POST' });
    expect(res.status).toBe(200);
    expect(await dest.exit).toBe(0);
    const report = JSON.parse(readFileSync(json, 'utf8')) as Report;
    expect(failedChecks(report)).toEqual([]);
    expect(report.switchover.reason).toBe('migrate-start-postcopy');
    // After the switch (and in postcopy mode) it is refused with the state it is in.
    const late = await fetch(`${control}/migrate-start-postcopy`, { method: 'POST' }).catch(() => undefined);
    if (late) {
      expect(late.status).toBe(409);
      expect(await late.json()).toMatchObject({ error: expect.stringMatching(/^expected a hybrid migration in precopy \(active\), got a hybrid migration in state (postcopy-active|completed)/) });
    }
    expect(await source.exit).toBe(0);
  });

  it('in postcopy mode migrate-start-postcopy answers 409 with the state', { timeout: 30_000 }, async () => {
    const source = startHost(SOURCE, ['--host', '127.0.0.1', '--port', '0', ...TEST_SOURCE_WARM_UP, '--memory', '4MiB', '--control-port', '0']);
    await listeningUrl(source.child, source.exit, 'the source', 20_000, source.stderr);
    const control = (await source.line(/^control (http:\/\/\S+)$/))[1]!;
    const res = await fetch(`${control}/migrate-start-postcopy`, { method: 'POST' });
    expect(res.status).toBe(409);
    expect(await res.json()).toEqual({ status: 'setup', mode: 'postcopy', error: 'expected a hybrid migration in precopy (active), got a postcopy migration in state setup' });
    expect((await fetch(`${control}/nothing`)).status).toBe(404);
  });
});

describe('precopy options: bad values exit 2 and say what is accepted', () => {
  it.each([
    [['--mode', 'lazy'], /--mode.*(postcopy, precopy, hybrid|Allowed choices are postcopy, precopy, hybrid)/],
    [['--mode', 'precopy', '--postcopy-after-rounds', '2'], /--postcopy-after-rounds: expected it with --mode hybrid .*got --mode precopy/],
    [['--mode', 'precopy', '--source-vcpus', '0'], /--source-vcpus: expected a whole number from 1 to 256, got "0"/],
    [['--mode', 'hybrid', '--downtime-limit', '-5'], /--downtime-limit: expected a whole number from 1 to 3600000, got "-5"/],
    [['--mode', 'hybrid', '--dirty-rate', 'fast'], /--dirty-rate: expected a whole number from 0 to 100000000, got "fast"/],
    [['--mode', 'hybrid', '--max-precopy-rounds', '0'], /--max-precopy-rounds: expected a whole number from 1 to 100000, got "0"/],
    [['--mode', 'hybrid', '--dirty-set', '1GiB', '--memory', '4MiB'], /--dirty-set: expected a size from one page \(4KiB\) to the guest's 4MiB, got 1GiB/],
    [['--mode', 'hybrid', '--avail-switchover-bandwidth', 'lots'], /--avail-switchover-bandwidth: expected a rate such as 1gbit/],
    [['--auto-converge'], /--auto-converge: expected it with --mode precopy or hybrid/],
    [['--mode', 'hybrid', '--inject', 'kill-source@10'], /--inject: expected kill-source@PAGES with --mode postcopy only/],
  ])('npm start %j', async (args, message) => {
    const r = await runNode(fileURLToLauncher(), args, { timeoutMs: 20_000 });
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(message);
  });
});

function fileURLToLauncher(): string {
  return new URL('../dist/cli.js', import.meta.url).pathname;
}
