#!/usr/bin/env node
/**
 * The floor's server process: the least a source host can do with the tool's
 * libraries and settings. `ws` with `perMessageDeflate: false`, binary frames,
 * messages encoded and validated with the tool's codec (@postcopy/shared), page
 * contents from the tool's GuestImage. No scheduler, sentmap, link emulation,
 * handshake or accounting.
 *
 * - `request {id, page}` is answered at once with `page {id, page, data}`;
 * - `start` streams `--bulk-mib` MiB of `pushed {page, data}` frames as fast as
 *   ws takes them (bounded by bufferedAmount), then `complete`.
 *
 * Prints `listening ws://127.0.0.1:PORT`; exits when its stdin closes (the
 * bench went away) or on SIGTERM.
 */
import type { AddressInfo } from 'node:net';
import { WebSocketServer, type WebSocket } from 'ws';
import { USAGE_EXIT_CODE, UsageError, decode, encode, makeLayout, maxFrameBytes, parseIntOption, type GuestLayout } from '@postcopy/shared';
import { GuestImage } from '@postcopy/source-host';
import {
  BULK_BATCH_FRAMES,
  BULK_HIGH_WATER_BYTES,
  FLOOR_IMAGE_BYTES,
  FLOOR_IMAGE_SPEC,
  FLOOR_PAGE_SIZE,
  bulkFrames,
  floorLayout,
} from './floor-layout.js';

function argValue(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1]! : fallback;
}

/**
 * Streams `frames` pushed pages as fast as ws takes them: a sliding window of
 * batches, each ending with a send callback; while ws holds the high-water
 * mark or more, wait for the oldest batch to leave (no drain-to-empty bubble).
 */
async function streamBulk(ws: WebSocket, image: GuestImage, frames: number): Promise<void> {
  const imagePages = image.layout.totalPages;
  // One promise per batch, resolved when its last frame has left ws for the socket.
  const batches: Promise<void>[] = [];
  let sent = 0;
  while (sent < frames) {
    if (ws.readyState !== ws.OPEN) return;
    if (ws.bufferedAmount >= BULK_HIGH_WATER_BYTES && batches.length > 0) {
      await batches.shift();
      continue;
    }
    const end = Math.min(frames, sent + BULK_BATCH_FRAMES);
    for (; sent < end; sent++) {
      const frame = encode({ type: 'pushed', page: sent, data: image.pageBytes(sent % imagePages) });
      if (sent === end - 1) batches.push(new Promise((resolve) => ws.send(frame, { binary: true }, () => resolve())));
      else ws.send(frame, { binary: true });
    }
  }
  ws.send(encode({ type: 'complete', pagesSent: frames }), { binary: true });
}

function serve(ws: WebSocket, layout: GuestLayout, image: GuestImage, frames: number): void {
  ws.binaryType = 'nodebuffer';
  const imagePages = image.layout.totalPages;
  ws.on('message', (data: Buffer, isBinary: boolean) => {
    try {
      if (!isBinary) throw new Error('expected binary frames, got a text frame');
      const message = decode(data, { layout });
      if (message.type === 'request') {
        ws.send(encode({ type: 'page', id: message.id, page: message.page, data: image.pageBytes(message.page % imagePages) }), { binary: true });
      } else if (message.type === 'start') {
        streamBulk(ws, image, frames).catch((err: unknown) => {
          process.stderr.write(`floor-server: bulk stream failed: ${(err as Error).message}\n`);
          ws.terminate();
        });
      } else {
        throw new Error(`expected request or start, got ${message.type}`);
      }
    } catch (err) {
      process.stderr.write(`floor-server: ${(err as Error).message}\n`);
      ws.close(1002);
    }
  });
  ws.on('error', (err) => process.stderr.write(`floor-server: ${err.message}\n`));
}

async function main(): Promise<void> {
  const bulkMiB = parseIntOption('--bulk-mib', argValue('--bulk-mib', '1'), 1, 1_048_576);
  const layout = floorLayout(bulkMiB);
  const image = new GuestImage(makeLayout(FLOOR_IMAGE_BYTES, FLOOR_PAGE_SIZE), FLOOR_IMAGE_SPEC);
  const wss = new WebSocketServer({
    host: '127.0.0.1',
    port: 0,
    perMessageDeflate: false,
    maxPayload: maxFrameBytes(layout.pageSize, layout.totalPages),
  });
  await new Promise<void>((resolve, reject) => {
    wss.once('listening', resolve);
    wss.once('error', reject);
  });
  wss.on('connection', (ws) => serve(ws, layout, image, bulkFrames(bulkMiB)));
  const stop = (): void => {
    for (const ws of wss.clients) ws.terminate();
    wss.close(() => process.exit(0));
  };
  process.stdin.on('end', stop).on('error', stop).resume();
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
  const { port } = wss.address() as AddressInfo;
  process.stdout.write(`listening ws://127.0.0.1:${port}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`floor-server: ${(err as Error).message}\n`);
  process.exit(err instanceof UsageError ? USAGE_EXIT_CODE : 1);
});
