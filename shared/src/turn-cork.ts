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

  /**
   * `until`: `tick` (the default) releases at the end of the turn; `poll`
   * releases with setImmediate, after the event loop has run the callbacks of
   * every socket that was readable in this poll, so that the frames one
   * connection carries for many others (the source's main channel: the pages
   * requested on every fault channel, without preempt) leave in one write too.
   */
  constructor(
    private readonly socket: Writable,
    private readonly until: 'tick' | 'poll' = 'tick',
  ) {}

  /** Call before each write: corks the socket for the rest of this turn (or poll). */
  hold(): void {
    if (this.corked) return;
    this.corked = true;
    this.socket.cork();
    if (this.until === 'tick') process.nextTick(this.release);
    else setImmediate(this.release);
  }

  private readonly release = (): void => {
    this.corked = false;
    this.socket.uncork();
  };
}
