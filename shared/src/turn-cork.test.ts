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

  it('poll holds until every callback of the poll ran; a tick frame brings the release forward', async () => {
    const { stream, writes } = recorder();
    const cork = new TurnCork(stream);
    cork.hold('poll');
    stream.write('p1');
    // Still held after the turn (a later callback of the same poll could add to it)...
    await new Promise<void>((resolve) => process.nextTick(resolve));
    expect(writes).toEqual([]);
    await tick();
    expect(writes).toEqual([['p1']]);
    // ...but a frame that asks for the turn's end takes the held ones with it.
    cork.hold('poll');
    stream.write('p2');
    cork.hold('tick');
    stream.write('t1');
    await new Promise<void>((resolve) => process.nextTick(resolve));
    expect(writes).toEqual([['p1'], ['p2', 't1']]);
  });

  it('a release meant for an earlier cork leaves a later one alone; nothing stays corked, nothing is lost', async () => {
    const { stream, writes } = recorder();
    const cork = new TurnCork(stream);
    const order: string[] = [];
    for (let i = 0; i < 20; i++) {
      const mode = i % 3 === 0 ? 'tick' : 'poll';
      cork.hold(mode);
      stream.write(`f${i}`);
      order.push(`f${i}`);
      if (i % 4 === 0) await new Promise<void>((resolve) => process.nextTick(resolve));
      if (i % 5 === 0) await tick();
    }
    await tick();
    await tick();
    expect(writes.flat()).toEqual(order);
    expect(stream.writableCorked).toBe(0);
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
