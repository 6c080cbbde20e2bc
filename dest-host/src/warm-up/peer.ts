import { randomBytes } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { WebSocketServer, type WebSocket } from 'ws';
import { ChannelRole, PROTOCOL_VERSION, decode, encode, encodePageReplyHeaderInto, fillPage, isZeroPage, pageReplyHeaderBytes, type GuestLayout, type ImageSpec, type Message } from '@postcopy/shared';

/**
 * The warm-up's page source: a WebSocket server on this host's loopback
 * that answers fault channels as the source does, for scratch memory only.
 * It takes a hello with its own token and secret (random, and never the
 * migration's), welcomes it with the scratch guest's layout, and answers
 * each request with the generator's page (`fillPage`, so the first-touch
 * check passes) in the source's own reply bytes (`encodePageReplyHeaderInto`
 * then the page; a zero page as `zero-page`), so the destination decodes
 * and installs them on the same code paths as the run's. It keeps no
 * exactly-once books: nothing it sends is a page of the guest.
 */
export class WarmUpPeer {
  readonly token = randomBytes(16).toString('hex');
  /** In the shape of a migration's secret (MIGRATION_SECRET_PATTERN), and as random. */
  readonly secret = randomBytes(32).toString('hex');
  /** Requests answered. */
  answered = 0;
  private readonly page: Uint32Array;

  private constructor(
    private readonly server: WebSocketServer,
    private readonly layout: GuestLayout,
    private readonly image: ImageSpec,
  ) {
    this.page = new Uint32Array(layout.pageSize / 4);
    server.on('connection', (ws) => this.serve(ws));
  }

  static start(layout: GuestLayout, image: ImageSpec): Promise<WarmUpPeer> {
    return new Promise((resolve, reject) => {
      const server = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false, maxPayload: 64 * 1024 });
      server.once('error', reject);
      server.once('listening', () => {
        server.off('error', reject);
        // A socket's error (a peer that resets) is that connection's, not the server's.
        server.on('error', () => {});
        resolve(new WarmUpPeer(server, layout, image));
      });
    });
  }

  get url(): string {
    return `ws://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  private serve(ws: WebSocket): void {
    ws.on('error', () => ws.terminate());
    let welcomed = false;
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      let message: Message;
      try {
        if (!isBinary) throw new Error('expected a binary message');
        message = decode(data, { layout: this.layout });
      } catch (err) {
        this.refuse(ws, `not a message the warm-up peer takes: ${(err as Error).message}`);
        return;
      }
      if (!welcomed) {
        const why = this.helloProblem(message);
        if (why !== undefined) {
          this.refuse(ws, why);
          return;
        }
        welcomed = true;
        ws.send(this.welcome());
        return;
      }
      if (message.type !== 'request') {
        this.refuse(ws, `expected a request, got ${message.type}`);
        return;
      }
      this.answer(ws, message.id, message.page);
    });
  }

  /** Why a first message is not a fault channel's hello for this peer, or undefined. */
  private helloProblem(m: Message): string | undefined {
    if (m.type !== 'hello') return `expected a hello, got ${m.type}`;
    if (m.token !== this.token || m.secret !== this.secret) return 'expected the warm-up peer\'s own token and secret';
    if (m.role !== ChannelRole.Fault) return 'expected a fault channel';
    if (m.guestBytes !== this.layout.guestBytes || m.pageSize !== this.layout.pageSize) return `expected the scratch guest's layout (${this.layout.guestBytes} bytes in ${this.layout.pageSize}-byte pages)`;
    return undefined;
  }

  private welcome(): Buffer {
    const { layout, image } = this;
    return encode({
      type: 'welcome',
      protocolVersion: PROTOCOL_VERSION,
      guestBytes: layout.guestBytes,
      pageSize: layout.pageSize,
      totalPages: layout.totalPages,
      imageDigest: '0'.repeat(64), // none: the destination checks no digest of the scratch memory
      imageSeed: image.seed,
      zeroFraction: image.zeroFraction,
      linkDelayUs: 0,
      linkBandwidthBps: 0,
      secret: '',
      mode: 'postcopy',
    });
  }

  private answer(ws: WebSocket, id: number, page: number): void {
    this.answered++;
    if (isZeroPage(this.image, page)) {
      ws.send(encode({ type: 'zero-page', id, page }));
      return;
    }
    fillPage(this.image, page, this.page);
    const bytes = this.layout.pageSize;
    const header = pageReplyHeaderBytes(bytes);
    const frame = Buffer.allocUnsafe(header + bytes);
    encodePageReplyHeaderInto(frame, 0, id, page, bytes);
    frame.set(new Uint8Array(this.page.buffer), header);
    ws.send(frame);
  }

  private refuse(ws: WebSocket, why: string): void {
    ws.send(encode({ type: 'error', code: 'warm-up-refused', message: `warm-up peer: ${why}` }));
    ws.close(1008);
  }

  /** Stops listening and cuts every connection. */
  close(): Promise<void> {
    for (const ws of this.server.clients) ws.terminate();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
