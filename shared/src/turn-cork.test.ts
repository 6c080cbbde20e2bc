import { once } from 'node:events';
import { createServer, connect, type AddressInfo, type Socket } from 'node:net';
import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { TurnCork } from './turn-cork.js';

/** A Writable that records each write it is given (a writev is one entry of several chunks). */
function recorder(): { stream: Writable; writes: string[][] } {
  const writes: string[][] = [];
  const stream = new Writable({
    writev(chunks, done) {
      writes.push(chunks.map((c) => String(c.chunk)));
      done();
    },
    write(chunk, _enc, done) {
      writes.push([String(chunk)]);
      done();
    },
  });
  return { stream, writes };
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe('TurnCork', () => {
  it('sends the frames of one turn in one write, in order, and the next turn in another', async () => {
    const { stream, writes } = recorder();
    const cork = new TurnCork(stream);
    for (const f of ['a', 'b', 'c']) {
      cork.hold();
      stream.write(f);
    }
    // Frames sent from microtasks of the same turn join the batch too.
    await Promise.resolve().then(() => {
      cork.hold();
      stream.write('d');
    });
    expect(writes).toEqual([]);
    await tick();
    expect(writes).toEqual([['a', 'b', 'c', 'd']]);
    cork.hold();
    stream.write('e');
    await tick();
    expect(writes).toEqual([['a', 'b', 'c', 'd'], ['e']]);
  });

  it('nests with the cork and uncork a sender does around each frame (as ws does)', async () => {
    const { stream, writes } = recorder();
    const cork = new TurnCork(stream);
    for (const f of ['h1', 'h2']) {
      cork.hold();
      stream.cork();
      stream.write(f);
      stream.write(`${f}-data`);
      stream.uncork();
    }
    await tick();
    expect(writes).toEqual([['h1', 'h1-data', 'h2', 'h2-data']]);
  });

  it('a socket destroyed while corked drops what it held, without an error, and the next turn is not corked', async () => {
    const server = createServer();
    const received: Buffer[] = [];
    server.on('connection', (s: Socket) => s.on('data', (d: Buffer) => received.push(d)));
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const socket = connect((server.address() as AddressInfo).port, '127.0.0.1');
    await once(socket, 'connect');
    const errors: Error[] = [];
    socket.on('error', (e) => errors.push(e));
    const cork = new TurnCork(socket);
    cork.hold();
    socket.write('lost');
    socket.destroy();
    await tick();
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(Buffer.concat(received).toString()).toBe('');
    expect(errors).toEqual([]);
    server.close();
  });
});
