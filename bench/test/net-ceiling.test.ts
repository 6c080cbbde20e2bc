/**
 * The net ceiling, tiny (16 MiB streams): output, the content check (and that
 * it fails when the sender corrupts a byte), teardown on success, failure and
 * timeout. Speeds are the bench's business, never asserted here.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { runNode } from '../../e2e/test/run.js';
import { NET_IMAGE_BYTES, NET_SENDER_MEMORY, netImage, netSenderSource } from '../src/net-ceiling-layout.js';
import { NET_CEILING_SENDER, NET_RECEIVE_MODES, measureNetCeiling, verifyNetStream } from '../src/net-ceiling.js';
import { alive, eventually } from './processes.js';

/** The built CLI and sender (run `npm run build` before this file alone). */
const CLI = fileURLToPath(new URL('../dist/net-ceiling-cli.js', import.meta.url));

async function rejection(promise: Promise<unknown>): Promise<Error & { code?: string }> {
  try {
    await promise;
  } catch (err) {
    return err as Error & { code?: string };
  }
  throw new Error('expected a rejection, got a result');
}

describe('net ceiling (16 MiB)', () => {
  for (const receive of NET_RECEIVE_MODES) {
    it(`${receive}: a well-formed, verified result, and the sender is gone`, async () => {
      let pid = 0;
      const r = await measureNetCeiling({ mib: 16, receive, timeoutMs: 20_000, onSpawn: (p) => (pid = p) });
      expect(r).toMatchObject({ floor: 'net', receive, sender: 'stream', bytes: 16 * 1024 ** 2, sabBytes: 16 * 1024 ** 2, senderBytes: 16 * 1024 ** 2, verified: true });
      expect(r.elapsedMs).toBeGreaterThan(0);
      expect(r.mibPerSec).toBeGreaterThan(0);
      expect(Number.isFinite(r.mibPerSec)).toBe(true);
      expect(r.reads).toBeGreaterThan(0);
      expect(r.meanReadBytes).toBe(Math.round(r.bytes / r.reads));
      expect(pid).toBeGreaterThan(0);
      expect(await eventually(() => !alive(pid))).toBe(true);
    });
  }

  it('sends from the 16 MiB image alone with sender image: a 48 MiB stream wraps around it, verified', async () => {
    const r = await measureNetCeiling({ mib: 48, sender: 'image', timeoutMs: 30_000 });
    expect(r).toMatchObject({ receive: 'onread', sender: 'image', bytes: 48 * 1024 ** 2, sabBytes: 48 * 1024 ** 2, senderBytes: NET_IMAGE_BYTES, verified: true });
  });

  for (const sender of NET_SENDER_MEMORY) {
    it(`sender ${sender}: fails the content check on a byte the sender corrupts, naming it`, async () => {
      let pid = 0;
      const err = await rejection(measureNetCeiling({ mib: 20, sender, corruptAt: 18_000_001, timeoutMs: 20_000, onSpawn: (p) => (pid = p) }));
      expect(err.code).toBe('ERR_POSTCOPY_CHECK');
      expect(err.message).toMatch(/^check content failed: expected byte 18000001 of the received stream to be \d+, got \d+$/);
      expect(await eventually(() => !alive(pid))).toBe(true);
    });
  }

  it('times out, and tears the sender down', async () => {
    let pid = 0;
    // Far too short for the sender to build its image and listen.
    const err = await rejection(measureNetCeiling({ mib: 64, timeoutMs: 5, onSpawn: (p) => (pid = p) }));
    expect(err.code).toBe('ERR_POSTCOPY_FLOOR_TIMEOUT');
    expect(err.message).toBe('expected the net ceiling (64 MiB, onread, sender stream) to finish within 5 ms, got no result');
    if (pid) expect(await eventually(() => !alive(pid))).toBe(true);
  });

  it('is torn down when aborted', async () => {
    const ac = new AbortController();
    let pid = 0;
    const run = measureNetCeiling({ mib: 64, timeoutMs: 60_000, signal: ac.signal, onSpawn: (p) => ((pid = p), ac.abort()) });
    const err = await rejection(run);
    expect(err.code).toBe('ERR_POSTCOPY_FLOOR_RUN');
    expect(err.message).toContain('aborted');
    expect(await eventually(() => !alive(pid))).toBe(true);
  });

  it('rejects bad options before starting anything', async () => {
    const err = await rejection(measureNetCeiling({ mib: 0 }));
    expect(err.code).toBe('ERR_POSTCOPY_USAGE');
    expect(err.message).toBe('expected mib from 1 to 1048576, got 0 (number)');
    const sender = await rejection(measureNetCeiling({ mib: 1, sender: 'disk' as never }));
    expect(sender.code).toBe('ERR_POSTCOPY_USAGE');
    expect(sender.message).toBe('expected sender stream or image, got "disk" (string)');
  });

  it('the sender refuses a bad --bytes with exit code 2', async () => {
    const run = await runNode(NET_CEILING_SENDER, ['--bytes', 'lots'], { timeoutMs: 20_000 });
    expect(run.code).toBe(2);
    expect(run.stderr).toContain('--bytes: expected a whole number');
    const memory = await runNode(NET_CEILING_SENDER, ['--bytes', '4096', '--memory', 'disk'], { timeoutMs: 20_000 });
    expect(memory.code).toBe(2);
    expect(memory.stderr).toContain('--memory: expected one of stream, image, got "disk" (string)');
  });
});

describe('verifyNetStream', () => {
  const image = netImage();

  it("passes what either sender sends from, copied in whole: the stream sender's memory repeats the image", () => {
    for (const sender of NET_SENDER_MEMORY) {
      const source = netSenderSource(20 * 1024 ** 2, sender);
      expect(source.length).toBe(sender === 'stream' ? 20 * 1024 ** 2 : NET_IMAGE_BYTES);
      const sab = new SharedArrayBuffer(source.length);
      new Uint8Array(sab).set(source);
      expect(() => verifyNetStream(sab, image)).not.toThrow();
    }
  });

  it('takes a buffer that wrapped around whole images, and names the first wrong byte', () => {
    const sab = new SharedArrayBuffer(2 * NET_IMAGE_BYTES);
    const view = new Uint8Array(sab);
    view.set(image, 0);
    view.set(image, NET_IMAGE_BYTES);
    expect(() => verifyNetStream(sab, image)).not.toThrow();
    view[NET_IMAGE_BYTES + 4097]! ^= 1;
    expect(() => verifyNetStream(sab, image)).toThrow(new RegExp(`expected byte ${NET_IMAGE_BYTES + 4097} of the received stream`));
  });

  it('checks a stream shorter than one image', () => {
    const sab = new SharedArrayBuffer(8192);
    new Uint8Array(sab).set(image.subarray(0, 8192));
    expect(() => verifyNetStream(sab, image)).not.toThrow();
    new Uint8Array(sab)[0]! ^= 1;
    expect(() => verifyNetStream(sab, image)).toThrow(/expected byte 0 of the received stream/);
  });
});

describe('net-ceiling-cli (tiny)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-net-ceiling-cli-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('prints the ceiling per receive mode and writes every run as JSON', async () => {
    const file = join(dir, 'net.json');
    const run = await runNode(CLI, ['--mib', '16', '--receive', 'onread,data', '--sender', 'stream,image', '--repeat', '1', '--json', file], { timeoutMs: 60_000 });
    expect(run.code, `stdout:\n${run.stdout}\nstderr:\n${run.stderr}`).toBe(0);
    expect(run.stdout).toMatch(/^net ceiling \(onread, sender stream\): [\d.]+ MiB\/s median \([\d.]+–[\d.]+\) over 1 runs of 16 MiB$/m);
    expect(run.stdout).toMatch(/^net ceiling \(data, sender image\): /m);
    const doc = JSON.parse(readFileSync(file, 'utf8')) as { runs: { receive: string; sender: string; verified: boolean }[] };
    expect(doc.runs.map((r) => [r.receive, r.sender, r.verified])).toEqual([
      ['onread', 'stream', true],
      ['onread', 'image', true],
      ['data', 'stream', true],
      ['data', 'image', true],
    ]);
  }, 70_000);

  it('rejects a bad value with exit code 2 and a message naming it', async () => {
    const run = await runNode(CLI, ['--receive', 'mmap'], { timeoutMs: 20_000 });
    expect(run.code).toBe(2);
    expect(run.stderr).toContain('--receive: expected one of onread, data, got "mmap"');
  });
});
