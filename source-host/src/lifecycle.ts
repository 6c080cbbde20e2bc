/**
 * The source's migration, as one state machine over QEMU's MigrationStatus
 * names (qapi/migration.json): every phase is a state, every change of phase
 * one transition in the table below, so what the source does when (a start,
 * a lost connection, a resume, the switchover, the end) is read here, not
 * gathered from flags spread through the server.
 *
 *   setup ──start──▶ active (precopy rounds) ──switchover──▶ device
 *     │                 │ lost: cancelled         │ precopy: completed (the destination runs)
 *     │                 ▼ not converged: failed   ▼ hybrid:  postcopy-active
 *     └──start (postcopy mode)──────────────────▶ postcopy-active ⇄ postcopy-paused ──▶ failed
 *                                                        │ finish
 *                                                        ▼
 *                                                    completed
 *
 * `completed` is QEMU's: the guest runs on the destination with all it needs
 * from here (after precopy's stop-and-copy), or every page has arrived. The
 * tool's own accounting (finish and its summary) can still follow there, and
 * a connection lost before the summary is resumed like one lost in postcopy.
 * A source restarted with `--resume` begins in postcopy-paused.
 */
import { EventEmitter } from 'node:events';

export type SourceState = 'setup' | 'active' | 'device' | 'postcopy-active' | 'postcopy-paused' | 'completed' | 'cancelled' | 'failed';

/** The legal transitions; anything else is a bug of the caller and throws. */
const TRANSITIONS: Record<SourceState, readonly SourceState[]> = {
  setup: ['active', 'postcopy-active', 'failed', 'cancelled'],
  active: ['device', 'cancelled', 'failed'],
  device: ['completed', 'postcopy-active', 'cancelled', 'failed'],
  'postcopy-active': ['postcopy-paused', 'completed', 'failed'],
  'postcopy-paused': ['postcopy-active', 'completed', 'failed'],
  completed: ['postcopy-paused', 'failed'],
  cancelled: [],
  failed: [],
};

/**
 * Events: `state` (to, from, reason) on every transition.
 */
export class SourceLifecycle extends EventEmitter {
  private current: SourceState;
  /** The state a pause returns to on resume (postcopy-active, or completed before the summary). */
  private resumeTo: SourceState = 'postcopy-active';
  /** The destination has its summary: the migration is over for good, nobody joins any more. */
  private summarized = false;
  /** Why the migration failed or was cancelled, once it did. */
  endReason: string | undefined;

  constructor(restarted: boolean) {
    super();
    this.current = restarted ? 'postcopy-paused' : 'setup';
  }

  get state(): SourceState {
    return this.current;
  }

  /** Whether a channel may still join: not after the summary, a failure or a cancel. */
  get joinable(): boolean {
    return !this.summarized && this.current !== 'failed' && this.current !== 'cancelled';
  }

  /** The migration is over (summary sent, failed or cancelled). */
  get ended(): boolean {
    return !this.joinable;
  }

  get isPaused(): boolean {
    return this.current === 'postcopy-paused';
  }

  /** Precopy (active) or the switchover window (device): the guest has not left. A lost connection cancels. */
  get beforeSwitchover(): boolean {
    return this.current === 'active' || this.current === 'device';
  }

  private to(next: SourceState, reason: string): void {
    const from = this.current;
    if (!TRANSITIONS[from].includes(next)) throw new Error(`migration state: expected a transition from ${from} to one of ${TRANSITIONS[from].join(', ') || 'nothing'}, got ${next} (${reason})`);
    this.current = next;
    this.emit('state', next, from, reason);
  }

  /** `start` from the destination: precopy rounds, or postcopy at once. */
  start(precopy: boolean): void {
    this.to(precopy ? 'active' : 'postcopy-active', 'start');
  }

  /** The guest stopped on the source; the last of what must go before it runs on the destination goes now. */
  switchover(): void {
    this.to('device', 'switchover');
  }

  /** After the switchover: postcopy begins (hybrid) or the destination runs with all of its memory (precopy). */
  switched(postcopy: boolean): void {
    this.to(postcopy ? 'postcopy-active' : 'completed', postcopy ? 'postcopy starts' : 'stop-and-copy done');
  }

  /** The main channel was lost after the switchover: wait for the destination to resume. */
  pause(reason: string): void {
    if (this.current !== 'postcopy-paused') this.resumeTo = this.current === 'completed' ? 'completed' : 'postcopy-active';
    this.to('postcopy-paused', reason);
  }

  resume(): void {
    this.to(this.resumeTo, 'resumed');
  }

  /** The summary went out: the migration is complete and closed. */
  finish(): void {
    this.summarized = true;
    if (this.current !== 'completed') this.to('completed', 'finish');
  }

  /** The guest never left: the migration is called off (QEMU's cancelled). */
  cancel(reason: string): void {
    this.endReason = reason;
    this.to('cancelled', reason);
  }

  fail(reason: string): void {
    this.endReason = reason;
    if (this.current !== 'failed') this.to('failed', reason);
  }

  /** The legal successors of `state` (for tests and documentation). */
  static successors(state: SourceState): readonly SourceState[] {
    return TRANSITIONS[state];
  }
}
