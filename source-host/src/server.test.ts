import { afterEach, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { ChannelRole, PROTOCOL_VERSION, decode, encode, makeLayout, type Message } from '@postcopy/shared';
import { GuestImage } from './image.js';
import { SourceServer } from './server.js';

const servers: SourceServer[] = [];
afterEach(async () => {
  while (servers.length) await servers.pop()!.close();
});

async function listen(handshakeTimeoutMs: number): Promise<SourceServer> {
  const image = new GuestImage(makeLayout(16 * 4096, 4096), { seed: 1, zeroFraction: 0 });
  const server = await SourceServer.listen(image, { host: '127.0.0.1', port: 0, token: 'secret', handshakeTimeoutMs });
  servers.push(server);
  return server;
}

/** Connects and collects what the server sends until it closes (or `timeoutMs`). */
function session(url: string, send: (ws: WebSocket) => void, timeoutMs = 5000): Promise<{ messages: Message[]; code: number }> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    const messages: Message[] = [];
    const timer = setTimeout(() => {
      ws.terminate();
      reject(new Error(`no close within ${timeoutMs} ms; got ${JSON.stringify(messages.map((m) => m.type))}`));
    }, timeoutMs);
    ws.on('open', () => send(ws));
    ws.on('message', (data: Buffer) => messages.push(decode(data, { layout: makeLayout(16 * 4096, 4096) })));
    ws.on('close', (code) => {
      clearTimeout(timer);
      resolve({ messages, code });
    });
  });
}

describe('source handshake timeout', () => {
  it('drops a peer that sends no hello, with an error saying so', async () => {
    const server = await listen(200);
    const started = performance.now();
    const { messages, code } = await session(server.url, () => {});
    expect(performance.now() - started).toBeGreaterThanOrEqual(190);
    expect(code).toBe(1008);
    expect(messages).toEqual([{ type: 'error', code: 'ERR_POSTCOPY_HANDSHAKE', message: 'expected hello within 200 ms, got none' }]);
  });

  it('leaves a peer that said hello in time alone', async () => {
    const server = await listen(200);
    const hello = encode({ type: 'hello', protocolVersion: PROTOCOL_VERSION, token: 'secret', role: ChannelRole.Fault, guestBytes: 16 * 4096, pageSize: 4096, channel: 'fault0' });
    const { messages } = await session(
      server.url,
      (ws) => {
        ws.send(hello);
        // Well past the timeout, ask for a page, then leave.
        setTimeout(() => ws.send(encode({ type: 'request', id: 1, page: 3 })), 400);
        setTimeout(() => ws.close(1000), 600);
      },
    );
    expect(messages.map((m) => m.type)).toEqual(['welcome', 'page']);
  });
});
