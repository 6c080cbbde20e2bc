import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { AddressInfo } from 'node:net';
import { WebSocketServer, type WebSocket } from 'ws';
import {
  ChannelRole,
  HandshakeError,
  PROTOCOL_VERSION,
  ProtocolError,
  decode,
  encode,
  formatBytes,
  maxFrameBytes,
  type Message,
  type SourceSummary,
} from '@postcopy/shared';
import type { GuestImage } from './image.js';
import { Link, NO_LINK, type LinkSpec } from './link.js';
import { SourceMigration, type Channel, type MigrationOptions } from './migration.js';

export interface SourceServerOptions {
  host: string;
  port: number;
  token: string;
  migration?: Partial<MigrationOptions>;
  /** A peer that has not completed its hello within this time is sent an error and dropped (default 10 s). */
  handshakeTimeoutMs?: number;
  /** The emulated link between the hosts (delay, bandwidth), applied here in both directions. */
  link?: LinkSpec;
}

/** One WebSocket connection from the destination, after (or before) its hello. */
class WsChannel implements Channel {
  label = 'unidentified';
  role: number | undefined;
  /** Sent an error: nothing more is read from it, and it closes once the error has gone out. */
  rejected = false;
  constructor(
    readonly ws: WebSocket,
    private readonly link: Link,
  ) {}
  get isOpen(): boolean {
    return this.ws.readyState === this.ws.OPEN;
  }
  /** Bytes queued on the emulated link and in the socket. */
  get bufferedAmount(): number {
    return this.ws.bufferedAmount + this.link.out.queuedBytes(this);
  }
  send(frame: Uint8Array, sent?: (err?: Error) => void): void {
    this.link.out.send(this, frame.length, () => {
      if (this.isOpen) this.ws.send(frame, { binary: true }, sent);
      else sent?.(new Error('channel closed'));
    });
  }
}

function tokenDigest(token: string): Buffer {
  return createHash('sha256').update(token).digest();
}

/** Constant-time token comparison (hashing first makes lengths equal). */
export function tokensEqual(expected: string, given: string): boolean {
  return timingSafeEqual(tokenDigest(expected), tokenDigest(given));
}

/** How long a rejected peer's error may take to go out before the connection is cut. */
const REJECT_GRACE_MS = 10_000;

/** RFC 6455 §5.5: a close frame's reason is at most 123 bytes of UTF-8. */
const MAX_CLOSE_REASON_BYTES = 123;

/**
 * A close reason that fits the frame: cut at a character boundary (counting
 * UTF-8 bytes, not UTF-16 units) with an ellipsis. `ws` throws a RangeError
 * for a longer reason, and that throw would take the whole process down.
 */
export function closeReason(text: string): string {
  if (Buffer.byteLength(text) <= MAX_CLOSE_REASON_BYTES) return text;
  const ellipsis = '…';
  let out = '';
  let bytes = Buffer.byteLength(ellipsis);
  for (const ch of text) {
    bytes += Buffer.byteLength(ch);
    if (bytes > MAX_CLOSE_REASON_BYTES) break;
    out += ch;
  }
  return out + ellipsis;
}

/**
 * A peer-chosen channel label made safe to print: printable ASCII only (no
 * newlines or terminal escapes that could forge or garble the source's log
 * lines), at most 64 characters.
 */
export function safeLabel(label: string): string {
  const printable = label.replace(/[^\x20-\x7e]/g, '?').slice(0, 64);
  return printable === '' ? 'unnamed' : printable;
}

export function generateToken(): string {
  return randomBytes(18).toString('base64url');
}

/**
 * The source host's WebSocket server for one migration. Events:
 * - `finished` (summary): the destination sent `finish` and got its summary;
 * - `destination-lost` (reason): the main channel closed before `finish`;
 * - `rejected` (label, error): a peer was sent an error and disconnected.
 */
export class SourceServer extends EventEmitter {
  readonly migration: SourceMigration;
  private readonly wss: WebSocketServer;
  private main: WsChannel | undefined;
  private finished = false;
  readonly link: Link;

  private constructor(
    readonly image: GuestImage,
    private readonly options: SourceServerOptions,
    wss: WebSocketServer,
  ) {
    super();
    this.migration = new SourceMigration(image, options.migration);
    this.link = new Link(options.link ?? NO_LINK);
    this.wss = wss;
    wss.on('connection', (ws) => this.accept(ws));
  }

  static async listen(image: GuestImage, options: SourceServerOptions): Promise<SourceServer> {
    const wss = new WebSocketServer({
      host: options.host,
      port: options.port,
      perMessageDeflate: false,
      maxPayload: maxFrameBytes(image.layout.pageSize, image.layout.totalPages),
    });
    await new Promise<void>((resolve, reject) => {
      wss.once('listening', resolve);
      wss.once('error', reject);
    });
    return new SourceServer(image, options, wss);
  }

  get url(): string {
    const address = this.wss.address() as AddressInfo;
    const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
    return `ws://${host}:${address.port}`;
  }

  close(): Promise<void> {
    this.migration.stop();
    this.link.stop();
    for (const ws of this.wss.clients) ws.terminate();
    return new Promise((resolve) => this.wss.close(() => resolve()));
  }

  private accept(ws: WebSocket): void {
    const channel = new WsChannel(ws, this.link);
    ws.binaryType = 'nodebuffer';
    // Nothing is served before a valid hello, and nobody may hold a socket without one.
    const timeoutMs = this.options.handshakeTimeoutMs ?? 10_000;
    const handshakeTimer = setTimeout(() => {
      if (channel.role === undefined) this.reject(channel, new HandshakeError(`expected hello within ${timeoutMs} ms, got none`));
    }, timeoutMs);
    handshakeTimer.unref();
    ws.once('close', () => clearTimeout(handshakeTimer));
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      // Frames from the destination cross the emulated link before they are read.
      this.link.in.send(channel, data.length, () => {
        if (!channel.isOpen || channel.rejected) return;
        try {
          if (!isBinary) throw new ProtocolError(`expected binary frames, got a text frame`);
          const message = decode(data, channel.role === undefined ? {} : { layout: this.image.layout });
          this.dispatch(channel, message);
        } catch (err) {
          this.reject(channel, err as Error);
        }
      });
    });
    ws.on('error', (err) => this.reject(channel, err));
    ws.on('close', () => {
      this.link.out.drop(channel);
      this.link.in.drop(channel);
      if (channel === this.main && !this.finished) {
        this.main = undefined;
        this.migration.stop();
        this.emit('destination-lost', `the destination's main channel closed before the migration finished`);
      }
    });
  }

  private reject(channel: WsChannel, err: Error): void {
    // One error per peer: frames that were already on their way are ignored.
    if (channel.rejected) return;
    channel.rejected = true;
    const code = (err as { code?: string }).code ?? 'ERR_POSTCOPY';
    if (channel.isOpen) {
      const close = (): void => {
        // Policy violation (1008) for handshake problems, protocol error (1002) otherwise.
        try {
          channel.ws.close(err instanceof HandshakeError ? 1008 : 1002, closeReason(err.message));
        } catch {
          // Nothing a peer sends may throw out of here (it would end the process): drop it instead.
          channel.ws.terminate();
        }
      };
      // The error crosses the emulated link like every frame: close only once
      // it has gone out, or the close frame overtakes it and the peer never
      // learns what was wrong (with --link-delay-us or --link-bandwidth).
      channel.send(encode({ type: 'error', code, message: err.message }), close);
      // A peer that stops reading would hold the error (and the close behind it) forever.
      const grace = setTimeout(() => channel.ws.terminate(), REJECT_GRACE_MS);
      grace.unref();
      channel.ws.once('close', () => clearTimeout(grace));
    }
    this.emit('rejected', channel.label, err);
  }

  private dispatch(channel: WsChannel, message: Message): void {
    if (channel.role === undefined) {
      if (message.type !== 'hello') throw new ProtocolError(`expected hello first, got ${message.type}`);
      this.handshake(channel, message);
      return;
    }
    switch (message.type) {
      case 'request':
        void this.migration.request(channel, message.id, message.page);
        return;
      case 'start':
        if (channel.role !== ChannelRole.Main) throw new ProtocolError(`expected start on the main channel, got it on ${channel.label}`);
        this.migration.preempt = message.preempt;
        this.migration.mainChannel = channel;
        if (message.push) this.migration.startPush(channel);
        return;
      case 'finish': {
        if (channel.role !== ChannelRole.Main) throw new ProtocolError(`expected finish on the main channel, got it on ${channel.label}`);
        // Let queued answers go out first, so the summary counts every reply.
        this.migration.stopPush();
        void this.migration.onIdle().then(() => {
          const summary: SourceSummary = this.migration.summarize(message.receivedmap);
          this.finished = true;
          channel.send(encode({ type: 'summary', ...summary }));
          this.emit('finished', summary);
        });
        return;
      }
      default:
        throw new ProtocolError(`expected request, start or finish, got ${message.type}`);
    }
  }

  private handshake(channel: WsChannel, hello: Extract<Message, { type: 'hello' }>): void {
    channel.label = safeLabel(hello.channel);
    if (hello.protocolVersion !== PROTOCOL_VERSION) {
      throw new HandshakeError(`expected protocol version ${PROTOCOL_VERSION}, got ${hello.protocolVersion}`);
    }
    if (!tokensEqual(this.options.token, hello.token)) {
      throw new HandshakeError(`expected a valid access token, got ${hello.token === '' ? 'none' : 'a wrong one'}`);
    }
    const { guestBytes, pageSize, totalPages } = this.image.layout;
    if (hello.guestBytes !== guestBytes || hello.pageSize !== pageSize) {
      throw new HandshakeError(
        `expected guest layout ${formatBytes(guestBytes)} in ${formatBytes(pageSize)} pages, got ${formatBytes(hello.guestBytes)} in ${formatBytes(hello.pageSize)} pages`,
      );
    }
    if (hello.role === ChannelRole.Main) {
      if (this.main) throw new HandshakeError(`expected one main channel, got a second one (${channel.label})`);
      this.main = channel;
    }
    channel.role = hello.role;
    channel.send(
      encode({
        type: 'welcome',
        protocolVersion: PROTOCOL_VERSION,
        guestBytes,
        pageSize,
        totalPages,
        imageDigest: this.image.digest,
        imageSeed: this.image.spec.seed,
        zeroFraction: this.image.spec.zeroFraction,
        linkDelayUs: this.link.spec.delayUs,
        linkBandwidthBps: this.link.spec.bandwidthBps,
      }),
    );
  }
}
