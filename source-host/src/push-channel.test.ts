import { createServer } from 'node:http';
import { connect, type AddressInfo, type Socket } from 'node:net';
import { Duplex } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { PUSH_RECORD, PUSH_UPGRADE, pushRecordHeader } from '@postcopy/shared';
import { within } from './fixtures/within.js';
import { SourcePushChannel } from './push-channel.js';

/** A socket that records what is written, and whether it was corked then. */
class RecordingSocket extends Duplex {
  corks = 0;
  uncorks = 0;
  readonly writes: { bytes: Buffer; corked: boolean }[] = [];

  constructor(readonly encrypted: boolean) {
    super();
  }

  override cork(): void {
    this.corks++;
    super.cork();
  }

  override uncork(): void {
    this.uncorks++;
    super.uncork();
  }

  override _read(): void {}

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (err?: Error | null) => void): void {
    this.writes.push({ bytes: Buffer.from(chunk), corked: false });
    callback();
  }

  override _writev(chunks: { chunk: Buffer }[], callback: (err?: Error | null) => void): void {
    for (const { chunk } of chunks) this.writes.push({ bytes: Buffer.from(chunk), corked: true });
    callback();
  }
}

/** A batch as pushRecords writes it: cork, a header and its pages, a zero record, uncork. */
function writeBatch(channel: SourcePushChannel, pages: Uint8Array): void {
  channel.cork();
  channel.write(pushRecordHeader(PUSH_RECORD.PAGES, 8, pages.length / 4096));
  channel.write(pages);
  channel.write(pushRecordHeader(PUSH_RECORD.ZERO, 10, 1));
  channel.uncork();
}

function openChannel(socket: RecordingSocket): SourcePushChannel {
  const channel = new SourcePushChannel(socket, Buffer.alloc(0), () => {}, () => {});
  socket.writes.length = 0; // the 101
  return channel;
}

describe('SourcePushChannel writes', () => {
  it('corks a batch into one writev on a TCP socket', async () => {
    const socket = new RecordingSocket(false);
    const channel = openChannel(socket);
    const pages = new Uint8Array(2 * 4096).fill(7);
    writeBatch(channel, pages);
    await new Promise((resolve) => setImmediate(resolve));
    expect(socket.corks).toBe(1);
    expect(socket.uncorks).toBe(1);
    expect(socket.writes.map((w) => w.corked)).toEqual([true, true, true]);
    expect(Buffer.concat(socket.writes.map((w) => w.bytes))).toEqual(
      Buffer.concat([pushRecordHeader(PUSH_RECORD.PAGES, 8, 2), pages, pushRecordHeader(PUSH_RECORD.ZERO, 10, 1)]),
    );
  });

  it('does not cork on a TLS socket: each header and run is a write of its own, in order', async () => {
    const socket = new RecordingSocket(true);
    const channel = openChannel(socket);
    const pages = new Uint8Array(2 * 4096).fill(9);
    writeBatch(channel, pages);
    await new Promise((resolve) => setImmediate(resolve));
    expect(socket.corks).toBe(0);
    expect(socket.uncorks).toBe(0);
    expect(socket.writes.map((w) => w.corked)).toEqual([false, false, false]);
    expect(socket.writes.map((w) => w.bytes)).toEqual([pushRecordHeader(PUSH_RECORD.PAGES, 8, 2), Buffer.from(pages), pushRecordHeader(PUSH_RECORD.ZERO, 10, 1)]);
  });
});

describe('SourcePushChannel closing', () => {
  it('closes when the destination ends its side (a FIN alone, on an HTTP server\'s half-open upgraded socket)', async () => {
    const server = createServer();
    const opened = new Promise<SourcePushChannel>((resolve) =>
      server.on('upgrade', (_req, socket: Duplex, head: Buffer) => resolve(new SourcePushChannel(socket, head, () => {}, () => {}))),
    );
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const client = connect((server.address() as AddressInfo).port, '127.0.0.1');
    try {
      client.write(`GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: ${PUSH_UPGRADE}\r\nConnection: Upgrade\r\n\r\n`);
      // Read everything the source sent (the 101), so that closing sends a FIN and no reset.
      await new Promise((resolve) => client.once('data', resolve));
      const channel = await opened;
      expect((channel.socket as Socket).allowHalfOpen).toBe(true);
      client.end();
      await within(channel.closed, 5000, 'the push channel to close after the destination ended its side');
      expect(channel.isOpen).toBe(false);
    } finally {
      client.destroy();
      // The upgraded socket is no longer the HTTP server's to close.
      void opened.then((channel) => channel.socket.destroy());
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    }
  });
});
