import WebSocket from 'ws';
import {
  ChannelRole,
  ConnectionError,
  HandshakeError,
  PROTOCOL_VERSION,
  ProtocolError,
  decode,
  encode,
  formatBytes,
  makeLayout,
  maxFrameBytes,
  type ChannelRoleCode,
  type GuestLayout,
  type Message,
  type Reply,
  type Welcome,
} from '@postcopy/shared';

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
}

interface Pending {
  page: number;
  resolve: (reply: Reply) => void;
  reject: (err: Error) => void;
}

/**
 * One WebSocket connection from the destination to the source: handshake,
 * requests matched to their replies by id, and (on the main channel) a
 * callback for everything else the source sends.
 */
export class PageClient {
  readonly welcome: Welcome;
  readonly layout: GuestLayout;
  private readonly ws: WebSocket;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closedError: Error | undefined;
  /** Messages that are not replies (pushed pages, complete, summary, error). */
  onMessage: (message: Message) => void = () => {};
  /** The connection ended (after close() too). */
  onClose: (err: Error | undefined) => void = () => {};

  private constructor(ws: WebSocket, welcome: Welcome) {
    this.ws = ws;
    this.welcome = welcome;
    this.layout = makeLayout(welcome.guestBytes, welcome.pageSize);
    ws.on('message', (data: Buffer) => this.receive(data));
    ws.on('close', (code: number, reason: Buffer) => {
      const err = this.closedError ?? new ConnectionError(`connection to the source closed (code ${code}${reason.length ? `: ${reason.toString()}` : ''})`);
      this.closedError = err;
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
      this.onClose(err);
    });
    ws.on('error', (err) => {
      this.closedError ??= new ConnectionError(`connection to the source failed: ${err.message}`);
    });
  }

  static connect(options: PageClientOptions): Promise<PageClient> {
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
      try {
        ws = new WebSocket(options.url, {
          perMessageDeflate: false,
          maxPayload: maxFrameBytes(options.pageSize, options.guestBytes / options.pageSize),
          handshakeTimeout: options.connectTimeoutMs ?? 10_000,
        });
      } catch (err) {
        reject(new ConnectionError(`expected a source URL like ws://127.0.0.1:PORT, got ${JSON.stringify(options.url)} (${(err as Error).message})`));
        return;
      }
      ws.binaryType = 'nodebuffer';
      const timer = setTimeout(
        () => fail(new ConnectionError(`no answer from the source at ${options.url} within ${options.connectTimeoutMs ?? 10_000} ms`)),
        options.connectTimeoutMs ?? 10_000,
      );
      ws.once('error', (err: NodeJS.ErrnoException) =>
        fail(new ConnectionError(`cannot reach the source at ${options.url}: ${err.code ?? ''} ${err.message}`.trim())),
      );
      ws.once('close', (code, reason) =>
        fail(new ConnectionError(`the source at ${options.url} closed the connection during the handshake (code ${code}${reason.length ? `: ${reason.toString()}` : ''})`)),
      );
      ws.once('open', () => {
        ws.send(
          encode({
            type: 'hello',
            protocolVersion: PROTOCOL_VERSION,
            token: options.token,
            role: options.role,
            guestBytes: options.guestBytes,
            pageSize: options.pageSize,
            channel: options.channel,
          }),
        );
      });
      ws.once('message', (data: Buffer) => {
        let message: Message;
        try {
          message = decode(data);
        } catch (err) {
          fail(new HandshakeError(`the source's first message is not a valid welcome: ${(err as Error).message}`));
          return;
        }
        if (message.type === 'error') {
          fail(new HandshakeError(`the source refused the handshake: ${message.message}`));
          return;
        }
        if (message.type !== 'welcome') {
          fail(new HandshakeError(`expected welcome from the source, got ${message.type}`));
          return;
        }
        if (message.protocolVersion !== PROTOCOL_VERSION) {
          fail(new HandshakeError(`expected protocol version ${PROTOCOL_VERSION}, the source speaks ${message.protocolVersion}`));
          return;
        }
        if (
          message.guestBytes !== options.guestBytes ||
          message.pageSize !== options.pageSize ||
          message.totalPages !== message.guestBytes / message.pageSize
        ) {
          fail(
            new HandshakeError(
              `expected guest layout ${formatBytes(options.guestBytes)} in ${formatBytes(options.pageSize)} pages, the source has ${formatBytes(message.guestBytes)} in ${formatBytes(message.pageSize)} pages (${message.totalPages} pages)`,
            ),
          );
          return;
        }
        settled = true;
        clearTimeout(timer);
        ws.removeAllListeners();
        resolve(new PageClient(ws, message));
      });
    });
  }

  /** Asks for `page`; resolves with the one reply the source owes. */
  request(page: number): Promise<Reply> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId;
    this.nextId = id === 0xffffffff ? 1 : id + 1;
    return new Promise<Reply>((resolve, reject) => {
      this.pending.set(id, { page, resolve, reject });
      this.ws.send(encode({ type: 'request', id, page }));
    });
  }

  get pendingRequests(): number {
    return this.pending.size;
  }

  send(message: Message): void {
    this.ws.send(encode(message));
  }

  close(): void {
    this.closedError ??= new ConnectionError('connection closed by the destination');
    this.ws.close(1000);
  }

  private receive(data: Buffer): void {
    let message: Message;
    try {
      message = decode(data, { layout: this.layout });
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
    this.ws.terminate();
  }
}

export { ChannelRole };
