/**
 * The handshake every fault and main channel opens with, whichever client
 * speaks it (PageClient on an event loop, BlockingPageChannel blocking): the
 * hello it sends and the checks of the welcome it gets. Apart from
 * page-client.ts so that a thread on the blocking channel loads no `ws`.
 */
import { HandshakeError, PROTOCOL_VERSION, decode, formatBytes, type Message, type Welcome } from '@postcopy/shared/net';
import type { PageClientOptions } from './page-client.js';

/** The hello a channel opens with (the same on every transport). */
export function helloFor(options: PageClientOptions): Message {
  return {
    type: 'hello',
    protocolVersion: PROTOCOL_VERSION,
    token: options.token,
    role: options.role,
    guestBytes: options.guestBytes,
    pageSize: options.pageSize,
    channel: options.channel,
    secret: options.secret,
  };
}

/**
 * The source's answer to a hello: its welcome, checked against what this
 * channel expects (protocol version, guest layout, the migration's secret);
 * throws a HandshakeError saying what is wrong otherwise.
 */
export function expectWelcome(data: Uint8Array, options: PageClientOptions): Welcome {
  let message: Message;
  try {
    message = decode(data);
  } catch (err) {
    throw new HandshakeError(`the source's first message is not a valid welcome: ${(err as Error).message}`);
  }
  if (message.type === 'error') throw new HandshakeError(`the source refused the handshake: ${message.message}`);
  if (message.type !== 'welcome') throw new HandshakeError(`expected welcome from the source, got ${message.type}`);
  if (message.protocolVersion !== PROTOCOL_VERSION) {
    throw new HandshakeError(`expected protocol version ${PROTOCOL_VERSION}, the source speaks ${message.protocolVersion}`);
  }
  if (message.guestBytes !== options.guestBytes || message.pageSize !== options.pageSize || message.totalPages !== message.guestBytes / message.pageSize) {
    throw new HandshakeError(
      `expected guest layout ${formatBytes(options.guestBytes)} in ${formatBytes(options.pageSize)} pages, the source has ${formatBytes(message.guestBytes)} in ${formatBytes(message.pageSize)} pages (${message.totalPages} pages)`,
    );
  }
  // The main channel that starts a migration asks with no secret and must be given one; every other channel must not.
  if (options.secret === '' && message.secret === '') throw new HandshakeError(`expected the source to give this migration a secret in its welcome, got none`);
  if (options.secret !== '' && message.secret !== '') throw new HandshakeError(`expected no secret in the welcome of a channel that presented one, got a new one`);
  return message;
}
