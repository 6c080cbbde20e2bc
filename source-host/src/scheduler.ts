import PQueue from 'p-queue';
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';

/** p-queue priorities: requested pages always before pushed pages. */
export const URGENT = 1;
export const BACKGROUND = 0;

/**
 * The source's send scheduler: one p-queue, one task at a time, urgent tasks
 * (answers to requests) ahead of every background task (pushes).
 *
 * p-queue starts the next task from the previous one's promise resolution, a
 * microtask; tasks that finish without waiting for I/O would drain the whole
 * queue before the event loop reads another socket. Background tasks therefore
 * end by yielding a macrotask (setImmediate), so a request that arrived while
 * pages were being pushed is read and queued ahead of the next push.
 */
export class Scheduler {
  private readonly queue = new PQueue({ concurrency: 1 });

  urgent(task: () => void | Promise<void>): Promise<void> {
    return this.queue.add(async () => {
      await task();
    }, { priority: URGENT });
  }

  background(task: () => void | Promise<void>): Promise<void> {
    return this.queue.add(
      async () => {
        await task();
        await yieldToEventLoop();
      },
      { priority: BACKGROUND },
    );
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
