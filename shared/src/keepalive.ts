/**
 * Keepalive for a WebSocket: a link that dies (a cable pulled, a veth taken
 * down, a host that froze) sends no reset, so without this a connection
 * looks alive forever and a paused migration would never even start to
 * recover. Four times per `timeoutMs` the peer is pinged (RFC 6455 §5.5.2:
 * it must answer with a pong as soon as practical); when a ping has gone
 * unanswered, and nothing else came from it either, for `timeoutMs`, the peer
 * counts as gone and the socket is cut: at most about 1.5 × `timeoutMs` after
 * the last sign of life. Any frame counts as a sign of life, so a peer whose
 * pong is queued behind a stream of data it is sending never looks silent.
 *
 * Silence is only the peer's fault if it was asked and had the time to
 * answer. This process can stall (a long synchronous task, a GC pause, a
 * starved CPU) for longer than the timeout: meanwhile it sends no ping, and
 * what the peer sent waits unread in the socket. So the clock runs from a
 * ping that went out, not from the last frame read, and a verdict of silence
 * waits for one turn of the event loop (Node runs timers before it reads
 * sockets) so that frames that arrived during a stall are read first.
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
  /** When the oldest ping sent since the last sign of life went out; undefined while none is unanswered. */
  private askedAt: number | undefined;
  /** A verdict of silence waits for the sockets to be read (see {@link check}). */
  private verdictPending = false;
  private readonly timer: NodeJS.Timeout;
  private readonly heard = (): void => {
    this.lastHeard = performance.now();
    this.askedAt = undefined;
  };
  private stopped = false;

  /**
   * Starts watching `socket`; `onSilent` runs once, just before the socket
   * is cut, when a ping stayed unanswered for `timeoutMs`. Stops by itself when the socket closes.
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

  private unansweredTooLong(): boolean {
    return this.askedAt !== undefined && performance.now() - this.askedAt > this.timeoutMs;
  }

  private check(): void {
    if (this.stopped) return;
    if (this.unansweredTooLong()) {
      // Timers run before the event loop reads sockets: after a stall of this
      // process, the peer's answer may be waiting unread right now. An
      // immediate runs after the sockets have been read; judge there.
      if (!this.verdictPending) {
        this.verdictPending = true;
        setImmediate(() => {
          this.verdictPending = false;
          this.judge();
        });
      }
      return;
    }
    try {
      this.socket.ping();
      this.askedAt ??= performance.now();
    } catch {
      // Not open any more: its close event stops this.
    }
  }

  private judge(): void {
    if (this.stopped || !this.unansweredTooLong()) return;
    this.stop();
    this.onSilent(performance.now() - this.lastHeard);
    this.socket.terminate();
  }

  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.timer);
    this.socket.off('pong', this.heard);
    this.socket.off('message', this.heard);
  }
}
