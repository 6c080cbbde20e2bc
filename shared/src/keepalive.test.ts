/**
 * The keepalive against a real WebSocket peer in another thread (so that it
 * keeps running while this thread stalls): a peer that is alive is never
 * cut, not even after this process itself stalled for longer than the
 * timeout; a peer that stops answering is cut within a bounded time.
 */
import { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { Keepalive } from './keepalive.js';

/** The peer: a ws server in a worker thread; `mode` says how it behaves once a client connects. */
const PEER = `
const { parentPort, workerData } = require('node:worker_threads');
const { WebSocketServer } = require('ws');
const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false }, () => parentPort.postMessage(wss.address().port));
wss.on('connection', (ws) => {
  // ws answers every ping with a pong by itself.
  if (workerData.mode === 'stream') setInterval(() => ws.send('x'), 10);
  // Stops reading: no pong comes back, as when the link dies.
  if (workerData.mode === 'dead') setTimeout(() => ws._socket.pause(), 100);
});
`;

const cleanups: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

async function peer(mode: 'pongs-only' | 'stream' | 'dead'): Promise<WebSocket> {
  const worker = new Worker(PEER, { eval: true, workerData: { mode } });
  cleanups.push(() => worker.terminate());
  const port = await new Promise<number>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  const ws = new WebSocket(`ws://127.0.0.1:${port}`, { perMessageDeflate: false });
  cleanups.push(() => ws.terminate());
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  return ws;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Blocks this thread (a long synchronous task, a GC pause, a starved CPU). */
function stall(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    // busy
  }
}

describe('Keepalive', () => {
  it('never cuts a peer that answers its pings', async () => {
    const ws = await peer('pongs-only');
    const cuts: number[] = [];
    new Keepalive(ws, 100, (silentMs) => cuts.push(silentMs));
    await sleep(600);
    expect(cuts).toEqual([]);
    expect(ws.readyState).toBe(ws.OPEN);
  });

  it('does not cut a live peer after this thread stalled for longer than the timeout (its frames wait unread)', async () => {
    const ws = await peer('stream');
    const cuts: number[] = [];
    new Keepalive(ws, 150, (silentMs) => cuts.push(silentMs));
    await sleep(200);
    // Timers run before I/O: the first thing after the stall is the
    // keepalive's check, with the peer's frames of the last 500 ms unread.
    stall(500);
    await sleep(300);
    expect(cuts).toEqual([]);
    expect(ws.readyState).toBe(ws.OPEN);
  });

  it('does not cut a peer that only answers pings after this thread stalled: it was never asked meanwhile', async () => {
    const ws = await peer('pongs-only');
    const cuts: number[] = [];
    new Keepalive(ws, 150, (silentMs) => cuts.push(silentMs));
    await sleep(200);
    stall(500);
    await sleep(300);
    expect(cuts).toEqual([]);
    expect(ws.readyState).toBe(ws.OPEN);
  });

  it('cuts a peer that stops answering, after the timeout and within a bound', async () => {
    const ws = await peer('dead');
    const closed = new Promise<void>((resolve) => ws.once('close', () => resolve()));
    const start = performance.now();
    const cut = new Promise<number>((resolve) => new Keepalive(ws, 200, resolve));
    const silentMs = await cut;
    const at = performance.now() - start;
    // The peer went deaf at about 100 ms; its last pong came at most then.
    // About 100 + 50 + 200 ms (the next ping, then the timeout); the bound
    // only has to tell "cut" from "never cut" on a loaded machine.
    expect(silentMs).toBeGreaterThan(200);
    expect(at).toBeGreaterThan(200);
    expect(at).toBeLessThan(2000);
    await closed;
  });
});
