import PQueue from 'p-queue';

/** p-queue priorities: requested pages always before pushed pages. */
export const URGENT = 1;
export const BACKGROUND = 0;

/** The promise an urgent task run at once returns (one, shared: nothing to allocate per request). */
const DONE: Promise<void> = Promise.resolve();

/**
 * The source's send scheduler: one p-queue, one task at a time, urgent tasks
 * (answers to requests) ahead of every background task (pushes).
 *
 * p-queue starts the next task from the previous one's promise resolution, a
 * microtask; tasks that finish without waiting for I/O would drain the whole
 * queue before the event loop reads another socket. After each background
 * task the queue therefore pauses until a macrotask later (setImmediate), so
 * a request that arrived while pages were being pushed is read before the
 * next push.
 *
 * An urgent task that finds nothing running and no urgent task waiting runs
 * at once, in the caller's turn, without a promise chain (issue 9: a request
 * when nothing is queued needs none). That keeps every order p-queue gives:
 * urgent tasks in arrival order (one runs at once only when none waits) and
 * ahead of every background task (those waiting stay behind it). It also
 * holds during the pause after a push, so a request read there is answered
 * in the turn it was read. Urgent tasks must be synchronous for this (they
 * are: answers and re-sent pages only hand frames to sockets).
 */
export class Scheduler {
  private readonly queue = new PQueue({ concurrency: 1 });
  /** The queue is paused for the yield after a background task. */
  private yielding = false;

  urgent(task: () => void): Promise<void> {
    if (this.queue.pending === 0 && this.queue.sizeBy({ priority: URGENT }) === 0) {
      try {
        task();
        return DONE;
      } catch (err) {
        return Promise.reject(err as Error);
      }
    }
    return this.queue.add(task, { priority: URGENT });
  }

  background(task: () => void | Promise<void>): Promise<void> {
    return this.queue.add(
      async () => {
        await task();
        this.yieldAfterBackground();
      },
      { priority: BACKGROUND },
    );
  }

  /** Holds the queue until a macrotask later, so that sockets are read between two pushes. */
  private yieldAfterBackground(): void {
    if (this.yielding) return;
    this.yielding = true;
    this.queue.pause();
    setImmediate(() => {
      this.yielding = false;
      this.queue.start();
    });
  }

  /** Tasks waiting (not counting the running one). */
  get waiting(): number {
    return this.queue.size;
  }

  onIdle(): Promise<void> {
    return this.queue.onIdle();
  }

  clear(): void {
    this.queue.clear();
  }
}
