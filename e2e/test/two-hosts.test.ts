/**
 * Two hosts on one machine (issue 8): the source runs in one network
 * namespace and the destination in another, joined by a veth pair, so the
 * migration crosses a real network boundary (addresses that exist only on
 * that veth, a TLS handshake with certificates for the source's address, the
 * source verifying the destination's client certificate) instead of
 * loopback. Then a real link failure mid-postcopy: the veth is taken down,
 * which sends no reset and no FIN, so the hosts can only notice through
 * their keepalive; it comes back within the reconnect timeout, and the
 * migration pauses, resumes and ends verified with nothing lost.
 *
 * Needs root and `ip netns`: without them the tests fail (CI is root), they
 * are never skipped. Namespaces and everything in them are removed after
 * each test, pass or fail, and on the runner's exit (see netns.ts).
 */
import { type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import type { Report } from '@postcopy/shared';
import { makeRunCertificates } from '../src/certs.js';
import { exitCode, listeningUrl } from '../src/launcher.js';
import { makeHostPair, ip, netnsExists, removeHostPair, setLink, spawnNodeIn, type HostPair } from './netns.js';
import { DEST, SOURCE, TEST_SOURCE_WARM_UP, failedChecks, within } from './run.js';

const MEMORY = '16MiB';
const TOTAL_PAGES = (16 * 1024 * 1024) / 4096;

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

const madeNamespaces: string[] = [];
afterAll(async () => {
  // The cleanup itself is part of what is tested: nothing of ours is left.
  for (const ns of madeNamespaces) expect(await netnsExists(ns), `namespace ${ns} left behind`).toBe(false);
});


const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** A fresh namespace pair, removed after the test. */
async function hostPair(): Promise<HostPair> {
  const pair = await within(makeHostPair(), 15_000, 'making the namespaces and the veth pair');
  madeNamespaces.push(pair.sourceNs, pair.destNs);
  cleanups.push(() => removeHostPair(pair));
  return pair;
}

/** A temporary folder, removed after the test. */
function tmpDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-two-hosts-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

interface Host {
  child: ChildProcess;
  exit: Promise<number>;
  stderr: () => string;
  /** Resolves with the first stderr line, printed so far or later, that matches (rejects if the host exits first, or after `timeoutMs`). */
  line(re: RegExp, timeoutMs: number, what: string): Promise<RegExpExecArray>;
}

/** Starts a built host CLI inside `ns`; killed after the test (its namespace's removal kills it too). */
function startHost(ns: string, script: string, args: string[], env: NodeJS.ProcessEnv): Host {
  const child = spawnNodeIn(ns, [script, ...args], env);
  cleanups.push(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const exit = exitCode(child);
  // Drained (the destination's report table goes there): a full pipe would block the host.
  child.stdout!.resume();
  let stderr = '';
  const lines: string[] = [];
  const watchers: { re: RegExp; resolve: (m: RegExpExecArray) => void }[] = [];
  createInterface({ input: child.stderr! }).on('line', (text) => {
    stderr += text + '\n';
    lines.push(text);
    for (const w of [...watchers]) {
      const m = w.re.exec(text);
      if (m) {
        watchers.splice(watchers.indexOf(w), 1);
        w.resolve(m);
      }
    }
  });
  return {
    child,
    exit,
    stderr: () => stderr,
    line: (re, timeoutMs, what) =>
      within(
        new Promise<RegExpExecArray>((resolve, reject) => {
          for (const text of lines) {
            const m = re.exec(text);
            if (m) return resolve(m);
          }
          watchers.push({ re, resolve });
          void exit.then((code) => reject(new Error(`${what}: the host exited (code ${code}) first\n${stderr}`)));
        }),
        timeoutMs,
        what,
      ),
  };
}

/**
 * Polls the destination's GET /status from inside its namespace (its status
 * server binds 127.0.0.1 there, out of this process's reach): one small node
 * process that prints a line per answer, and exits when its stdin (held by
 * this process only) closes.
 */
const POLLER = `
const url = process.env.STATUS_URL;
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
const tick = async () => {
  try {
    const body = await (await fetch(url)).json();
    process.stdout.write(JSON.stringify({ pages: body['pages-received'], status: body.status }) + '\\n');
  } catch (err) {
    process.stdout.write(JSON.stringify({ error: String(err) }) + '\\n');
  }
  setTimeout(tick, 25);
};
tick();
`;

interface Status {
  pages: number;
  status: string;
}

interface StatusWatch {
  latest(): Status | undefined;
  /** Resolves with the first status that satisfies `ok` (rejects after `timeoutMs`, or when the destination exits first). */
  until(ok: (s: Status) => boolean, timeoutMs: number, what: string): Promise<Status>;
}

function watchStatus(ns: string, statusUrl: string, dest: Host): StatusWatch {
  const poller = spawnNodeIn(ns, ['-e', POLLER], { ...process.env, STATUS_URL: statusUrl });
  cleanups.push(() => {
    poller.stdin!.end();
    if (poller.exitCode === null && poller.signalCode === null) poller.kill('SIGKILL');
  });
  poller.stderr!.resume();
  let latest: Status | undefined;
  const waiters: { ok: (s: Status) => boolean; resolve: (s: Status) => void }[] = [];
  createInterface({ input: poller.stdout! }).on('line', (text) => {
    let parsed: Partial<Status>;
    try {
      parsed = JSON.parse(text) as Partial<Status>;
    } catch {
      return;
    }
    if (typeof parsed.pages !== 'number' || typeof parsed.status !== 'string') return;
    const s = { pages: parsed.pages, status: parsed.status };
    latest = s;
    for (const w of [...waiters]) {
      if (w.ok(s)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(s);
      }
    }
  });
  return {
    latest: () => latest,
    until: (ok, timeoutMs, what) =>
      within(
        new Promise<Status>((resolve, reject) => {
          waiters.push({ ok, resolve });
          void dest.exit.then((code) => reject(new Error(`${what}: the destination exited (code ${code}) first\n${dest.stderr()}`)));
        }),
        timeoutMs,
        `${what} (last status: ${JSON.stringify(latest)})`,
      ),
  };
}

/** Bytes received on `dev` in `ns` so far (the kernel's counters of that veth end). */
async function rxBytes(ns: string, dev: string): Promise<number> {
  const [link] = JSON.parse(await ip(['-n', ns, '-j', '-s', 'link', 'show', 'dev', dev])) as [{ stats64: { rx: { bytes: number } } }];
  return link.stats64.rx.bytes;
}

interface Migration {
  net: HostPair;
  source: Host;
  dest: Host;
  url: string;
  json: string;
}

/**
 * Starts the source in its namespace, listening on its veth address over
 * TLS (certificates made now, for that address; --tls-verify-peer with a
 * client certificate for the destination), then the destination in the
 * other namespace against the URL the source printed.
 */
async function startMigration(sourceArgs: string[], destArgs: string[]): Promise<Migration> {
  const net = await hostPair();
  const dir = tmpDir();
  const certs = await within(makeRunCertificates(dir, [net.sourceAddr]), 15_000, 'making the certificates with openssl');
  const env = { ...process.env, POSTCOPY_TOKEN: randomBytes(18).toString('base64url') };
  const source = startHost(
    net.sourceNs,
    SOURCE,
    [
      ...['--host', net.sourceAddr, '--port', '0', ...TEST_SOURCE_WARM_UP, '--memory', MEMORY],
      ...['--tls-cert', certs.source.cert, '--tls-key', certs.source.key, '--tls-ca', certs.ca, '--tls-verify-peer'],
      ...sourceArgs,
    ],
    env,
  );
  const url = await listeningUrl(source.child, source.exit, 'the source', 15_000, source.stderr);
  // The URL it printed is its veth address: only reachable across the veth, from the other namespace.
  expect(url).toMatch(new RegExp(`^wss://${net.sourceAddr.replaceAll('.', '\\.')}:[1-9]\\d*$`));
  const json = join(dir, 'report.json');
  const dest = startHost(
    net.destNs,
    DEST,
    [
      ...['--source', url, '--memory', MEMORY, '--vcpus', '2', '--json', json],
      ...['--tls-ca', certs.ca, '--tls-cert', certs.dest.cert, '--tls-key', certs.dest.key],
      ...destArgs,
    ],
    env,
  );
  return { net, source, dest, url, json };
}

/** Both hosts ended well, and the report says verified over TLS with every check passing. */
async function expectVerified(m: Migration, timeoutMs: number): Promise<Report> {
  const destCode = await within(m.dest.exit, timeoutMs, `the destination to finish\n${m.dest.stderr()}`);
  expect(destCode, `destination:\n${m.dest.stderr()}\nsource:\n${m.source.stderr()}`).toBe(0);
  expect(await within(m.source.exit, 5_000, 'the source to exit after the summary'), m.source.stderr()).toBe(0);
  expect(existsSync(m.json), 'the destination wrote no --json report').toBe(true);
  const report = JSON.parse(readFileSync(m.json, 'utf8')) as Report;
  expect(failedChecks(report)).toEqual([]);
  expect(report.verified).toBe(true);
  expect(report.tls).toBe(true);
  expect(report.digest.dest).toBe(report.digest.source);
  expect(report.counters.pagesInstalled).toBe(TOTAL_PAGES);
  expect(report.counters.pagesInstalled).toBe(report.counters.pagesSentBySource);
  expect(report.counters.replies).toBe(report.counters.requests);
  return report;
}

describe('two hosts on one machine: network namespaces joined by a veth pair', () => {
  it('migrates across the veth over TLS (client certificate verified), verified', { timeout: 25_000 }, async () => {
    const m = await startMigration([], []);
    const report = await expectVerified(m, 20_000);
    expect(report.recovery.pauses).toBe(0);
    // The guest's memory really went over the veth: its far end received at least every non-zero page.
    const contentBytes = (TOTAL_PAGES - report.counters.pagesZero) * 4096;
    expect(await rxBytes(m.net.destNs, m.net.destIf)).toBeGreaterThanOrEqual(contentBytes);
  });

  it('the veth goes down mid-postcopy for 4× --keepalive-ms and comes back: the migration pauses, resumes, ends verified', { timeout: 30_000 }, async () => {
    const KEEPALIVE_MS = 500;
    const DOWN_MS = 2_000;
    const m = await startMigration(
      // The push is slowed (16 MiB at 50 Mbit/s is about 2.7 s) so that the link dies mid-postcopy.
      ['--keepalive-ms', String(KEEPALIVE_MS), '--max-postcopy-bandwidth', '50mbit', '--resume-timeout-ms', '15000'],
      // A small connect timeout: attempts made while the link is down hang (SYNs into a dead link) instead of failing.
      ['--keepalive-ms', String(KEEPALIVE_MS), '--connect-timeout-ms', '1000', '--reconnect-timeout-ms', '15000', '--status-port', '0'],
    );
    const [, statusUrl] = await m.dest.line(/^status (http:\/\/\S+)$/, 15_000, 'the destination to print its status URL');
    const status = watchStatus(m.net.destNs, statusUrl!, m.dest);
    const before = await status.until((s) => s.status === 'postcopy-active' && s.pages >= 600, 15_000, 'the destination to install 600 pages');
    expect(before.pages, 'the migration ended before the link could fail mid-postcopy').toBeLessThan(TOTAL_PAGES);

    // The source's end goes down: the destination's end just loses its carrier. Nothing tells either host.
    await setLink(m.net.sourceNs, m.net.sourceIf, 'down');
    const downAt = performance.now();
    const paused = await status.until((s) => s.status === 'postcopy-paused', 5_000, 'the destination to pause on its keepalive');
    expect(paused.pages).toBeLessThan(TOTAL_PAGES);
    await m.dest.line(/^dest: the source said nothing for \d+ ms on the main channel/, 5_000, "the destination's keepalive to report the silent source");
    await m.source.line(/^source: the destination's main channel was silent for \d+ ms/, 5_000, "the source's keepalive to report the silent destination");
    // While it is down nothing arrives (the status server is on lo, which stays up).
    await sleep(100);
    const early = status.latest()!;
    await sleep(Math.max(0, DOWN_MS - (performance.now() - downAt)));
    const whileDown = status.latest()!;
    expect(whileDown.status).toBe('postcopy-paused');
    expect(whileDown.pages).toBe(early.pages);
    await setLink(m.net.sourceNs, m.net.sourceIf, 'up');

    await m.dest.line(/^dest: resumed after \d+ ms/, 10_000, 'the destination to resume once the link is back');
    const report = await expectVerified(m, 20_000);
    const r = report.recovery;
    expect(r.pauses).toBeGreaterThanOrEqual(1);
    expect(r.resumes).toBe(r.pauses);
    expect(r.keepaliveMs).toBe(KEEPALIVE_MS);
    // The destination noticed the dead link itself (a dead link sends no reset), and so did the source.
    expect(r.keepaliveTimeouts).toBeGreaterThanOrEqual(1);
    expect(r.sourceKeepaliveTimeouts).toBeGreaterThanOrEqual(1);
    expect(r.dropsInjected).toBe(0);
    expect(r.sourceRestarts).toBe(0);
    // Paused for (most of) the outage: it resumed only once the link was back.
    expect(r.pausedMs).toBeGreaterThanOrEqual(DOWN_MS - 2 * KEEPALIVE_MS);
    expect(report.checks.find((c) => c.name === 'recovered')?.ok).toBe(true);
  });
});
