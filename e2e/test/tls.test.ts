/**
 * The migration link over TLS (issue 8), with real host processes and
 * certificates made by the test at run time:
 *
 * - every refusal a user can meet (a source certificate from another CA, for
 *   another name, expired; under --tls-verify-peer no client certificate, one
 *   from another CA, an expired one; ws:// against wss:// and the reverse)
 *   ends the destination with exit 1 and a message saying what was expected
 *   and what came, serves and installs nothing, is logged by the source as
 *   `source: rejected ...`, and leaves the source serving: a good destination
 *   then migrates verified against the same source process;
 * - bad TLS files (a key that is not the certificate's, an unreadable file,
 *   a TLS option for a ws:// source) are usage errors: exit 2 naming the
 *   option and the file, before anything listens or connects;
 * - a full migration over TLS for every strategy, drops and a source restart
 *   under TLS, and an IPv6 run, all verified.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { STRATEGIES, type Report } from '@postcopy/shared';
import { exitCode } from '../src/launcher.js';
import { DEST, SOURCE, TEST_SOURCE_WARM_UP, TEST_WARM_UP, expectVerified, failedChecks, migrate, runNode, type ProcessResult } from './run.js';
import {
  MEMORY,
  TOKEN,
  destTls,
  expectAnswersWebSockets,
  makeTestCertificates,
  removeCertificates,
  sourceTls,
  startSource,
  until,
  within,
  type SourceHost,
  type TestCertificates,
} from './tls-fixtures.js';

let certs: TestCertificates;
beforeAll(async () => {
  certs = await makeTestCertificates();
});
afterAll(() => removeCertificates(certs));

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});
const register = (stop: () => Promise<void>): void => void cleanups.push(stop);

/** A temporary folder of this test's own, removed after it. */
function tmpDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-tls-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

interface DestResult extends ProcessResult {
  report: Report | undefined;
}

/** A real destination process against `url` (8 MiB, 2 vCPUs), with `args` (TLS options among them). */
async function runDest(url: string, args: string[]): Promise<DestResult> {
  const json = join(tmpDir(), 'report.json');
  const result = await runNode(DEST, ['--source', url, ...TEST_WARM_UP, '--memory', MEMORY, '--vcpus', '2', '--json', json, ...args], {
    env: { POSTCOPY_TOKEN: TOKEN },
    timeoutMs: 30_000,
  });
  return { ...result, report: existsSync(json) ? (JSON.parse(readFileSync(json, 'utf8')) as Report) : undefined };
}


/**
 * A destination refused before any migration: exit 1, the message, no
 * report (nothing installed), and exactly one new `source: rejected` line on
 * the source that matches `logged`. The source is still up.
 */
async function expectRefused(source: SourceHost, url: string, args: string[], said: RegExp, logged: RegExp): Promise<void> {
  const before = source.rejections().length;
  const dest = await runDest(url, args);
  expect(dest.code, dest.stderr).toBe(1);
  expect(dest.stderr).toMatch(said);
  expect(dest.stderr).toMatch(/expected/);
  // Refused before a welcome: no run, no report, nothing installed.
  expect(dest.report).toBeUndefined();
  expect(dest.stdout).toBe('');
  expect(dest.stderr).not.toMatch(/^status /m);
  await until(() => source.rejections().length > before, 5_000, `the source to log the refusal (${said})`);
  const added = source.rejections().slice(before);
  expect(added).toHaveLength(1);
  expect(added[0]).toMatch(logged);
  expect(source.child.exitCode, source.stderr()).toBeNull();
}

/** The source served one good migration and ended normally; every page went out exactly once, to it. */
async function expectMigratedOnce(source: SourceHost, report: Report): Promise<void> {
  expect(report.tls).toBe(true);
  expect(report.counters.pagesSentBySource).toBe(report.counters.totalPages);
  expect(report.counters.pagesInstalled).toBe(report.counters.totalPages);
  expect(await within(source.exit, 10_000, 'the source to exit after its migration')).toBe(0);
  expect(source.stderr()).not.toMatch(/destination lost/);
}

const PEER = String.raw`127\.0\.0\.1:\d+`;

/**
 * `openssl s_client` trusting `caFile` refuses the source's certificate
 * (-verify_return_error) with a TLS alert, as a client that is not Node's
 * does; the source logs one line that matches `logged`.
 */
async function opensslRefuses(source: SourceHost, caFile: string, logged: RegExp): Promise<void> {
  const before = source.rejections().length;
  const { port } = new URL(source.url);
  const client = spawn('openssl', ['s_client', '-connect', `127.0.0.1:${port}`, '-CAfile', caFile, '-verify_return_error'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let said = '';
  client.stderr!.on('data', (d: Buffer) => (said += d.toString()));
  cleanups.push(() => void (client.exitCode === null && client.kill('SIGKILL')));
  expect(await within(exitCode(client), 10_000, 'openssl s_client to give up'), said).not.toBe(0);
  await until(() => source.rejections().length > before, 5_000, 'the source to log the refusal of its certificate');
  const added = source.rejections().slice(before);
  expect(added).toHaveLength(1);
  expect(added[0]).toMatch(new RegExp(`^source: rejected TLS peer ${PEER}: ${logged.source}`));
}

describe('TLS refusals: a clear message, nothing served, and the source keeps serving', () => {
  it('under --tls-verify-peer: an untrusted source certificate, no client certificate, one from another CA, an expired one, and ws://; then a good destination migrates', async () => {
    const source = await startSource(sourceTls(certs), register);
    expect(source.url).toMatch(/^wss:\/\/127\.0\.0\.1:\d+$/);

    // The destination does not trust the CA that signed the source's certificate.
    await expectRefused(
      source,
      source.url,
      destTls(certs, certs.otherCa),
      /dest: TLS with the source at wss:\/\/127\.0\.0\.1:\d+ failed: the source's certificate is not signed by a CA this destination trusts \((SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)\): expected one signed by the CA in --tls-ca/,
      new RegExp(`^source: rejected TLS peer ${PEER}: expected the TLS handshake to complete, got the connection closed in the middle of it \\(ECONNRESET\\): a destination that refuses this source's certificate .* does that; its own log says why$`),
    );
    // No client certificate at all.
    await expectRefused(
      source,
      source.url,
      destTls(certs, certs.ca, null),
      /dest: the source at wss:\/\/127\.0\.0\.1:\d+ refused this destination \(HTTP 403 Forbidden\): expected a client certificate signed by the CA in the source's --tls-ca \(--tls-verify-peer\), got none: give the destination --tls-cert and --tls-key/,
      new RegExp(`^source: rejected TLS peer ${PEER}: expected a client certificate signed by the CA in the source's --tls-ca \\(--tls-verify-peer\\), got none`),
    );
    // A client certificate signed by another CA.
    await expectRefused(
      source,
      source.url,
      destTls(certs, certs.ca, certs.destOtherCa),
      /refused this destination \(HTTP 403 Forbidden\): expected a client certificate signed by the CA in the source's --tls-ca \(--tls-verify-peer\), got one issued by "CN=postcopy-other-ca" that it does not accept \(UNABLE_TO_VERIFY_LEAF_SIGNATURE\)/,
      new RegExp(`^source: rejected TLS peer ${PEER}: expected a client certificate signed by the CA in the source's --tls-ca \\(--tls-verify-peer\\), got one issued by "CN=postcopy-other-ca"`),
    );
    // An expired client certificate: the source refuses it.
    await expectRefused(
      source,
      source.url,
      destTls(certs, certs.ca, certs.destExpired),
      /refused this destination \(HTTP 403 Forbidden\): expected a client certificate valid now \(--tls-verify-peer\), got one that expired on \w{3} +\d+ [\d:]+ \d{4} GMT \(CERT_HAS_EXPIRED\)/,
      new RegExp(`^source: rejected TLS peer ${PEER}: expected a client certificate valid now \\(--tls-verify-peer\\), got one that expired on .* \\(CERT_HAS_EXPIRED\\)$`),
    );
    // TLS is not a way in without the token: a destination with good certificates and a wrong token is refused at its hello.
    await expectRefused(
      source,
      source.url,
      [...destTls(certs), '--token', 'not-the-token'],
      /dest: the source refused the handshake: expected a valid access token, got a wrong one/,
      /^source: rejected main: expected a valid access token, got a wrong one$/,
    );
    // Plain ws:// against the TLS source.
    await expectRefused(
      source,
      source.url.replace(/^wss:/, 'ws:'),
      [],
      /dest: the source at ws:\/\/127\.0\.0\.1:\d+ dropped the connection before the WebSocket upgrade \(ECONNRESET\): if it listens on wss:\/\/, expected --source wss:\/\/\.\.\. \(and --tls-ca\)/,
      new RegExp(`^source: rejected TLS peer ${PEER}: expected a TLS handshake, got plain HTTP \\(a ws:// peer: it should use wss://\\)$`),
    );
    expect(source.rejections()).toHaveLength(6);
    // A peer that is not Node (OpenSSL's own client) refuses the certificate with a TLS alert: the source says its certificate was refused.
    await opensslRefuses(source, certs.otherCa, /expected the peer to accept this source's certificate, got its refusal: it does not trust the CA that signed it \(ERR_SSL_TLSV1_ALERT_UNKNOWN_CA\)$/);
    expect(source.rejections()).toHaveLength(7);

    // The same source process, after all that: a good destination migrates, verified over TLS.
    const good = await runDest(source.url, destTls(certs));
    const report = expectVerified(good, source.stderr());
    await expectMigratedOnce(source, report);
    expect(source.rejections()).toHaveLength(7);
  });

  it('a source certificate for another name: refused; a wrong --tls-server-name too; the right one migrates', async () => {
    const source = await startSource(sourceTls(certs, certs.sourceOtherName), register);
    await expectRefused(
      source,
      source.url,
      destTls(certs),
      /dest: TLS with the source at wss:\/\/127\.0\.0\.1:\d+ failed: the source's certificate is not for "127\.0\.0\.1": expected a certificate naming "127\.0\.0\.1" \(the host in --source\), got one for DNS:source\.example; give --tls-server-name with a name it holds/,
      /^source: rejected TLS peer 127\.0\.0\.1:\d+: expected the TLS handshake to complete, got the connection closed/,
    );
    await expectRefused(
      source,
      source.url,
      [...destTls(certs), '--tls-server-name', 'other.example'],
      /the source's certificate is not for "other\.example": expected a certificate naming "other\.example" \(--tls-server-name\), got one for DNS:source\.example/,
      /^source: rejected TLS peer 127\.0\.0\.1:\d+: expected the TLS handshake to complete/,
    );
    const good = await runDest(source.url, [...destTls(certs), '--tls-server-name', 'source.example']);
    await expectMigratedOnce(source, expectVerified(good, source.stderr()));
  });

  it('an expired source certificate: a warning at start, the destination refuses it, and the source still answers', async () => {
    const source = await startSource(sourceTls(certs, certs.sourceExpired), register);
    expect(source.stderr()).toMatch(
      /^source: warning: the certificate in --tls-cert \(.*source-expired\.pem\) expired on \w{3} +\d+ [\d:]+ \d{4} GMT: peers will refuse it$/m,
    );
    await expectRefused(
      source,
      source.url,
      destTls(certs),
      /dest: TLS with the source at wss:\/\/127\.0\.0\.1:\d+ failed: the source's certificate has expired \(CERT_HAS_EXPIRED\): expected a certificate valid now/,
      /^source: rejected TLS peer 127\.0\.0\.1:\d+: expected the TLS handshake to complete/,
    );
    await opensslRefuses(source, certs.ca, /expected the peer to accept this source's certificate, got its refusal: it finds it expired \(ERR_SSL_SSLV3_ALERT_CERTIFICATE_EXPIRED\)$/);
    // No real destination accepts that certificate; a peer told to ignore it still gets a WebSocket answer.
    await expectAnswersWebSockets(source.url, { rejectUnauthorized: false, ...clientFiles(certs) });
    expect(source.child.exitCode).toBeNull();
  });

  it('a wss:// destination against a plain ws:// source: refused, logged; a ws:// destination then migrates', async () => {
    const source = await startSource([], register);
    expect(source.url).toMatch(/^ws:\/\//);
    await expectRefused(
      source,
      source.url.replace(/^ws:/, 'wss:'),
      destTls(certs),
      /dest: TLS with the source at wss:\/\/127\.0\.0\.1:\d+ failed: the source at wss:\/\/127\.0\.0\.1:\d+ does not speak TLS \(EPROTO\): expected a source started with --tls-cert and --tls-key, or use ws:\/\/ for a plain one/,
      new RegExp(`^source: rejected peer ${PEER}: expected plain HTTP \\(this source listens on ws://\\), got a TLS handshake: a wss:// destination`),
    );
    const good = await runDest(source.url, []);
    const report = expectVerified(good, source.stderr());
    expect(report.tls).toBe(false);
    expect(await source.exit).toBe(0);
  });
});

/** The PEM texts of the destination's client certificate, as socket options. */
function clientFiles(c: TestCertificates): { cert: string; key: string } {
  return { cert: readFileSync(c.dest.cert, 'utf8'), key: readFileSync(c.dest.key, 'utf8') };
}

describe('bad TLS files and options: exit 2 naming the option and the file, before anything listens or connects', () => {
  /** A usage error: exit 2, the message, and nothing listened, connected or reported. */
  function expectUsageError(r: ProcessResult, said: RegExp): void {
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(said);
    expect(r.stderr).toMatch(/expected/);
    expect(r.stdout).not.toMatch(/listening|verified/);
  }
  const sourceRun = (args: string[]): Promise<ProcessResult> =>
    runNode(SOURCE, ['--port', '0', ...TEST_SOURCE_WARM_UP, '--memory', MEMORY, ...args], { env: { POSTCOPY_TOKEN: TOKEN }, timeoutMs: 15_000 });
  // Nothing listens on port 1: a destination that got past its options would say "cannot reach", not exit 2.
  const destRun = (source: string, args: string[]): Promise<ProcessResult> =>
    runNode(DEST, ['--source', source, '--memory', MEMORY, ...args], { env: { POSTCOPY_TOKEN: TOKEN }, timeoutMs: 15_000 });

  it('a key that is not the certificate\'s (source and destination)', async () => {
    const [source, dest] = await Promise.all([
      sourceRun(['--tls-cert', certs.source.cert, '--tls-key', certs.dest.key]),
      destRun('wss://127.0.0.1:1', ['--tls-ca', certs.ca, '--tls-cert', certs.dest.cert, '--tls-key', certs.source.key]),
    ]);
    expectUsageError(source, /^source: --tls-key: expected the private key of the certificate in ".*\/source\.pem", got a key \(".*\/dest\.key"\) that does not match it$/m);
    expectUsageError(dest, /^dest: --tls-key: expected the private key of the certificate in ".*\/dest\.pem", got a key \(".*\/source\.key"\) that does not match it$/m);
  });

  it('unreadable files: missing, a directory, and (unless root, who reads anything) no permission', async () => {
    const dir = tmpDir();
    const missing = join(dir, 'missing.pem');
    const folder = join(dir, 'a-folder.pem');
    mkdirSync(folder);
    const runs = await Promise.all([
      sourceRun(['--tls-cert', missing, '--tls-key', certs.source.key]),
      sourceRun(['--tls-cert', certs.source.cert, '--tls-key', certs.source.key, '--tls-ca', folder]),
      destRun('wss://127.0.0.1:1', ['--tls-ca', missing]),
      destRun('wss://127.0.0.1:1', ['--tls-ca', certs.ca, '--tls-cert', certs.dest.cert, '--tls-key', folder]),
    ]);
    expectUsageError(runs[0]!, /^source: --tls-cert: expected a readable PEM file, got ".*missing\.pem" \(ENOENT\)$/m);
    expectUsageError(runs[1]!, /^source: --tls-ca: expected a readable PEM file, got ".*a-folder\.pem" \(EISDIR\)$/m);
    expectUsageError(runs[2]!, /^dest: --tls-ca: expected a readable PEM file, got ".*missing\.pem" \(ENOENT\)$/m);
    expectUsageError(runs[3]!, /^dest: --tls-key: expected a readable PEM file, got ".*a-folder\.pem" \(EISDIR\)$/m);
    if (process.getuid?.() !== 0) {
      const { chmodSync, copyFileSync } = await import('node:fs');
      const locked = join(dir, 'locked.key');
      copyFileSync(certs.source.key, locked);
      chmodSync(locked, 0o000);
      expectUsageError(await sourceRun(['--tls-cert', certs.source.cert, '--tls-key', locked]), /--tls-key: expected a readable PEM file, got ".*locked\.key" \(EACCES\)/);
    }
  });

  it('a file that is not what its option says (a key given as the certificate)', async () => {
    const r = await sourceRun(['--tls-cert', certs.source.key, '--tls-key', certs.source.key]);
    expectUsageError(r, /^source: --tls-cert: expected a PEM certificate in ".*\/source\.key", got none$/m);
  });

  it('a TLS option given to the destination of a ws:// source', async () => {
    const runs = await Promise.all([
      destRun('ws://127.0.0.1:1', ['--tls-ca', certs.ca]),
      destRun('ws://127.0.0.1:1', ['--tls-cert', certs.dest.cert, '--tls-key', certs.dest.key]),
      destRun('ws://127.0.0.1:1', ['--tls-server-name', 'source.example']),
    ]);
    expectUsageError(runs[0]!, /^dest: --tls-ca: expected a wss:\/\/ source with it \(TLS options apply to TLS sources\), got --source ws:\/\/127\.0\.0\.1:1$/m);
    expectUsageError(runs[1]!, /^dest: --tls-cert: expected a wss:\/\/ source with it/m);
    expectUsageError(runs[2]!, /^dest: --tls-server-name: expected a wss:\/\/ source with it/m);
  });
});

/** A launcher run (`npm start -- --tls ...`) that ended verified over TLS. */
function expectVerifiedOverTls(result: Awaited<ReturnType<typeof migrate>>): Report {
  const report = expectVerified(result);
  expect(report.tls).toBe(true);
  expect(result.stdout).toMatch(/push (on|off)(, preempt)?, TLS/);
  expect(result.stderr).toMatch(/^postcopy: source listening wss:\/\/127\.0\.0\.1:\d+$/m);
  return report;
}

/** A recovered run: every pause resumed, exactly-once intact. */
function expectRecovered(result: Awaited<ReturnType<typeof migrate>>, pauses: number): Report {
  const report = expectVerifiedOverTls(result);
  expect(report.recovery.pauses).toBe(pauses);
  expect(report.recovery.resumes).toBe(pauses);
  expect(report.checks.find((c) => c.name === 'recovered')?.ok).toBe(true);
  expect(report.checks.find((c) => c.name === 'no-page-sent-twice')?.ok).toBe(true);
  expect(report.counters.pagesInstalled).toBe(report.counters.totalPages);
  expect(result.stdout).toMatch(new RegExp(`recovery: ${pauses} pauses?, ${pauses} resumes?`));
  // Every channel, the reconnected ones included, went over TLS: nothing was refused on the way.
  expect(result.stderr).not.toMatch(/rejected TLS peer/);
  return report;
}

describe('a full migration over TLS (npm start -- --tls): every strategy, verified', () => {
  for (const strategy of STRATEGIES) {
    it(strategy, async () => {
      const report = expectVerifiedOverTls(await migrate(['--tls', '--strategy', strategy, '--memory', MEMORY, '--vcpus', '2'], 30_000));
      expect(report.strategy).toBe(strategy);
      expect(report.counters.faults).toBeGreaterThan(0);
      expect(report.counters.pagesSentBySource).toBe(report.counters.totalPages);
    });
  }
});

describe('recovery under TLS: the channels reconnect over TLS and nothing is lost', () => {
  const SMALL = ['--memory', '16MiB', '--vcpus', '2'];

  it('a drop (shared-uffd, push)', async () => {
    const result = await migrate(['--tls', ...SMALL, '--inject', 'drop@1000'], 40_000);
    const report = expectRecovered(result, 1);
    expect(report.recovery.dropsInjected).toBe(1);
    expect(result.stderr).toMatch(/dest: resumed after \d+ ms/);
  });

  it('two drops with --preempt (kvm-exit)', async () => {
    const result = await migrate(['--tls', ...SMALL, '--strategy', 'kvm-exit', '--preempt', '--inject', 'drop@800,drop@2500'], 40_000);
    const report = expectRecovered(result, 2);
    expect(report.preempt).toBe(true);
    expect(report.recovery.dropsInjected).toBe(2);
  });

  it('the source killed and restarted with --resume and the same TLS files (kill-source, per-thread-uffd)', async () => {
    // The push is slowed so that the kill lands mid-migration (16 MiB at 50 Mbit/s is about 2.7 s).
    const result = await migrate(['--tls', ...SMALL, '--strategy', 'per-thread-uffd', '--max-postcopy-bandwidth', '50mbit', '--inject', 'kill-source@1000'], 40_000);
    const report = expectRecovered(result, 1);
    expect(report.recovery.sourceRestarts).toBe(1);
    expect(result.stderr).toMatch(/postcopy: --inject kill-source@1000: killed the source \(SIGKILL\); restarting it with --resume/);
    expect(result.stderr).toMatch(/dest: resumed after \d+ ms \(source restarted\)/);
  });
});

describe('IPv6 over TLS', () => {
  it('npm start -- --tls --host ::1: verified, the URL in bracket form', async () => {
    const result = await migrate(['--tls', '--host', '::1', '--memory', MEMORY, '--vcpus', '2'], 30_000);
    const report = expectVerified(result);
    expect(report.tls).toBe(true);
    expect(result.stderr).toMatch(/^postcopy: source listening wss:\/\/\[::1\]:\d+$/m);
  });

  it('hosts started by hand: --host [::1] prints wss://[::1]:PORT, and the destination takes that URL', async () => {
    const source = await startSource(['--host', '[::1]', ...sourceTls(certs)], register);
    expect(source.url).toMatch(/^wss:\/\/\[::1\]:\d+$/);
    expect(source.stdout()).toMatch(/^listening wss:\/\/\[::1\]:\d+$/m);
    const dest = await runDest(source.url, ['--host', '::1', ...destTls(certs)]);
    await expectMigratedOnce(source, expectVerified(dest, source.stderr()));
  });
});
