import { COUNTER } from '../vmm/state.js';

/**
 * The destination's connection session, shared by every thread that talks to
 * the source: one Int32 word that is even while connected (the session's
 * epoch) and odd while paused (QEMU's postcopy-paused). Only the main thread
 * moves it: {@link pause} when a connection is lost or a drop is injected,
 * {@link resume} once the source has answered `resume`. Fault channels in
 * worker threads watch it: a pause cuts their sockets (pending requests are
 * kept), a resume makes them reconnect and replay what is pending.
 *
 * Replies from an ended session must not be installed after the pause took
 * its receivedmap snapshot (the source would send those pages again: EEXIST,
 * a page sent twice). Installers bracket the check-and-install with
 * {@link enterInstall}/{@link leaveInstall}; the pause waits for the count to
 * reach 0 ({@link quiesce}) before the snapshot. Atomics are sequentially
 * consistent, so an installer either saw the pause (and dropped the reply) or
 * is counted and finishes before the snapshot.
 */
export class Session {
  constructor(private readonly words: Int32Array) {}

  get epoch(): number {
    return Atomics.load(this.words, COUNTER.SESSION);
  }

  static isPaused(epoch: number): boolean {
    return (epoch & 1) === 1;
  }

  /** Main thread: the connections are gone. Returns the paused value. */
  pause(): number {
    const epoch = this.epoch;
    if (Session.isPaused(epoch)) return epoch;
    Atomics.store(this.words, COUNTER.SESSION, epoch + 1);
    Atomics.notify(this.words, COUNTER.SESSION);
    return epoch + 1;
  }

  /** Main thread: the source resumed the migration; fault channels may reconnect. */
  resume(): number {
    const epoch = this.epoch;
    if (!Session.isPaused(epoch)) return epoch;
    Atomics.store(this.words, COUNTER.SESSION, epoch + 1);
    Atomics.notify(this.words, COUNTER.SESSION);
    return epoch + 1;
  }

  /** Resolves once the session word is no longer `epoch` (or after `timeoutMs`). */
  async changed(epoch: number, timeoutMs: number): Promise<number> {
    const wait = Atomics.waitAsync(this.words, COUNTER.SESSION, epoch, timeoutMs);
    if (wait.async) {
      // A pending Atomics.waitAsync does not keep a worker's event loop alive
      // (nodejs/node#44729): once a paused fault channel has cut its socket,
      // nothing else may, and the worker would stop running before the
      // resume wakes it. A timer for the same span keeps it alive.
      const keepAlive = setTimeout(() => {}, timeoutMs + 50);
      try {
        await wait.value;
      } finally {
        clearTimeout(keepAlive);
      }
    }
    return this.epoch;
  }

  /** The same, blocking this thread (a worker with nothing else to do: see BlockingPageChannel). */
  changedSync(epoch: number, timeoutMs: number): number {
    Atomics.wait(this.words, COUNTER.SESSION, epoch, timeoutMs);
    return this.epoch;
  }

  /**
   * An installer is about to install a reply that came on a connection of
   * session `epoch`: true if that session is still current (then call
   * {@link leaveInstall} once the page is marked received), false if it ended
   * (drop the reply).
   */
  enterInstall(epoch: number): boolean {
    Atomics.add(this.words, COUNTER.INSTALLING, 1);
    if (Atomics.load(this.words, COUNTER.SESSION) === epoch) return true;
    this.leaveInstall();
    return false;
  }

  leaveInstall(): void {
    // Wake a pausing main thread only (a notify on every install would cost a lock).
    if (Atomics.sub(this.words, COUNTER.INSTALLING, 1) === 1 && Session.isPaused(this.epoch)) {
      Atomics.notify(this.words, COUNTER.INSTALLING);
    }
  }

  /** Counts pending requests re-sent after a resume. */
  countReplayed(n = 1): void {
    Atomics.add(this.words, COUNTER.REPLAYED, n);
  }

  /** Counts a reply dropped because its connection's session had ended. */
  countDropped(): void {
    Atomics.add(this.words, COUNTER.REPLIES_DROPPED, 1);
  }

  /** Main thread, after {@link pause}: waits until no installer is inside (a few µs at most). */
  quiesce(timeoutMs = 1000): void {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const inside = Atomics.load(this.words, COUNTER.INSTALLING);
      if (inside === 0) return;
      if (performance.now() > deadline) throw new Error(`pause: ${inside} reply install(s) still running after ${timeoutMs} ms`);
      Atomics.wait(this.words, COUNTER.INSTALLING, inside, 5);
    }
  }
}
