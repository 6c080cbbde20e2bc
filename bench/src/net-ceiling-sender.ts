#!/usr/bin/env node
/**
 * The net ceiling's sender process: the least a source host can do to move
 * bytes with Node's own `net`. One TCP connection on 127.0.0.1 (TCP_NODELAY),
 * `--bytes` of the stream (net-ceiling-layout.ts) written as slices of what
 * it sends from (no copy, no encoding; `--memory stream`, the default: a
 * buffer of the receiver's size it fills first, as a source host holds guest
 * memory; `--memory image`: the 16 MiB image), waiting for `drain` whenever
 * the socket's buffer is full; then `end`.
 *
 * Prints `listening tcp://127.0.0.1:PORT`, serves one connection, and exits 0
 * once it has closed; exits when its stdin closes (the bench went away) or on
 * SIGTERM. `--corrupt-at OFFSET` (testing only) flips the stream byte at that
 * offset, to prove the receiver's content check fails.
 */
import { createServer, type AddressInfo, type Socket } from 'node:net';
import { USAGE_EXIT_CODE, UsageError, describe, parseIntOption } from '@postcopy/shared';
import { NET_SENDER_MEMORY, NET_WRITE_BYTES, netSenderSource, type NetSenderMemory } from './net-ceiling-layout.js';

function argValue(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1]! : undefined;
}

/** Resolves when the socket can take more (`drain`), rejects if it closes first. */
function drain(socket: Socket): Promise<void> {
  return new Promise((resolve, reject) => {
    const onDrain = (): void => {
      socket.off('close', onClose);
      resolve();
    };
    const onClose = (): void => {
      socket.off('drain', onDrain);
      reject(new Error('expected the receiver to read the whole stream, got a closed connection'));
    };
    socket.once('drain', onDrain);
    socket.once('close', onClose);
  });
}

async function stream(socket: Socket, source: Buffer, bytes: number, corruptAt: number | undefined): Promise<void> {
  let sent = 0;
  while (sent < bytes) {
    const offset = sent % source.length;
    const length = Math.min(NET_WRITE_BYTES, bytes - sent, source.length - offset);
    let chunk = source.subarray(offset, offset + length);
    if (corruptAt !== undefined && corruptAt >= sent && corruptAt < sent + length) {
      chunk = Buffer.from(chunk); // a private copy: the source stays right
      chunk[corruptAt - sent]! ^= 0xff;
    }
    sent += length;
    if (!socket.write(chunk)) await drain(socket);
  }
  socket.end();
}

async function main(): Promise<void> {
  const bytesText = argValue('--bytes');
  if (bytesText === undefined) throw new UsageError('--bytes: expected a byte count, got none');
  const bytes = parseIntOption('--bytes', bytesText, 1);
  const corruptText = argValue('--corrupt-at');
  const corruptAt = corruptText === undefined ? undefined : parseIntOption('--corrupt-at', corruptText, 0, bytes - 1);
  const memoryText = argValue('--memory') ?? 'stream';
  if (!(NET_SENDER_MEMORY as readonly string[]).includes(memoryText)) {
    throw new UsageError(`--memory: expected one of ${NET_SENDER_MEMORY.join(', ')}, got ${describe(memoryText)}`);
  }
  const source = netSenderSource(bytes, memoryText as NetSenderMemory);
  let served = false;
  const server = createServer({ noDelay: true }, (socket) => {
    if (served) {
      socket.destroy();
      return;
    }
    served = true;
    server.close();
    socket.on('error', (err) => process.stderr.write(`net-ceiling-sender: ${err.message}\n`));
    socket.on('close', () => process.exit(0));
    stream(socket, source, bytes, corruptAt).catch((err: unknown) => {
      process.stderr.write(`net-ceiling-sender: ${(err as Error).message}\n`);
      process.exit(1);
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const stop = (): void => process.exit(0);
  process.stdin.on('end', stop).on('error', stop).resume();
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
  const { port } = server.address() as AddressInfo;
  process.stdout.write(`listening tcp://127.0.0.1:${port}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`net-ceiling-sender: ${(err as Error).message}\n`);
  process.exit(err instanceof UsageError ? USAGE_EXIT_CODE : 1);
});
