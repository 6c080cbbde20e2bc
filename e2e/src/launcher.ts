import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { constants as osConstants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { makeRunCertificates } from './certs.js';

/** Built entry points of the two hosts. */
export const SOURCE_CLI = fileURLToPath(new URL('./cli.js', import.meta.resolve('@postcopy/source-host')));
export const DEST_CLI = fileURLToPath(new URL('./cli.js', import.meta.resolve('@postcopy/dest-host')));

export interface LaunchOptions {
  /** Arguments for the source host (image options). */
  sourceArgs: string[];
  /** Arguments for the destination host (run options; --source is added). */
  destArgs: string[];
  /** How long the source may take to build its image and listen. */
  sourceStartTimeoutMs?: number;
  /**
   * Where the hosts' output goes: `inherit` (default) shows the destination's
   * report and both hosts' errors here; `pipe` keeps them, and the result
   * carries the end of their stderr.
   */
  destStdio?: 'inherit' | 'pipe';
  /**
   * Fault injection (`--inject kill-source@PAGES`): once the destination has
   * installed this many pages, SIGKILL the source and start it again with
   * `--resume` on the same port. One kill per entry.
   */
  killSourceAt?: number[];
  /**
   * Run over TLS with throwaway certificates (a CA, the source's, the
   * destination's) made for this run in a temporary folder and removed
   * afterwards: the source listens on wss:// and verifies the destination's
   * certificate (--tls-verify-peer), the destination verifies the source's.
   */
  tls?: boolean;
  /** Address both hosts bind (default 127.0.0.1; `::1` for IPv6). */
  host?: string;
}

export interface LaunchResult {
  /** The run's exit code: the destination's, else the (last) source's. */
  code: number;
  destCode: number;
  sourceCode: number;
  url: string;
  /** With `destStdio: 'pipe'`: the end of both hosts' stderr (at most 4,000 characters). */
  stderrTail: string;
  /** Source processes killed by `killSourceAt` (each restarted with --resume). */
  sourceKills: number;
}

const TAIL_CHARS = 4000;

/** A child process's exit code (128 + the signal's number when a signal ended it). */
export function exitCode(child: ChildProcess): Promise<number> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) resolve(child.exitCode);
    else if (child.signalCode !== null) resolve(128 + (osConstants.signals[child.signalCode] ?? 1));
    else child.once('exit', (code, signal) => resolve(code ?? (signal ? 128 + (osConstants.signals[signal] ?? 1) : 1)));
  });
}

/**
 * The URL a host prints as its own `listening ws://HOST:PORT` line on stdout.
 * Rejects if the host exits first (`detail` adds what it said) or takes
 * longer than `timeoutMs`.
 */
export function listeningUrl(child: ChildProcess, exit: Promise<number>, what: string, timeoutMs: number, detail: () => string = () => ''): Promise<string> {
  return new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what} did not print its URL within ${timeoutMs} ms`)), timeoutMs);
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const m = /^listening (wss?:\/\/\S+)$/.exec(line);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
    void exit.then((code) => {
      clearTimeout(timer);
      const said = detail();
      reject(new Error(`${what} exited (code ${code}) before listening${said ? `: ${said}` : ''}`));
    });
  });
}

interface SourceProcess {
  child: ChildProcess;
  exit: Promise<number>;
  url: Promise<string>;
}

/** Starts a source host; `url` resolves with the URL of its `listening ws://...` (or wss://) line. */
function startSource(args: string[], env: NodeJS.ProcessEnv, timeoutMs: number, onStderr: (chunk: Buffer) => void): SourceProcess {
  const child = spawn(process.execPath, [SOURCE_CLI, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stderr!.on('data', onStderr);
  const exit = exitCode(child);
  const url = listeningUrl(child, exit, 'the source', timeoutMs);
  url.catch(() => {});
  return { child, exit, url };
}

/** Pages the destination has installed, from its GET /status (undefined if it does not answer). */
async function pagesReceived(statusUrl: string): Promise<number | undefined> {
  try {
    const res = await fetch(statusUrl);
    const body = (await res.json()) as { 'pages-received'?: unknown };
    return typeof body['pages-received'] === 'number' ? body['pages-received'] : undefined;
  } catch {
    return undefined;
  }
}

/**
 * A two-process local migration: starts the source host, waits for its
 * `listening ws://...` line, starts the destination host against it, and waits
 * for both. A fresh random token goes to both through the environment, never
 * the command line.
 */
export async function launch(options: LaunchOptions): Promise<LaunchResult> {
  const env = { ...process.env, POSTCOPY_TOKEN: randomBytes(18).toString('base64url') };
  // The run's own folder: the migration's secret (for a source restarted with --resume) and any throwaway certificates.
  const runDir = mkdtempSync(join(tmpdir(), 'postcopy-run-'));
  try {
    return await launchIn(runDir, env, options);
  } finally {
    rmSync(runDir, { recursive: true, force: true });
  }
}

async function launchIn(runDir: string, env: NodeJS.ProcessEnv, options: LaunchOptions): Promise<LaunchResult> {
  const host = options.host ?? '127.0.0.1';
  const sourceTlsArgs: string[] = [];
  const destTlsArgs: string[] = [];
  if (options.tls) {
    const certs = await makeRunCertificates(runDir, [...new Set([host, '127.0.0.1', '::1', 'localhost'])]);
    sourceTlsArgs.push('--tls-cert', certs.source.cert, '--tls-key', certs.source.key, '--tls-ca', certs.ca, '--tls-verify-peer');
    destTlsArgs.push('--tls-ca', certs.ca, '--tls-cert', certs.dest.cert, '--tls-key', certs.dest.key);
  }
  const hostArgs = ['--host', host, '--secret-file', join(runDir, 'migration-secret'), ...sourceTlsArgs];
  const startTimeoutMs = options.sourceStartTimeoutMs ?? 120_000;
  const piped = options.destStdio === 'pipe';
  const kills = [...(options.killSourceAt ?? [])].sort((a, b) => a - b);
  let tail = '';
  const keep = (chunk: Buffer): void => {
    tail = (tail + chunk.toString('utf8')).slice(-2 * TAIL_CHARS);
  };
  const sourceStderr = (chunk: Buffer): void => (piped ? keep(chunk) : void process.stderr.write(chunk));
  /** A line of the launcher's own, where the hosts' stderr goes. */
  const say = (line: string): void => sourceStderr(Buffer.from(line + '\n'));
  let source = startSource([...hostArgs, '--port', '0', ...options.sourceArgs], env, startTimeoutMs, sourceStderr);
  const sources: ChildProcess[] = [source.child];
  let dest: ChildProcess | undefined;
  let sourceKills = 0;
  let stopKiller = false;
  try {
    const url = await source.url;
    // The source's own `listening` line is read here, not shown: say where it listens (IPv6 in brackets).
    say(`postcopy: source listening ${url}`);
    // To kill the source at a page count, the launcher reads the destination's GET /status.
    const destArgs = kills.length > 0 && !options.destArgs.includes('--status-port') ? [...options.destArgs, '--status-port', '0'] : options.destArgs;
    const watchStderr = piped || kills.length > 0;
    dest = spawn(process.execPath, [DEST_CLI, '--source', url, '--host', host, ...destTlsArgs, ...destArgs], {
      env,
      stdio: watchStderr ? ['ignore', piped ? 'pipe' : 'inherit', 'pipe'] : ['ignore', 'inherit', 'inherit'],
    });
    if (piped) dest.stdout!.resume(); // The report table: drained so the pipe never fills.
    let statusUrl: string | undefined;
    if (watchStderr) {
      createInterface({ input: dest.stderr! }).on('line', (line) => {
        const m = /^status (http:\/\/\S+)$/.exec(line);
        if (m) statusUrl = m[1];
        if (piped) keep(Buffer.from(line + '\n'));
        else process.stderr.write(line + '\n');
      });
    }
    const destExit = exitCode(dest);
    void destExit.then(() => (stopKiller = true));
    const killer = (async () => {
      const port = new URL(url).port;
      for (const at of kills) {
        for (;;) {
          if (stopKiller) return;
          const received = statusUrl === undefined ? undefined : await pagesReceived(statusUrl);
          if (received !== undefined && received >= at) break;
          await new Promise((resolve) => setTimeout(resolve, 5));
        }
        if (stopKiller || source.child.exitCode !== null) return;
        source.child.kill('SIGKILL');
        await source.exit;
        sourceKills++;
        say(`postcopy: --inject kill-source@${at}: killed the source (SIGKILL); restarting it with --resume on port ${port}`);
        source = startSource([...hostArgs, '--port', port, ...options.sourceArgs, '--resume'], env, startTimeoutMs, sourceStderr);
        sources.push(source.child);
        await source.url;
      }
    })();
    const destCode = await destExit;
    await killer.then(
      () => {
        if (sourceKills < kills.length) say(`postcopy: --inject: ${kills.length - sourceKills} kill-source fault(s) did not go off: the migration ended first`);
      },
      (err: Error) => say(`postcopy: could not restart the source: ${err.message}`),
    );
    // The source ends by itself after the destination's finish; if the
    // destination failed before that, stop the source.
    const sourceEnded = await Promise.race([source.exit, new Promise<undefined>((r) => setTimeout(() => r(undefined), destCode === 0 ? 5000 : 500))]);
    if (sourceEnded === undefined) source.child.kill('SIGTERM');
    const sourceCode = await source.exit;
    const code = destCode !== 0 ? destCode : sourceCode;
    let stderrTail = tail.replace(/\s+$/, '');
    if (stderrTail.length > TAIL_CHARS) {
      const cut = stderrTail.indexOf('\n', stderrTail.length - TAIL_CHARS);
      stderrTail = cut >= 0 ? stderrTail.slice(cut + 1) : stderrTail.slice(-TAIL_CHARS);
    }
    return { code, destCode, sourceCode, url, stderrTail, sourceKills };
  } finally {
    stopKiller = true;
    for (const child of sources) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    if (dest && dest.exitCode === null) dest.kill('SIGKILL');
  }
}
