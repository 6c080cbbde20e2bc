import { EventEmitter } from 'node:events';
import type { IncomingMessage, OutgoingHttpHeaders } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer, type WebSocket } from 'ws';
import {
  ChannelRole,
  HandshakeError,
  Keepalive,
  PROTOCOL_VERSION,
  PUSH_UPGRADE,
  PausedError,
  PostcopyError,
  ProtocolError,
  TurnCork,
  decode,
  decodeRequestFast,
  encode,
  encodePageReplyHeaderInto,
  formatBytes,
  pageReplyHeaderBytes,
  PAGE_REPLY_HEADER_BYTES,
  maxFrameBytes,
  type Message,
} from '@postcopy/shared';
import { admit, generateSecret, tokensEqual, type AdmissionState } from './access.js';
import { MigrationController, type ControllerOptions } from './controller.js';
import type { GuestImage } from './image.js';
import type { SourceState } from './lifecycle.js';
import { Link, NO_LINK, type LinkSpec } from './link.js';
import { listen, type Listener, type ListenerTls } from './listener.js';
import type { Channel, MigrationOptions, SourceMigration } from './migration.js';
import { SourcePushChannel, isPushUpgrade } from './push-channel.js';
import type { Admission } from './access.js';
import { SERVER_DEFAULTS } from './defaults.js';
import { FRAME_HEADER_BYTES, binaryFrameHeaderInto } from './ws-frame.js';

export { generateToken, tokensEqual } from './access.js';

export interface SourceServerOptions {
  host: string;
  port: number;
  token: string;
  migration?: Partial<MigrationOptions>;
  /** How the migration runs (default postcopy) and, for precopy, its guest and decisions. */
  mode?: ControllerOptions['mode'];
  precopy?: ControllerOptions['precopy'];
  guest?: ControllerOptions['guest'];
  /** Testing only: the dirty log forgets every Nth dirty bit. */
  loseDirtyBitsEvery?: number;
  /** The guest's assigned devices (devices/). */
  devices?: ControllerOptions['devices'];
  /** The source's warm-up before this server listened (warm-up.ts), for the summary. */
  warmUp?: { requests: number; ms: number };
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
  /** Listen on wss:// with these (the source's certificate, key, and the CA of client certificates). */
  tls?: ListenerTls;
  /**
   * The migration's secret, for a source restarted with `--resume` (read
   * from its predecessor's `--secret-file`); a fresh source makes its own.
   */
  secret?: string;
  /** Cut the main channel (a pause) when the destination has said nothing, not even a pong, for this long; 0 = never (default 10 s). */
  keepaliveMs?: number;
  /** Testing only: fault channels need not present the migration's secret (see access.ts). */
  unsafeUnboundChannels?: boolean;
}

export { SERVER_DEFAULTS };

/** Where the migration stands: QEMU's MigrationStatus names (see lifecycle.ts). */
export type MigrationState = SourceState;

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
  /** Its hello presented the migration's secret (a main channel that may resume). */
  presentedSecret = false;
  /** Sent an error: nothing more is read from it, and it closes once the error has gone out. */
  rejected = false;
  /** Frames sent in one turn (or poll: see TurnCork) leave in one write. */
  private readonly cork: TurnCork;
  constructor(
    readonly ws: WebSocket,
    private readonly link: Link,
    private readonly socket: Duplex,
  ) {
    this.cork = new TurnCork(socket);
  }
  get isOpen(): boolean {
    return this.ws.readyState === this.ws.OPEN;
  }
  /** Bytes queued on the emulated link and in the socket. */
  get bufferedAmount(): number {
    return this.ws.bufferedAmount + this.link.out.queuedBytes(this);
  }
  send(frame: Uint8Array, sent?: (err?: Error) => void, batch: 'turn' | 'poll' = 'turn'): void {
    this.link.out.send(this, frame.length, () => {
      if (this.isOpen) {
        this.cork.hold(batch === 'poll' ? 'poll' : 'tick');
        this.ws.send(frame, { binary: true }, sent);
      }
      else sent?.(new Error('channel closed'));
    });
  }
  /**
   * The reply `{ type: 'page', id, page, data }` as a frame of our own: the
   * WebSocket and msgpack headers in one small buffer, then `data` from the
   * image as it lies; under the turn's cork both leave in the same writev
   * as the other frames. ws.send takes one buffer, so encode() first copied
   * every page into msgpackr's (a kvm-exit run at 8 vCPUs: 6.6 % of the
   * source's samples in that copy). The frame is one ws's clients read
   * like any other (ws-frame.ts), and its message decodes as encode()'s
   * does (codec.ts's encodePageReplyHeaderInto, with uint32 where encode()
   * may pick narrower integers). ws writes each message to the socket
   * whole when it neither compresses (perMessageDeflate is off) nor reads
   * a Blob (never sent here), so its frames and ours never interleave. The
   * page's bytes are read when the socket writes them, not now: pages are
   * requested only after the switchover (the controller refuses earlier
   * requests), when the guest no longer changes the image, which the push
   * channel's records rely on too.
   */
  sendPage(id: number, page: number, data: Uint8Array, batch: 'turn' | 'poll' = 'turn'): void {
    const head = Buffer.allocUnsafe(FRAME_HEADER_BYTES + PAGE_REPLY_HEADER_BYTES);
    const payload = pageReplyHeaderBytes(data.length) + data.length;
    let n = binaryFrameHeaderInto(head, 0, payload);
    n += encodePageReplyHeaderInto(head, n, id, page, data.length);
    this.link.out.send(this, payload, () => {
      if (!this.isOpen) return;
      this.cork.hold(batch === 'poll' ? 'poll' : 'tick');
      this.socket.write(head.subarray(0, n));
      this.socket.write(data);
    });
  }
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
 * - `rejected` (label, error): a peer was sent an error and disconnected, or
 *   was cut before it became a WebSocket (a failed TLS handshake, a client
 *   certificate refused, no upgrade in time: listener.ts);
 * - `destination-done`: the main channel closed after the summary (the
 *   destination has all it wanted, page hashes included);
 * - `keepalive-timeout` (silentMs): the main channel was silent for longer
 *   than `keepaliveMs` (a dead link sends no close) and was cut: a pause.
 * - and the controller's: `cancelled` (reason: the connection was lost
 *   during precopy), `failed` (error: precopy did not converge),
 *   `switchover`, `running`, `state` (see controller.ts).
 */
export class SourceServer extends EventEmitter {
  /** The migration's phases and what happens in each (lifecycle.ts, controller.ts). */
  readonly controller: MigrationController;
  readonly migration: SourceMigration;
  private readonly wss: WebSocketServer;
  private main: WsChannel | undefined;
  private closing = false;
  /** Every open connection, with or without a hello (the connection limit counts them all). */
  private readonly connections = new Set<WsChannel>();
  /** Push channels (push-channel.ts), with or without a hello: counted in the connection limit too. */
  private readonly pushChannels = new Set<SourcePushChannel>();
  readonly link: Link;
  /** The migration's secret (see access.ts): every channel but the first main one must present it. */
  readonly secret: string;
  /** The secret went to a main channel (or was inherited with --resume): the migration exists. */
  private secretIssued: boolean;
  /** Times the main channel's keepalive found the destination silent. */
  keepaliveTimeouts = 0;

  private constructor(
    readonly image: GuestImage,
    private readonly options: SourceServerOptions,
    private readonly listener: Listener,
    wss: WebSocketServer,
  ) {
    super();
    const restarted = options.resume === true;
    if (restarted && options.secret === undefined) {
      throw new RangeError('a source started with --resume needs the secret of the migration it resumes (options.secret)');
    }
    this.controller = new MigrationController(image, {
      mode: options.mode ?? 'postcopy',
      ...(options.migration ? { migration: options.migration } : {}),
      ...(options.precopy ? { precopy: options.precopy } : {}),
      ...(options.guest ? { guest: options.guest } : {}),
      ...(options.loseDirtyBitsEvery !== undefined ? { loseDirtyBitsEvery: options.loseDirtyBitsEvery } : {}),
      ...(options.devices ? { devices: options.devices } : {}),
      restarted,
      resumeTimeoutMs: options.resumeTimeoutMs ?? SERVER_DEFAULTS.resumeTimeoutMs,
    });
    // The old session's fault channels go when the migration pauses: the
    // destination reconnects them after `resumed` and re-sends their pending
    // requests (their answers still queued count as undeliverable). Peers
    // without a hello are left to the handshake timeout. Before `paused` is
    // heard elsewhere, so a listener sees them gone.
    this.controller.on('paused', () => this.cutFaultChannels());
    this.controller.on('cancelled', () => this.cutFaultChannels());
    for (const event of ['paused', 'resumed', 'destination-lost', 'cancelled', 'failed', 'switchover', 'running', 'finished', 'state']) {
      this.controller.on(event, (...args: unknown[]) => this.emit(event, ...args));
    }
    this.migration = this.controller.migration;
    this.link = new Link(options.link ?? NO_LINK);
    this.wss = wss;
    this.secret = options.secret ?? generateSecret();
    this.secretIssued = restarted;
    wss.on('connection', (ws, req) => {
      // verifyClient (in listen) already refused a peer whose client
      // certificate is not accepted; this is the second lock on that door.
      if (listener.refusal(req.socket) !== undefined) {
        ws.terminate();
        return;
      }
      listener.upgraded(req.socket);
      this.accept(ws, req.socket);
    });
  }

  get state(): MigrationState {
    return this.controller.state;
  }

  /** Connections open now, with or without a hello (what the connection limit counts). */
  get openConnections(): number {
    return this.connections.size + this.pushChannels.size;
  }

  get resumeTimeoutMs(): number {
    return this.options.resumeTimeoutMs ?? SERVER_DEFAULTS.resumeTimeoutMs;
  }

  static async listen(image: GuestImage, options: SourceServerOptions): Promise<SourceServer> {
    let server: SourceServer | undefined;
    const listener = await listen({
      host: options.host,
      port: options.port,
      tls: options.tls,
      handshakeTimeoutMs: options.handshakeTimeoutMs ?? SERVER_DEFAULTS.handshakeTimeoutMs,
      onRejected: (peer, reason) => server?.emit('rejected', peer, new HandshakeError(reason)),
    });
    const wss = new WebSocketServer({
      // Upgrades are routed below: push channels here, WebSockets to ws.
      noServer: true,
      perMessageDeflate: false,
      maxPayload: maxFrameBytes(image.layout.pageSize, image.layout.totalPages),
      // Under --tls-verify-peer, a peer whose client certificate is not
      // accepted gets a 403 saying why instead of a WebSocket (listener.ts).
      verifyClient: (info: { req: IncomingMessage }, done: (ok: boolean, code?: number, message?: string, headers?: OutgoingHttpHeaders) => void) => {
        const reason = listener.refusal(info.req.socket);
        if (reason === undefined) done(true);
        else done(false, 403, reason, { 'Content-Type': 'text/plain; charset=utf-8' });
      },
    });
    server = new SourceServer(image, options, listener, wss);
    const created = server;
    listener.server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      if (isPushUpgrade(req)) created.acceptPush(req, socket, head);
      else wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
    });
    return server;
  }

  /** `ws://HOST:PORT`, or `wss://HOST:PORT` with TLS (IPv6 in brackets). */
  get url(): string {
    return this.listener.url;
  }

  close(): Promise<void> {
    // Channels closed from here on are this server's doing: no pause, no destination-lost.
    this.closing = true;
    void this.controller.close();
    this.link.stop();
    for (const ws of this.wss.clients) ws.terminate();
    for (const push of this.pushChannels) push.destroy();
    return new Promise((resolve) => {
      this.wss.close(() => {
        this.listener.server.close(() => resolve());
        // Sockets that never became WebSockets (a TLS or HTTP handshake in progress).
        this.listener.server.closeAllConnections();
        this.listener.destroyAll();
      });
    });
  }

  /** A push channel's upgrade (push-channel.ts): its hello is checked like every channel's. */
  private acceptPush(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    const refused = this.listener.refusal(req.socket);
    if (refused !== undefined) {
      socket.end(`HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n${refused}\n`);
      return;
    }
    this.listener.upgraded(req.socket);
    const channel = new SourcePushChannel(
      socket,
      head,
      (c, hello) => this.pushHello(c, hello),
      (c, err) => this.emit('rejected', c.label, err),
    );
    const max = this.options.maxConnections ?? SERVER_DEFAULTS.maxConnections;
    if (this.openConnections + 1 > max) {
      channel.reject(new BusyError(`expected at most ${max} connections, this would be ${this.openConnections + 1}`));
      return;
    }
    this.pushChannels.add(channel);
    const timeoutMs = this.options.handshakeTimeoutMs ?? SERVER_DEFAULTS.handshakeTimeoutMs;
    const handshakeTimer = setTimeout(() => {
      if (!channel.admitted) channel.reject(new HandshakeError(`expected hello within ${timeoutMs} ms, got none`));
    }, timeoutMs);
    handshakeTimer.unref();
    void channel.closed.then(() => {
      clearTimeout(handshakeTimer);
      this.pushChannels.delete(channel);
      if (channel.admitted) this.controller.pushStreamClosed(channel);
    });
  }

  private pushHello(channel: SourcePushChannel, hello: Extract<Message, { type: 'hello' }>): void {
    channel.label = safeLabel(hello.channel);
    if (hello.role !== ChannelRole.Push) throw new HandshakeError(`expected a push channel's hello (role ${ChannelRole.Push}) on a ${PUSH_UPGRADE} stream, got role ${hello.role}`);
    this.checkHello(channel.label, hello);
    channel.admitted = true;
    channel.send(this.welcomeFor({ kind: 'fault' }));
    this.controller.attachPushStream(channel);
  }

  private accept(ws: WebSocket, socket: Duplex): void {
    const channel = new WsChannel(ws, this.link, socket);
    ws.binaryType = 'nodebuffer';
    ws.on('error', (err) => this.reject(channel, err));
    const max = this.options.maxConnections ?? SERVER_DEFAULTS.maxConnections;
    if (this.openConnections + 1 > max) {
      // Nothing it sends is read: it gets the error and the close behind it.
      ws.once('close', () => this.link.out.drop(channel));
      this.reject(channel, new BusyError(`expected at most ${max} connections, this would be ${this.openConnections + 1}`));
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
          // After the hello, a request (the hot path) without msgpackr; anything else, or a request it does not take, through decode().
          const layout = this.image.layout;
          const message = channel.role === undefined ? decode(data) : (decodeRequestFast(data, layout) ?? decode(data, { layout }));
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
    // After the summary the main channel stays taken: nobody takes over a finished migration.
    if (this.controller.lifecycle.ended) {
      this.emit('destination-done');
      return;
    }
    this.main = undefined;
    this.controller.mainLost(`the destination's main channel closed before the migration finished`);
  }

  private cutFaultChannels(): void {
    for (const other of this.connections) {
      if (other.role === ChannelRole.Fault) other.ws.terminate();
    }
    // Push channels too: records of the old session stop where they are (the resume's receivedmap says what arrived).
    for (const push of this.pushChannels) push.destroy();
  }

  /** Cuts the main channel when the destination goes silent (a dead link closes nothing). */
  private watchMain(channel: WsChannel): void {
    const ms = this.options.keepaliveMs ?? SERVER_DEFAULTS.keepaliveMs;
    if (ms <= 0) return;
    new Keepalive(channel.ws, ms, (silentMs) => {
      this.keepaliveTimeouts++;
      this.emit('keepalive-timeout', silentMs);
    });
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
    const main = (what: string): void => {
      if (channel.role !== ChannelRole.Main) throw new ProtocolError(`expected ${what} on the main channel, got it on ${channel.label}`);
    };
    switch (message.type) {
      case 'request':
        this.controller.request(channel, message.id, message.page);
        return;
      case 'start':
        main('start');
        this.controller.start(channel, message);
        return;
      case 'resume':
        main('resume');
        // A resume is the migration's own destination coming back: only a
        // main channel whose hello presented the secret can get here while
        // paused (admit() refuses the rest), and this says so where it matters.
        if (this.controller.lifecycle.isPaused && !channel.presentedSecret) {
          throw new ProtocolError(`expected resume only on a main channel that presented the migration's secret, got it on ${channel.label}`);
        }
        this.controller.resume(channel, message);
        return;
      case 'finish':
        main('finish');
        this.controller.finish(channel, message.receivedmap, () => this.keepaliveTimeouts, this.options.warmUp);
        return;
      case 'running':
        main('running');
        this.controller.running();
        return;
      case 'precopy-synced':
        main('precopy-synced');
        this.controller.precopySynced(message.seq);
        return;
      case 'hash-request':
        main('hash-request');
        this.controller.hashRequest(channel);
        return;
      case 'devices-ready':
      case 'switchover-ack':
        main(message.type);
        this.controller.deviceAnswer(message);
        return;
      case 'error':
        main('error');
        this.controller.peerError(message);
        return;
      default:
        // Worded as before resume existed: e2e/test/hostile-client.test.ts matches it.
        throw new ProtocolError(`expected request, start or finish, got ${message.type}`);
    }
  }

  /** Where the migration stands, for admit(). */
  private admission(label: string): AdmissionState {
    const lifecycle = this.controller.lifecycle;
    const state = lifecycle.state;
    const phase: AdmissionState['phase'] = lifecycle.ended
      ? 'ended'
      : lifecycle.isPaused
        ? 'paused'
        : state === 'setup'
          ? 'fresh'
          : lifecycle.beforeSwitchover
            ? 'precopy'
            : 'running';
    const endedAs = state === 'cancelled' ? 'was cancelled' : state === 'failed' ? 'failed' : 'finished';
    return {
      phase,
      endedAs,
      hasMain: this.main !== undefined,
      secretIssued: this.secretIssued,
      secret: this.secret,
      label,
      unbound: this.options.unsafeUnboundChannels === true,
    };
  }

  /**
   * The checks every channel's hello passes (version, token, layout, the
   * migration's secret: admit()); throws a HandshakeError (or PausedError)
   * saying what was expected. Returns what the channel joins as.
   */
  private checkHello(label: string, hello: Extract<Message, { type: 'hello' }>): Admission {
    if (hello.protocolVersion !== PROTOCOL_VERSION) {
      throw new HandshakeError(`expected protocol version ${PROTOCOL_VERSION}, got ${hello.protocolVersion}`);
    }
    if (!tokensEqual(this.options.token, hello.token)) {
      throw new HandshakeError(`expected a valid access token, got ${hello.token === '' ? 'none' : 'a wrong one'}`);
    }
    const { guestBytes, pageSize } = this.image.layout;
    if (hello.guestBytes !== guestBytes || hello.pageSize !== pageSize) {
      throw new HandshakeError(
        `expected guest layout ${formatBytes(guestBytes)} in ${formatBytes(pageSize)} pages, got ${formatBytes(hello.guestBytes)} in ${formatBytes(hello.pageSize)} pages`,
      );
    }
    const admission = admit(hello, this.admission(label));
    if (admission.kind === 'fault' && this.controller.lifecycle.isPaused) {
      throw new PausedError(`the migration is paused: expected the destination's main channel to resume it first`);
    }
    return admission;
  }

  private welcomeFor(admission: Admission): Message {
    const { guestBytes, pageSize, totalPages } = this.image.layout;
    return {
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
      // Only the main channel that starts the migration learns the secret; nobody gets it echoed.
      secret: admission.kind === 'new-main' ? this.secret : '',
      mode: this.controller.mode,
    };
  }

  private handshake(channel: WsChannel, hello: Extract<Message, { type: 'hello' }>): void {
    channel.label = safeLabel(hello.channel);
    if (hello.role === ChannelRole.Push) {
      throw new HandshakeError(`expected a main or fault channel's hello on a WebSocket, got a push channel's (role ${ChannelRole.Push}: those upgrade to ${PUSH_UPGRADE})`);
    }
    const admission = this.checkHello(channel.label, hello);
    switch (admission.kind) {
      case 'new-main':
        this.main = channel;
        this.secretIssued = true;
        break;
      case 'resume-main': {
        const old = this.main;
        if (admission.takeover && old) {
          // The destination holds the secret and opens a new main channel: it
          // has lost the old one, whose link may be dead without a close
          // reaching us. Let go of it now instead of refusing until our
          // keepalive notices.
          this.main = undefined;
          old.ws.terminate();
          this.controller.mainLost(`the destination opened a new main channel (${channel.label}): it lost the old one`);
        }
        this.main = channel;
        channel.presentedSecret = true;
        break;
      }
      case 'fault':
        break;
    }
    if (hello.role === ChannelRole.Main) this.watchMain(channel);
    channel.role = hello.role;
    channel.send(encode(this.welcomeFor(admission)));
  }
}
