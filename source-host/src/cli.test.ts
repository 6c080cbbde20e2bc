/**
 * The source command as a process (run from source with tsx): what it prints
 * around recovery, and how it ends when the destination does not resume.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { ChannelRole, PROTOCOL_VERSION, bitmapBytes, decode, encode, makeLayout, type Message } from '@postcopy/shared';

const CLI = fileURLToPath(new URL('./cli.ts', import.meta.url));
const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const LAYOUT = makeLayout(256 * 1024, 4096);

interface SourceProcess {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  exited: Promise<number | null>;
}

/**
 * Like vitest's aliases, the process imports @postcopy/shared from its
 * sources (a tsconfig `paths` entry tsx follows), so it needs no build.
 */
let tsconfigDir = '';
let tsconfig = '';
beforeAll(() => {
  tsconfigDir = mkdtempSync(join(tmpdir(), 'postcopy-source-cli-'));
  tsconfig = join(tsconfigDir, 'tsconfig.json');
  writeFileSync(tsconfig, JSON.stringify({ compilerOptions: { baseUrl: ROOT, paths: { '@postcopy/shared': ['shared/src/index.ts'] } } }));
});
afterAll(() => rmSync(tsconfigDir, { recursive: true, force: true }));

const children: ChildProcess[] = [];
const sockets: WebSocket[] = [];
afterEach(() => {
  for (const ws of sockets.splice(0)) ws.terminate();
  for (const child of children.splice(0)) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
});

function startSource(args: string[]): SourceProcess {
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, '--memory', '256KiB', '--token', 'secret', '--warm-up-requests', '16', ...args], {
    cwd: ROOT,
    env: { ...process.env, TSX_TSCONFIG_PATH: tsconfig },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, stdout: () => out, stderr: () => err, exited };
}

async function until(predicate: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function listeningUrl(source: SourceProcess): Promise<string> {
  await until(() => /\n/.test(source.stdout()), 20_000, `the listening line (stderr: ${source.stderr()})`);
  const first = source.stdout().split('\n')[0]!;
  expect(first).toMatch(/^listening ws:\/\/127\.0\.0\.1:\d+$/);
  return first.slice('listening '.length);
}

/** A main channel (with the migration's secret to resume it): hello, then resolves with the messages array once welcomed. */
async function mainChannel(url: string, secret = ''): Promise<{ ws: WebSocket; messages: Message[]; secret: string }> {
  const ws = new WebSocket(url, { perMessageDeflate: false });
  sockets.push(ws);
  const messages: Message[] = [];
  ws.on('message', (data: Buffer) => messages.push(decode(data, { layout: LAYOUT })));
  ws.on('error', () => {});
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve());
    ws.once('error', reject);
  });
  ws.send(encode({ type: 'hello', protocolVersion: PROTOCOL_VERSION, token: 'secret', role: ChannelRole.Main, guestBytes: LAYOUT.guestBytes, pageSize: LAYOUT.pageSize, channel: 'main', secret }));
  await until(() => messages.length > 0, 5000, 'the welcome');
  const welcome = messages[0]!;
  expect(welcome.type).toBe('welcome');
  return { ws, messages, secret: welcome.type === 'welcome' && welcome.secret !== '' ? welcome.secret : secret };
}

describe('source command: recovery', () => {
  it('with --resume says it waits, and exits 1 with a clear reason when nobody resumes', async () => {
    const secretFile = join(tsconfigDir, 'resume-secret');
    writeFileSync(secretFile, 'ab'.repeat(32) + '\n');
    const source = startSource(['--resume', '--secret-file', secretFile, '--resume-timeout-ms', '300']);
    await listeningUrl(source);
    expect(await source.exited).toBe(1);
    expect(source.stdout().split('\n').filter(Boolean)).toHaveLength(1);
    expect(source.stderr()).toBe(
      'source: restarted with --resume: waiting for the destination to resume the migration\n' +
        'source: destination lost: this source was restarted with --resume and the destination did not resume the migration within 300 ms\n',
    );
  }, 30_000);

  it('prints paused and resumed, and finishes normally after the resume', async () => {
    const secretFile = join(tsconfigDir, 'secret');
    const source = startSource(['--resume-timeout-ms', '5000', '--secret-file', secretFile]);
    const url = await listeningUrl(source);
    const main = await mainChannel(url);
    // The secret the welcome gave is kept in the file, owner-only, for a source restarted with --resume.
    expect(readFileSync(secretFile, 'utf8')).toBe(main.secret + '\n');
    expect(statSync(secretFile).mode & 0o777).toBe(0o600);
    main.ws.send(encode({ type: 'start', push: true, preempt: true }));
    await until(() => main.messages.some((m) => m.type === 'pushed'), 5000, 'a pushed page');
    main.ws.terminate();
    await until(() => source.stderr().includes('paused'), 5000, 'the paused line');
    expect(source.stderr()).toBe(
      "source: connection to the destination lost during postcopy (the destination's main channel closed before the migration finished): paused, waiting up to 5000 ms for it to resume\n",
    );

    // Nothing received: every page pushed so far was lost on the way.
    const main2 = await mainChannel(url, main.secret);
    main2.ws.send(encode({ type: 'resume', push: true, preempt: true, receivedmap: new Uint8Array(bitmapBytes(LAYOUT.totalPages)), requestedmap: new Uint8Array(bitmapBytes(LAYOUT.totalPages)) }));
    await until(() => main2.messages.some((m) => m.type === 'complete'), 5000, 'complete after the resume');
    const resumed = main2.messages[1]!;
    expect(resumed.type).toBe('resumed');
    const lost = resumed.type === 'resumed' ? resumed.pagesMarkedUnsent : -1;
    expect(lost).toBeGreaterThan(0);
    await until(() => source.stderr().includes('resumed'), 5000, 'the resumed line');
    expect(source.stderr().split('\n')[1]).toBe(`source: resumed (${lost} pages lost on the way marked unsent)`);

    main2.ws.send(encode({ type: 'finish', receivedmap: new Uint8Array(bitmapBytes(LAYOUT.totalPages)).fill(0xff) }));
    await until(() => main2.messages.some((m) => m.type === 'summary'), 5000, 'the summary');
    // The source stays until the destination is done with it (it might still ask for page hashes).
    await new Promise((r) => setTimeout(r, 300));
    expect(source.child.exitCode).toBeNull();
    main2.ws.close();
    expect(await source.exited).toBe(0);
    const summary = main2.messages.find((m) => m.type === 'summary');
    expect(summary).toMatchObject({ pagesSent: LAYOUT.totalPages, pagesSentTwice: 0, sentNotReceived: 0, receivedNotSent: 0 });
  }, 30_000);

  it('--resume without --secret-file, or with a file that holds no secret, is a usage error (exit 2) before anything listens', async () => {
    const missing = startSource(['--resume']);
    expect(await missing.exited).toBe(2);
    expect(missing.stdout()).toBe('');
    expect(missing.stderr()).toMatch(/^source: --resume: expected --secret-file with it/);
    const bad = join(tsconfigDir, 'not-a-secret');
    writeFileSync(bad, 'hello\n');
    const wrong = startSource(['--resume', '--secret-file', bad]);
    expect(await wrong.exited).toBe(2);
    expect(wrong.stderr()).toMatch(/^source: --secret-file: expected a migration secret \(64 hex digits\)/);
    const absent = startSource(['--resume', '--secret-file', join(tsconfigDir, 'nowhere', 'secret')]);
    expect(await absent.exited).toBe(2);
    expect(absent.stderr()).toMatch(/^source: --secret-file: expected the secret file the source that died wrote, got .*ENOENT/);
  }, 30_000);
});
