/**
 * The source's end of a push channel (shared/push-stream.ts): an HTTP
 * upgrade to `postcopy-push`, one length-prefixed hello read and answered,
 * then records written, nothing read. The hello is checked like every
 * channel's (the server's checkHello: version, token, layout, the
 * migration's secret); the records are written by the migration
 * (migration.ts, pushRecords).
 */
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { LengthPrefixedFrame, PUSH_UPGRADE, ProtocolError, decode, encode, lengthPrefixed, type Hello, type Message } from '@postcopy/shared';
import type { PushStream } from './migration.js';

/** Whether an upgrade request asks for a push channel (anything else goes to the WebSocket server). */
export function isPushUpgrade(req: IncomingMessage): boolean {
  return String(req.headers.upgrade ?? '').toLowerCase() === PUSH_UPGRADE;
}

/** How long a peer whose error is on its way may keep the socket. */
const REJECT_GRACE_MS = 10_000;

export class SourcePushChannel implements PushStream {
  label = 'unidentified push channel';
  /** Its hello was accepted: records may go out. */
  admitted = false;
  rejected = false;
  private readonly frame = new LengthPrefixedFrame();
  private readonly closedPromise: Promise<void>;
  /**
   * Whether a batch's writes are corked into one writev: on a TCP socket
   * only. A TLS socket takes a writev of several buffers by first copying
   * them into one (Node's TLSWrap::DoWrite), and corking made every batch
   * one such writev; uncorked, a write the socket takes at once is
   * encrypted from where it lies (writes queued behind a busy socket are
   * still joined). Measured on the two-core machine (1 GiB, TLS, runs
   * interleaved in pairs): 433 against 389 MiB/s corked (medians of 4), 517
   * against 483 (of 8), faster in 10 of the 12 pairs, the destination's main
   * thread 0.1-0.25 s less busy.
   */
  private readonly corks: boolean;

  constructor(
    readonly socket: Duplex,
    head: Buffer,
    private readonly onHello: (channel: SourcePushChannel, hello: Hello) => void,
    private readonly onReject: (channel: SourcePushChannel, err: Error) => void,
  ) {
    this.corks = (socket as { encrypted?: boolean }).encrypted !== true;
    this.closedPromise = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('error', () => socket.destroy());
    // The destination says nothing after its hello, so its end of the stream
    // is the channel's: Node's HTTP server hands upgraded sockets over with
    // allowHalfOpen set, and a FIN alone (a destination that read all it was
    // sent, then closed) would leave this side open, never closed, until a
    // write failed. Precopy waiting on its SYNC writes nothing, and would
    // never learn that its push channel was gone.
    socket.on('end', () => socket.destroy());
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: ${PUSH_UPGRADE}\r\nConnection: Upgrade\r\n\r\n`);
    socket.on('data', (chunk: Buffer) => this.read(chunk));
    if (head.length > 0) this.read(head);
  }

  get isOpen(): boolean {
    return !this.socket.destroyed && this.socket.writable;
  }

  get bufferedAmount(): number {
    return this.socket.writableLength;
  }

  cork(): void {
    if (this.corks) this.socket.cork();
  }

  uncork(): void {
    if (this.corks) this.socket.uncork();
  }

  write(bytes: Uint8Array, sent?: () => void): void {
    if (sent === undefined) {
      this.socket.write(bytes);
      return;
    }
    // A write's callback also runs (with an error) when the socket is destroyed first; the close settles it too.
    let done = false;
    const once = (): void => {
      if (done) return;
      done = true;
      sent();
    };
    this.socket.write(bytes, once);
    void this.closedPromise.then(once);
  }

  drained(): Promise<void> {
    if (this.socket.writableLength === 0 || !this.isOpen) return Promise.resolve();
    return Promise.race([new Promise<void>((resolve) => this.socket.once('drain', () => resolve())), this.closedPromise]);
  }

  get closed(): Promise<void> {
    return this.closedPromise;
  }

  /** The hello, then nothing: the destination says nothing more on a push channel. */
  private read(chunk: Buffer): void {
    if (this.rejected) return;
    try {
      if (this.admitted) throw new ProtocolError(`expected nothing from the destination on a push channel after its hello, got ${chunk.length} bytes`);
      const got = this.frame.push(chunk);
      if (got === undefined) return;
      if (got.rest.length > 0) throw new ProtocolError(`expected nothing from the destination on a push channel after its hello, got ${got.rest.length} bytes`);
      const message: Message = decode(got.frame);
      if (message.type !== 'hello') throw new ProtocolError(`expected hello first, got ${message.type}`);
      this.onHello(this, message);
    } catch (err) {
      this.reject(err as Error);
    }
  }

  /** Sends a handshake frame (welcome). */
  send(message: Message): void {
    this.socket.write(lengthPrefixed(encode(message)));
  }

  /** Sends the error and closes once it is out (or cuts after a grace). */
  reject(err: Error): void {
    if (this.rejected) return;
    this.rejected = true;
    const code = (err as { code?: string }).code ?? 'ERR_POSTCOPY';
    if (this.isOpen) {
      this.socket.end(lengthPrefixed(encode({ type: 'error', code, message: err.message })));
      const grace = setTimeout(() => this.socket.destroy(), REJECT_GRACE_MS);
      grace.unref();
      this.socket.once('close', () => clearTimeout(grace));
    }
    this.onReject(this, err);
  }

  destroy(): void {
    this.socket.destroy();
  }
}
