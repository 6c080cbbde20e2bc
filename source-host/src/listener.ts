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
}

/** Answer to anything that is not a WebSocket upgrade (ws's own server does the same). */
function upgradeRequired(_req: IncomingMessage, res: ServerResponse): void {
  res.writeHead(426, { 'content-type': 'text/plain' });
  res.end('Upgrade Required: this is a postcopy migration source; connect with a WebSocket\n');
}

/** What OpenSSL said about a TLS peer, in the user's terms (for the source's log). */
export function describeTlsClientError(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE':
      return 'expected a client certificate (--tls-verify-peer), got none';
    case 'ERR_SSL_HTTP_REQUEST':
      return 'expected a TLS handshake, got plain HTTP (a ws:// peer: it should use wss://)';
    case 'ERR_SSL_WRONG_VERSION_NUMBER':
    case 'ERR_SSL_UNSUPPORTED_PROTOCOL':
    case 'ERR_SSL_PACKET_LENGTH_TOO_LONG':
      return `expected a TLS handshake, got bytes that are not one (${err.code})`;
    case 'ECONNRESET':
      return 'the peer reset the connection during the TLS handshake';
    default:
      if (/certificate verify failed|unknown ca|self.signed|expired/i.test(err.message)) {
        return `expected a client certificate signed by the CA in --tls-ca and valid now, got one that is not (${err.code ?? err.message})`;
      }
      if (/timed out/i.test(err.message) || err.code === 'ERR_TLS_HANDSHAKE_TIMEOUT') return 'expected a TLS handshake, got none in time';
      return `TLS handshake failed (${err.code ?? ''} ${err.message})`.replace(/\s+\)/, ')');
  }
}

/**
 * Listens on `host`:`port`. `onTlsClientError` hears of every TLS peer that
 * failed its handshake (the server keeps serving everyone else).
 */
export async function listen(options: {
  host: string;
  port: number;
  tls?: ListenerTls | undefined;
  handshakeTimeoutMs: number;
  onTlsClientError?: (peer: string, reason: string) => void;
}): Promise<Listener> {
  const { tls, handshakeTimeoutMs } = options;
  const server: HttpServer = tls
    ? (createHttpsServer(
        {
          cert: tls.cert,
          key: tls.key,
          ...(tls.ca !== undefined ? { ca: tls.ca } : {}),
          requestCert: tls.verifyPeer,
          rejectUnauthorized: tls.verifyPeer,
          minVersion: 'TLSv1.2',
          // A TCP peer that never finishes the TLS handshake (tls.Server's own timer).
          handshakeTimeout: handshakeTimeoutMs,
        },
        upgradeRequired,
      ) as unknown as HttpServer)
    : createHttpServer(upgradeRequired);
  const timers = new WeakMap<Socket, NodeJS.Timeout>();
  /** From this socket's first byte on, it has `handshakeTimeoutMs` to become a WebSocket. */
  const watch = (socket: Socket): void => {
    const timer = setTimeout(() => socket.destroy(), handshakeTimeoutMs);
    timer.unref();
    timers.set(socket, timer);
    socket.once('close', () => clearTimeout(timer));
  };
  // The socket ws upgrades is the TLS socket for wss:// and the TCP socket for ws://.
  server.on(tls ? 'secureConnection' : 'connection', watch);
  if (tls) {
    server.on('tlsClientError', (err: NodeJS.ErrnoException, socket: TLSSocket) => {
      const peer = socket.remoteAddress ? `${hostForUrl(socket.remoteAddress)}:${socket.remotePort}` : 'a TLS peer';
      options.onTlsClientError?.(peer, describeTlsClientError(err));
      socket.destroy();
    });
  }
  server.on('clientError', (_err: Error, socket: Socket) => {
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
  };
}
