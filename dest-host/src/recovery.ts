import { ConnectionError, HandshakeError, PostcopyError, ProtocolError, type Resume, type Resumed } from '@postcopy/shared';
import type { PageClient } from './net/page-client.js';
import type { Session } from './net/session.js';

export interface RecoveryOptions {
  session: Session;
  /** Opens a new main channel (handshake done). */
  connectMain(): Promise<PageClient>;
  /** The image the migration began with: a source with another image cannot resume it. */
  imageDigest: string;
  /** The resume message, built from the receivedmap as it is at that moment. */
  resumeMessage(): Resume;
  /**
   * Takes over the new main channel (its message and close handlers). Called
   * synchronously when `resumed` arrives, so that the pages the source sends
   * right behind it reach the real handlers.
   */
  adopt(client: PageClient): void;
  /** A pause begins: cut the main channel, stop the watchdog, forget `complete`. */
  onPause(reason: string): void;
  /** The migration runs again. */
  onResume(resumed: Resumed, pausedMs: number): void;
  /** Recovery failed for good: fail the run. */
  fail(err: Error): void;
  reconnectTimeoutMs: number;
  /** How long the source may take to answer `resume`. */
  answerTimeoutMs: number;
  now(): number;
}

/** First retry after this long, doubling up to {@link MAX_BACKOFF_MS}. */
const FIRST_BACKOFF_MS = 50;
const MAX_BACKOFF_MS = 1000;

/**
 * The destination's side of postcopy recovery (QEMU's postcopy-paused and
 * postcopy-recover, migration/postcopy-ram.c and savevm.c): when a connection
 * to the source is lost, every connection is cut and the migration pauses
 * (vCPUs that touch missing pages stay blocked; nothing is installed from the
 * old connections after the receivedmap snapshot). The main channel then
 * reconnects with backoff and sends `resume` with the receivedmap (the source
 * marks every page the destination lacks as unsent, as QEMU's
 * ram_dirty_bitmap_reload does) and the pages still requested (QEMU re-sends
 * its page_requested tree); once the source answers `resumed`, the session
 * resumes and the fault channels reconnect and replay their pending requests.
 */
export class Recovery {
  pauses = 0;
  resumes = 0;
  pagesResent = 0;
  sourceRestarts = 0;
  pausedMs = 0;
  /** Each pause that ended in a resume: when (the options' clock), and why it began (for the timeline). */
  readonly spans: { startMs: number; endMs: number; reason: string }[] = [];
  private pausedNow = false;
  private pauseReason = '';
  private activeWaiters: (() => void)[] = [];
  private pauseWaiters: (() => void)[] = [];

  constructor(private readonly o: RecoveryOptions) {}

  get paused(): boolean {
    return this.pausedNow;
  }

  /** Resolves when the migration is not paused. */
  whenActive(): Promise<void> {
    return this.pausedNow ? new Promise((resolve) => this.activeWaiters.push(resolve)) : Promise.resolve();
  }

  /** Resolves when the next pause begins. */
  nextPause(): Promise<void> {
    return new Promise((resolve) => this.pauseWaiters.push(resolve));
  }

  /** A connection is lost (or a drop is injected): pause, reconnect, resume. Ignored while already paused. */
  lost(reason: string): void {
    if (this.pausedNow) return;
    this.pausedNow = true;
    void this.recover(reason).catch((err: Error) => this.o.fail(err));
  }

  private async recover(reason: string): Promise<void> {
    const { session } = this.o;
    const pausedAt = this.o.now();
    this.pauseReason = reason;
    this.pauses++;
    session.pause();
    this.o.onPause(reason);
    for (const w of this.pauseWaiters.splice(0)) w();
    // No reply from the old connections may be installed after the snapshot.
    session.quiesce();
    const deadline = pausedAt + this.o.reconnectTimeoutMs;
    let delay = 0;
    // A source that answered and refused says more than a later "connection refused".
    let refusal: Error | undefined;
    for (;;) {
      if (delay > 0) await new Promise((resolve) => setTimeout(resolve, delay));
      try {
        await this.resumeOnce(pausedAt);
        return;
      } catch (err) {
        if (!(err instanceof ConnectionError)) refusal = err as Error;
        delay = delay === 0 ? FIRST_BACKOFF_MS : Math.min(delay * 2, MAX_BACKOFF_MS);
        if (this.o.now() + delay > deadline) {
          throw new ConnectionError(
            `the connection to the source was lost (${reason}) and the migration could not be resumed within ${this.o.reconnectTimeoutMs} ms; ` +
              `last attempt: ${(err as Error).message}${refusal && refusal !== err ? `; earlier the source refused: ${refusal.message}` : ''}`,
          );
        }
      }
    }
  }

  /** One attempt: a new main channel, `resume`, and its `resumed`. */
  private async resumeOnce(pausedAt: number): Promise<void> {
    const client = await this.o.connectMain();
    const digest = client.welcome.imageDigest;
    if (digest !== this.o.imageDigest) {
      client.terminate();
      throw new HandshakeError(
        `expected the source's image ${this.o.imageDigest.slice(0, 16)}…, got ${digest.slice(0, 16)}… (start the source with the same image options to resume)`,
      );
    }
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        client.terminate();
        reject(new ConnectionError(`the source did not answer resume within ${this.o.answerTimeoutMs} ms`));
      }, this.o.answerTimeoutMs);
      client.onMessage = (m) => {
        clearTimeout(timer);
        if (m.type === 'resumed') {
          this.resumed(client, m, pausedAt);
          resolve();
          return;
        }
        client.terminate();
        reject(
          m.type === 'error'
            ? new PostcopyError(m.code, `the source refused to resume: ${m.message}`)
            : new ProtocolError(`expected resumed in answer to resume, got ${m.type}`),
        );
      };
      client.onClose = (err) => {
        clearTimeout(timer);
        reject(err ?? new ConnectionError('the source closed the connection before it answered resume'));
      };
      // The snapshot is taken here, after the pause quiesced every installer.
      client.send(this.o.resumeMessage());
    });
  }

  /** Synchronous: the source resumed. Everything is in place before the next frame is read. */
  private resumed(client: PageClient, m: Resumed, pausedAt: number): void {
    const now = this.o.now();
    const pausedMs = now - pausedAt;
    this.spans.push({ startMs: pausedAt, endMs: now, reason: this.pauseReason });
    this.resumes++;
    this.pagesResent += m.pagesMarkedUnsent;
    if (m.restarted) this.sourceRestarts++;
    this.pausedMs += pausedMs;
    this.pausedNow = false;
    this.o.adopt(client);
    this.o.session.resume();
    this.o.onResume(m, pausedMs);
    for (const w of this.activeWaiters.splice(0)) w();
  }
}
