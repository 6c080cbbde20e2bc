import type { ClientRequest, IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import WebSocket from 'ws';
import {
  ChannelRole,
  ConnectionError,
  Keepalive,
  ProtocolError,
  REQUEST_BYTES,
  TurnCork,
  decode,
  decodeReplyFast,
  encode,
  encodeRequestInto,
  explainTlsError,
  makeLayout,
  maxDestFrameBytes,
  type ChannelRoleCode,
  type GuestLayout,
  type Message,
  type Reply,
  type TlsMaterial,
  type Welcome,
} from '@postcopy/shared/net';
import { expectWelcome, helloFor } from './hello.js';
import { MAX_REFUSAL_CHARS, printableRefusal } from './refusal.js';
import { Session } from './session.js';

export interface PageClientOptions {
  url: string;
  token: string;
  role: ChannelRoleCode;
  /** Label of the channel's owner (`main`, `vcpu3`, `resolver0`). */
  channel: string;
  /** The layout this destination expects; the source must agree. */
  guestBytes: number;
  pageSize: number;
  connectTimeoutMs?: number;
  /** Recovery: the connection survives the session's pauses (see {@link SessionFollowing}). */
  following?: SessionFollowing;
  /**
   * The migration's secret (from the main channel's welcome), presented in
   * the hello of every channel but the main channel that starts the
   * migration ('' there: it receives the secret).
   */
  secret: string;
  /** wss:// only: the CA to verify the source with, this host's client certificate, the name to expect. */
  tls?: ClientTls;
  /** Cut the connection when the source says nothing (not even a pong) for this long; 0 or absent = never. */
  keepaliveMs?: number;
  /** The keepalive cut a silent connection. */
  onKeepaliveTimeout?: (silentMs: number) => void;
}

/** How the destination speaks TLS to a wss:// source (PEM texts, so workers can get them in workerData). */
export interface ClientTls extends TlsMaterial {
  /** The name the source's certificate must hold, when it is not the host of the URL (`--tls-server-name`). */
  serverName?: string;
}

/**
 * A fault channel that follows the destination's {@link Session}: when the
 * session pauses it cuts its socket and keeps its pending requests; when the
 * session resumes it reconnects (with backoff) and replays them, with their
 * ids, on the new connection. Replies that arrive on a connection whose
 * session has ended are dropped (their requests stay pending and are
 * replayed), so each request is still answered exactly once.
 */
export interface SessionFollowing {
  session: Session;
  /** Give up (fail every pending request) when a reconnect takes longer. */
  reconnectTimeoutMs: number;
  /** This connection dropped while its session was current: whoever can pause the session must. */
  onLost: (err: Error, epoch: number) => void;
}

interface Pending {
  page: number;
  /** Went out on some connection (a replay of it counts as replayed). */
  sent: boolean;
  resolve: (reply: Reply) => void;
  reject: (err: Error) => void;
}

interface Opened {
  ws: WebSocket;
  welcome: Welcome;
  /** The connection's socket (from the upgrade), for {@link TurnCork}. */
  socket: Duplex;
}

/** How often a paused fault channel re-checks whether it was closed meanwhile (ms). */
const SESSION_POLL_MS = 250;

/**
 * One WebSocket connection from the destination to the source: handshake,
 * requests matched to their replies by id, and (on the main channel) a
 * callback for everything else the source sends.
 */
export class PageClient {
  readonly welcome: Welcome;
  readonly layout: GuestLayout;
  /** The socket of the current connection; undefined while cut (paused). */
  private ws: WebSocket | undefined;
  /** Requests sent in one turn leave in one write (the current connection's). */
  private cork: TurnCork | undefined;
  /** Session epoch the current connection belongs to. */
  private epoch: number;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closedError: Error | undefined;
  private closing = false;
  /** The current socket's error, if any (its close follows). */
  private socketError: Error | undefined;
  private readonly following: SessionFollowing | undefined;
  /** Messages that are not replies (pushed pages, complete, summary, error). */
  onMessage: (message: Message) => void = () => {};
  /** The connection ended for good (after close() too; not on a session pause). */
  onClose: (err: Error | undefined) => void = () => {};

  private constructor(
    opened: Opened,
    private readonly options: PageClientOptions,
  ) {
    this.welcome = opened.welcome;
    this.layout = makeLayout(opened.welcome.guestBytes, opened.welcome.pageSize);
    this.following = options.following;
    this.epoch = this.following?.session.epoch ?? 0;
    this.attach(opened);
    this.keepalive(opened.ws);
    if (this.following) {
      const following = this.following;
      void this.follow(following).catch((err: Error) => this.fail(err));
    }
  }

  /** The session this client follows, if any. */
  get session(): Session | undefined {
    return this.following?.session;
  }

  /**
   * Session epoch of the connection replies come from. Read it right after a
   * request's promise resolves: replies are delivered from the socket's
   * message task, and the epoch changes only in a later task (a reconnect).
   */
  get connectionEpoch(): number {
    return this.epoch;
  }

  private attach(opened: Opened): void {
    const ws = opened.ws;
    this.ws = ws;
    this.cork = new TurnCork(opened.socket);
    ws.on('message', (data: Buffer) => {
      if (ws === this.ws) this.receive(data);
    });
    ws.on('close', (code: number, reason: Buffer) => this.socketClosed(ws, code, reason));
    ws.on('error', (err) => {
      if (ws === this.ws) this.socketError = err;
    });
  }

  /** A dead link sends no reset: ping the source and cut the socket when it stays silent. */
  private keepalive(ws: WebSocket): void {
    const ms = this.options.keepaliveMs ?? 0;
    if (ms <= 0) return;
    new Keepalive(ws, ms, (silentMs) => {
      if (ws === this.ws) this.socketError = new Error(`the source said nothing for ${Math.round(silentMs)} ms (--keepalive-ms ${ms}): the link is down or the source is gone`);
      this.options.onKeepaliveTimeout?.(silentMs);
    });
  }

  private socketClosed(ws: WebSocket, code: number, reason: Buffer): void {
    if (ws !== this.ws) return; // a socket this client already cut
    this.ws = undefined;
    const err =
      this.closedError ??
      (this.socketError
        ? new ConnectionError(`connection to the source failed: ${this.socketError.message}`)
        : new ConnectionError(`connection to the source closed (code ${code}${reason.length ? `: ${reason.toString()}` : ''})`));
    this.socketError = undefined;
    if (this.following && !this.closing && !this.closedError) {
      // Recovery: keep the pending requests; follow() reconnects once the
      // session has paused and resumed. If the session is still current,
      // nobody knows yet that the connection is gone: say so.
      if (this.following.session.epoch === this.epoch) this.following.onLost(err, this.epoch);
      return;
    }
    this.closedError = err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    this.onClose(err);
  }

  /** Closed by the destination, or failed for good. */
  private get ended(): boolean {
    return this.closing || this.closedError !== undefined;
  }

  /** Cuts the socket without ending the client (a session pause). */
  private cut(): void {
    const ws = this.ws;
    this.ws = undefined;
    ws?.terminate();
  }

  /** Follows the session for the client's life: cut on a pause, reconnect and replay on a resume. */
  private async follow(following: SessionFollowing): Promise<void> {
    const session = following.session;
    while (!this.ended) {
      let now = await session.changed(this.epoch, SESSION_POLL_MS);
      if (now === this.epoch) continue;
      this.cut();
      while (Session.isPaused(now) && !this.ended) now = await session.changed(now, SESSION_POLL_MS);
      if (this.ended) return;
      await this.reconnect(following, now);
    }
  }

  private async reconnect(following: SessionFollowing, epoch: number): Promise<void> {
    const deadline = performance.now() + following.reconnectTimeoutMs;
    let delay = 20;
    for (;;) {
      if (this.ended || following.session.epoch !== epoch) return;
      try {
        const opened = await PageClient.open(this.options);
        if (this.ended || following.session.epoch !== epoch) {
          opened.ws.terminate();
          return;
        }
        this.epoch = epoch;
        this.attach(opened);
        this.keepalive(opened.ws);
        this.replay(following.session);
        return;
      } catch (err) {
        if (performance.now() + delay > deadline) {
          throw new ConnectionError(
            `${this.options.channel}: could not reconnect to the source at ${this.options.url} within ${following.reconnectTimeoutMs} ms after the migration resumed: ${(err as Error).message}`,
          );
        }
        await new Promise((resolve) => setTimeout(resolve, delay));
        delay = Math.min(delay * 2, 500);
      }
    }
  }

  /** Re-sends every pending request on the new connection, with its id. */
  private replay(session: Session): void {
    let replayed = 0;
    this.cork?.hold();
    for (const [id, p] of this.pending) {
      if (p.sent) replayed++;
      p.sent = true;
      this.ws!.send(encode({ type: 'request', id, page: p.page }));
    }
    if (replayed > 0) session.countReplayed(replayed);
  }

  /** Ends the client with `err`: every pending request fails. */
  private fail(err: Error): void {
    this.closedError ??= err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    this.cut();
    this.onClose(err);
  }

  static async connect(options: PageClientOptions): Promise<PageClient> {
    return new PageClient(await PageClient.open(options), options);
  }

  /** Opens a socket and completes the handshake. */
  private static open(options: PageClientOptions): Promise<Opened> {
    return new Promise((resolve, reject) => {
      let settled = false;
      const fail = (err: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        ws.terminate();
        reject(err);
      };
      let ws: WebSocket;
      const tls = options.tls;
      try {
        ws = new WebSocket(options.url, {
          perMessageDeflate: false,
          maxPayload: maxDestFrameBytes(options.pageSize, options.guestBytes / options.pageSize),
          handshakeTimeout: options.connectTimeoutMs ?? 10_000,
          ...(tls?.ca !== undefined ? { ca: tls.ca } : {}),
          ...(tls?.cert !== undefined && tls.key !== undefined ? { cert: tls.cert, key: tls.key } : {}),
          ...(tls?.serverName !== undefined ? { servername: tls.serverName } : {}),
        });
      } catch (err) {
        reject(new ConnectionError(`expected a source URL like ws://127.0.0.1:PORT or wss://HOST:PORT, got ${JSON.stringify(options.url)} (${(err as Error).message})`));
        return;
      }
      ws.binaryType = 'nodebuffer';
      let socket: Duplex | undefined;
      ws.once('upgrade', (res: IncomingMessage) => (socket = res.socket));
      const timer = setTimeout(
        () => fail(new ConnectionError(`no answer from the source at ${options.url} within ${options.connectTimeoutMs ?? 10_000} ms`)),
        options.connectTimeoutMs ?? 10_000,
      );
      ws.once('error', (err: NodeJS.ErrnoException) => {
        const tlsProblem = explainTlsError(err, options.url, tls?.serverName);
        if (tlsProblem) fail(new ConnectionError(`TLS with the source at ${options.url} failed: ${tlsProblem}`));
        else if (options.url.startsWith('ws:') && (err.code === 'ECONNRESET' || /socket hang up/.test(err.message))) {
          // A TLS server reads an HTTP request as a broken handshake and drops the connection.
          fail(new ConnectionError(`the source at ${options.url} dropped the connection before the WebSocket upgrade (${err.code ?? err.message}): if it listens on wss://, expected --source wss://... (and --tls-ca)`));
        } else fail(new ConnectionError(`cannot reach the source at ${options.url}: ${err.code ?? ''} ${err.message}`.trim()));
      });
      ws.once('unexpected-response', (_req: ClientRequest, res: IncomingMessage) => {
        // An HTTP answer instead of the upgrade: a source refusing this
        // destination before any WebSocket (under --tls-verify-peer, a client
        // certificate it does not accept: 403), which says why in the body.
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          if (body.length < MAX_REFUSAL_CHARS) body += chunk;
        });
        const done = (): void => {
          const said = printableRefusal(body);
          fail(new ConnectionError(`the source at ${options.url} refused this destination (HTTP ${res.statusCode ?? '?'}${res.statusMessage ? ` ${printableRefusal(res.statusMessage)}` : ''})${said ? `: ${said}` : ''}`));
        };
        res.once('end', done);
        res.once('error', done);
        res.once('close', done);
      });
      ws.once('close', (code, reason) =>
        fail(new ConnectionError(`the source at ${options.url} closed the connection during the handshake (code ${code}${reason.length ? `: ${reason.toString()}` : ''})`)),
      );
      ws.once('open', () => ws.send(encode(helloFor(options))));
      ws.once('message', (data: Buffer) => {
        let welcome: Welcome;
        try {
          welcome = expectWelcome(data, options);
        } catch (err) {
          fail(err as Error);
          return;
        }
        if (!socket) {
          fail(new ConnectionError(`expected the WebSocket upgrade to give its socket, got none`));
          return;
        }
        settled = true;
        clearTimeout(timer);
        ws.removeAllListeners();
        resolve({ ws, welcome, socket });
      });
    });
  }

  /** Asks for `page`; resolves with the one reply the source owes. */
  request(page: number): Promise<Reply> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId;
    this.nextId = id === 0xffffffff ? 1 : id + 1;
    return new Promise<Reply>((resolve, reject) => {
      const ws = this.ws;
      // While paused (or cut) the request waits: it goes out as a replay after the resume.
      const live = ws !== undefined && ws.readyState === ws.OPEN && (!this.following || this.following.session.epoch === this.epoch);
      this.pending.set(id, { page, sent: live, resolve, reject });
      if (live) {
        this.cork!.hold();
        // The request frame without msgpackr, as the blocking channel writes it; a fresh
        // buffer, as ws may queue it unmasked and uncopied (an all-zero mask) until the cork's write.
        const frame = Buffer.allocUnsafe(REQUEST_BYTES);
        encodeRequestInto(frame, id, page);
        ws.send(frame);
      }
    });
  }

  get pendingRequests(): number {
    return this.pending.size;
  }

  send(message: Message): void {
    this.ws?.send(encode(message));
  }

  close(): void {
    this.closing = true;
    this.closedError ??= new ConnectionError('connection closed by the destination');
    if (this.ws) this.ws.close(1000);
    else this.onClose(this.closedError);
  }

  /** Drops the connection at once, without a close handshake and without calling onClose (a cut). */
  terminate(): void {
    this.closing = true;
    this.closedError ??= new ConnectionError('connection cut by the destination');
    this.onClose = () => {};
    this.onMessage = () => {};
    this.cut();
  }

  private receive(data: Buffer): void {
    let message: Message;
    try {
      // A reply (the hot path) without msgpackr; anything else, or a reply it does not take, through decode().
      message = decodeReplyFast(data, this.layout) ?? decode(data, { layout: this.layout });
    } catch (err) {
      this.abort(err as Error);
      return;
    }
    if ((message.type === 'page' || message.type === 'zero-page') && message.id === 0) {
      // A requested page sent on the main channel (no preempt): not a reply to this channel.
      this.onMessage(message);
      return;
    }
    if (message.type === 'page' || message.type === 'zero-page' || message.type === 'already-sent' || message.type === 'sent-on-main') {
      if (this.following && this.following.session.epoch !== this.epoch) {
        // A reply from a session that has ended: its request stays pending and is replayed.
        this.following.session.countDropped();
        return;
      }
      const pending = this.pending.get(message.id);
      if (!pending) {
        this.abort(new ProtocolError(`${message.type} for request id ${message.id}, which this channel never sent or already had answered`));
        return;
      }
      if (pending.page !== message.page) {
        this.abort(new ProtocolError(`${message.type} for request ${message.id}: expected page ${pending.page}, got page ${message.page}`));
        return;
      }
      this.pending.delete(message.id);
      pending.resolve(message);
      return;
    }
    this.onMessage(message);
  }

  /** A broken source: fail every pending request with `err` and drop the connection. */
  private abort(err: Error): void {
    this.closedError = err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    this.ws?.terminate();
  }
}

export { ChannelRole };
