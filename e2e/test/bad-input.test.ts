import { createServer } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocketServer } from 'ws';
import { MessageType, PROTOCOL_VERSION } from '@postcopy/shared';
import { pack } from 'msgpackr';
import { DEST, LAUNCHER, SOURCE, TEST_SOURCE_WARM_UP, runNode } from './run.js';
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

/** Starts a real source process on an ephemeral port; resolves with its URL. */
function startSource(args: string[], token = 'secret'): Promise<{ url: string; child: ChildProcess }> {
  const child = spawn(process.execPath, [SOURCE, '--port', '0', ...TEST_SOURCE_WARM_UP, ...args], { env: { ...process.env, POSTCOPY_TOKEN: token }, stdio: ['ignore', 'pipe', 'pipe'] });
  cleanups.push(() => void child.kill('SIGKILL'));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('source did not listen')), 20_000);
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const m = /^listening (ws:\/\/\S+)$/.exec(line);
      if (m) {
        clearTimeout(timer);
        resolve({ url: m[1]!, child });
      }
    });
  });
}

/** A port that was free a moment ago and has nothing listening now. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

describe('bad options exit 2 and say what is accepted', () => {
  it('unknown strategy', async () => {
    const r = await runNode(LAUNCHER, ['--strategy', 'bogus']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/shared-uffd, per-thread-uffd, per-region-uffd, kvm-exit/);
  });
  it('unknown workload', async () => {
    const r = await runNode(LAUNCHER, ['--workload', 'zigzag']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/sequential, random, shared-hot/);
  });
  it('bad size', async () => {
    const r = await runNode(LAUNCHER, ['--memory', '12XB']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('--memory: expected a size such as 4096, 4KiB, 64MiB or 1GiB');
    expect(r.stderr).toContain('"12XB"');
  });
  it('bad page size', async () => {
    const r = await runNode(LAUNCHER, ['--page-size', '8KiB']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('--page-size: expected one of 4KiB, 2MiB, got 8KiB');
  });
  it('bad vCPU count', async () => {
    const r = await runNode(LAUNCHER, ['--vcpus', '0']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('--vcpus: expected a whole number from 1 to 256, got "0"');
  });
  it('--help lists every option with its default', async () => {
    const r = await runNode(LAUNCHER, ['--help']);
    expect(r.code).toBe(0);
    for (const option of ['--strategy', '--vcpus', '--memory', '--page-size', '--memslot-size', '--workload', '--accesses', '--write-fraction', '--seed', '--zero-fraction', '--no-push', '--readers', '--io-threads', '--json']) {
      expect(r.stdout).toContain(option);
    }
    expect(r.stdout).toMatch(/--memory <size>[^]*?\(default:\s+"64MiB"\)/);
  });
});

describe('the destination fails clearly, never hangs', () => {
  it('source not reachable', async () => {
    const port = await closedPort();
    const r = await runNode(DEST, ['--source', `ws://127.0.0.1:${port}`, '--token', 't'], { timeoutMs: 20_000 });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`cannot reach the source at ws://127.0.0.1:${port}`);
  });

  it('layout mismatch', async () => {
    const { url } = await startSource(['--memory', '16MiB']);
    const r = await runNode(DEST, ['--source', url, '--memory', '8MiB'], { env: { POSTCOPY_TOKEN: 'secret' }, timeoutMs: 20_000 });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('expected guest layout 16MiB in 4KiB pages, got 8MiB in 4KiB pages');
  });

  it('wrong token', async () => {
    const { url } = await startSource(['--memory', '4MiB']);
    const r = await runNode(DEST, ['--source', url, '--memory', '4MiB'], { env: { POSTCOPY_TOKEN: 'wrong' }, timeoutMs: 20_000 });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('the source refused the handshake: expected a valid access token');
  });

  it('another protocol version', async () => {
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    cleanups.push(() => new Promise<void>((r) => wss.close(() => r())));
    await new Promise<void>((r) => wss.once('listening', () => r()));
    wss.on('connection', (ws) => {
      ws.once('message', () => ws.send(pack([MessageType.Welcome, 99, 4 * 1024 * 1024, 4096, 1024, 'a'.repeat(64), 1, 0, 0, 0, 'b'.repeat(64), 0])));
    });
    const port = (wss.address() as { port: number }).port;
    const r = await runNode(DEST, ['--source', `ws://127.0.0.1:${port}`, '--memory', '4MiB', '--token', 't'], { timeoutMs: 20_000 });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`expected protocol version ${PROTOCOL_VERSION}, the source speaks 99`);
  });

  it('a source that accepts and then says nothing', async () => {
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    cleanups.push(() => new Promise<void>((r) => { for (const c of wss.clients) c.terminate(); wss.close(() => r()); }));
    await new Promise<void>((r) => wss.once('listening', () => r()));
    const port = (wss.address() as { port: number }).port;
    const r = await runNode(DEST, ['--source', `ws://127.0.0.1:${port}`, '--memory', '4MiB', '--token', 't', '--connect-timeout-ms', '1000'], { timeoutMs: 30_000 });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('no answer from the source');
  });
});
