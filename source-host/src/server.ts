import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { AddressInfo } from 'node:net';
import { WebSocketServer, type WebSocket } from 'ws';
import {
  ChannelRole,
  HandshakeError,
  PROTOCOL_VERSION,
  PausedError,
  PostcopyError,
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
  /**
   * This process replaces a source that died (`--resume`): the migration
   * begins paused, with an empty sentmap, and waits for the destination to
   * resume it (the resume timer runs from listen).
   */
  resume?: boolean;
  /** How long a paused migration waits for a resume before the destination counts as lost (default 10 s). */
  resumeTimeoutMs?: number;
  /** Open connections at most, peers without a hello included; one more is sent ERR_POSTCOPY_BUSY (default 1024). */
  maxConnections?: number;
}

/** Server option defaults in one literal. */
export const SERVER_DEFAULTS = {
  handshakeTimeoutMs: 10_000,
  resumeTimeoutMs: 10_000,
  maxConnections: 1024,
} as const;

/**
 * Where the migration stands: `fresh` (no start yet), `active` (after start
 * or resume), `paused` (the main channel was lost before finish, or this
 * process was restarted with `--resume`: waiting for a resume), `finished`
 * (the summary went out), `lost` (the destination is gone for good:
 * `destination-lost` was emitted).
 */
export type MigrationState = 'fresh' | 'active' | 'paused' | 'finished' | 'lost';

/** The server is at its connection limit: retry later (close code 1013). */
export class BusyError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_BUSY', message);
  }
}

/** WebSocket close codes (RFC 6455 §7.4, IANA registry). */
const CLOSE_PROTOCOL_ERROR = 1002;
const CLOSE_POLICY_VIOLATION = 1008;
const CLOSE_TRY_AGAIN_LATER = 1013;

/** The close code a rejected peer gets: retry later, policy violation (handshake), or protocol error. */
export function closeCodeFor(err: Error): number {
  if (err instanceof PausedError || err instanceof BusyError) return CLOSE_TRY_AGAIN_LATER;
  if (err instanceof HandshakeError) return CLOSE_POLICY_VIOLATION;
  return CLOSE_PROTOCOL_ERROR;
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
 * - `paused` (reason): the main channel closed during the migration (after
 *   start, before finish): the migration pauses, the old fault channels are
 *   cut, and it waits `resumeTimeoutMs` for the destination to resume it
 *   (QEMU's postcopy-paused);
 * - `resumed` (pagesMarkedUnsent, restarted): the destination resumed a
 *   paused migration on a new main channel (QEMU's postcopy-recover);
 * - `destination-lost` (reason): the main channel closed before start, or a
 *   paused migration was not resumed in time;
 * - `rejected` (label, error): a peer was sent an error and disconnected.
 */
export class SourceServer extends EventEmitter {
  readonly migration: SourceMigration;
  private readonly wss: WebSocketServer;
  private main: WsChannel | undefined;
  private migrationState: MigrationState;
  /** Paused because this process was restarted (`--resume`) and not resumed since, rather than a lost connection. */
  private pausedByRestart: boolean;
  private resumeTimer: NodeJS.Timeout | undefined;
  private closing = false;
  /** Every open connection, with or without a hello (the connection limit counts them all). */
  private readonly connections = new Set<WsChannel>();
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
    this.pausedByRestart = options.resume === true;
    this.migrationState = this.pausedByRestart ? 'paused' : 'fresh';
    if (this.pausedByRestart) this.startResumeTimer();
    wss.on('connection', (ws) => this.accept(ws));
  }

  get state(): MigrationState {
    return this.migrationState;
  }

  /** Connections open now, with or without a hello (what the connection limit counts). */
  get openConnections(): number {
    return this.connections.size;
  }

  get resumeTimeoutMs(): number {
    return this.options.resumeTimeoutMs ?? SERVER_DEFAULTS.resumeTimeoutMs;
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
    // Channels closed from here on are this server's doing: no pause, no destination-lost.
    this.closing = true;
    clearTimeout(this.resumeTimer);
    this.migration.stop();
    this.link.stop();
    for (const ws of this.wss.clients) ws.terminate();
    return new Promise((resolve) => this.wss.close(() => resolve()));
  }

  private accept(ws: WebSocket): void {
    const channel = new WsChannel(ws, this.link);
    ws.binaryType = 'nodebuffer';
    ws.on('error', (err) => this.reject(channel, err));
    const max = this.options.maxConnections ?? SERVER_DEFAULTS.maxConnections;
    if (this.connections.size + 1 > max) {
      // Nothing it sends is read: it gets the error and the close behind it.
      ws.once('close', () => this.link.out.drop(channel));
      this.reject(channel, new BusyError(`expected at most ${max} connections, this would be ${this.connections.size + 1}`));
      return;
    }
    this.connections.add(channel);
    // Nothing is served before a valid hello, and nobody may hold a socket without one.
    const timeoutMs = this.options.handshakeTimeoutMs ?? SERVER_DEFAULTS.handshakeTimeoutMs;
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
    ws.on('close', () => {
      this.connections.delete(channel);
      this.link.out.drop(channel);
      this.link.in.drop(channel);
      if (channel === this.main) this.mainClosed();
    });
  }

  private mainClosed(): void {
    if (this.closing) return;
    switch (this.migrationState) {
      case 'finished':
        // The main channel stays taken: nobody takes over a finished migration.
        return;
      case 'fresh':
        // Died before start: there is nothing to resume.
        this.main = undefined;
        this.lose(`the destination's main channel closed before the migration started`);
        return;
      case 'active': {
        this.main = undefined;
        this.migrationState = 'paused';
        this.pausedByRestart = false;
        this.migration.pause();
        // The old session's fault channels go too: the destination reconnects
        // them after `resumed` and re-sends their pending requests. Their
        // answers still queued count as undeliverable. Peers without a hello
        // are left to the handshake timeout.
        for (const other of this.connections) {
          if (other.role === ChannelRole.Fault) other.ws.terminate();
        }
        this.emit('paused', `the destination's main channel closed before the migration finished`);
        this.startResumeTimer();
        return;
      }
      case 'paused':
      case 'lost':
        // A resume attempt that dropped: still paused, the timer keeps running.
        this.main = undefined;
        return;
    }
  }

  private startResumeTimer(): void {
    clearTimeout(this.resumeTimer);
    const ms = this.resumeTimeoutMs;
    const restarted = this.pausedByRestart;
    this.resumeTimer = setTimeout(() => {
      if (this.migrationState !== 'paused' || this.closing) return;
      this.lose(
        restarted
          ? `this source was restarted with --resume and the destination did not resume the migration within ${ms} ms`
          : `the destination's connection was lost during postcopy and it did not resume within ${ms} ms`,
      );
    }, ms);
    this.resumeTimer.unref();
  }

  /** The destination is gone for good. */
  private lose(reason: string): void {
    clearTimeout(this.resumeTimer);
    this.migrationState = 'lost';
    this.migration.stop();
    this.emit('destination-lost', reason);
  }

  private reject(channel: WsChannel, err: Error): void {
    // One error per peer: frames that were already on their way are ignored.
    if (channel.rejected) return;
    channel.rejected = true;
    const code = (err as { code?: string }).code ?? 'ERR_POSTCOPY';
    if (channel.isOpen) {
      const close = (): void => {
        // Try again later (1013) while paused or busy, policy violation (1008)
        // for handshake problems, protocol error (1002) otherwise.
        try {
          channel.ws.close(closeCodeFor(err), closeReason(err.message));
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
        // Only the new main channel can be open while paused (fault hellos are refused).
        if (this.migrationState === 'paused') throw new ProtocolError(`expected resume: the migration is paused, got a request`);
        void this.migration.request(channel, message.id, message.page);
        return;
      case 'start':
        if (channel.role !== ChannelRole.Main) throw new ProtocolError(`expected start on the main channel, got it on ${channel.label}`);
        if (this.migrationState === 'paused') throw new ProtocolError(`expected resume: the migration is paused (${this.pauseCause()})`);
        if (this.migrationState !== 'fresh') throw new ProtocolError(`expected start once, got it again (the migration is ${this.migrationState})`);
        this.migrationState = 'active';
        this.migration.preempt = message.preempt;
        this.migration.mainChannel = channel;
        if (message.push) this.migration.startPush(channel);
        return;
      case 'resume':
        if (channel.role !== ChannelRole.Main) throw new ProtocolError(`expected resume on the main channel, got it on ${channel.label}`);
        this.resume(channel, message);
        return;
      case 'finish': {
        if (channel.role !== ChannelRole.Main) throw new ProtocolError(`expected finish on the main channel, got it on ${channel.label}`);
        if (this.migrationState === 'paused') throw new ProtocolError(`expected resume: the migration is paused (${this.pauseCause()}), got finish`);
        // Let queued answers go out first, so the summary counts every reply.
        this.migration.stopPush();
        void this.migration.onIdle().then(() => {
          // The connection was lost meanwhile: the destination resumes and finishes again.
          if (channel !== this.main || !channel.isOpen) return;
          const summary: SourceSummary = this.migration.summarize(message.receivedmap);
          this.migrationState = 'finished';
          clearTimeout(this.resumeTimer);
          channel.send(encode({ type: 'summary', ...summary }));
          this.emit('finished', summary);
        });
        return;
      }
      default:
        // Worded as before resume existed: e2e/test/hostile-client.test.ts matches it.
        throw new ProtocolError(`expected request, start or finish, got ${message.type}`);
    }
  }

  private pauseCause(): string {
    return this.pausedByRestart ? 'this source was started with --resume' : 'its connection was lost';
  }

  private resume(channel: WsChannel, message: Extract<Message, { type: 'resume' }>): void {
    switch (this.migrationState) {
      case 'fresh':
        throw new ProtocolError(
          `expected start: this source has no migration to resume (start it with --resume to continue a migration whose source process died)`,
        );
      case 'paused':
        break;
      default:
        throw new ProtocolError(`expected resume only while the migration is paused, got it while it is ${this.migrationState}`);
    }
    const restarted = this.pausedByRestart;
    // Once the sentmap is reset and before the re-sent requested pages (on the
    // same channel): active again, and `resumed` goes out.
    const pagesMarkedUnsent = this.migration.resume(channel, message, (n) => {
      this.migrationState = 'active';
      this.pausedByRestart = false;
      clearTimeout(this.resumeTimer);
      this.resumeTimer = undefined;
      channel.send(encode({ type: 'resumed', pagesMarkedUnsent: n, restarted }));
    });
    this.emit('resumed', pagesMarkedUnsent, restarted);
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
    } else if (this.migrationState === 'paused') {
      throw new PausedError(`the migration is paused: expected the destination's main channel to resume it first`);
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
