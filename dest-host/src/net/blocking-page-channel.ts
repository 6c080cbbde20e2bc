import { lookup } from 'node:dns/promises';
import { ConnectionError, ProtocolError, REQUEST_BYTES, decode, decodeReplyFast, encode, encodeRequestInto, makeLayout, maxDestFrameBytes, type GuestLayout, type Message, type Reply, type Welcome } from '@postcopy/shared/net';
import { loadUffdNative, type UffdNative } from '../memory/uffd-native.js';
import { BlockingWebSocket } from './blocking-ws.js';
import { expectWelcome, helloFor } from './hello.js';
import type { PageClientOptions, SessionFollowing } from './page-client.js';
import { Session } from './session.js';

/** How long one blocked read lasts before the channel looks at the session again (a pause elsewhere cuts it within this). */
const SLICE_MS = 50;
/** How often a channel waiting for a resume re-checks whether it was closed meanwhile (ms). */
const SESSION_POLL_MS = 250;

/**
 * A fault channel for a thread that blocks while its page comes (a kvm-exit
 * vCPU, as KVM's vCPU thread does after KVM_EXIT_MEMORY_FAULT): {@link request}
 * sends the request and waits for its reply on a blocking socket, with no
 * event loop in between (see BlockingWebSocket). One request at a time.
 *
 * The same contract as PageClient's, synchronously: it follows the
 * destination's {@link Session}. A connection lost while the session is
 * current is reported (SessionFollowing.onLost) and the request waits for the
 * resume; a pause from elsewhere cuts the socket within {@link SLICE_MS}; after
 * the resume it reconnects (with backoff, within reconnectTimeoutMs) and
 * sends the request again with its id (counted as replayed). A reply read on
 * a connection whose session has ended is dropped (counted), so each request
 * is still answered exactly once. Over wss:// it speaks TLS with node's own
 * OpenSSL on the same socket (see BlockingWebSocket), given --tls-ca.
 */
export class BlockingPageChannel {
  readonly welcome: Welcome;
  readonly layout: GuestLayout;
  private ws: BlockingWebSocket | undefined;
  private epoch: number;
  private nextId = 1;
  private closedError: Error | undefined;
  private closing = false;
  private readonly following: SessionFollowing | undefined;
  private readonly maxPayload: number;
  /** The request in hand, encoded (one buffer for the channel's life). */
  private readonly frame = new Uint8Array(REQUEST_BYTES);
  /** Messages that are not replies (an error the source says before it closes). */
  onMessage: (message: Message) => void = () => {};

  private constructor(
    private readonly native: UffdNative,
    private readonly options: PageClientOptions,
    private readonly url: URL,
    private readonly address: { address: string; family: number },
    opened: { ws: BlockingWebSocket; welcome: Welcome },
  ) {
    this.welcome = opened.welcome;
    this.layout = makeLayout(opened.welcome.guestBytes, opened.welcome.pageSize);
    this.following = options.following;
    this.epoch = this.following?.session.epoch ?? 0;
    this.maxPayload = maxDestFrameBytes(options.pageSize, options.guestBytes / options.pageSize);
    this.ws = opened.ws;
  }

  /**
   * Why this channel cannot serve `options` (TLS, no addon), or undefined when
   * it can: the caller then uses PageClient.
   */
  static unavailable(options: Pick<PageClientOptions, 'url' | 'tls'>): string | undefined {
    if (options.url.startsWith('wss:') && options.tls?.ca === undefined) return "a wss:// source verified against the system's CAs (no --tls-ca) is spoken by the event-loop client only";
    const load = loadUffdNative();
    if (!load.ok) return load.reason;
    if (options.url.startsWith('wss:') && load.native.constants.HAVE_TLS !== 1) return "the uffd addon was built without node's OpenSSL headers, so TLS is spoken by the event-loop client only";
    return undefined;
  }

  static async connect(options: PageClientOptions): Promise<BlockingPageChannel> {
    const why = BlockingPageChannel.unavailable(options);
    if (why !== undefined) throw new Error(`a blocking fault channel is unavailable: ${why}`);
    const native = loadUffdNative();
    if (!native.ok) throw new Error(native.reason);
    let url: URL;
    try {
      url = new URL(options.url);
    } catch (err) {
      throw new ConnectionError(`expected a source URL like ws://127.0.0.1:PORT, got ${JSON.stringify(options.url)} (${(err as Error).message})`);
    }
    const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
    let address: { address: string; family: number };
    try {
      address = await lookup(host);
    } catch (err) {
      throw new ConnectionError(`cannot reach the source at ${options.url}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    const maxPayload = maxDestFrameBytes(options.pageSize, options.guestBytes / options.pageSize);
    return new BlockingPageChannel(native.native, options, url, address, BlockingPageChannel.open(native.native, options, url, address, maxPayload));
  }

  /** Connects and completes the handshake (hello, welcome), blocking. */
  private static open(native: UffdNative, options: PageClientOptions, url: URL, address: { address: string; family: number }, maxPayload: number): { ws: BlockingWebSocket; welcome: Welcome } {
    const timeoutMs = options.connectTimeoutMs ?? 10_000;
    const tls = options.tls;
    const ws = BlockingWebSocket.connect(native, url, address, timeoutMs, SLICE_MS, maxPayload, tls?.ca !== undefined ? { ...tls, ca: tls.ca } : undefined);
    try {
      ws.send(encode(helloFor(options)));
      const data = ws.receive(performance.now() + timeoutMs);
      if (data === undefined) throw new ConnectionError(`no answer from the source at ${options.url} within ${timeoutMs} ms`);
      return { ws, welcome: expectWelcome(data, options) };
    } catch (err) {
      ws.terminate();
      throw err;
    }
  }

  get session(): Session | undefined {
    return this.following?.session;
  }

  /** Session epoch of the connection the last reply came from (read it right after {@link request} returns). */
  get connectionEpoch(): number {
    return this.epoch;
  }

  /** Asks for `page` and blocks until the one reply the source owes; throws when the channel fails for good. */
  request(page: number): Reply {
    const id = this.nextId;
    this.nextId = id === 0xffffffff ? 1 : id + 1;
    encodeRequestInto(this.frame, id, page);
    const frame = this.frame;
    let sent = false;
    for (;;) {
      const ws = this.connected();
      if (sent) this.following?.session.countReplayed(1);
      try {
        ws.send(frame);
        sent = true;
        const reply = this.replyTo(ws, id, page);
        if (reply !== undefined) return reply;
      } catch (err) {
        if (!(err instanceof ConnectionError)) {
          this.fail(err as Error);
          throw err;
        }
        this.lost(err);
      }
    }
  }

  /** The reply to request `id`, or undefined when the session ended first (the socket is cut then). */
  private replyTo(ws: BlockingWebSocket, id: number, page: number): Reply | undefined {
    const following = this.following;
    for (;;) {
      // One slice (SO_RCVTIMEO) at most: then the session is looked at again.
      const data = ws.receive();
      if (following !== undefined && following.session.epoch !== this.epoch) {
        // A pause from elsewhere: a reply of the ended session is not installed; the request is replayed.
        if (data !== undefined) following.session.countDropped();
        this.cut();
        return undefined;
      }
      if (data === undefined) continue;
      let message: Message | undefined = decodeReplyFast(data, this.layout);
      try {
        message ??= decode(data, { layout: this.layout });
      } catch (err) {
        throw new ProtocolError((err as Error).message);
      }
      if (message.type === 'page' || message.type === 'zero-page' || message.type === 'already-sent' || message.type === 'sent-on-main') {
        if (message.id !== id) throw new ProtocolError(`${message.type} for request id ${message.id}, which this channel never sent or already had answered`);
        if (message.page !== page) throw new ProtocolError(`${message.type} for request ${id}: expected page ${page}, got page ${message.page}`);
        return message;
      }
      this.onMessage(message);
    }
  }

  /** The connection failed: with recovery, say so (when nobody knows yet) and wait for the resume; without, fail. */
  private lost(err: Error): void {
    this.cut();
    const following = this.following;
    if (following === undefined || this.closing) {
      this.fail(err);
      throw err;
    }
    if (following.session.epoch === this.epoch) following.onLost(err, this.epoch);
  }

  /** A live connection of the current session: after a pause, waits for the resume and reconnects. */
  private connected(): BlockingWebSocket {
    for (;;) {
      if (this.closedError) throw this.closedError;
      const following = this.following;
      if (this.ws !== undefined && !this.ws.isClosed && (following === undefined || following.session.epoch === this.epoch)) return this.ws;
      if (following === undefined) {
        this.fail(new ConnectionError('connection to the source closed'));
        continue;
      }
      this.cut();
      let now = following.session.epoch;
      while ((now === this.epoch || Session.isPaused(now)) && !this.closing) now = following.session.changedSync(now, SESSION_POLL_MS);
      if (this.closing) {
        this.fail(new ConnectionError('connection closed by the destination'));
        continue;
      }
      this.reconnect(following, now);
    }
  }

  /** Reconnects for session `epoch` with backoff; gives up after reconnectTimeoutMs. */
  private reconnect(following: SessionFollowing, epoch: number): void {
    const deadline = performance.now() + following.reconnectTimeoutMs;
    let delay = 20;
    for (;;) {
      if (following.session.epoch !== epoch) return; // paused again: connected() waits for the next resume
      try {
        const opened = BlockingPageChannel.open(this.native, this.options, this.url, this.address, this.maxPayload);
        this.ws = opened.ws;
        this.epoch = epoch;
        return;
      } catch (err) {
        if (performance.now() + delay > deadline) {
          const failure = new ConnectionError(
            `${this.options.channel}: could not reconnect to the source at ${this.options.url} within ${following.reconnectTimeoutMs} ms after the migration resumed: ${(err as Error).message}`,
          );
          this.fail(failure);
          throw failure;
        }
        following.session.changedSync(epoch, delay);
        delay = Math.min(delay * 2, 500);
      }
    }
  }

  private cut(): void {
    this.ws?.terminate();
    this.ws = undefined;
  }

  private fail(err: Error): void {
    this.closedError ??= err;
    this.cut();
  }

  close(): void {
    this.closing = true;
    this.closedError ??= new ConnectionError('connection closed by the destination');
    this.ws?.close();
    this.ws = undefined;
  }
}
