/**
 * The ceiling of Node's own sockets (issue 9, "Push"): one `net` stream from a
 * sender process to this one on 127.0.0.1, every byte copied into a
 * SharedArrayBuffer as it arrives, as the destination copies pages into guest
 * memory. Push throughput is held to it; the ws floor (floor.ts) stays a
 * figure of its own.
 *
 * Two ways to receive (`receive`):
 * - `onread`: `net.connect({ onread })` reads into one reused 1 MiB buffer and
 *   each read is copied into the SharedArrayBuffer: the most Node's sockets
 *   give, hence the ceiling;
 * - `data`: plain `'data'` events (a fresh buffer per read, up to 64 KiB, as
 *   `ws` gets them), each copied likewise.
 *
 * The SharedArrayBuffer is fresh (the stream's size, at most 1 GiB), so the
 * copy also pays the first touch of its pages, as a migration's guest memory
 * does. The sender sends from memory of the same size it filled first
 * (`sender: 'stream'`, the ceiling), as a source host holds the guest, or
 * from a 16 MiB image (`'image'`, a figure): see net-ceiling-layout.ts for
 * why it matters on this VM. Timed from `connect` to the last byte copied;
 * after that, the whole SharedArrayBuffer is compared with what the sender
 * must have sent.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { connect, type NetConnectOpts, type Socket } from 'node:net';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { CheckError, UsageError, describe } from '@postcopy/shared';
import { exitCode } from './child-exit.js';
import { FloorRunError, FloorTimeoutError } from './errors.js';
import { NET_IMAGE_BYTES, NET_READ_BYTES, NET_SENDER_MEMORY, netImage, netSabBytes, netSenderBytes, type NetSenderMemory } from './net-ceiling-layout.js';

/** The built sender, found from src/ and dist/ alike (tests import src/). */
export const NET_CEILING_SENDER = fileURLToPath(new URL('../dist/net-ceiling-sender.js', import.meta.url));

export const NET_RECEIVE_MODES = ['onread', 'data'] as const;
export type NetReceiveMode = (typeof NET_RECEIVE_MODES)[number];

/** Option defaults in one literal. */
export const NET_CEILING_DEFAULTS = {
  mib: 1024,
  receive: 'onread',
  sender: 'stream',
  timeoutMs: 120_000,
} as const satisfies { mib: number; receive: NetReceiveMode; sender: NetSenderMemory; timeoutMs: number };

const START_TIMEOUT_MS = 30_000;
const STOP_GRACE_MS = 2_000;

export interface NetCeilingOptions {
  /** MiB streamed (default 1024). */
  mib?: number;
  receive?: NetReceiveMode;
  /** What the sender sends from (default `stream`: memory of the receiver's size). */
  sender?: NetSenderMemory;
  /** The whole measurement, the sender's start included; then everything is torn down (default 120 s). */
  timeoutMs?: number;
  /** Testing only: the sender flips the stream byte at this offset (the content check must fail). */
  corruptAt?: number;
  /** Called with the sender's process id once it is started. */
  onSpawn?: (pid: number) => void;
  signal?: AbortSignal;
}

export interface NetCeilingResult {
  floor: 'net';
  receive: NetReceiveMode;
  sender: NetSenderMemory;
  bytes: number;
  /** Size of what the sender sent from. */
  senderBytes: number;
  /** Size of the SharedArrayBuffer the stream was copied into. */
  sabBytes: number;
  elapsedMs: number;
  /** Stream bytes per second, in MiB/s. */
  mibPerSec: number;
  /** Reads the receiver got, and their mean size. */
  reads: number;
  meanReadBytes: number;
  verified: true;
}

interface Sender {
  child: ChildProcess;
  /** The port of its `listening tcp://127.0.0.1:PORT` line. */
  port: Promise<number>;
  stop(): Promise<void>;
}

/** Starts the sender at once; `port` resolves when it listens (within `timeoutMs`). */
function startSender(bytes: number, memory: NetSenderMemory, corruptAt: number | undefined, timeoutMs: number, onSpawn: ((pid: number) => void) | undefined): Sender {
  const args = [NET_CEILING_SENDER, '--bytes', String(bytes), '--memory', memory];
  if (corruptAt !== undefined) args.push('--corrupt-at', String(corruptAt));
  const child = spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-2000)));
  child.stdin!.on('error', () => {}); // it may be gone before we close its stdin
  const exit = exitCode(child);
  const stop = async (): Promise<void> => {
    // Closing its stdin asks it to go; SIGKILL if it does not.
    child.stdin!.end();
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_GRACE_MS);
    await exit;
    clearTimeout(timer);
  };
  const port = new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new FloorTimeoutError(`expected the net ceiling's sender to listen within ${timeoutMs} ms, got nothing`)), timeoutMs);
    child.once('spawn', () => child.pid !== undefined && onSpawn?.(child.pid));
    child.once('error', (err) => reject(new FloorRunError(`expected to start the net ceiling's sender, got ${err.message}`)));
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const m = /^listening tcp:\/\/127\.0\.0\.1:(\d+)$/.exec(line);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
    void exit.then((code) => {
      clearTimeout(timer);
      reject(new FloorRunError(`expected the net ceiling's sender to listen, got exit code ${code}${stderr.trim() ? `: ${stderr.trim()}` : ''}`));
    });
  });
  port.catch(() => {});
  return { child, port, stop };
}

interface Received {
  elapsedMs: number;
  reads: number;
}

/** Receives `bytes` into `sab` (wrapping around it) and times it. */
function receive(port: number, bytes: number, sab: SharedArrayBuffer, mode: NetReceiveMode, track: (socket: Socket) => void): Promise<Received> {
  const view = new Uint8Array(sab);
  const size = sab.byteLength;
  return new Promise((resolve, reject) => {
    let received = 0;
    let reads = 0;
    let t0 = 0n;
    let elapsedMs = -1;
    let settled = false;
    const fail = (err: Error): void => {
      if (settled) return;
      settled = true;
      socket.destroy();
      reject(err);
    };
    const copy = (chunk: Uint8Array): void => {
      reads++;
      if (received + chunk.length > bytes) {
        fail(new FloorRunError(`expected ${bytes} bytes from the net ceiling's sender, got more`));
        return;
      }
      // Copy into the SharedArrayBuffer, as the destination copies pages into guest memory.
      let offset = received % size;
      let from = 0;
      while (from < chunk.length) {
        const n = Math.min(chunk.length - from, size - offset);
        view.set(from === 0 && n === chunk.length ? chunk : chunk.subarray(from, from + n), offset);
        from += n;
        offset = 0;
      }
      received += chunk.length;
      if (received === bytes) elapsedMs = Number(process.hrtime.bigint() - t0) / 1e6;
    };
    const options: NetConnectOpts = { host: '127.0.0.1', port, noDelay: true };
    if (mode === 'onread') {
      options.onread = {
        buffer: Buffer.allocUnsafe(NET_READ_BYTES),
        callback: (n: number, buf: Uint8Array) => {
          copy(buf.subarray(0, n));
          return !settled;
        },
      };
    }
    const socket = connect(options);
    track(socket);
    socket.once('connect', () => (t0 = process.hrtime.bigint()));
    if (mode === 'data') socket.on('data', (chunk: Buffer) => copy(chunk));
    socket.once('error', (err) => fail(new FloorRunError(`expected the net ceiling's stream, got ${err.message}`)));
    socket.once('end', () => {
      if (received !== bytes) fail(new FloorRunError(`expected ${bytes} bytes from the net ceiling's sender, got ${received} before the end of the stream`));
      else if (!settled) {
        settled = true;
        socket.destroy();
        resolve({ elapsedMs, reads });
      }
    });
    socket.once('close', () => fail(new FloorRunError(`expected ${bytes} bytes from the net ceiling's sender, got ${received} before the connection closed`)));
  });
}

/**
 * Compares the SharedArrayBuffer with the stream's content: byte j must be
 * image byte j % 16 MiB (see net-ceiling-layout.ts). Throws CheckError naming
 * the first wrong byte.
 */
export function verifyNetStream(sab: SharedArrayBuffer, image: Buffer): void {
  const all = Buffer.from(sab);
  for (let at = 0; at < all.length; at += NET_IMAGE_BYTES) {
    const got = all.subarray(at, Math.min(all.length, at + NET_IMAGE_BYTES));
    const want = image.subarray(0, got.length);
    if (got.equals(want)) continue;
    let i = 0;
    while (got[i] === want[i]) i++;
    throw new CheckError('content', `expected byte ${at + i} of the received stream to be ${want[i]}, got ${got[i]}`);
  }
}

function checkOptions(mib: number, receive: string, sender: string, timeoutMs: number): void {
  if (!Number.isInteger(mib) || mib < 1 || mib > 1_048_576) throw new UsageError(`expected mib from 1 to 1048576, got ${describe(mib)}`);
  if (!(NET_RECEIVE_MODES as readonly string[]).includes(receive)) throw new UsageError(`expected receive ${NET_RECEIVE_MODES.join(' or ')}, got ${describe(receive)}`);
  if (!(NET_SENDER_MEMORY as readonly string[]).includes(sender)) throw new UsageError(`expected sender ${NET_SENDER_MEMORY.join(' or ')}, got ${describe(sender)}`);
  if (!Number.isInteger(timeoutMs) || timeoutMs < 1) throw new UsageError(`expected timeoutMs >= 1, got ${describe(timeoutMs)}`);
}

/** One measurement: a fresh sender process and SharedArrayBuffer; the stream; its check. */
export async function measureNetCeiling(options: NetCeilingOptions = {}): Promise<NetCeilingResult> {
  const mib = options.mib ?? NET_CEILING_DEFAULTS.mib;
  const mode = options.receive ?? NET_CEILING_DEFAULTS.receive;
  const sender = options.sender ?? NET_CEILING_DEFAULTS.sender;
  const timeoutMs = options.timeoutMs ?? NET_CEILING_DEFAULTS.timeoutMs;
  checkOptions(mib, mode, sender, timeoutMs);
  options.signal?.throwIfAborted();
  const bytes = mib * 1024 ** 2;
  const sab = new SharedArrayBuffer(netSabBytes(bytes));
  let socket: Socket | undefined;
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  // Anything that ends the measurement early rejects this; the finally below tears down.
  const stopped = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new FloorTimeoutError(`expected the net ceiling (${mib} MiB, ${mode}, sender ${sender}) to finish within ${timeoutMs} ms, got no result`)), timeoutMs);
    onAbort = () => reject(new FloorRunError('the net ceiling was aborted'));
    options.signal?.addEventListener('abort', onAbort, { once: true });
  });
  stopped.catch(() => {});
  const child = startSender(bytes, sender, options.corruptAt, START_TIMEOUT_MS, options.onSpawn);
  try {
    const port = await Promise.race([child.port, stopped]);
    const got = await Promise.race([receive(port, bytes, sab, mode, (s) => (socket = s)), stopped]);
    verifyNetStream(sab, netImage());
    return {
      floor: 'net',
      receive: mode,
      sender,
      bytes,
      senderBytes: netSenderBytes(bytes, sender),
      sabBytes: sab.byteLength,
      elapsedMs: Math.round(got.elapsedMs * 1000) / 1000,
      mibPerSec: Math.round((mib / (got.elapsedMs / 1000)) * 10) / 10,
      reads: got.reads,
      meanReadBytes: Math.round(bytes / got.reads),
      verified: true,
    };
  } finally {
    clearTimeout(timer);
    if (onAbort) options.signal?.removeEventListener('abort', onAbort);
    socket?.destroy();
    await child.stop();
  }
}
