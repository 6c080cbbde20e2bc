/**
 * What the TLS tests share: throwaway certificates made at run time with the
 * machine's `openssl` (e2e/src/certs.ts; no private key is committed), real
 * host processes started from the built CLIs on ephemeral ports, and a probe
 * that shows a source still answers WebSocket peers. Each test file makes its
 * own certificates in a temporary folder and removes it afterwards.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import WebSocket from 'ws';
import { ChannelRole, PROTOCOL_VERSION, decode, encode, type Message } from '@postcopy/shared';
import { makeCa, makeLeaf, type KeyPair } from '../src/certs.js';
import { exitCode, listeningUrl } from '../src/launcher.js';
import { SOURCE, TEST_SOURCE_WARM_UP, within } from './run.js';

export { within };

export const TOKEN = 'tls-test-token';
export const MEMORY = '8MiB';
export const GUEST_BYTES = 8 * 1024 * 1024;

export interface TestCertificates {
  dir: string;
  /** The CA both hosts trust. */
  ca: string;
  /** Another CA, which signed nothing either host accepts. */
  otherCa: string;
  /** The source's certificate, for 127.0.0.1, ::1 and localhost. */
  source: KeyPair;
  /** A source certificate for another name only (source.example). */
  sourceOtherName: KeyPair;
  /** A source certificate that has expired. */
  sourceExpired: KeyPair;
  /** The destination's client certificate. */
  dest: KeyPair;
  /** A client certificate signed by the other CA. */
  destOtherCa: KeyPair;
  /** A client certificate that has expired. */
  destExpired: KeyPair;
}

/** A CA, another CA, and good and bad leaves of each host, in a new temporary folder ({@link removeCertificates} removes it). */
export async function makeTestCertificates(): Promise<TestCertificates> {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-tls-test-'));
  try {
    const ca = await makeCa(dir, 'postcopy-test-ca');
    const otherCa = await makeCa(dir, 'postcopy-other-ca');
    // One after the other: leaves of one CA share its serial file.
    const source = await makeLeaf(dir, ca, 'source', { names: ['127.0.0.1', '::1', 'localhost'], usage: 'server' });
    const sourceOtherName = await makeLeaf(dir, ca, 'source-other-name', { names: ['source.example'], usage: 'server' });
    const sourceExpired = await makeLeaf(dir, ca, 'source-expired', { names: ['127.0.0.1', 'localhost'], usage: 'server', days: 0 });
    const dest = await makeLeaf(dir, ca, 'dest', { names: ['postcopy-destination'], usage: 'client' });
    const destExpired = await makeLeaf(dir, ca, 'dest-expired', { names: ['postcopy-destination'], usage: 'client', days: 0 });
    const destOtherCa = await makeLeaf(dir, otherCa, 'dest-other-ca', { names: ['postcopy-destination'], usage: 'client' });
    return { dir, ca: ca.cert, otherCa: otherCa.cert, source, sourceOtherName, sourceExpired, dest, destOtherCa, destExpired };
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

export function removeCertificates(certs: TestCertificates | undefined): void {
  if (certs) rmSync(certs.dir, { recursive: true, force: true });
}

/** The source's TLS options with this certificate (and, with `verifyPeer`, the CA of client certificates). */
export function sourceTls(certs: TestCertificates, pair: KeyPair = certs.source, verifyPeer = true): string[] {
  return ['--tls-cert', pair.cert, '--tls-key', pair.key, '--tls-ca', certs.ca, ...(verifyPeer ? ['--tls-verify-peer'] : [])];
}

/** The destination's TLS options: the CA it trusts and, unless `null`, its client certificate. */
export function destTls(certs: TestCertificates, ca = certs.ca, client: KeyPair | null = certs.dest): string[] {
  return ['--tls-ca', ca, ...(client ? ['--tls-cert', client.cert, '--tls-key', client.key] : [])];
}


export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Waits until `predicate` holds, polling; fails after `ms`. */
export async function until(predicate: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms: ${what}`);
    await sleep(5);
  }
}

export interface SourceHost {
  url: string;
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  /** The source's `source: rejected ...` lines so far. */
  rejections: () => string[];
  exit: Promise<number>;
  /** SIGKILL if still running, and wait for the exit. */
  stop: () => Promise<void>;
}

/**
 * Starts a real source process (built CLI, ephemeral port, the token in the
 * environment) and resolves once it prints its URL. `register` receives the
 * stop function at once, so the caller's cleanup runs on every path.
 */
export async function startSource(args: string[], register: (stop: () => Promise<void>) => void): Promise<SourceHost> {
  const child = spawn(process.execPath, [SOURCE, '--port', '0', ...TEST_SOURCE_WARM_UP, '--memory', MEMORY, ...args], {
    env: { ...process.env, POSTCOPY_TOKEN: TOKEN },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  createInterface({ input: child.stdout! }).on('line', (line) => (stdout += line + '\n'));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exit = exitCode(child);
  const stop = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await within(exit, 5_000, 'the source to exit after SIGKILL');
  };
  register(stop);
  const url = await listeningUrl(child, exit, 'the source', 20_000, () => stderr);
  return {
    url,
    child,
    stdout: () => stdout,
    stderr: () => stderr,
    rejections: () => stderr.split('\n').filter((l) => l.startsWith('source: rejected ')),
    exit,
    stop,
  };
}

/** The socket options a test client needs to speak TLS to the source as the destination would. */
export function clientTlsOptions(certs: TestCertificates, client: KeyPair | null = certs.dest): { ca: string; cert?: string; key?: string } {
  return {
    ca: readFileSync(certs.ca, 'utf8'),
    ...(client ? { cert: readFileSync(client.cert, 'utf8'), key: readFileSync(client.key, 'utf8') } : {}),
  };
}

/**
 * The source still answers WebSocket peers: a fault hello (no migration yet,
 * so no secret) is refused with the handshake error that says a migration's
 * main channel comes first. Nothing of a migration is touched.
 * `tls` are the socket options (a rejected certificate can be let through
 * with `rejectUnauthorized: false`, to probe a source whose certificate the
 * real destination refuses).
 */
export async function expectAnswersWebSockets(url: string, tls: Record<string, unknown> = {}): Promise<void> {
  const ws = new WebSocket(url, { perMessageDeflate: false, ...tls });
  try {
    ws.on('error', () => {});
    const first = new Promise<Message>((resolve, reject) => {
      ws.once('message', (data: Buffer) => {
        try {
          resolve(decode(data));
        } catch (err) {
          reject(err as Error);
        }
      });
      ws.once('close', (code) => reject(new Error(`the source closed the probe (code ${code}) without a word`)));
    });
    await within(
      new Promise<void>((resolve, reject) => {
        ws.once('open', () => resolve());
        ws.once('error', reject);
      }),
      5_000,
      `a WebSocket to ${url}`,
    );
    ws.send(
      encode({
        type: 'hello',
        protocolVersion: PROTOCOL_VERSION,
        token: TOKEN,
        role: ChannelRole.Fault,
        guestBytes: GUEST_BYTES,
        pageSize: 4096,
        channel: 'probe',
        secret: '',
      }),
    );
    const answer = await within(first, 5_000, 'the source to answer the probe');
    if (answer.type !== 'error' || !/expected a fault channel of a running migration, got probe before any migration started/.test(answer.message)) {
      throw new Error(`expected the source to refuse the probe's fault hello before any migration, got ${JSON.stringify(answer)}`);
    }
  } finally {
    ws.terminate();
  }
}
