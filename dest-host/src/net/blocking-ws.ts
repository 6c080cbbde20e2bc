import { createHash, randomFillSync } from 'node:crypto';
import { ConnectionError, ProtocolError, writeUint16BE, writeUint32BE } from '@postcopy/shared/net';
import { isIP } from 'node:net';
import { errnoName, type TlsConnection, type UffdNative } from '../memory/uffd-native.js';
import { MAX_REFUSAL_CHARS, printableRefusal } from './refusal.js';

/**
 * A WebSocket client (RFC 6455) over a blocking TCP socket, for a thread
 * that waits for its answer and has nothing else to do meanwhile: a kvm-exit
 * vCPU whose run loop exited (KVM_EXIT_MEMORY_FAULT: the VMM fetches the page
 * on the vCPU thread itself), a resolver serving one blocked vCPU. Such a
 * thread needs no event loop: each call is a system call on its own socket
 * (the uffd addon's tcpConnect, sockSend, sockRecv), and the fault path runs
 * no stream, emitter or promise machinery (issue 9: in the event-loop client
 * most of a vCPU worker's CPU per fault went there, and into compiling it
 * once per isolate).
 *
 * Binary messages only, unfragmented, no extensions: what the source's `ws`
 * server sends (perMessageDeflate off). Pings are answered with pongs;
 * a close frame, a masked or reserved-bit frame, a fragment or an oversized
 * message ends the connection with an error. Client frames are masked
 * (RFC 6455 section 5.3) with keys from a CSPRNG pool.
 */
export class BlockingWebSocket {
  private buffer: Uint8Array;
  /** Unparsed received bytes are buffer[start, end). */
  private start = 0;
  private end = 0;
  private readonly header = new Uint8Array(14);
  private readonly masks = new Uint8Array(4096);
  private maskAt = 4096;
  private closed = false;
  /** wss://: the TLS connection over the socket (node's OpenSSL, see tlsConnect in uffd.c). */
  private tls: TlsConnection | undefined;

  private constructor(
    private readonly native: UffdNative,
    private fd: number,
    /** Largest message accepted (as ws's maxPayload). */
    private readonly maxPayload: number,
    readonly url: string,
  ) {
    this.buffer = new Uint8Array(Math.min(maxPayload + 14, 64 * 1024));
  }

  /**
   * Connects to `address` (numeric, resolved by the caller) and performs the
   * opening handshake for `url` within `timeoutMs`; throws a ConnectionError
   * saying what failed (an HTTP refusal with its status and body). From the
   * WebSocket handshake on, one blocked recv lasts `sliceMs` (SO_RCVTIMEO)
   * before {@link receive} looks at its deadline again and its caller at the
   * session; a blocked send may take `timeoutMs` before the connection
   * counts as failed.
   */
  static connect(native: UffdNative, url: URL, address: { address: string; family: number }, timeoutMs: number, sliceMs: number, maxPayload: number, tls?: BlockingTls): BlockingWebSocket {
    const port = Number(url.port || (url.protocol === 'wss:' ? 443 : 80));
    const fd = native.tcpConnect(address.address, port, address.family, timeoutMs);
    if (fd < 0) throw new ConnectionError(`cannot reach the source at ${url.href}: ${errnoName(fd)}`);
    const ws = new BlockingWebSocket(native, fd, maxPayload, url.href);
    try {
      if (url.protocol === 'wss:') {
        // The TLS handshake's every blocked read may take the whole timeout, not one slice.
        native.sockSetTimeouts(fd, timeoutMs, timeoutMs);
        if (tls === undefined) throw new Error(`expected TLS material for ${url.href}`);
        const name = tls.serverName ?? (url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname);
        const conn = native.tlsConnect(fd, tls.ca, tls.cert ?? null, tls.key ?? null, name, isIP(name) !== 0);
        if (typeof conn === 'number') throw new ConnectionError(`TLS with the source at ${url.href} failed: ${native.tlsError(null)} (${errnoName(conn)})`);
        ws.tls = conn;
      }
      native.sockSetTimeouts(fd, Math.max(1, Math.min(timeoutMs, sliceMs)), timeoutMs);
      ws.handshake(url, timeoutMs);
      return ws;
    } catch (err) {
      ws.terminate();
      throw err;
    }
  }

  private handshake(url: URL, timeoutMs: number): void {
    const key = randomFillSync(Buffer.alloc(16)).toString('base64');
    const request =
      `GET ${url.pathname || '/'}${url.search} HTTP/1.1\r\n` +
      `Host: ${url.host}\r\n` +
      'Upgrade: websocket\r\nConnection: Upgrade\r\n' +
      `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`;
    this.write(Buffer.from(request, 'latin1'));
    const deadline = performance.now() + timeoutMs;
    let headEnd = -1;
    while (headEnd < 0) {
      let filled: boolean;
      try {
        filled = this.fill(deadline, 'during the WebSocket handshake');
      } catch (err) {
        // TLS 1.3: the client's handshake ends before the source has checked
        // its certificate, so a refusal arrives as an alert or, when the
        // request crossed the close, as a reset.
        if (this.url.startsWith('wss:') && err instanceof ConnectionError) {
          throw new ConnectionError(`${err.message}: after the TLS handshake, the source closed the connection (does it require a client certificate, --tls-verify-peer, that this destination does not have or it does not trust?)`);
        }
        throw err;
      }
      if (!filled) throw new ConnectionError(`no answer from the source at ${this.url} within ${timeoutMs} ms`);
      headEnd = Buffer.from(this.buffer.buffer, this.buffer.byteOffset + this.start, this.end - this.start).indexOf('\r\n\r\n');
      if (headEnd < 0 && this.end - this.start > 16 * 1024) throw new ProtocolError(`the source's HTTP answer to the WebSocket upgrade has no end of headers within 16 KiB`);
    }
    const head = Buffer.from(this.buffer.subarray(this.start, this.start + headEnd)).toString('latin1');
    this.start += headEnd + 4;
    const [statusLine = '', ...lines] = head.split('\r\n');
    const headers = new Map<string, string>();
    for (const line of lines) {
      const colon = line.indexOf(':');
      if (colon > 0) headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
    }
    const status = /^HTTP\/1\.[01] (\d{3})(?: (.*))?$/.exec(statusLine);
    if (!status) throw new ProtocolError(`expected an HTTP status line from the source, got ${JSON.stringify(statusLine.slice(0, 80))}`);
    if (status[1] !== '101') throw new ConnectionError(this.refusal(Number(status[1]), status[2] ?? '', headers, deadline));
    const accept = createHash('sha1').update(`${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64');
    if (headers.get('upgrade')?.toLowerCase() !== 'websocket' || headers.get('sec-websocket-accept') !== accept) {
      throw new ProtocolError(`the source's WebSocket upgrade answer is not valid (Upgrade ${JSON.stringify(headers.get('upgrade') ?? '')}, Sec-WebSocket-Accept ${headers.get('sec-websocket-accept') === accept ? 'right' : 'wrong'})`);
    }
    if (headers.has('sec-websocket-extensions')) throw new ProtocolError(`the source accepted WebSocket extensions this client did not offer: ${headers.get('sec-websocket-extensions')}`);
  }

  /** An HTTP answer instead of the upgrade: what the source said, with as much of its body as arrives (bounded). */
  private refusal(code: number, reason: string, headers: Map<string, string>, deadline: number): string {
    const length = Math.min(Number(headers.get('content-length') ?? MAX_REFUSAL_CHARS) || 0, MAX_REFUSAL_CHARS);
    while (this.end - this.start < length && this.fill(deadline, 'reading the refusal')) {
      // read what the body has
    }
    const body = Buffer.from(this.buffer.subarray(this.start, this.start + Math.min(length, this.end - this.start))).toString('utf8');
    const said = printableRefusal(body);
    return `the source at ${this.url} refused this destination (HTTP ${code}${reason ? ` ${printableRefusal(reason)}` : ''})${said ? `: ${said}` : ''}`;
  }

  /** Sends one binary message. Throws a ConnectionError when the socket fails. */
  send(payload: Uint8Array): void {
    this.sendFrame(0x2, payload);
  }

  /** Sends a close frame (code 1000) and closes the socket. */
  close(): void {
    if (this.closed) return;
    const body = new Uint8Array([0x03, 0xe8]);
    try {
      this.sendFrame(0x8, body);
    } catch {
      // the peer is gone already
    }
    this.terminate();
  }

  /** Cuts the connection at once (no close handshake). Idempotent. */
  terminate(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.tls !== undefined) this.native.tlsClose(this.tls);
    this.tls = undefined;
    this.native.sockShutdown(this.fd);
    this.native.close(this.fd);
    this.fd = -1;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * The next binary message, waiting at most until `deadline`
   * (performance.now() ms), or without one for one receive slice (see
   * {@link connect}); undefined when none came by then. The view is
   * valid until the next call. Answers pings on the way. Throws a
   * ConnectionError when the connection ends, a ProtocolError on a frame
   * this client does not accept.
   */
  receive(deadline = -1): Uint8Array | undefined {
    for (;;) {
      const message = this.parse();
      if (message !== undefined) return message;
      if (!this.fill(deadline, 'waiting for a message')) return undefined;
    }
  }

  /** A whole data frame from the buffer (answering control frames), or undefined when more bytes are needed. */
  private parse(): Uint8Array | undefined {
    for (;;) {
      const b = this.buffer;
      const have = this.end - this.start;
      if (have < 2) return undefined;
      const b0 = b[this.start]!;
      const b1 = b[this.start + 1]!;
      const opcode = b0 & 0x0f;
      if ((b0 & 0x70) !== 0) throw new ProtocolError(`the source sent a WebSocket frame with reserved bits set (0x${b0.toString(16)})`);
      if ((b0 & 0x80) === 0 || opcode === 0) throw new ProtocolError(`the source sent a fragmented WebSocket message (opcode ${opcode}), which a fault channel does not take`);
      if ((b1 & 0x80) !== 0) throw new ProtocolError(`the source sent a masked WebSocket frame (RFC 6455 section 5.1: a server must not mask)`);
      let length = b1 & 0x7f;
      let at = this.start + 2;
      if (length === 126) {
        if (have < 4) return undefined;
        length = (b[at]! << 8) | b[at + 1]!;
        at += 2;
      } else if (length === 127) {
        if (have < 10) return undefined;
        const high = (b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!;
        if (high !== 0) throw new ProtocolError(`the source sent a WebSocket message of more than 4 GiB`);
        length = ((b[at + 4]! << 24) >>> 0) + ((b[at + 5]! << 16) | (b[at + 6]! << 8) | b[at + 7]!);
        at += 8;
      }
      if (length > this.maxPayload) throw new ProtocolError(`the source sent a WebSocket message of ${length} bytes, more than the ${this.maxPayload} a fault channel takes`);
      if (at + length > this.end) {
        this.makeRoom(at - this.start + length);
        return undefined;
      }
      const payload = b.subarray(at, at + length);
      this.start = at + length;
      if (this.start === this.end) this.start = this.end = 0;
      switch (opcode) {
        case 0x2:
          return payload;
        case 0x9:
          if (length > 125) throw new ProtocolError(`the source sent a ping of ${length} bytes (at most 125)`);
          this.sendFrame(0xa, payload);
          continue;
        case 0xa:
          continue;
        case 0x8: {
          const code = length >= 2 ? (payload[0]! << 8) | payload[1]! : 1005;
          const reason = length > 2 ? printableRefusal(Buffer.from(payload.subarray(2)).toString('utf8')) : '';
          this.terminate();
          throw new ConnectionError(`connection to the source closed (code ${code}${reason ? `: ${reason}` : ''})`);
        }
        default:
          throw new ProtocolError(`the source sent a WebSocket frame with opcode ${opcode}; a fault channel takes binary messages only`);
      }
    }
  }

  /** Room for a frame of `frameBytes` from `start`: the unparsed bytes moved to the front, the buffer grown if it must. */
  private makeRoom(frameBytes: number): void {
    if (this.start > 0) {
      this.buffer.copyWithin(0, this.start, this.end);
      this.end -= this.start;
      this.start = 0;
    }
    if (frameBytes > this.buffer.length) {
      const grown = new Uint8Array(Math.min(Math.max(frameBytes, this.buffer.length * 2), this.maxPayload + 14));
      grown.set(this.buffer.subarray(0, this.end));
      this.buffer = grown;
    }
  }

  /** One recv into the buffer; false when the deadline passed with nothing read. Throws when the connection ended. */
  private fill(deadline: number, doing: string): boolean {
    if (this.closed) throw new ConnectionError(`connection to the source closed`);
    if (this.end === this.buffer.length) this.makeRoom(this.buffer.length + 1);
    for (;;) {
      const n = this.tls === undefined ? this.native.sockRecv(this.fd, this.buffer, this.end, this.buffer.length - this.end) : this.native.tlsRecv(this.tls, this.buffer, this.end, this.buffer.length - this.end);
      if (n > 0) {
        this.end += n;
        return true;
      }
      if (n === 0) {
        this.terminate();
        throw new ConnectionError(`connection to the source closed (end of stream ${doing})`);
      }
      if (n === -11 /* EAGAIN: SO_RCVTIMEO passed */) {
        if (deadline < 0 || performance.now() >= deadline) return false;
        continue;
      }
      const why = this.tls !== undefined ? `${this.native.tlsError(this.tls)} (${errnoName(n)})` : errnoName(n);
      this.terminate();
      throw new ConnectionError(`connection to the source failed ${doing}: ${why}`);
    }
  }

  private sendFrame(opcode: number, payload: Uint8Array): void {
    if (this.closed) throw new ConnectionError(`connection to the source closed`);
    const h = this.header;
    const length = payload.length;
    h[0] = 0x80 | opcode;
    let at: number;
    if (length < 126) {
      h[1] = 0x80 | length;
      at = 2;
    } else if (length < 65536) {
      h[1] = 0x80 | 126;
      writeUint16BE(h, 2, length);
      at = 4;
    } else {
      h[1] = 0x80 | 127;
      writeUint32BE(h, 2, 0);
      writeUint32BE(h, 6, length);
      at = 10;
    }
    if (this.maskAt === this.masks.length) {
      randomFillSync(this.masks);
      this.maskAt = 0;
    }
    const m = this.masks;
    const k = this.maskAt;
    this.maskAt += 4;
    h[at] = m[k]!;
    h[at + 1] = m[k + 1]!;
    h[at + 2] = m[k + 2]!;
    h[at + 3] = m[k + 3]!;
    at += 4;
    // Header and masked payload in one send (one segment on the wire).
    const frame = length <= 256 ? this.small : new Uint8Array(at + length);
    for (let i = 0; i < at; i++) frame[i] = h[i]!;
    for (let i = 0; i < length; i++) frame[at + i] = payload[i]! ^ m[k + (i & 3)]!;
    this.write(frame, at + length);
  }

  /** Where a small frame (a request, a pong) is assembled: no allocation per frame. */
  private readonly small = new Uint8Array(14 + 256);

  private write(bytes: Uint8Array, length = bytes.length): void {
    const n = this.tls === undefined ? this.native.sockSend(this.fd, bytes, 0, length) : this.native.tlsSend(this.tls, bytes, 0, length);
    if (n !== length) {
      const why = this.tls !== undefined ? `${this.native.tlsError(this.tls)} (${errnoName(n)})` : errnoName(n);
      this.terminate();
      throw new ConnectionError(`connection to the source failed while sending: ${why}`);
    }
  }
}

/** What a wss:// connection verifies the source with (PEM texts), and the client certificate it shows. */
export interface BlockingTls {
  /** Required: the blocking client trusts exactly these CA certificates. */
  ca: string;
  cert?: string;
  key?: string;
  /** The name the source's certificate must hold, when it is not the URL's host. */
  serverName?: string;
}
