import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

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
}

export interface LaunchResult {
  /** The run's exit code: the destination's, else the source's. */
  code: number;
  destCode: number;
  sourceCode: number;
  url: string;
  /** With `destStdio: 'pipe'`: the end of both hosts' stderr (at most 4,000 characters). */
  stderrTail: string;
}

const TAIL_CHARS = 4000;

function exitCode(child: ChildProcess): Promise<number> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) resolve(child.exitCode);
    else child.once('exit', (code, signal) => resolve(code ?? (signal ? 128 + 1 : 1)));
  });
}

/**
 * A two-process local migration: starts the source host, waits for its
 * `listening ws://...` line, starts the destination host against it, and waits
 * for both. A fresh random token goes to both through the environment, never
 * the command line.
 */
export async function launch(options: LaunchOptions): Promise<LaunchResult> {
  const env = { ...process.env, POSTCOPY_TOKEN: randomBytes(18).toString('base64url') };
  const source = spawn(process.execPath, [SOURCE_CLI, '--host', '127.0.0.1', '--port', '0', ...options.sourceArgs], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const piped = options.destStdio === 'pipe';
  let tail = '';
  const keep = (chunk: Buffer): void => {
    tail = (tail + chunk.toString('utf8')).slice(-2 * TAIL_CHARS);
  };
  source.stderr!.on('data', (chunk: Buffer) => (piped ? keep(chunk) : process.stderr.write(chunk)));
  const sourceExit = exitCode(source);
  let dest: ChildProcess | undefined;
  try {
    const url = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`the source did not print its URL within ${options.sourceStartTimeoutMs ?? 120_000} ms`)),
        options.sourceStartTimeoutMs ?? 120_000,
      );
      const lines = createInterface({ input: source.stdout! });
      lines.on('line', (line) => {
        const m = /^listening (ws:\/\/\S+)$/.exec(line);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]!);
        }
      });
      void sourceExit.then((code) => {
        clearTimeout(timer);
        reject(new Error(`the source exited (code ${code}) before listening`));
      });
    });
    dest = spawn(process.execPath, [DEST_CLI, '--source', url, ...options.destArgs], {
      env,
      stdio: piped ? ['ignore', 'pipe', 'pipe'] : ['ignore', 'inherit', 'inherit'],
    });
    if (piped) {
      dest.stderr!.on('data', keep);
      // The report table: drained so the pipe never fills.
      dest.stdout!.resume();
    }
    const destCode = await exitCode(dest);
    // The source ends by itself after the destination's finish; if the
    // destination failed before that, stop the source.
    const sourceEnded = await Promise.race([sourceExit, new Promise<undefined>((r) => setTimeout(() => r(undefined), destCode === 0 ? 5000 : 500))]);
    if (sourceEnded === undefined) source.kill('SIGTERM');
    const sourceCode = await sourceExit;
    const code = destCode !== 0 ? destCode : sourceCode;
    let stderrTail = tail.replace(/\s+$/, '');
    if (stderrTail.length > TAIL_CHARS) {
      const cut = stderrTail.indexOf('\n', stderrTail.length - TAIL_CHARS);
      stderrTail = cut >= 0 ? stderrTail.slice(cut + 1) : stderrTail.slice(-TAIL_CHARS);
    }
    return { code, destCode, sourceCode, url, stderrTail };
  } finally {
    if (source.exitCode === null) source.kill('SIGKILL');
    if (dest && dest.exitCode === null) dest.kill('SIGKILL');
  }
}
