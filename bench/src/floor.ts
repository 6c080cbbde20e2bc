import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';
import {
  createLatencyHistogram,
  decode,
  encode,
  maxFrameBytes,
  recordNs,
  summarize,
  type GuestLayout,
  type Histogram,
  type LatencySummary,
} from '@postcopy/shared';
import { exitCode, listeningUrl } from '@postcopy/e2e';
import { bulkFrames, floorLayout } from './floor-layout.js';

/** The built floor server, run as its own process. */
export const FLOOR_SERVER = fileURLToPath(new URL('./floor-server.js', import.meta.url));

export interface FloorOptions {
  /** Timed round trips. */
  requests: number;
  /** Untimed round trips first. */
  warmup: number;
  /** MiB streamed for the bulk throughput. */
  bulkMiB: number;
}

export interface FloorResult {
  /** Request/reply round trip of one 4 KiB page, one request outstanding (µs). */
  roundTripUs: LatencySummary;
  /** Page bytes per second of the bulk stream, in MiB/s. */
  bulkMiBs: number;
}

interface FloorServer {
  url: string;
  stop(): Promise<void>;
}

/** Starts the floor server process and waits for its `listening ws://...` line. */
async function startFloorServer(bulkMiB: number): Promise<FloorServer> {
  const child = spawn(process.execPath, [FLOOR_SERVER, '--bulk-mib', String(bulkMiB)], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exit = exitCode(child);
  const stop = async (): Promise<void> => {
    // Closing its stdin asks it to go; SIGKILL if it does not.
    child.stdin!.end();
    const timer = setTimeout(() => child.kill('SIGKILL'), 2000);
    await exit;
    clearTimeout(timer);
  };
  try {
    const url = await listeningUrl(child, exit, 'the floor server', 30_000, () => stderr.trim());
    return { url, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** A client connection with the destination's settings (see dest-host's PageClient). */
function connect(url: string, layout: GuestLayout): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, {
      perMessageDeflate: false,
      maxPayload: maxFrameBytes(layout.pageSize, layout.totalPages),
      handshakeTimeout: 10_000,
    });
    ws.binaryType = 'nodebuffer';
    ws.once('open', () => {
      ws.removeAllListeners('error');
      resolve(ws);
    });
    ws.once('error', (err) => reject(new Error(`cannot reach the floor server at ${url}: ${err.message}`)));
  });
}

/**
 * `count` request/reply round trips, one outstanding at a time (like one vCPU
 * faulting page after page). Each is timed from just before the request is
 * encoded to just after its reply is decoded and checked; `histogram` gets
 * them (none when warming up).
 */
function roundTrips(ws: WebSocket, layout: GuestLayout, count: number, histogram: Histogram | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    let id = 0;
    let page = 0;
    let t0 = 0n;
    const finish = (err?: Error): void => {
      ws.off('message', onMessage);
      ws.off('close', onClose);
      if (err) reject(err);
      else resolve();
    };
    const next = (): void => {
      if (done === count) {
        finish();
        return;
      }
      id++;
      page = (done * 7919) % layout.totalPages;
      t0 = process.hrtime.bigint();
      ws.send(encode({ type: 'request', id, page }), { binary: true });
    };
    const onMessage = (data: Buffer): void => {
      let ok: boolean;
      try {
        const reply = decode(data, { layout });
        ok = reply.type === 'page' && reply.id === id && reply.page === page;
      } catch (err) {
        finish(err as Error);
        return;
      }
      const t1 = process.hrtime.bigint();
      if (!ok) {
        finish(new Error(`the floor server answered request ${id} (page ${page}) with something else`));
        return;
      }
      if (histogram) recordNs(histogram, Number(t1 - t0));
      done++;
      next();
    };
    const onClose = (): void => finish(new Error(`the floor server closed the connection after ${done} of ${count} round trips`));
    ws.on('message', onMessage);
    ws.on('close', onClose);
    next();
  });
}

/** Asks for the bulk stream and times it from the ask to `complete`; returns MiB/s of page data. */
function bulk(ws: WebSocket, layout: GuestLayout, bulkMiB: number): Promise<number> {
  const expected = bulkFrames(bulkMiB);
  return new Promise((resolve, reject) => {
    let frames = 0;
    let bytes = 0;
    let t0 = 0n;
    ws.on('message', (data: Buffer) => {
      let message;
      try {
        message = decode(data, { layout });
      } catch (err) {
        reject(err as Error);
        return;
      }
      if (message.type === 'pushed') {
        frames++;
        bytes += message.data.length;
      } else if (message.type === 'complete') {
        const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
        if (frames !== expected) reject(new Error(`expected ${expected} pushed frames from the floor server, got ${frames}`));
        else resolve(bytes / 1024 ** 2 / seconds);
      } else {
        reject(new Error(`expected pushed or complete from the floor server, got ${message.type}`));
      }
    });
    ws.on('close', () => reject(new Error(`the floor server closed the bulk stream after ${frames} of ${expected} frames`)));
    t0 = process.hrtime.bigint();
    ws.send(encode({ type: 'start', push: true, preempt: false }), { binary: true });
  });
}

/** One measurement of the floor: a fresh server process, warm-up, timed round trips, then the bulk stream. */
export async function measureFloor(options: FloorOptions): Promise<FloorResult> {
  const layout = floorLayout(options.bulkMiB);
  const server = await startFloorServer(options.bulkMiB);
  try {
    const rttWs = await connect(server.url, layout);
    const histogram = createLatencyHistogram();
    try {
      await roundTrips(rttWs, layout, options.warmup, undefined);
      await roundTrips(rttWs, layout, options.requests, histogram);
    } finally {
      rttWs.terminate();
    }
    const bulkWs = await connect(server.url, layout);
    let bulkMiBs: number;
    try {
      bulkMiBs = await bulk(bulkWs, layout, options.bulkMiB);
    } finally {
      bulkWs.terminate();
    }
    return { roundTripUs: summarize(histogram), bulkMiBs };
  } finally {
    await server.stop();
  }
}
