/**
 * The source's listening socket: plain HTTP for `ws://`, or HTTPS for
 * `wss://` with the source's certificate and, under `--tls-verify-peer`
 * (QEMU's `verify-peer`), a client certificate required and checked against
 * the CA. The WebSocket server rides on it.
 *
 * Nobody may hold a socket for long without saying who it is: a TCP peer
 * that never starts TLS, a TLS peer that never sends the WebSocket upgrade,
 * and a plain peer that never sends it are all cut after the handshake
 * timeout, as a WebSocket that never sends its hello already is.
 *
 * Under `--tls-verify-peer` a client certificate is checked after the TLS
 * handshake rather than during it: Node's TLS server, told to reject an
 * unauthorized peer, destroys the socket without a TLS alert, so a
 * destination whose certificate was refused saw only "socket hang up" and
 * could not tell why. Here such a peer completes TLS (encrypted, but
 * unauthenticated), gets nothing but an HTTP 403 that says what was expected
 * and what came, and is logged; no WebSocket is ever made for it
 * ({@link Listener.refusal}, checked by the source's WebSocket server before
 * any upgrade).
 */
import { createServer as createHttpServer, type IncomingMessage, type Server as HttpServer, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { hostForUrl, type TlsMaterial } from '@postcopy/shared';

export interface ListenerTls extends TlsMaterial {
  cert: string;
  key: string;
  /** Require a client certificate signed by `ca` (QEMU's verify-peer). */
  verifyPeer: boolean;
}

export interface Listener {
  server: HttpServer;
  /** `ws://HOST:PORT` or `wss://HOST:PORT`, IPv6 in brackets. */
  url: string;
  tls: boolean;
  /** The upgrade of this socket's request succeeded: its pre-upgrade timer stops. */
  upgraded(socket: Socket): void;
  /**
   * Why this socket's peer must be refused before any WebSocket is made (a
   * client certificate missing or not accepted under `--tls-verify-peer`),
   * or undefined when it may go on. The reason is logged once, here.
   */
  refusal(socket: Socket): string | undefined;
  /**
   * Destroys every TCP connection still open, those in the middle of a TLS
   * handshake included: the HTTP server's closeAllConnections() knows only
   * the sockets that reached HTTP, so a peer holding a half-done TLS
   * handshake would keep a closing source alive until its handshake timeout.
   */
  destroyAll(): void;
}

/** Peer-controlled text (a certificate's names) made safe to print: printable ASCII, at most 80 characters. */
function printable(text: string): string {
  const safe = text.replace(/[^\x20-\x7e]/g, '?');
  return safe.length > 80 ? `${safe.slice(0, 79)}…` : safe;
}

/** A certificate subject or issuer as `CN=name, O=org` (Node gives an object, a value an array when repeated). */
function distinguishedName(dn: Record<string, string | string[]> | undefined): string {
  if (!dn) return '';
  return printable(
    Object.entries(dn)
      .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join('+') : v}`)
      .join(', '),
  );
}

/**
 * Why a TLS peer's client certificate is not accepted under
 * `--tls-verify-peer` (undefined when it is): said for the source's log and,
 * in the 403 it gets, for the destination's user.
 */
export function describeClientCertificateRefusal(socket: TLSSocket): string | undefined {
  if (socket.authorized) return undefined;
  const cert = socket.getPeerCertificate();
  const code = socket.authorizationError instanceof Error ? (socket.authorizationError as NodeJS.ErrnoException).code : String(socket.authorizationError ?? 'UNSPECIFIED');
  if (!cert || Object.keys(cert).length === 0) {
    return `expected a client certificate signed by the CA in the source's --tls-ca (--tls-verify-peer), got none: give the destination --tls-cert and --tls-key`;
  }
  switch (code) {
    case 'CERT_HAS_EXPIRED':
      return `expected a client certificate valid now (--tls-verify-peer), got one that expired on ${cert.valid_to} (${code})`;
    case 'CERT_NOT_YET_VALID':
      return `expected a client certificate valid now (--tls-verify-peer), got one not valid before ${cert.valid_from} (${code})`;
    default:
      return `expected a client certificate signed by the CA in the source's --tls-ca (--tls-verify-peer), got one issued by "${distinguishedName(cert.issuer as unknown as Record<string, string | string[]>)}" that it does not accept (${code})`;
  }
}

/** Answer to anything that is not a WebSocket upgrade (ws's own server does the same). */
function upgradeRequired(_req: IncomingMessage, res: ServerResponse): void {
  res.writeHead(426, { 'content-type': 'text/plain' });
  res.end('Upgrade Required: this is a postcopy migration source; connect with a WebSocket\n');
}

/**
 * What OpenSSL said about a TLS peer that failed its handshake, in the
 * user's terms (for the source's log).
 *
 * An alert OpenSSL reports here (`ERR_SSL_..._ALERT_...`) is one the peer
 * *sent*: the peer refused this source's certificate. (Client certificates
 * are not refused during the handshake: see the header.)
 */
export function describeTlsClientError(err: NodeJS.ErrnoException & { reason?: string }, handshakeTimeoutMs?: number): string {
  const code = err.code ?? '';
  const refusedOurs = (why: string): string => `expected the peer to accept this source's certificate, got its refusal: ${why} (${code})`;
  switch (code) {
    case 'ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE':
      return 'expected a client certificate (--tls-verify-peer), got none';
    case 'ERR_SSL_HTTP_REQUEST':
      return 'expected a TLS handshake, got plain HTTP (a ws:// peer: it should use wss://)';
    case 'ERR_SSL_WRONG_VERSION_NUMBER':
    case 'ERR_SSL_UNSUPPORTED_PROTOCOL':
    case 'ERR_SSL_UNKNOWN_PROTOCOL':
    case 'ERR_SSL_PACKET_LENGTH_TOO_LONG':
    case 'ERR_SSL_UNEXPECTED_MESSAGE':
    case 'ERR_SSL_UNEXPECTED_RECORD':
      return `expected a TLS handshake, got bytes that are not one (${code})`;
    case 'ECONNRESET':
      // Node's TLS client checks the server's certificate after the
      // handshake and, refusing it, just closes: no alert says why. So this
      // is what a destination that refused this source's certificate looks
      // like from here (and a peer that merely gave up).
      return "expected the TLS handshake to complete, got the connection closed in the middle of it (ECONNRESET): a destination that refuses this source's certificate (not signed by a CA it trusts, not for the name it dialled, expired) does that; its own log says why";
    case 'ERR_TLS_HANDSHAKE_TIMEOUT':
      return `expected a TLS handshake${handshakeTimeoutMs !== undefined ? ` within ${handshakeTimeoutMs} ms (--handshake-timeout-ms)` : ''}, got none: cut`;
    case 'ERR_SSL_TLSV1_ALERT_UNKNOWN_CA':
      return refusedOurs('it does not trust the CA that signed it');
    case 'ERR_SSL_SSLV3_ALERT_CERTIFICATE_EXPIRED':
      return refusedOurs('it finds it expired');
    case 'ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE':
    case 'ERR_SSL_SSLV3_ALERT_CERTIFICATE_UNKNOWN':
    case 'ERR_SSL_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE':
    case 'ERR_SSL_SSLV3_ALERT_CERTIFICATE_REVOKED':
      return refusedOurs('it finds it bad (not for the name it dialled, or not one it can use)');
    default: {
      // OpenSSL's own reason ("unexpected message"), not its whole error-queue line.
      const reason = err.reason ?? err.message;
      if (/_ALERT_/.test(code)) return `expected a TLS handshake, got the peer's alert "${reason}" (${code})`;
      return `expected a TLS handshake, got one that failed: ${reason} (${code || err.message})`;
    }
  }
}

/**
 * Listens on `host`:`port`. `onRejected` hears of every peer cut before it
 * became a WebSocket, with a label (`TLS peer ADDR:PORT`, `peer ADDR:PORT`)
 * and why: a failed TLS handshake, a refused client certificate, no upgrade
 * in time, a TLS handshake sent to a plain source (the server keeps serving
 * everyone else).
 */
export async function listen(options: {
  host: string;
  port: number;
  tls?: ListenerTls | undefined;
  handshakeTimeoutMs: number;
  onRejected?: (peer: string, reason: string) => void;
}): Promise<Listener> {
  const { tls, handshakeTimeoutMs } = options;
  const server: HttpServer = tls
    ? (createHttpsServer(
        {
          cert: tls.cert,
          key: tls.key,
          ...(tls.ca !== undefined ? { ca: tls.ca } : {}),
          requestCert: tls.verifyPeer,
          // Checked after the handshake, by refusal() (see the header): a
          // rejection during it would reach the peer as a bare reset.
          rejectUnauthorized: false,
          minVersion: 'TLSv1.2',
          // A TCP peer that never finishes the TLS handshake (tls.Server's own timer).
          handshakeTimeout: handshakeTimeoutMs,
        },
        (req: IncomingMessage, res: ServerResponse) => {
          // A request that is not an upgrade, from a peer whose certificate is refused, gets the refusal too.
          const reason = refusal(req.socket);
          if (reason === undefined) upgradeRequired(req, res);
          else {
            res.writeHead(403, { 'content-type': 'text/plain; charset=utf-8', connection: 'close' });
            res.end(reason + '\n');
          }
        },
      ) as unknown as HttpServer)
    : createHttpServer(upgradeRequired);
  const timers = new WeakMap<Socket, NodeJS.Timeout>();
  /** The socket's peer as `ADDR:PORT` (IPv6 in brackets), taken while the socket is open. */
  const peers = new WeakMap<Socket, string>();
  const peerOf = (socket: Socket): string => {
    // A TLS socket that failed its handshake is destroyed, and its own
    // remoteAddress gone, before tlsClientError is heard; the TCP socket
    // under it (Node's `_parent`) was recorded at 'connection' below.
    const known = peers.get(socket) ?? peers.get((socket as Socket & { _parent?: Socket })._parent ?? socket);
    if (known !== undefined) return known;
    return socket.remoteAddress !== undefined ? `${hostForUrl(socket.remoteAddress)}:${socket.remotePort}` : '(address unknown)';
  };
  const label = (socket: Socket): string => `${tls ? 'TLS peer' : 'peer'} ${peerOf(socket)}`;
  /** Refusals already logged (a peer may send a request and an upgrade on one socket). */
  const refused = new WeakMap<Socket, string>();
  const refusal = (socket: Socket): string | undefined => {
    if (!tls?.verifyPeer) return undefined;
    const known = refused.get(socket);
    if (known !== undefined) return known;
    const reason = describeClientCertificateRefusal(socket as TLSSocket);
    if (reason !== undefined) {
      refused.set(socket, reason);
      options.onRejected?.(label(socket), reason);
    }
    return reason;
  };
  /** From this socket's first byte on, it has `handshakeTimeoutMs` to become a WebSocket. */
  const watch = (socket: Socket): void => {
    peers.set(socket, peerOf(socket));
    const timer = setTimeout(() => {
      options.onRejected?.(label(socket), `expected a WebSocket upgrade within ${handshakeTimeoutMs} ms (--handshake-timeout-ms), got none: cut`);
      socket.destroy();
    }, handshakeTimeoutMs);
    timer.unref();
    timers.set(socket, timer);
    socket.once('close', () => clearTimeout(timer));
  };
  // The socket ws upgrades is the TLS socket for wss:// and the TCP socket for ws://.
  server.on(tls ? 'secureConnection' : 'connection', watch);
  // Every TCP peer's address, while it is still there to read; and every TCP socket, for destroyAll().
  const open = new Set<Socket>();
  server.on('connection', (raw: Socket) => {
    if (tls) peers.set(raw, peerOf(raw));
    open.add(raw);
    raw.once('close', () => open.delete(raw));
  });
  if (tls) {
    server.on('tlsClientError', (err: NodeJS.ErrnoException, socket: TLSSocket) => {
      options.onRejected?.(label(socket), describeTlsClientError(err, handshakeTimeoutMs));
      socket.destroy();
    });
  }
  server.on('clientError', (err: Error & { rawPacket?: Buffer }, socket: Socket) => {
    // A TLS handshake record (content type 22, version 3.x) sent to a plain
    // source: a wss:// destination. Say so here too; it hears "does not
    // speak TLS" on its side.
    if (!tls && err.rawPacket !== undefined && err.rawPacket[0] === 0x16 && err.rawPacket[1] === 0x03) {
      options.onRejected?.(
        label(socket),
        'expected plain HTTP (this source listens on ws://), got a TLS handshake: a wss:// destination (give it --source ws://..., or start this source with --tls-cert and --tls-key)',
      );
    }
    // Not HTTP at all: answer 400 as Node does by default, then drop it.
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
    else socket.destroy();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port, options.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address() as AddressInfo;
  return {
    server,
    url: `${tls ? 'wss' : 'ws'}://${hostForUrl(address.address)}:${address.port}`,
    tls: tls !== undefined,
    upgraded: (socket) => {
      clearTimeout(timers.get(socket));
      timers.delete(socket);
    },
    refusal,
    destroyAll: () => {
      for (const raw of open) raw.destroy();
      open.clear();
    },
  };
}
