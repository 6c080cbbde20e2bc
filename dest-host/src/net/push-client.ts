/**
 * The destination's end of a push channel (shared/push-stream.ts): a TCP
 * socket whose reads go where {@link PushRecordReader} says (Node's `onread`
 * with a buffer chosen per read), so a pushed run's bytes land in guest
 * memory, or the staging buffer they are COPYed from, with no copy of ours.
 *
 * Over TLS (a `wss://` source) the socket is a TLSSocket made by
 * `tls.connect`, which takes `onread` too ("If the socket option is
 * missing, incoming data is stored in a single buffer and passed to the
 * supplied callback", Node's tls.connect): its TLSWrap asks for a buffer
 * before each SSL_read and decrypts into it, no larger than asked, so the
 * decrypted bytes land where {@link PushClient.buffer} says, as on TCP,
 * with no `'data'` chunk allocated and copied. The TLS options are those of
 * every other channel (CA, server name, client certificate).
 *
 * The handshake is read exactly (the `101`, then the welcome's length, then
 * its bytes), so no read takes a byte of the first record.
 */
import { connect, isIP, type OnReadOpts, type Socket } from 'node:net';
import { connect as connectTls, type ConnectionOptions } from 'node:tls';
import {
  ChannelRole,
  ConnectionError,
  HandshakeError,
  PROTOCOL_VERSION,
  PUSH_UPGRADE,
  decode,
  encode,
  lengthPrefixed,
  MAX_PUSH_HANDSHAKE_BYTES,
  explainTlsError,
  type GuestLayout,
  type Message,
} from '@postcopy/shared/net';
import type { ClientTls } from './page-client.js';
import { PushRecordReader, type PrecopyPushPlacement, type PushPlacement } from './push-reader.js';

export interface PushClientOptions {
  /** The source's `ws://HOST:PORT`, or `wss://HOST:PORT` (then the channel runs over TLS, with {@link tls}). */
  url: string;
  /** wss:// only: the CA to verify the source with, this host's client certificate, the name to expect (as for every channel). */
  tls?: ClientTls;
  token: string;
  /** The migration's secret (a push channel presents it, like every channel but the first main one). */
  secret: string;
  layout: GuestLayout;
  channel: string;
  connectTimeoutMs: number;
  placement: PushPlacement;
  /** Where precopy's records go (precopy and hybrid modes); without it one is a protocol error. */
  precopy?: PrecopyPushPlacement;
  /** The channel ended (not after {@link PushClient.cut}): `err` says why. */
  onClose: (err: Error) => void;
}

const HTTP_RESPONSE_BYTES = 4096;

type Phase = 'http' | 'length' | 'welcome' | 'records';

export class PushClient {
  private phase: Phase = 'http';
  private readonly scratch = new Uint8Array(Math.max(HTTP_RESPONSE_BYTES, MAX_PUSH_HANDSHAKE_BYTES));
  private got = 0;
  private want = 0;
  private readonly reader: PushRecordReader;
  private socket!: Socket;
  private cutDone = false;
  private failure: Error | undefined;
  private settle: { resolve: () => void; reject: (err: Error) => void } | undefined;
  /** Pages of an unfinished record given back when the channel ended. */
  pagesReleased = 0;

  private constructor(private readonly options: PushClientOptions) {
    this.reader = new PushRecordReader(options.layout, options.placement, options.precopy);
  }

  /** Records read whole. */
  get records(): number {
    return this.reader.records;
  }

  static async connect(options: PushClientOptions): Promise<PushClient> {
    const client = new PushClient(options);
    await client.open();
    return client;
  }

  private open(): Promise<void> {
    let url: URL;
    try {
      url = new URL(this.options.url);
    } catch (err) {
      return Promise.reject(new ConnectionError(`expected a source URL like ws://HOST:PORT or wss://HOST:PORT for a push channel, got ${JSON.stringify(this.options.url)} (${(err as Error).message})`));
    }
    const secure = url.protocol === 'wss:';
    if (!secure && url.protocol !== 'ws:') return Promise.reject(new ConnectionError(`expected a ws:// or wss:// source for a push channel, got ${url.protocol}`));
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    const port = Number(url.port || (secure ? 443 : 80));
    const tls = this.options.tls;
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => this.fail(new ConnectionError(`no push channel from the source at ${this.options.url} within ${this.options.connectTimeoutMs} ms`)), this.options.connectTimeoutMs);
      this.settle = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      const upgrade = (): void => {
        socket.write(`GET /push HTTP/1.1\r\nHost: ${url.host}\r\nConnection: Upgrade\r\nUpgrade: ${PUSH_UPGRADE}\r\n\r\n`);
      };
      // Each read goes where the handshake or the record reader says (see buffer()).
      const onread = { buffer: () => this.buffer(), callback: (n: number) => this.read(n) };
      let socket: Socket;
      if (secure) {
        // As ws does for the other channels: SNI with the name expected (never an IP address).
        const servername = tls?.serverName ?? (isIP(host) === 0 ? host : undefined);
        // Node's types leave `onread` out of tls.connect's options; tls.connect documents and honours it.
        const options: ConnectionOptions & { onread: OnReadOpts } = {
          host,
          port,
          ...(servername !== undefined ? { servername } : {}),
          ...(tls?.ca !== undefined ? { ca: tls.ca } : {}),
          ...(tls?.cert !== undefined && tls.key !== undefined ? { cert: tls.cert, key: tls.key } : {}),
          onread,
        };
        socket = connectTls(options);
        socket.setNoDelay(true);
        socket.once('secureConnect', upgrade);
      } else {
        socket = connect({ host, port, noDelay: true, onread });
        socket.once('connect', upgrade);
      }
      this.socket = socket;
      socket.on('error', (err: NodeJS.ErrnoException) => {
        const tlsProblem = secure ? explainTlsError(err, this.options.url, tls?.serverName) : undefined;
        this.failure ??= new ConnectionError(
          tlsProblem !== undefined ? `push channel: TLS with the source at ${this.options.url} failed: ${tlsProblem}` : `push channel to the source at ${this.options.url}: ${err.code ?? ''} ${err.message}`.trim(),
        );
      });
      socket.once('close', () => this.closed());
    });
  }

  private buffer(): Uint8Array {
    switch (this.phase) {
      case 'http':
        return this.scratch.subarray(this.got, HTTP_RESPONSE_BYTES);
      case 'length':
      case 'welcome':
        return this.scratch.subarray(this.got, this.want);
      case 'records':
        return this.reader.buffer();
    }
  }

  /** One read of `n` bytes into {@link buffer}: false stops reading. */
  private read(n: number): boolean {
    if (this.cutDone) return false;
    try {
      if (this.phase === 'records') {
        this.reader.consumed(n);
        return true;
      }
      this.got += n;
      if (this.phase === 'http') this.httpResponse();
      else if (this.got === this.want) {
        if (this.phase === 'length') {
          const length = new DataView(this.scratch.buffer, 0, 4).getUint32(0, false);
          if (length < 1 || length > MAX_PUSH_HANDSHAKE_BYTES) throw new HandshakeError(`expected a push channel's welcome of at most ${MAX_PUSH_HANDSHAKE_BYTES} bytes, got a length of ${length}`);
          this.phase = 'welcome';
          this.got = 0;
          this.want = length;
        } else this.welcome(decode(this.scratch.slice(0, this.want)));
      }
      return true;
    } catch (err) {
      this.fail(err as Error);
      return false;
    }
  }

  private httpResponse(): void {
    const text = Buffer.from(this.scratch.buffer, 0, this.got).toString('latin1');
    const end = text.indexOf('\r\n\r\n');
    if (end < 0) {
      if (this.got >= HTTP_RESPONSE_BYTES) throw new HandshakeError(`expected the source's answer to a push channel's upgrade within ${HTTP_RESPONSE_BYTES} bytes, got more`);
      return;
    }
    const status = /^HTTP\/1\.1 (\d{3})/.exec(text);
    if (status?.[1] !== '101') {
      const said = text.slice(end + 4).replace(/[^\x20-\x7e]/g, ' ').trim().slice(0, 300);
      throw new HandshakeError(`expected the source to upgrade a push channel (HTTP 101), got ${JSON.stringify(text.slice(0, text.indexOf('\r\n')))}${said ? `: ${said}` : ''}`);
    }
    if (end + 4 !== this.got) throw new HandshakeError(`expected nothing from the source after its 101 before the push channel's hello, got ${this.got - end - 4} bytes`);
    this.phase = 'length';
    this.got = 0;
    this.want = 4;
    const { layout } = this.options;
    this.socket.write(
      lengthPrefixed(
        encode({
          type: 'hello',
          protocolVersion: PROTOCOL_VERSION,
          token: this.options.token,
          role: ChannelRole.Push,
          guestBytes: layout.guestBytes,
          pageSize: layout.pageSize,
          channel: this.options.channel,
          secret: this.options.secret,
        }),
      ),
    );
  }

  private welcome(message: Message): void {
    if (message.type === 'error') throw new HandshakeError(`the source refused the push channel: ${message.message}`);
    if (message.type !== 'welcome') throw new HandshakeError(`expected welcome on the push channel, got ${message.type}`);
    if (message.protocolVersion !== PROTOCOL_VERSION) throw new HandshakeError(`expected protocol version ${PROTOCOL_VERSION}, the source speaks ${message.protocolVersion}`);
    const { layout } = this.options;
    if (message.guestBytes !== layout.guestBytes || message.pageSize !== layout.pageSize) {
      throw new HandshakeError(`expected the push channel's welcome to give the guest's layout, got ${message.guestBytes} bytes in pages of ${message.pageSize}`);
    }
    if (message.secret !== '') throw new HandshakeError(`expected no secret in the welcome of a channel that presented one, got a new one`);
    this.phase = 'records';
    const settle = this.settle;
    this.settle = undefined;
    settle?.resolve();
  }

  /** Ends the channel with `err` (a broken stream, a refusal). */
  private fail(err: Error): void {
    this.failure ??= err;
    this.socket.destroy();
  }

  private closed(): void {
    if (this.cutDone) return;
    this.cutDone = true;
    this.pagesReleased += this.reader.end();
    const err = this.failure ?? new ConnectionError(`push channel to the source at ${this.options.url} closed`);
    const settle = this.settle;
    this.settle = undefined;
    if (settle) settle.reject(err);
    else this.options.onClose(err);
  }

  /**
   * Cuts the channel now (a pause, the end of the run): nothing more is read
   * or installed, and the pages of a record it was in the middle of are
   * given back before this returns (so the resume's receivedmap, taken
   * after, does not have them), without calling onClose.
   */
  cut(): void {
    if (this.cutDone) return;
    this.cutDone = true;
    this.pagesReleased += this.reader.end();
    this.socket.destroy();
    const settle = this.settle;
    this.settle = undefined;
    settle?.reject(new ConnectionError('push channel cut by the destination'));
  }
}
