/**
 * Keepalive for a WebSocket: a link that dies (a cable pulled, a veth taken
 * down, a host that froze) sends no reset, so without this a connection
 * looks alive forever and a paused migration would never even start to
 * recover. Every `intervalMs` the peer is pinged (RFC 6455 §5.5.2: it must
 * answer with a pong as soon as practical); when nothing at all came from it
 * (no pong and no message) for `timeoutMs`, it counts as gone and the socket
 * is cut. Any frame counts as a sign of life, so a peer whose pong is queued
 * behind a stream of data it is sending never looks silent.
 *
 * Both hosts run one on the migration's main channel (`--keepalive-ms`); a
 * dead link takes every channel with it, and losing the main channel pauses
 * the whole migration on both sides.
 */

/** The part of a `ws` WebSocket this needs (structural, so `shared` does not depend on `ws`). */
export interface PingableSocket {
  ping(): void;
  terminate(): void;
  on(event: 'pong' | 'message', listener: () => void): unknown;
  off(event: 'pong' | 'message', listener: () => void): unknown;
  once(event: 'close', listener: () => void): unknown;
}

export class Keepalive {
  private lastHeard: number;
  private readonly timer: NodeJS.Timeout;
  private readonly heard = (): void => {
    this.lastHeard = performance.now();
  };
  private stopped = false;

  /**
   * Starts watching `socket`; `onSilent` runs once, just before the socket
   * is cut, when nothing came for `timeoutMs`. Stops by itself when the socket closes.
   */
  constructor(
    private readonly socket: PingableSocket,
    readonly timeoutMs: number,
    private readonly onSilent: (silentMs: number) => void,
  ) {
    this.lastHeard = performance.now();
    socket.on('pong', this.heard);
    socket.on('message', this.heard);
    socket.once('close', () => this.stop());
    // Four pings per timeout: a lost or late one or two do not matter.
    this.timer = setInterval(() => this.check(), Math.max(10, Math.floor(timeoutMs / 4)));
    this.timer.unref();
  }

  private check(): void {
    if (this.stopped) return;
    const silentMs = performance.now() - this.lastHeard;
    if (silentMs > this.timeoutMs) {
      this.stop();
      this.onSilent(silentMs);
      this.socket.terminate();
      return;
    }
    try {
      this.socket.ping();
    } catch {
      // Not open any more: its close event stops this.
    }
  }

  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.timer);
    this.socket.off('pong', this.heard);
    this.socket.off('message', this.heard);
  }
}
