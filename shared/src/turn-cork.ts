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
  /** Which release is due for the current cork: at the end of the turn, or of the poll. */
  private due: 'tick' | 'poll' | undefined;
  /** Bumped by every cork, so that a release scheduled for an earlier one does nothing. */
  private generation = 0;

  constructor(private readonly socket: Writable) {}

  /**
   * Call before each write: corks the socket until the end of this turn
   * (`tick`, the default), or until the event loop has run the callbacks of
   * every socket that was readable in this poll (`poll`, with setImmediate):
   * the frames one connection carries for many others (the source's main
   * channel: the pages requested on every fault channel, without preempt)
   * then leave in one write too. A `tick` frame brings the release forward
   * for the frames held with it: nothing waits longer than its own asked.
   */
  hold(until: 'tick' | 'poll' = 'tick'): void {
    if (!this.corked) {
      this.corked = true;
      this.due = undefined;
      this.generation++;
      this.socket.cork();
    }
    const generation = this.generation;
    if (until === 'tick' && this.due !== 'tick') {
      this.due = 'tick';
      process.nextTick(() => this.release(generation));
    } else if (this.due === undefined) {
      this.due = 'poll';
      setImmediate(() => this.release(generation));
    }
  }

  private release(generation: number): void {
    // A release for a cork that has ended already (a tick release came first).
    if (!this.corked || generation !== this.generation) return;
    this.corked = false;
    this.socket.uncork();
  }
}
