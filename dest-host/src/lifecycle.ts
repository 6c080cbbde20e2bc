/**
 * The destination's migration as one state machine over QEMU's
 * MigrationStatus names (what its incoming side reports in query-migrate):
 *
 *   setup ──start──▶ active (precopy: pages arrive, the guest still runs on the source)
 *     │                 │ switchover (hybrid): postcopy-active    lost: cancelled
 *     │                 │ switchover (precopy): completed (the guest runs with all of its memory)
 *     └──start (postcopy mode)──▶ postcopy-active ⇄ postcopy-paused
 *                                      │ summary
 *                                      ▼
 *                                  completed
 *
 * Each transition is one line of the table below; runDestination moves the
 * machine, GET /status shows it, and what may happen in each state (a lost
 * connection cancels before the switchover and pauses after it; the guest's
 * vCPUs run only after it) is asked of it rather than of flags.
 */
export type DestState = 'setup' | 'active' | 'postcopy-active' | 'postcopy-paused' | 'completed' | 'cancelled' | 'failed';

const TRANSITIONS: Record<DestState, readonly DestState[]> = {
  setup: ['active', 'postcopy-active', 'failed', 'cancelled'],
  active: ['postcopy-active', 'completed', 'cancelled', 'failed'],
  'postcopy-active': ['postcopy-paused', 'completed', 'failed'],
  'postcopy-paused': ['postcopy-active', 'completed', 'failed'],
  completed: ['postcopy-paused', 'failed'],
  cancelled: [],
  failed: [],
};

export class DestLifecycle {
  private current: DestState = 'setup';
  /** Where a resume returns to: postcopy-active, or completed when precopy had brought every page. */
  private resumeTo: DestState = 'postcopy-active';
  private switched = false;
  /** The summary came: the migration is over. */
  finished = false;
  private readonly listeners: ((to: DestState, from: DestState) => void)[] = [];

  get state(): DestState {
    return this.current;
  }

  onChange(listener: (to: DestState, from: DestState) => void): void {
    this.listeners.push(listener);
  }

  /** The guest may run here: postcopy from the start, or after the switchover. */
  get switchedOver(): boolean {
    return this.switched;
  }

  get isPaused(): boolean {
    return this.current === 'postcopy-paused';
  }

  private to(next: DestState): void {
    const from = this.current;
    if (!TRANSITIONS[from].includes(next)) throw new Error(`destination state: expected a transition from ${from} to one of ${TRANSITIONS[from].join(', ') || 'nothing'}, got ${next}`);
    this.current = next;
    for (const l of this.listeners) l(next, from);
  }

  /** `start` went out: precopy rounds follow, or postcopy at once. */
  start(precopy: boolean): void {
    this.to(precopy ? 'active' : 'postcopy-active');
    if (!precopy) this.switched = true;
  }

  /** The source's `switchover`: postcopy (hybrid), or every page is here (precopy). */
  switchover(postcopy: boolean): void {
    if (this.current !== 'active') throw new Error(`destination state: expected a switchover during precopy (active), got one in ${this.current}`);
    this.switched = true;
    this.to(postcopy ? 'postcopy-active' : 'completed');
  }

  pause(): void {
    if (this.current !== 'postcopy-paused') this.resumeTo = this.current === 'completed' ? 'completed' : 'postcopy-active';
    this.to('postcopy-paused');
  }

  resume(): void {
    this.to(this.resumeTo);
  }

  /** The source's summary arrived. */
  finish(): void {
    this.finished = true;
    if (this.current !== 'completed') this.to('completed');
  }

  cancel(): void {
    if (this.current !== 'failed' && this.current !== 'cancelled') this.to('cancelled');
  }

  fail(): void {
    if (this.current !== 'failed' && this.current !== 'cancelled') this.to('failed');
  }

  static successors(state: DestState): readonly DestState[] {
    return TRANSITIONS[state];
  }
}
