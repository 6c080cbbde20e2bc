import type { Writable } from 'node:stream';

/**
 * Batches a socket's writes by turn of the event loop (issue 9: batching
 * requests and replies when many are pending). The first frame sent in a
 * turn corks the socket; a `process.nextTick` uncorks it once the turn's
 * synchronous work and microtasks are done (Node runs the tick queue and the
 * microtask queue in turn until both are empty), so every frame sent in
 * that turn (the answers to all the requests one read brought, the requests
 * of all the faults a resolver read at once) leaves in one write.
 *
 * Nothing is reordered and nothing is held past the turn: frames leave in
 * the order they were sent, and a lone frame leaves as soon as its turn
 * ends, before any I/O is polled again. A socket destroyed while corked
 * loses what it held, as it loses what the kernel had not sent yet: the
 * recovery protocol already covers both (requests pending are replayed,
 * pages lost are unsent again).
 */
export class TurnCork {
  private corked = false;

  constructor(private readonly socket: Writable) {}

  /** Call before each write: corks the socket for the rest of this turn. */
  hold(): void {
    if (this.corked) return;
    this.corked = true;
    this.socket.cork();
    process.nextTick(this.release);
  }

  private readonly release = (): void => {
    this.corked = false;
    this.socket.uncork();
  };
}
