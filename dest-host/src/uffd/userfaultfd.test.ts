/**
 * The emulated userfaultfd against the kernel semantics table in DESIGN.md
 * ("Emulated userfaultfd: the semantics to match"). Faulting threads are real
 * worker threads (fixtures/faulting-thread.ts) blocked in Atomics.wait; this
 * thread plays the resolver (read / COPY / ZEROPAGE / WAKE).
 */
import type { Worker } from 'node:worker_threads';
import { makeLayout, makeMemslotLayout, startWorker, type GuestLayout } from '@postcopy/shared';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { GuestMemory } from '../memory/guest-memory.js';
import type { FaultingThreadData, FaultingThreadMessage } from './fixtures/faulting-thread.js';
import { loadNativeFutex, type Futex } from './futex.js';
import { ERRNO, MODE_DONTWAKE, MODE_WP, UFFD_PAGEFAULT_FLAG_WRITE, UffdMessage, Userfaultfd } from './userfaultfd.js';

/** Every semantic below holds whichever way the threads sleep (futex.ts): the kernel's futex where the addon loads, and V8's Atomics. */
const SLEEP_KINDS: Futex['kind'][] = loadNativeFutex() !== undefined ? ['futex', 'atomics'] : ['atomics'];
let sleepKind: Futex['kind'] = 'atomics';

const PAGE = 4096;
const HUGE = 2 * 1024 * 1024;
/** How long a thread that must stay blocked is watched for a wrong wake-up. */
const QUIET_MS = 300;
/** Upper bound for anything we wait for (worker start, a message, a wake-up). */
const TIMEOUT_MS = 5000;

type MessageType = FaultingThreadMessage['type'];
type MessageOf<T extends MessageType> = Extract<FaultingThreadMessage, { type: T }>;

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `condition` (letting worker messages in between) until true; rejects after `timeoutMs`. */
async function waitUntil(condition: () => boolean, what: string, timeoutMs = TIMEOUT_MS): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(2);
  }
}

/** Rejects if `promise` does not settle within `timeoutMs`. */
async function within<T>(promise: Promise<T>, what: string, timeoutMs = TIMEOUT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Word 0 of the page made by pageData(seed): a positive int32, as GuestMemory.load returns it. */
const firstWord = (seed: number): number => 0x10000 * (seed + 1) + 0xbeef;

/** Distinct contents for a page (or `size` bytes), recognisable by its first word. */
function pageData(seed: number, size = PAGE): Uint8Array {
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i++) bytes[i] = (i * 31 + seed * 7 + 1) & 0xff;
  new Int32Array(bytes.buffer, 0, 1)[0] = firstWord(seed);
  return bytes;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Index of the first byte where `actual` differs from `expected`, or -1 if they are equal. */
function firstDifference(actual: Uint8Array, expected: Uint8Array): number {
  if (actual.length !== expected.length) return Math.min(actual.length, expected.length);
  for (let i = 0; i < actual.length; i++) if (actual[i] !== expected[i]) return i;
  return -1;
}

/** One faulting worker thread and everything it has posted so far. */
class FaultingThread {
  readonly messages: FaultingThreadMessage[] = [];
  private failure: Error | undefined;
  private exitCode: number | undefined;

  constructor(
    readonly worker: Worker,
    readonly tid: number,
    readonly page: number,
  ) {
    worker.on('message', (m: FaultingThreadMessage) => this.messages.push(m));
    worker.on('error', (err: Error) => {
      this.failure = err;
    });
    worker.on('exit', (code: number) => {
      this.exitCode = code;
    });
  }

  find<T extends MessageType>(type: T): MessageOf<T> | undefined {
    return this.messages.find((m): m is MessageOf<T> => m.type === type);
  }

  /** Wake-ups (returns from handleFault) reported so far. */
  get wakeups(): number {
    return this.messages.filter((m) => m.type === 'woken').length;
  }

  private check(): void {
    if (this.failure !== undefined) throw new Error(`faulting thread ${this.tid} failed: ${this.failure.stack ?? this.failure.message}`);
  }

  async waitFor<T extends MessageType>(type: T, timeoutMs = TIMEOUT_MS): Promise<MessageOf<T>> {
    await waitUntil(
      () => {
        this.check();
        if (this.find(type) !== undefined) return true;
        if (this.exitCode !== undefined) throw new Error(`faulting thread ${this.tid} exited (${this.exitCode}) without '${type}': ${JSON.stringify(this.messages)}`);
        return false;
      },
      `'${type}' from faulting thread ${this.tid}`,
      timeoutMs,
    );
    return this.find(type)!;
  }

  async waitForWakeups(n: number): Promise<void> {
    await waitUntil(
      () => {
        this.check();
        return this.wakeups >= n;
      },
      `${n} wake-up(s) of faulting thread ${this.tid}`,
    );
  }
}

interface Fixture {
  layout: GuestLayout;
  memory: GuestMemory;
  uffd: Userfaultfd;
}

/** A 16-page guest of 4 KiB pages and its emulated userfaultfd. */
function setup(maxThreads = 4, maxContexts = 4): Fixture {
  const layout = makeLayout(16 * PAGE, PAGE);
  const memory = GuestMemory.create(layout, 1 << 30);
  const uffd = Userfaultfd.create(memory, maxThreads, maxContexts, sleepKind);
  return { layout, memory, uffd };
}

/** A process-wide context registering the whole guest. */
function openAll(f: Fixture, tid?: number): number {
  const ctx = f.uffd.open(tid);
  expect(f.uffd.register(ctx, 0, f.layout.guestBytes)).toBe(0);
  return ctx;
}

interface ReadMessage {
  address: number;
  flags: number;
  tid: number;
}

/** Blocking read(2) of one message (at most TIMEOUT_MS); fails the test if none comes. */
function readMessage(uffd: Userfaultfd, ctx: number): ReadMessage {
  const msg = new UffdMessage();
  expect(uffd.read(ctx, msg, TIMEOUT_MS), `a fault message on context ${ctx}`).toBe(true);
  return { address: msg.address, flags: msg.flags, tid: msg.tid };
}

const workers: Worker[] = [];

afterEach(async () => {
  const all = workers.splice(0);
  await Promise.all(all.map((w) => w.terminate()));
});

function startThread(
  f: Pick<Fixture, 'memory' | 'uffd'>,
  tid: number,
  page: number,
  write: boolean,
  options: Pick<FaultingThreadData, 'stopAfterWakeups'> = {},
): FaultingThread {
  const workerData: FaultingThreadData = { memory: f.memory.toBuffers(), uffd: f.uffd.toBuffers(), tid, page, write, ...options };
  const worker = startWorker(import.meta.url, 'fixtures/faulting-thread', { workerData });
  workers.push(worker);
  return new FaultingThread(worker, tid, page);
}

/**
 * After a thread's message has been read, the thread may still be between
 * queueing it and its must_wait look at the pte and the context (nanoseconds).
 * If the page appears (or the context closes) in that gap, it leaves the fault
 * by itself, as in the kernel, without being woken. Tests that need it asleep
 * first (to see it stay blocked, or to count it in threadsWoken) wait this long.
 */
const settle = (): Promise<void> => sleep(50);

/** Asserts thread `t` is still blocked on its page and posts nothing for QUIET_MS. */
async function expectStaysBlocked(uffd: Userfaultfd, ...threads: FaultingThread[]): Promise<void> {
  for (const t of threads) expect(uffd.blockedPage(t.tid), `thread ${t.tid} blocked`).toBe(t.page);
  await sleep(QUIET_MS);
  for (const t of threads) {
    expect(t.wakeups, `wake-ups of thread ${t.tid}`).toBe(0);
    expect(t.find('resumed'), `thread ${t.tid} resumed`).toBeUndefined();
    expect(uffd.blockedPage(t.tid), `thread ${t.tid} blocked`).toBe(t.page);
  }
}

describe.each(SLEEP_KINDS)('emulated userfaultfd, threads sleeping on %s: the kernel semantics of DESIGN.md', (kind) => {
  beforeEach(() => {
    sleepKind = kind;
  });

  it('sleeps and wakes the way its creator chose, in every thread that attaches', () => {
    const f = setup();
    expect(f.uffd.sleepKind).toBe(kind);
    expect(new Userfaultfd(f.uffd.toBuffers(), f.memory).sleepKind).toBe(kind);
  });

  it('COPY into a missing page copies len bytes and wakes this context\'s waiter on that page (only)', async () => {
    const f = setup();
    const { uffd, memory } = f;
    const ctx = openAll(f);
    const onFive = startThread(f, 1, 5, true);
    const onSix = startThread(f, 2, 6, false);
    const seen = [readMessage(uffd, ctx), readMessage(uffd, ctx)].sort((a, b) => a.tid - b.tid);
    expect(seen.map((m) => m.address)).toEqual([5 * PAGE, 6 * PAGE]);
    await settle();

    const src = pageData(5);
    expect(uffd.copy(ctx, 5 * PAGE, src, PAGE)).toBe(PAGE);
    expect(uffd.isPresent(5)).toBe(true);
    expect(firstDifference(memory.pageBytes(5), src)).toBe(-1);

    const resumed = await onFive.waitFor('resumed');
    expect(resumed).toEqual({ type: 'resumed', tid: 1, wakeups: 1, firstWord: firstWord(5) });
    expect(uffd.blockedPage(1)).toBe(-1);
    // The waiter on page 6 is outside the copied range: still blocked.
    expect(uffd.isPresent(6)).toBe(false);
    await expectStaysBlocked(uffd, onSix);
    expect(uffd.counters()).toMatchObject({ faults: 2, copies: 1, eexist: 0, threadsWoken: 1 });

    // A multi-page COPY with nobody waiting returns the whole len, every page in place.
    const three = concat(pageData(10), pageData(11), pageData(12));
    expect(uffd.copy(ctx, 10 * PAGE, three, 3 * PAGE)).toBe(3 * PAGE);
    for (const p of [10, 11, 12]) {
      expect(uffd.isPresent(p)).toBe(true);
      expect(firstDifference(memory.pageBytes(p), pageData(p))).toBe(-1);
    }
    expect(uffd.counters()).toMatchObject({ copies: 4, threadsWoken: 1 });
  });

  it('COPY into an installed page fails with -EEXIST and wakes nobody, not even in its own context', async () => {
    const f = setup();
    const { uffd, memory } = f;
    const ctx = openAll(f);
    const t = startThread(f, 1, 4, true);
    expect(readMessage(uffd, ctx)).toEqual({ address: 4 * PAGE, flags: UFFD_PAGEFAULT_FLAG_WRITE, tid: 1 });
    await settle();
    // Install without waking, so the thread is blocked on an installed page.
    expect(uffd.copy(ctx, 4 * PAGE, pageData(4), PAGE, MODE_DONTWAKE)).toBe(PAGE);

    expect(uffd.copy(ctx, 4 * PAGE, pageData(40), PAGE)).toBe(-ERRNO.EEXIST);
    expect(uffd.copy(ctx, 4 * PAGE, pageData(41), PAGE, MODE_DONTWAKE)).toBe(-ERRNO.EEXIST);
    expect(firstDifference(memory.pageBytes(4), pageData(4))).toBe(-1); // not overwritten
    await expectStaysBlocked(uffd, t);
    expect(uffd.counters()).toMatchObject({ copies: 1, eexist: 2, threadsWoken: 0 });

    expect(uffd.wake(ctx, 4 * PAGE, PAGE)).toBe(0);
    expect(await t.waitFor('resumed')).toEqual({ type: 'resumed', tid: 1, wakeups: 1, firstWord: firstWord(4) });
  });

  it('wake scope is per context: an EEXIST on the second per-thread context wakes nobody; that resolver owes a WAKE', async () => {
    const f = setup();
    const { uffd, memory } = f;
    const ctxA = openAll(f, 1); // thread 1's own userfaultfd
    const ctxB = openAll(f, 2); // thread 2's own userfaultfd
    const a = startThread(f, 1, 3, true);
    const b = startThread(f, 2, 3, false);

    // Each thread's fault goes to its own context, and only there.
    expect(readMessage(uffd, ctxA)).toEqual({ address: 3 * PAGE, flags: UFFD_PAGEFAULT_FLAG_WRITE, tid: 1 });
    expect(readMessage(uffd, ctxB)).toEqual({ address: 3 * PAGE, flags: 0, tid: 2 });
    const msg = new UffdMessage();
    expect(uffd.tryRead(ctxA, msg)).toBe(false);
    expect(uffd.tryRead(ctxB, msg)).toBe(false);
    await settle();

    // Resolver A installs the page: wakes A's thread only.
    expect(uffd.copy(ctxA, 3 * PAGE, pageData(3), PAGE)).toBe(PAGE);
    expect(await a.waitFor('resumed')).toEqual({ type: 'resumed', tid: 1, wakeups: 1, firstWord: firstWord(3) });

    // Resolver B's COPY of the same page: EEXIST, nothing copied, nobody woken.
    expect(uffd.copy(ctxB, 3 * PAGE, pageData(33), PAGE)).toBe(-ERRNO.EEXIST);
    expect(firstDifference(memory.pageBytes(3), pageData(3))).toBe(-1);
    await expectStaysBlocked(uffd, b);
    expect(uffd.counters()).toMatchObject({ faults: 2, copies: 1, eexist: 1, threadsWoken: 1 });

    // A WAKE on A does not reach B's thread either.
    expect(uffd.wake(ctxA, 3 * PAGE, PAGE)).toBe(0);
    await expectStaysBlocked(uffd, b);

    // B's WAKE releases it; it finds the page A installed.
    expect(uffd.wake(ctxB, 3 * PAGE, PAGE)).toBe(0);
    expect(await b.waitFor('resumed')).toEqual({ type: 'resumed', tid: 2, wakeups: 1, firstWord: firstWord(3) });
    expect(uffd.blockedPage(2)).toBe(-1);
    expect(uffd.counters()).toMatchObject({ faults: 2, threadsWoken: 2, wakeCalls: 2 });
  });

  it('ZEROPAGE installs zeros and wakes; a COPY after it (and a ZEROPAGE after a COPY) fails with -EEXIST', async () => {
    const f = setup();
    const { uffd, memory } = f;
    const ctx = openAll(f);
    // Bytes a cut stream left in a page it had taken (claim, write, release)
    // do not survive: a missing page holds zeros, so ZEROPAGE writes nothing.
    expect(uffd.copyClaim(2, 1)).toBe(1);
    memory.pagesBytes(2, 1).fill(0x5a);
    uffd.copyRelease(2, 1);
    expect(firstDifference(memory.pageBytes(2), new Uint8Array(PAGE))).toBe(-1);
    expect(uffd.zeropage(ctx, 2 * PAGE, PAGE)).toBe(PAGE);
    expect(uffd.isPresent(2)).toBe(true);
    expect(firstDifference(memory.pageBytes(2), new Uint8Array(PAGE))).toBe(-1);

    expect(uffd.copy(ctx, 2 * PAGE, pageData(2), PAGE)).toBe(-ERRNO.EEXIST);
    expect(firstDifference(memory.pageBytes(2), new Uint8Array(PAGE))).toBe(-1);

    expect(uffd.copy(ctx, 3 * PAGE, pageData(3), PAGE)).toBe(PAGE);
    expect(uffd.zeropage(ctx, 3 * PAGE, PAGE)).toBe(-ERRNO.EEXIST);
    expect(firstDifference(memory.pageBytes(3), pageData(3))).toBe(-1);
    expect(uffd.zeropage(ctx, 2 * PAGE, PAGE)).toBe(-ERRNO.EEXIST);

    // ZEROPAGE wakes this context's waiter like COPY does; what page 7 held before its discard is gone.
    expect(uffd.copy(ctx, 7 * PAGE, pageData(7), PAGE)).toBe(PAGE);
    expect(uffd.discard(7 * PAGE, PAGE)).toBe(0);
    const t = startThread(f, 1, 7, false);
    expect(readMessage(uffd, ctx)).toEqual({ address: 7 * PAGE, flags: 0, tid: 1 });
    await settle();
    expect(uffd.zeropage(ctx, 7 * PAGE, PAGE)).toBe(PAGE);
    expect(await t.waitFor('resumed')).toEqual({ type: 'resumed', tid: 1, wakeups: 1, firstWord: 0 });
    expect(uffd.counters()).toMatchObject({ zeropages: 2, copies: 2, eexist: 3, threadsWoken: 1, discards: 1 });
  });

  it('ZEROPAGE on 2 MiB pages fails with -EINVAL (hugetlb has no zero page); a COPY of zeros works', () => {
    const layout = makeLayout(4 * HUGE, HUGE);
    const memory = GuestMemory.create(layout, 1 << 30);
    const uffd = Userfaultfd.create(memory, 2, 1, sleepKind);
    const ctx = uffd.open();
    expect(uffd.register(ctx, 0, layout.guestBytes)).toBe(0);
    expect(uffd.zeropage(ctx, HUGE, HUGE)).toBe(-ERRNO.EINVAL);
    expect(uffd.zeropage(ctx, 0, 2 * HUGE)).toBe(-ERRNO.EINVAL);
    expect(uffd.isPresent(0)).toBe(false);
    expect(uffd.isPresent(1)).toBe(false);
    expect(uffd.counters()).toMatchObject({ zeropages: 0, eexist: 0 });
    // What QEMU does instead.
    expect(uffd.copy(ctx, HUGE, new Uint8Array(HUGE), HUGE)).toBe(HUGE);
    expect(uffd.isPresent(1)).toBe(true);
    // A misaligned 2 MiB copy (4 KiB aligned only) is EINVAL there.
    expect(uffd.copy(ctx, 2 * HUGE + PAGE, pageData(1, HUGE), HUGE)).toBe(-ERRNO.EINVAL);
    expect(uffd.copy(ctx, 2 * HUGE, pageData(1, HUGE), PAGE)).toBe(-ERRNO.EINVAL);
  });

  it('COPY of 2 pages where the 2nd is installed copies the 1st (4096, the kernel\'s EAGAIN) and wakes its waiter', async () => {
    const f = setup();
    const { uffd, memory } = f;
    const ctx = openAll(f);
    const t = startThread(f, 1, 6, true);
    expect(readMessage(uffd, ctx)).toEqual({ address: 6 * PAGE, flags: UFFD_PAGEFAULT_FLAG_WRITE, tid: 1 });
    await settle();
    expect(uffd.copy(ctx, 7 * PAGE, pageData(7), PAGE)).toBe(PAGE);

    expect(uffd.copy(ctx, 6 * PAGE, concat(pageData(6), pageData(70)), 2 * PAGE)).toBe(PAGE);
    expect(uffd.isPresent(6)).toBe(true);
    expect(firstDifference(memory.pageBytes(6), pageData(6))).toBe(-1);
    expect(firstDifference(memory.pageBytes(7), pageData(7))).toBe(-1); // the installed page is untouched
    expect(await t.waitFor('resumed')).toEqual({ type: 'resumed', tid: 1, wakeups: 1, firstWord: firstWord(6) });
    expect(uffd.counters()).toMatchObject({ copies: 2, threadsWoken: 1 });

    // When the 1st page is the installed one nothing is copied: -EEXIST, the 2nd stays missing.
    expect(uffd.copy(ctx, 7 * PAGE, concat(pageData(71), pageData(8)), 2 * PAGE)).toBe(-ERRNO.EEXIST);
    expect(uffd.isPresent(8)).toBe(false);
    expect(firstDifference(memory.pageBytes(7), pageData(7))).toBe(-1);
  });

  it('COPY into an unregistered range fails with -ENOENT and installs nothing', () => {
    const f = setup();
    const { uffd } = f;
    const ctx = uffd.open();
    expect(uffd.register(ctx, 0, 8 * PAGE)).toBe(0); // pages 0..7 only
    const empty = uffd.open(); // registers nothing
    const src = concat(pageData(1), pageData(2));

    expect(uffd.copy(ctx, 8 * PAGE, src, PAGE)).toBe(-ERRNO.ENOENT);
    expect(uffd.copy(ctx, 7 * PAGE, src, 2 * PAGE)).toBe(-ERRNO.ENOENT); // straddles the end
    expect(uffd.copy(ctx, 16 * PAGE, src, PAGE)).toBe(-ERRNO.ENOENT); // past the guest
    expect(uffd.zeropage(ctx, 9 * PAGE, PAGE)).toBe(-ERRNO.ENOENT);
    expect(uffd.copy(empty, 8 * PAGE, src, PAGE)).toBe(-ERRNO.ENOENT);
    expect(uffd.zeropage(empty, 9 * PAGE, PAGE)).toBe(-ERRNO.ENOENT);
    for (const p of [7, 8, 9]) expect(uffd.isPresent(p)).toBe(false);
    expect(uffd.counters()).toMatchObject({ copies: 0, zeropages: 0, eexist: 0 });

    // Inside the registered range it works.
    expect(uffd.copy(ctx, 7 * PAGE, src, PAGE)).toBe(PAGE);
    expect(uffd.isPresent(7)).toBe(true);
    // Once ctx is closed its pages are registered nowhere: ENOENT there too.
    uffd.close(ctx);
    expect(uffd.copy(empty, 6 * PAGE, src, PAGE)).toBe(-ERRNO.ENOENT);
  });

  it('COPY on a context into pages another context registers succeeds, and wakes only its own context (find_dst_vma)', async () => {
    // The kernel checks that the range is registered with *a* userfaultfd
    // (mm/userfaultfd.c, find_dst_vma), not with the one the ioctl came on.
    // The emulation used to answer ENOENT here; a real kernel copies.
    const f = setup();
    const { uffd, memory } = f;
    const low = uffd.open();
    const high = uffd.open();
    expect(uffd.register(low, 0, 8 * PAGE)).toBe(0);
    expect(uffd.register(high, 8 * PAGE, 8 * PAGE)).toBe(0);
    const t = startThread(f, 1, 9, false);
    expect(readMessage(uffd, high)).toEqual({ address: 9 * PAGE, flags: 0, tid: 1 });
    await settle();

    expect(uffd.copy(low, 9 * PAGE, pageData(9), PAGE)).toBe(PAGE);
    expect(firstDifference(memory.pageBytes(9), pageData(9))).toBe(-1);
    await expectStaysBlocked(uffd, t); // low had no waiter there; high's thread is not low's to wake
    expect(uffd.copy(high, 9 * PAGE, pageData(90), PAGE)).toBe(-ERRNO.EEXIST);
    expect(uffd.wake(high, 9 * PAGE, PAGE)).toBe(0);
    expect(await t.waitFor('resumed')).toEqual({ type: 'resumed', tid: 1, wakeups: 1, firstWord: firstWord(9) });
    // A range across the two contexts is no single registered vma.
    expect(uffd.copy(low, 7 * PAGE, concat(pageData(7), pageData(8)), 2 * PAGE)).toBe(-ERRNO.ENOENT);
  });

  it('REGISTER of pages another process-wide context has fails with -EBUSY; per-thread contexts may overlap', () => {
    const f = setup();
    const { uffd } = f;
    const a = uffd.open();
    const b = uffd.open();
    expect(uffd.register(a, 0, 8 * PAGE)).toBe(0);
    expect(uffd.register(b, 4 * PAGE, 8 * PAGE)).toBe(-ERRNO.EBUSY); // overlaps 4..7
    expect(uffd.register(b, 8 * PAGE, 8 * PAGE)).toBe(0);
    expect(uffd.register(a, 0, 8 * PAGE)).toBe(0); // again: nothing to do
    expect(uffd.register(a, 2 * PAGE, 2 * PAGE)).toBe(0);
    const own = uffd.open(1); // the per-thread proposal: overlapping is its point
    expect(uffd.register(own, 0, f.layout.guestBytes)).toBe(0);
    // b can take a's pages once a is closed (the kernel's release unregisters them).
    uffd.close(a);
    expect(uffd.register(b, 0, 8 * PAGE)).toBe(0);
  });

  it('UNREGISTER wakes the range\'s waiters, which read a zero page; COPY there is then ENOENT', async () => {
    const f = setup();
    const { uffd } = f;
    const ctx = openAll(f);
    // What page 6 held before its discard never shows.
    expect(uffd.copy(ctx, 6 * PAGE, pageData(6), PAGE)).toBe(PAGE);
    expect(uffd.discard(6 * PAGE, PAGE)).toBe(0);
    const t = startThread(f, 1, 6, true);
    const other = startThread(f, 2, 12, false);
    expect([readMessage(uffd, ctx).tid, readMessage(uffd, ctx).tid].sort()).toEqual([1, 2]);
    await settle();
    expect(uffd.unregister(ctx, 4 * PAGE, 4 * PAGE)).toBe(0); // pages 4..7
    // Two returns from handleFault: the wake-up, then the retry's plain fault (a zero page).
    expect(await t.waitFor('resumed')).toEqual({ type: 'resumed', tid: 1, wakeups: 2, firstWord: 0 });
    expect(uffd.copy(ctx, 5 * PAGE, pageData(5), PAGE)).toBe(-ERRNO.ENOENT);
    expect(uffd.copy(ctx, 3 * PAGE, pageData(3), PAGE)).toBe(PAGE); // the rest stays registered
    expect(uffd.copy(ctx, 8 * PAGE, pageData(8), PAGE)).toBe(PAGE);
    await expectStaysBlocked(uffd, other);
    expect(uffd.copy(ctx, 12 * PAGE, pageData(12), PAGE)).toBe(PAGE);
    expect(await other.waitFor('resumed')).toMatchObject({ firstWord: firstWord(12) });
    expect(uffd.unregister(ctx, PAGE + 1, PAGE)).toBe(-ERRNO.EINVAL);
  });

  it('COPY and ZEROPAGE modes other than DONTWAKE are -EINVAL (WP after the range lookup), installing nothing', () => {
    const f = setup();
    const { uffd } = f;
    const ctx = uffd.open();
    expect(uffd.register(ctx, 0, 8 * PAGE)).toBe(0);
    expect(uffd.copy(ctx, PAGE, pageData(1), PAGE, 1 << 2)).toBe(-ERRNO.EINVAL);
    expect(uffd.copy(ctx, PAGE, pageData(1), PAGE, MODE_WP)).toBe(-ERRNO.EINVAL);
    expect(uffd.copy(ctx, PAGE, pageData(1), PAGE, MODE_WP | MODE_DONTWAKE)).toBe(-ERRNO.EINVAL);
    expect(uffd.copy(ctx, 9 * PAGE, pageData(9), PAGE, MODE_WP)).toBe(-ERRNO.ENOENT); // the range is looked up first
    expect(uffd.zeropage(ctx, PAGE, PAGE, MODE_WP)).toBe(-ERRNO.EINVAL);
    expect(uffd.isPresent(1)).toBe(false);
    expect(uffd.copy(ctx, PAGE, pageData(1), PAGE, MODE_DONTWAKE)).toBe(PAGE);
  });

  it('UNREGISTER through a context of pages another process-wide context registers is -EINVAL and changes nothing', () => {
    const f = setup();
    const { uffd } = f;
    const owner = uffd.open();
    const other = uffd.open();
    expect(uffd.register(owner, 0, 8 * PAGE)).toBe(0);
    expect(uffd.unregister(other, 0, 8 * PAGE)).toBe(-ERRNO.EINVAL);
    expect(uffd.unregister(other, 4 * PAGE, 8 * PAGE)).toBe(-ERRNO.EINVAL); // overlapping is enough
    expect(uffd.unregister(other, 8 * PAGE, 8 * PAGE)).toBe(0); // nobody's pages: nothing to do
    expect(uffd.copy(owner, 2 * PAGE, pageData(2), PAGE)).toBe(PAGE); // still registered
  });

  it('discard makes installed pages missing again (zeroed, pte NONE): the next touch faults and a COPY installs anew', async () => {
    const f = setup();
    const { uffd, memory } = f;
    const ctx = openAll(f);
    expect(uffd.copy(ctx, 4 * PAGE, concat(pageData(4), pageData(5)), 2 * PAGE)).toBe(2 * PAGE);
    expect(uffd.discard(4 * PAGE, PAGE)).toBe(0);
    expect(uffd.isPresent(4)).toBe(false);
    expect(uffd.isPresent(5)).toBe(true);
    expect(firstDifference(memory.pageBytes(4), new Uint8Array(PAGE))).toBe(-1);
    expect(uffd.discard(0, f.layout.guestBytes)).toBe(0); // missing pages stay missing
    expect(uffd.isPresent(5)).toBe(false);
    expect(uffd.counters()).toMatchObject({ discards: 2 });

    const t = startThread(f, 1, 4, false);
    expect(readMessage(uffd, ctx)).toEqual({ address: 4 * PAGE, flags: 0, tid: 1 });
    expect(uffd.copy(ctx, 4 * PAGE, pageData(44), PAGE)).toBe(PAGE); // not EEXIST
    expect(await t.waitFor('resumed')).toMatchObject({ firstWord: firstWord(44) });
    expect(uffd.discard(PAGE + 8, PAGE)).toBe(-ERRNO.EINVAL);
    expect(uffd.discard(15 * PAGE, 2 * PAGE)).toBe(-ERRNO.EINVAL);
  });

  it('COPY at a misaligned address or length fails with -EINVAL (so do ZEROPAGE, WAKE, REGISTER)', () => {
    const f = setup();
    const { uffd } = f;
    const ctx = openAll(f);
    const empty = uffd.open();
    const src = concat(pageData(1), pageData(2));

    expect(uffd.copy(ctx, PAGE + 1, src, PAGE)).toBe(-ERRNO.EINVAL);
    expect(uffd.copy(ctx, PAGE + 512, src, PAGE)).toBe(-ERRNO.EINVAL);
    expect(uffd.copy(ctx, PAGE, src, 100)).toBe(-ERRNO.EINVAL);
    expect(uffd.copy(ctx, PAGE, src, PAGE + 1)).toBe(-ERRNO.EINVAL);
    expect(uffd.copy(ctx, PAGE, src, 0)).toBe(-ERRNO.EINVAL);
    expect(uffd.copy(ctx, -PAGE, src, PAGE)).toBe(-ERRNO.EINVAL);
    expect(uffd.copy(ctx, PAGE, src, 2.5 * PAGE)).toBe(-ERRNO.EINVAL);
    // Alignment is checked before the range lookup, as in the kernel.
    expect(uffd.copy(empty, PAGE + 1, src, PAGE)).toBe(-ERRNO.EINVAL);
    expect(uffd.zeropage(ctx, PAGE + 8, PAGE)).toBe(-ERRNO.EINVAL);
    expect(uffd.zeropage(ctx, PAGE, 8)).toBe(-ERRNO.EINVAL);
    expect(uffd.wake(ctx, 8, PAGE)).toBe(-ERRNO.EINVAL);
    expect(uffd.wake(ctx, 0, 0)).toBe(-ERRNO.EINVAL);
    expect(uffd.register(empty, 1, PAGE)).toBe(-ERRNO.EINVAL);
    expect(uffd.isPresent(1)).toBe(false);
    expect(uffd.isPresent(2)).toBe(false);
    expect(uffd.counters()).toMatchObject({ copies: 0, zeropages: 0, eexist: 0, wakeCalls: 0 });
  });

  it('COPY from a source shorter than len fails with -EFAULT and installs nothing; open() of a bad thread id uses no context', () => {
    const f = setup();
    const ctx = openAll(f);
    expect(f.uffd.copy(ctx, 0, pageData(1), 2 * PAGE)).toBe(-ERRNO.EFAULT);
    expect(f.uffd.isPresent(0)).toBe(false);
    expect(() => f.uffd.open(99)).toThrow(RangeError);
    // The slot was not used up: three more contexts still fit in maxContexts = 4.
    for (let i = 0; i < 3; i++) expect(f.uffd.open()).toBe(ctx + 1 + i);
  });

  it('WAKE on a range with no waiters succeeds and does nothing (a waiter next to it stays blocked)', async () => {
    const f = setup();
    const { uffd } = f;
    const ctx = openAll(f);
    expect(uffd.wake(ctx, 0, f.layout.guestBytes)).toBe(0); // nobody at all
    expect(uffd.counters()).toMatchObject({ wakeCalls: 1, threadsWoken: 0 });

    const t = startThread(f, 1, 9, false);
    expect(readMessage(uffd, ctx)).toEqual({ address: 9 * PAGE, flags: 0, tid: 1 });
    expect(uffd.wake(ctx, 8 * PAGE, PAGE)).toBe(0); // the page below
    expect(uffd.wake(ctx, 10 * PAGE, 6 * PAGE)).toBe(0); // everything above
    expect(uffd.wake(ctx, 0, 9 * PAGE)).toBe(0); // everything below
    await expectStaysBlocked(uffd, t);
    expect(uffd.counters()).toMatchObject({ wakeCalls: 4, threadsWoken: 0 });
    const msg = new UffdMessage();
    expect(uffd.tryRead(ctx, msg)).toBe(false);

    expect(uffd.copy(ctx, 9 * PAGE, pageData(9), PAGE)).toBe(PAGE);
    expect(await t.waitFor('resumed')).toEqual({ type: 'resumed', tid: 1, wakeups: 1, firstWord: firstWord(9) });
  });

  it('two threads faulting the same page deliver two messages, one per thread', async () => {
    const f = setup();
    const { uffd } = f;
    const ctx = openAll(f);
    const a = startThread(f, 1, 5, true);
    const b = startThread(f, 2, 5, false);
    const seen = [readMessage(uffd, ctx), readMessage(uffd, ctx)].sort((x, y) => x.tid - y.tid);
    expect(seen).toEqual([
      { address: 5 * PAGE, flags: UFFD_PAGEFAULT_FLAG_WRITE, tid: 1 },
      { address: 5 * PAGE, flags: 0, tid: 2 },
    ]);
    const msg = new UffdMessage();
    expect(uffd.tryRead(ctx, msg)).toBe(false); // exactly two
    // FAULTS is bumped just after a message is queued: it may trail the read by a moment.
    await waitUntil(() => uffd.counters().faults === 2, 'two faults counted');
    expect(uffd.blockedPage(1)).toBe(5);
    expect(uffd.blockedPage(2)).toBe(5);
    expect(a.wakeups + b.wakeups).toBe(0);
  });

  it('one COPY while two threads wait on that page (same context) wakes both', async () => {
    const f = setup();
    const { uffd } = f;
    const ctx = openAll(f);
    const a = startThread(f, 1, 12, true);
    const b = startThread(f, 3, 12, false);
    const tids = [readMessage(uffd, ctx).tid, readMessage(uffd, ctx).tid].sort();
    expect(tids).toEqual([1, 3]);
    await settle();

    expect(uffd.copy(ctx, 12 * PAGE, pageData(12), PAGE)).toBe(PAGE);
    const [ra, rb] = await Promise.all([a.waitFor('resumed'), b.waitFor('resumed')]);
    expect(ra).toEqual({ type: 'resumed', tid: 1, wakeups: 1, firstWord: firstWord(12) });
    expect(rb).toEqual({ type: 'resumed', tid: 3, wakeups: 1, firstWord: firstWord(12) });
    expect(uffd.counters()).toMatchObject({ faults: 2, copies: 1, threadsWoken: 2, wakeCalls: 0 });
    expect(uffd.blockedPage(1)).toBe(-1);
    expect(uffd.blockedPage(3)).toBe(-1);
  });

  it('COPY with DONTWAKE installs the page but the waiter stays blocked until a WAKE on its range', async () => {
    const f = setup();
    const { uffd, memory } = f;
    const ctx = openAll(f);
    const t = startThread(f, 2, 3, true);
    expect(readMessage(uffd, ctx)).toEqual({ address: 3 * PAGE, flags: UFFD_PAGEFAULT_FLAG_WRITE, tid: 2 });
    await settle();

    expect(uffd.copy(ctx, 3 * PAGE, pageData(3), PAGE, MODE_DONTWAKE)).toBe(PAGE);
    expect(uffd.isPresent(3)).toBe(true);
    expect(firstDifference(memory.pageBytes(3), pageData(3))).toBe(-1);
    await expectStaysBlocked(uffd, t);
    expect(uffd.counters()).toMatchObject({ copies: 1, threadsWoken: 0 });

    expect(uffd.wake(ctx, 3 * PAGE, PAGE)).toBe(0);
    expect(await t.waitFor('resumed')).toEqual({ type: 'resumed', tid: 2, wakeups: 1, firstWord: firstWord(3) });
    expect(uffd.counters()).toMatchObject({ faults: 1, threadsWoken: 1, wakeCalls: 1 });
  });

  it('a COPY in two halves (claim, bytes written in place, publish): waiters block meanwhile, other COPYs get EEXIST, a release wakes nobody', async () => {
    const f = setup();
    const { uffd, memory } = f;
    const ctx = openAll(f);
    // Page 6 is installed: a claim from 4 takes 4 and 5 and stops there.
    expect(uffd.copy(ctx, 6 * PAGE, pageData(6), PAGE)).toBe(PAGE);
    expect(uffd.copyClaim(4, 4)).toBe(2);
    // Taken pages read as missing: a thread touching one blocks; another COPY of it is EEXIST.
    const t = startThread(f, 1, 5, false);
    expect(readMessage(uffd, ctx)).toEqual({ address: 5 * PAGE, flags: 0, tid: 1 });
    expect(uffd.copy(ctx, 5 * PAGE, pageData(99), PAGE)).toBe(-ERRNO.EEXIST);
    expect(uffd.copyClaim(5, 1)).toBe(0);
    // Given back (the bytes never came): missing again, and nobody woken.
    uffd.copyRelease(4, 2);
    expect(uffd.isPresent(5)).toBe(false);
    await expectStaysBlocked(uffd, t);
    // Taken again, the bytes written straight into memory, then published: the waiter wakes with them.
    expect(uffd.copyClaim(4, 2)).toBe(2);
    memory.pagesBytes(4, 2).set(concat(pageData(4), pageData(5)));
    expect(uffd.copyPublish(ctx, 4, 2)).toBe(2 * PAGE);
    expect(await t.waitFor('resumed')).toEqual({ type: 'resumed', tid: 1, wakeups: 1, firstWord: firstWord(5) });
    expect(uffd.isPresent(4)).toBe(true);
    expect(firstDifference(memory.pageBytes(5), pageData(5))).toBe(-1);
    // Outside the registered ranges: ENOENT, nothing taken.
    expect(uffd.copyClaim(f.layout.totalPages - 1, 2)).toBe(-ERRNO.ENOENT);
  });

  it('WAKE while the page is still missing: the thread wakes, faults again, and a new message is delivered', async () => {
    const f = setup();
    const { uffd } = f;
    const ctx = openAll(f);
    const t = startThread(f, 2, 11, false);
    const first = readMessage(uffd, ctx);
    expect(first).toEqual({ address: 11 * PAGE, flags: 0, tid: 2 });

    expect(uffd.wake(ctx, 11 * PAGE, PAGE)).toBe(0);
    await t.waitForWakeups(1);
    const second = readMessage(uffd, ctx); // the retry's fault
    expect(second).toEqual(first);
    await waitUntil(() => uffd.counters().faults === 2, 'two faults counted');
    expect(uffd.counters()).toMatchObject({ faults: 2, threadsWoken: 1 });
    expect(uffd.blockedPage(2)).toBe(11);
    const msg = new UffdMessage();
    expect(uffd.tryRead(ctx, msg)).toBe(false); // one new message, not more
    expect(t.find('resumed')).toBeUndefined();

    expect(uffd.copy(ctx, 11 * PAGE, pageData(11), PAGE)).toBe(PAGE);
    expect(await t.waitFor('resumed')).toEqual({ type: 'resumed', tid: 2, wakeups: 2, firstWord: firstWord(11) });
  });

  it('a WAKE before the message is read withdraws it: only the retry\'s message is delivered', async () => {
    const f = setup();
    const { uffd } = f;
    const ctx = openAll(f);
    const t = startThread(f, 1, 13, true);
    // FAULTS is bumped after the message is queued.
    await waitUntil(() => uffd.counters().faults === 1 && uffd.blockedPage(1) === 13, 'thread 1 to queue its fault');
    expect(uffd.wake(ctx, 13 * PAGE, PAGE)).toBe(0);
    await t.waitForWakeups(1);
    await waitUntil(() => uffd.counters().faults === 2, 'thread 1 to fault again');

    expect(readMessage(uffd, ctx)).toEqual({ address: 13 * PAGE, flags: UFFD_PAGEFAULT_FLAG_WRITE, tid: 1 });
    const msg = new UffdMessage();
    expect(uffd.tryRead(ctx, msg)).toBe(false); // the first fault's message went with its wake-up
    expect(uffd.copy(ctx, 13 * PAGE, pageData(13), PAGE)).toBe(PAGE);
    expect(await t.waitFor('resumed')).toEqual({ type: 'resumed', tid: 1, wakeups: 2, firstWord: firstWord(13) });
  });

  it('a message carries the page-aligned address, the write flag (or 0 for a read) and the faulting thread id', async () => {
    const f = setup();
    const { uffd } = f;
    const ctx = openAll(f);
    startThread(f, 1, 7, true);
    startThread(f, 3, 2, false);
    const seen = [readMessage(uffd, ctx), readMessage(uffd, ctx)].sort((x, y) => x.tid - y.tid);
    expect(seen).toEqual([
      { address: 7 * PAGE, flags: UFFD_PAGEFAULT_FLAG_WRITE, tid: 1 },
      { address: 2 * PAGE, flags: 0, tid: 3 },
    ]);
    for (const m of seen) expect(m.address % PAGE).toBe(0);
    expect(UFFD_PAGEFAULT_FLAG_WRITE).toBe(1);
  });

  it('a fault address above 4 GiB round-trips through the message (2 MiB pages)', async () => {
    // 4 GiB + 8 MiB of 2 MiB pages. The test never touches page data, so the
    // guest memory is attached without buffers: nothing is allocated but the page table.
    const layout = makeLayout(4 * 1024 ** 3 + 4 * HUGE, HUGE);
    const memory = new GuestMemory({ layout, memslots: makeMemslotLayout(layout, 1 << 30), buffers: [] });
    const uffd = Userfaultfd.create(memory, 4, 1, sleepKind);
    const ctx = uffd.open();
    expect(uffd.register(ctx, 0, layout.guestBytes)).toBe(0);
    const f = { memory, uffd };
    const at4G = startThread(f, 1, 2048, false, { stopAfterWakeups: 1 });
    const last = startThread(f, 2, 2051, true, { stopAfterWakeups: 1 });
    const seen = [readMessage(uffd, ctx), readMessage(uffd, ctx)].sort((x, y) => x.tid - y.tid);
    expect(seen).toEqual([
      { address: 2 ** 32, flags: 0, tid: 1 },
      { address: 2 ** 32 + 3 * HUGE, flags: UFFD_PAGEFAULT_FLAG_WRITE, tid: 2 },
    ]);
    // WAKE with a 64-bit start reaches exactly those waiters.
    expect(uffd.wake(ctx, 2 ** 32 + 3 * HUGE, HUGE)).toBe(0);
    expect(await last.waitFor('stopped')).toEqual({ type: 'stopped', tid: 2, wakeups: 1 });
    expect(uffd.blockedPage(1)).toBe(2048);
    expect(uffd.wake(ctx, 2 ** 32, HUGE)).toBe(0);
    expect(await at4G.waitFor('stopped')).toEqual({ type: 'stopped', tid: 1, wakeups: 1 });
  });

  it('readAsync resolves when a message is queued, and resolves false after close', async () => {
    const f = setup();
    const { uffd } = f;
    const ctx = openAll(f);
    const msg = new UffdMessage();
    let settled = false;
    const pending = uffd.readAsync(ctx, msg).finally(() => {
      settled = true;
    });
    await sleep(30);
    expect(settled).toBe(false); // nothing queued yet

    const t = startThread(f, 1, 4, true);
    expect(await within(pending, 'readAsync to deliver the fault')).toBe(true);
    expect({ address: msg.address, flags: msg.flags, tid: msg.tid }).toEqual({ address: 4 * PAGE, flags: UFFD_PAGEFAULT_FLAG_WRITE, tid: 1 });
    expect(uffd.copy(ctx, 4 * PAGE, pageData(4), PAGE)).toBe(PAGE);
    await t.waitFor('resumed');

    // End of file: a pending readAsync resolves false on close.
    let eofSettled = false;
    const eof = uffd.readAsync(ctx, new UffdMessage()).finally(() => {
      eofSettled = true;
    });
    await sleep(30);
    expect(eofSettled).toBe(false);
    uffd.close(ctx);
    expect(uffd.isOpen(ctx)).toBe(false);
    expect(await within(eof, 'readAsync to see end-of-file')).toBe(false);
    // And any later read returns false at once.
    expect(await within(uffd.readAsync(ctx, new UffdMessage()), 'readAsync after close')).toBe(false);
    const started = performance.now();
    expect(uffd.read(ctx, new UffdMessage(), TIMEOUT_MS)).toBe(false);
    expect(performance.now() - started).toBeLessThan(1000);
  });

  it('a blocking read returns false after its timeout when nothing is pending', () => {
    const f = setup();
    const ctx = openAll(f);
    const started = performance.now();
    expect(f.uffd.read(ctx, new UffdMessage(), 50)).toBe(false);
    const elapsed = performance.now() - started;
    expect(elapsed).toBeGreaterThanOrEqual(45);
    expect(elapsed).toBeLessThan(2000);
  });

  it('close wakes the threads blocked on that context, and they read a zero page (never installed: not verified)', async () => {
    const f = setup();
    const { uffd } = f;
    const ctx = openAll(f);
    // What page 5 held before its discard does not show through.
    expect(uffd.copy(ctx, 5 * PAGE, pageData(5), PAGE)).toBe(PAGE);
    expect(uffd.discard(5 * PAGE, PAGE)).toBe(0);
    const t = startThread(f, 1, 5, true);
    expect(readMessage(uffd, ctx).tid).toBe(1);
    await settle();
    uffd.close(ctx);
    await t.waitForWakeups(1);
    // The kernel's release unregisters the range (fs/userfaultfd.c,
    // userfaultfd_release); the retry is a plain anonymous fault: zeros.
    // (The emulation used to throw a SIGBUS here.) Two returns from
    // handleFault: the wake-up, then the retry's plain fault.
    expect(await t.waitFor('resumed')).toEqual({ type: 'resumed', tid: 1, wakeups: 2, firstWord: 0 });
    expect(uffd.isPresent(5)).toBe(true);
    expect(uffd.blockedPage(1)).toBe(-1);
    expect(uffd.counters()).toMatchObject({ faults: 1, threadsWoken: 1 });
  });

  it('closing a per-thread context wakes only its thread, which then faults into the process-wide context', async () => {
    const f = setup();
    const { uffd } = f;
    const shared = openAll(f);
    const own = openAll(f, 1);
    const a = startThread(f, 1, 5, true);
    const b = startThread(f, 2, 5, false);
    expect(readMessage(uffd, own)).toEqual({ address: 5 * PAGE, flags: UFFD_PAGEFAULT_FLAG_WRITE, tid: 1 });
    expect(readMessage(uffd, shared)).toEqual({ address: 5 * PAGE, flags: 0, tid: 2 });

    uffd.close(own);
    await a.waitForWakeups(1);
    expect(readMessage(uffd, shared)).toEqual({ address: 5 * PAGE, flags: UFFD_PAGEFAULT_FLAG_WRITE, tid: 1 });
    expect(b.wakeups).toBe(0);
    expect(uffd.blockedPage(2)).toBe(5);

    expect(uffd.copy(shared, 5 * PAGE, pageData(5), PAGE)).toBe(PAGE);
    const [ra, rb] = await Promise.all([a.waitFor('resumed'), b.waitFor('resumed')]);
    expect(ra).toEqual({ type: 'resumed', tid: 1, wakeups: 2, firstWord: firstWord(5) });
    expect(rb).toEqual({ type: 'resumed', tid: 2, wakeups: 1, firstWord: firstWord(5) });
  });
});
