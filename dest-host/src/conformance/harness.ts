/**
 * What a conformance case drives: one guest (16 pages of 4 KiB) on one
 * memory backend, real faulting worker threads (thread.ts), and this thread
 * as the resolver. Everything a case observes is put in words that do not
 * depend on the backend: errno names, byte counts, which of the case's
 * threads a message came from, what a thread read ("data 5", "zeros").
 * No addresses, thread ids or timings reach an observation.
 *
 * Never touch guest memory from this thread: on uffd a missing page would
 * block it in the kernel with nobody left to resolve the fault. Pages are
 * read by the faulting threads, which report word 0 of what they read.
 */
import type { Worker } from 'node:worker_threads';
import { makeLayout, startWorker } from '@postcopy/shared';
import type { BackendMemory, FaultMessage, MemoryBackend } from '../memory/backend.js';
import { UFFD_PAGEFAULT_FLAG_WRITE } from '../memory/backend.js';
import { errnoName } from '../memory/uffd-native.js';
import type { ConformanceThreadCommand, ConformanceThreadData, ConformanceThreadMessage } from './thread.js';

export const PAGE = 4096;
export const GUEST_PAGES = 16;
/** How long a thread that must stay blocked is watched for a wrong wake-up. */
export const QUIET_MS = 300;
/** Upper bound for anything awaited: a worker start, a message, a wake-up. */
export const TIMEOUT_MS = 5000;
const MAX_THREADS = 8;
const MAX_CONTEXTS = 8;

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Word 0 of the page made by pageData(seed). */
export const firstWord = (seed: number): number => 0x10000 * (seed + 1) + 0xbeef;

/** Distinct contents of `pages` pages, page i recognisable by firstWord(seeds[i]). */
export function pageData(...seeds: number[]): Uint8Array {
  const bytes = new Uint8Array(seeds.length * PAGE);
  seeds.forEach((seed, p) => {
    for (let i = 0; i < PAGE; i++) bytes[p * PAGE + i] = (i * 31 + seed * 7 + 1) & 0xff;
    new DataView(bytes.buffer, p * PAGE, 4).setInt32(0, firstWord(seed), true);
  });
  return bytes;
}

/** An ioctl result in backend-independent words: a byte count, `ok` for 0, or an errno name. */
export function result(r: number): number | string {
  if (r === 0) return 'ok';
  return r > 0 ? r : errnoName(r);
}

/** One faulting worker thread and what it has posted. */
export class CaseThread {
  readonly messages: ConformanceThreadMessage[] = [];
  failure: Error | undefined;
  exited = false;
  tid = -1;
  private resumedSeen = 0;

  constructor(
    readonly label: string,
    readonly worker: Worker,
  ) {
    worker.on('message', (m: ConformanceThreadMessage) => {
      if (m.type === 'ready') this.tid = m.tid;
      this.messages.push(m);
    });
    worker.on('error', (err: Error) => {
      this.failure = err;
    });
    worker.on('exit', () => {
      this.exited = true;
    });
  }

  /** Read results taken so far by {@link Harness.readResult}. */
  readsSeen = 0;

  get reads(): Extract<ConformanceThreadMessage, { type: 'read-result' }>[] {
    return this.messages.filter((m): m is Extract<ConformanceThreadMessage, { type: 'read-result' }> => m.type === 'read-result');
  }

  get resumes(): Extract<ConformanceThreadMessage, { type: 'resumed' }>[] {
    return this.messages.filter((m): m is Extract<ConformanceThreadMessage, { type: 'resumed' }> => m.type === 'resumed');
  }

  /** The next resume not yet taken by {@link Harness.resumed}/{@link Harness.stays}. */
  takeResume(): Extract<ConformanceThreadMessage, { type: 'resumed' }> | undefined {
    const r = this.resumes[this.resumedSeen];
    if (r !== undefined) this.resumedSeen++;
    return r;
  }

  peekResume(): boolean {
    return this.resumes.length > this.resumedSeen;
  }

  check(): void {
    if (this.failure) throw new Error(`thread ${this.label} failed: ${this.failure.stack ?? this.failure.message}`);
    if (this.exited) throw new Error(`thread ${this.label} exited: ${JSON.stringify(this.messages)}`);
  }
}

export class Harness {
  readonly threads: CaseThread[] = [];
  private readonly contexts: number[] = [];
  private readonly seeds = new Map<number, number>();
  private readonly msg: FaultMessage = { address: 0, flags: 0, tid: 0 };

  private constructor(
    readonly backend: MemoryBackend,
    readonly memory: BackendMemory,
  ) {
    for (let seed = 0; seed < 256; seed++) this.seeds.set(firstWord(seed), seed);
  }

  static create(backend: MemoryBackend): Harness {
    const layout = makeLayout(GUEST_PAGES * PAGE, PAGE);
    const memory = backend.create({ layout, memslotBytes: layout.guestBytes, maxThreads: MAX_THREADS, maxContexts: MAX_CONTEXTS });
    return new Harness(backend, memory);
  }

  // ------------------------------------------------------------ contexts and ioctls

  /** A new context (closed by dispose if the case does not). */
  open(): number {
    const ctx = this.memory.open();
    this.contexts.push(ctx);
    return ctx;
  }

  /** A context registering the whole guest. */
  openAll(): number {
    const ctx = this.open();
    const r = this.memory.register(ctx, 0, GUEST_PAGES * PAGE);
    if (r !== 0) throw new Error(`expected REGISTER of the whole guest to succeed, got ${result(r)}`);
    return ctx;
  }

  copy(ctx: number, page: number, seeds: number[], mode = 0): number | string {
    return result(this.memory.copy(ctx, page * PAGE, pageData(...seeds), seeds.length * PAGE, mode));
  }

  /**
   * The ioctl's own result for a COPY whose `copy` field says `copied`
   * (userfaultfd_copy: -EAGAIN when fewer bytes than asked were copied).
   */
  static ioctlOfCopy(copied: number, len: number): string {
    if (copied < 0) return errnoName(copied);
    return copied === len ? 'ok' : 'EAGAIN';
  }

  // ------------------------------------------------------------ threads

  /** Starts a faulting thread and waits until it is attached. */
  async thread(label: string): Promise<CaseThread> {
    const data: ConformanceThreadData = { backend: this.backend.name, handle: this.memory.handle, slot: this.threads.length + 1 };
    const worker = startWorker(import.meta.url, 'thread', { workerData: data });
    const t = new CaseThread(label, worker);
    this.threads.push(t);
    await this.until(() => t.tid >= 0, `thread ${label} to start`, t);
    return t;
  }

  touch(t: CaseThread, page: number, write = false): void {
    const cmd: ConformanceThreadCommand = { type: 'touch', page, write };
    t.worker.postMessage(cmd);
  }

  /** Makes `t` a reader: it blocks in read(2) of `ctx` (Infinity: no timeout of its own), or awaits readAsync. */
  readFrom(t: CaseThread, ctx: number, how: 'blocking' | 'async' = 'blocking'): void {
    const cmd: ConformanceThreadCommand = how === 'async' ? { type: 'read-async', ctx } : { type: 'read', ctx, timeoutMs: Infinity };
    t.worker.postMessage(cmd);
  }

  /** readAsync on this thread, as words (`still reading` after TIMEOUT_MS). */
  async readAsync(ctx: number): Promise<string> {
    const msg: FaultMessage = { address: 0, flags: 0, tid: 0 };
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), TIMEOUT_MS);
    });
    const r = await Promise.race([this.memory.readAsync(ctx, msg), timeout]);
    clearTimeout(timer);
    if (r === 'timeout') return 'still reading';
    return r === 0 ? this.describeMessage(msg) : `none (${result(r)})`;
  }

  /** What `t`'s next read returned (up to TIMEOUT_MS): the message, `none (ERRNO)`, or `still reading`. */
  async readResult(t: CaseThread): Promise<string> {
    const deadline = Date.now() + TIMEOUT_MS;
    while (t.reads.length <= t.readsSeen && Date.now() < deadline) {
      t.check();
      await sleep(2);
    }
    const r = t.reads[t.readsSeen];
    if (r === undefined) return 'still reading';
    t.readsSeen++;
    return r.result === 0 ? this.describeMessage(r.message) : `none (${result(r.result)})`;
  }

  /** Waits until every thread is asleep in its fault (so a DONTWAKE COPY cannot race its must_wait check). */
  async blocked(...threads: CaseThread[]): Promise<void> {
    for (const t of threads) await this.until(() => this.memory.isBlockedInFault(t.tid), `thread ${t.label} to block in its fault`, t);
    // The emulation publishes the wait before its must_wait look at the pte: let it get to sleep.
    await sleep(20);
  }

  /** Waits for the thread's next resume (up to TIMEOUT_MS): what it read, or `blocked`. */
  async resumed(t: CaseThread): Promise<string> {
    const deadline = Date.now() + TIMEOUT_MS;
    while (!t.peekResume() && Date.now() < deadline) {
      t.check();
      await sleep(2);
    }
    return this.outcome(t);
  }

  /** Watches the thread for QUIET_MS: `blocked` if it stayed in its fault, else what it read. */
  async stays(t: CaseThread): Promise<string> {
    await sleep(QUIET_MS);
    return this.outcome(t);
  }

  private outcome(t: CaseThread): string {
    t.check();
    const r = t.takeResume();
    if (r !== undefined) return `resumed: ${this.describe(r.value)}`;
    return this.memory.isBlockedInFault(t.tid) ? 'blocked' : 'neither resumed nor blocked in a fault';
  }

  /** What word 0 says about a page: `zeros`, `data N`, or the number. */
  describe(value: number): string {
    if (value === 0) return 'zeros';
    const seed = this.seeds.get(value);
    return seed === undefined ? `unexpected 0x${(value >>> 0).toString(16)}` : `data ${seed}`;
  }

  // ------------------------------------------------------------ messages

  /** Blocking read of one message (up to TIMEOUT_MS), as `page P, read|write, from LABEL`. */
  read(ctx: number): string {
    const r = this.memory.read(ctx, this.msg, TIMEOUT_MS);
    if (r !== 0) return `no message (${result(r)})`;
    return this.describeMessage(this.msg);
  }

  /** Non-blocking read: the message, or `none (EAGAIN)`. */
  tryRead(ctx: number): string {
    const r = this.memory.tryRead(ctx, this.msg);
    if (r !== 0) return `none (${result(r)})`;
    return this.describeMessage(this.msg);
  }

  /** `n` messages, sorted (their order between threads is the scheduler's). */
  readSorted(ctx: number, n: number): string {
    return Array.from({ length: n }, () => this.read(ctx))
      .sort()
      .join('; ');
  }

  private describeMessage(m: FaultMessage): string {
    const page = m.address / PAGE;
    const from = this.threads.find((t) => t.tid === m.tid);
    const aligned = m.address % PAGE === 0 ? '' : ' (not page-aligned)';
    const kind = (m.flags & UFFD_PAGEFAULT_FLAG_WRITE) !== 0 ? 'write' : 'read';
    return `page ${page}${aligned}, ${kind}, from ${from ? from.label : 'a tid of no thread of this case'}`;
  }

  // ------------------------------------------------------------ teardown

  /**
   * Closes every context (a thread blocked in a real fault cannot be
   * terminated, but a close wakes it), terminates the threads, then releases
   * the memory. A thread that does not exit keeps the memory mapped (unmapping
   * under it would kill the process) and fails the case.
   */
  async dispose(): Promise<void> {
    for (const ctx of this.contexts) this.memory.close(ctx); // -EBADF for those the case closed
    const exits = this.threads.map((t) => t.worker.terminate());
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), TIMEOUT_MS);
    });
    const done = await Promise.race([Promise.all(exits).then(() => 'exited' as const), timeout]);
    clearTimeout(timer);
    if (done === 'timeout') throw new Error(`faulting threads did not exit within ${TIMEOUT_MS} ms of their contexts closing; guest memory left mapped`);
    this.memory.dispose();
  }

  private async until(condition: () => boolean, what: string, t: CaseThread): Promise<void> {
    const deadline = Date.now() + TIMEOUT_MS;
    while (!condition()) {
      t.check();
      if (Date.now() > deadline) throw new Error(`timed out after ${TIMEOUT_MS} ms waiting for ${what}`);
      await sleep(2);
    }
  }
}

