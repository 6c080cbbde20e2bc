/**
 * The destination VMM's own shared state (not the kernel's): the receivedmap
 * with its in-flight marks, first-touch marks, counters, and one fault queue
 * per vCPU. Every index is named here; every thread attaches to the same
 * buffers.
 */

/** pageStatus values: the receivedmap (RECEIVED) and the in-flight set (REQUESTED). */
export const PAGE = {
  MISSING: 0,
  /** Somebody on the destination asked the source for it; nobody else may ask. */
  REQUESTED: 1,
  /** Installed in guest memory (set only after a successful COPY/ZEROPAGE). */
  RECEIVED: 2,
} as const;

export const COUNTER = {
  REQUESTS: 0,
  REPLIES: 1,
  SUPPRESSED: 2,
  PAGES_DEMAND: 3,
  PAGES_PUSHED: 4,
  PAGES_ZERO: 5,
  ALREADY_SENT: 6,
  INSTALLED: 7,
  VERIFIED: 8,
  VERIFY_FAILURES: 9,
  /** First page whose content was wrong, plus one (0 = none). */
  FIRST_BAD_PAGE: 10,
  NON_VCPU_FAULTS: 11,
  /** Pages the source sent whose install found them already present (source sent twice). */
  DUPLICATE_DATA: 12,
  /** Guest accesses completed, all threads: the watchdog's progress signal. */
  ACCESSES: 13,
  /** Replies saying the requested page went out on the main channel (no preempt). */
  ON_MAIN: 14,
  /** Pushed pages that were zero-page notices (no data on the wire). */
  PUSHED_ZERO: 15,
  /** Connection session: even = connected (epoch), odd = paused (see net/session.ts). */
  SESSION: 16,
  /** Replies being installed right now (a pause waits for 0 before it snapshots the receivedmap). */
  INSTALLING: 17,
  /** Pending requests re-sent on a fault channel after a resume. */
  REPLAYED: 18,
  /** Replies that arrived on a connection whose session had ended: dropped, their requests replayed. */
  REPLIES_DROPPED: 19,
  /**
   * UFFDIO_COPY / UFFDIO_ZEROPAGE results of EEXIST, whoever issued them
   * (resolvers, vCPUs, the main thread): the destination's own count, the
   * same on either memory backend (the kernel keeps none).
   */
  EEXIST: 20,
  /** UFFDIO_WAKE calls issued (the WAKEs strategies owe). */
  WAKES: 21,
  /** Pages installed by precopy (their first arrival; a page discarded and sent again counts again). */
  PAGES_PRECOPY: 22,
  /** Precopy pages that arrived for a page already here (the guest dirtied it again on the source): overwritten. */
  PRECOPY_REWRITES: 23,
  /** Pages dropped at the switch to postcopy (the discard set). */
  DISCARDED: 24,
  /** Of those, pages a fault fetched again afterwards (demand, not push). */
  DISCARDED_DEMANDED: 25,
  /** Threads waiting (or about to wait) on some page's status: markReceived notifies only while it is above 0. */
  PAGE_WAITERS: 26,
  /** Of PAGES_PUSHED, pages that came on a push channel (net/push-client.ts), not in the main channel's messages. */
  PUSH_CHANNEL_PAGES: 27,
  /** Precopy pages (first arrivals and rewrites, zero pages too) that came on a push channel, not in the main channel's messages. */
  PRECOPY_PUSH_CHANNEL_PAGES: 28,
  LENGTH: 29,
} as const;

/**
 * Per-vCPU (and per-I/O-thread) fault queue, as shared Int32 fields:
 * outstanding faults of that thread, oldest first. A thread blocks on one
 * fault at a time, so the queue holds at most one entry in practice; it has
 * room for more so that asynchronous-fault extensions keep the same shape.
 */
export const FAULT_QUEUE = {
  COUNT: 0,
  FAULTS: 1,
  /** Pages of outstanding faults, CAPACITY slots. */
  PAGES: 2,
  CAPACITY: 4,
  /** Fault messages resolvers read for this thread (mapped from the message's thread id). */
  MESSAGES: 6,
  STRIDE: 7,
} as const;

/** tids entry of a thread slot whose thread has not said its id yet. */
export const NO_TID = -1;

/**
 * Who installed a page (the origins buffer, kept only while tracing: see
 * trace/): the timeline says of each fault whether its own request brought
 * the page or something else did, and only the installer knows which.
 */
export const ORIGIN = {
  NONE: 0,
  /** A fault's request, answered on its resolver's (or kvm-exit vCPU's) own channel. */
  DEMAND: 1,
  /** A fault's request, answered on the main channel (no preempt) and installed by the main thread. */
  MAIN: 2,
  /** Pushed by the source, unrequested. */
  PUSH: 3,
  /** Sent in a precopy round (or stop-and-copy). */
  PRECOPY: 4,
} as const;

export interface VmmBuffers {
  pageStatus: SharedArrayBuffer;
  firstTouch: SharedArrayBuffer;
  counters: SharedArrayBuffer;
  faultQueues: SharedArrayBuffer;
  /** Fault start times (ms since the run's epoch), CAPACITY per thread. */
  faultStarts: SharedArrayBuffer;
  /** One byte a page: 1 once the switch to postcopy discarded it. */
  discarded: SharedArrayBuffer;
  /** Blocked time so far (ms) per thread, for live status. */
  blockedTotals: SharedArrayBuffer;
  /**
   * Per thread slot: the id fault messages carry for that thread (its slot
   * on the emulation, its gettid() on uffd), written by the thread once it
   * is bound, before it reports ready. Int32, NO_TID until then.
   */
  tids: SharedArrayBuffer;
  /** One byte a page, an {@link ORIGIN}: who installed it. Only while tracing (--trace); absent, nobody records it. */
  origins?: SharedArrayBuffer;
}

export class VmmState {
  readonly pageStatus: Int32Array;
  readonly firstTouch: Uint8Array;
  readonly counters: Int32Array;
  readonly faultQueues: Int32Array;
  readonly faultStarts: Float64Array;
  readonly discarded: Uint8Array;
  /** Written only by the owning thread; others read it for status (a torn read is impossible for aligned doubles on x86-64 and arm64). */
  readonly blockedTotals: Float64Array;
  /** Thread slot → the id its fault messages carry (see VmmBuffers.tids). */
  readonly tids: Int32Array;
  /** Page → {@link ORIGIN}, while tracing (see VmmBuffers.origins). */
  readonly origins: Uint8Array | undefined;
  /** tid → slot, built by this thread as tids appear. */
  private readonly slotByTid = new Map<number, number>();

  /** `trace`: also keep who installed each page (the timeline's, one byte a page). */
  static create(totalPages: number, threads: number, trace = false): VmmState {
    return new VmmState({
      ...(trace ? { origins: new SharedArrayBuffer(totalPages) } : {}),
      pageStatus: new SharedArrayBuffer(totalPages * 4),
      firstTouch: new SharedArrayBuffer(totalPages),
      counters: new SharedArrayBuffer(COUNTER.LENGTH * 4),
      faultQueues: new SharedArrayBuffer(threads * FAULT_QUEUE.STRIDE * 4),
      faultStarts: new SharedArrayBuffer(threads * FAULT_QUEUE.CAPACITY * 8),
      discarded: new SharedArrayBuffer(totalPages),
      blockedTotals: new SharedArrayBuffer(Math.max(1, threads) * 8),
      tids: (() => {
        const tids = new SharedArrayBuffer(Math.max(1, threads) * 4);
        new Int32Array(tids).fill(NO_TID);
        return tids;
      })(),
    });
  }

  constructor(readonly buffers: VmmBuffers) {
    this.pageStatus = new Int32Array(buffers.pageStatus);
    this.firstTouch = new Uint8Array(buffers.firstTouch);
    this.counters = new Int32Array(buffers.counters);
    this.faultQueues = new Int32Array(buffers.faultQueues);
    this.faultStarts = new Float64Array(buffers.faultStarts);
    this.discarded = new Uint8Array(buffers.discarded);
    this.blockedTotals = new Float64Array(buffers.blockedTotals);
    this.tids = new Int32Array(buffers.tids);
    this.origins = buffers.origins ? new Uint8Array(buffers.origins) : undefined;
  }

  /** Thread `slot` says which id its fault messages carry (once bound, before it reports ready). */
  setTid(slot: number, tid: number): void {
    Atomics.store(this.tids, slot, tid);
  }

  tidOf(slot: number): number {
    return Atomics.load(this.tids, slot);
  }

  /**
   * The thread slot, and so the fault queue, of a fault message's thread
   * id, or -1 for an id no guest thread has. Every slot is stored before
   * its thread reports ready, and threads fault only after every thread
   * is ready (go), so a message's id is always found here.
   */
  slotOfTid(tid: number): number {
    const known = this.slotByTid.get(tid);
    if (known !== undefined) return known;
    for (let slot = 0; slot < this.tids.length; slot++) {
      const t = Atomics.load(this.tids, slot);
      if (t !== NO_TID) this.slotByTid.set(t, slot);
    }
    return this.slotByTid.get(tid) ?? -1;
  }

  /** A resolver read a fault message of thread `slot`. */
  noteMessage(slot: number): void {
    Atomics.add(this.faultQueues, slot * FAULT_QUEUE.STRIDE + FAULT_QUEUE.MESSAGES, 1);
  }

  messagesOf(slot: number): number {
    return Atomics.load(this.faultQueues, slot * FAULT_QUEUE.STRIDE + FAULT_QUEUE.MESSAGES);
  }

  count(counter: number, by = 1): void {
    Atomics.add(this.counters, counter, by);
  }

  counter(counter: number): number {
    return Atomics.load(this.counters, counter);
  }

  isReceived(page: number): boolean {
    return Atomics.load(this.pageStatus, page) === PAGE.RECEIVED;
  }

  /** Claims the right to request `page`: true for the first asker only (the in-flight set). */
  claim(page: number): boolean {
    return Atomics.compareExchange(this.pageStatus, page, PAGE.MISSING, PAGE.REQUESTED) === PAGE.MISSING;
  }

  /**
   * Marks `page` received after its install and wakes whoever awaits it.
   *
   * Atomics.notify takes V8's one process-wide futex lock even when nobody
   * waits, and the main thread marks every pushed page: it notifies only
   * while some thread waits on a page (PAGE_WAITERS). No wake-up is lost: a
   * waiter counts itself before it loads the status, this stores the status
   * before it loads the count, and all four are sequentially consistent, so
   * either this sees the waiter counted (and notifies), or the waiter's load
   * comes after this store and sees RECEIVED (and does not sleep).
   *
   * `origin` ({@link ORIGIN}) says who installed it; it is kept only while
   * tracing. The plain byte store is ordered before the status store, and
   * it is read only at the end of the run, after every worker said done.
   */
  markReceived(page: number, origin: number): void {
    const origins = this.origins;
    if (origins !== undefined) origins[page] = origin;
    Atomics.store(this.pageStatus, page, PAGE.RECEIVED);
    Atomics.add(this.counters, COUNTER.INSTALLED, 1);
    if (Atomics.load(this.counters, COUNTER.PAGE_WAITERS) > 0) Atomics.notify(this.pageStatus, page);
  }

  /**
   * The switch to postcopy dropped `page` (it was sent in precopy and dirtied
   * since): out of the receivedmap, missing again. Only the main thread
   * installs or discards during precopy, and no guest thread runs yet.
   */
  markDiscarded(page: number): void {
    if (Atomics.compareExchange(this.pageStatus, page, PAGE.RECEIVED, PAGE.MISSING) !== PAGE.RECEIVED) return;
    Atomics.store(this.discarded, page, 1);
    Atomics.sub(this.counters, COUNTER.INSTALLED, 1);
    Atomics.add(this.counters, COUNTER.DISCARDED, 1);
  }

  /** A demand fetch installed `page`: counted when the switch to postcopy had discarded it. */
  noteDemanded(page: number): void {
    if (this.discarded[page] === 1) Atomics.add(this.counters, COUNTER.DISCARDED_DEMANDED, 1);
  }

  /** Resolves once `page` is in the receivedmap (installed by whoever got it). */
  async untilReceived(page: number): Promise<void> {
    if (Atomics.load(this.pageStatus, page) === PAGE.RECEIVED) return;
    // Counted before the status is loaded again (see markReceived).
    Atomics.add(this.counters, COUNTER.PAGE_WAITERS, 1);
    try {
      for (;;) {
        const status = Atomics.load(this.pageStatus, page);
        if (status === PAGE.RECEIVED) return;
        const wait = Atomics.waitAsync(this.pageStatus, page, status);
        if (wait.async) await wait.value;
      }
    } finally {
      Atomics.sub(this.counters, COUNTER.PAGE_WAITERS, 1);
    }
  }

  /** Synchronous variant for a thread that has nothing else to do meanwhile. */
  waitReceived(page: number): void {
    if (Atomics.load(this.pageStatus, page) === PAGE.RECEIVED) return;
    // Counted before the status is loaded again (see markReceived).
    Atomics.add(this.counters, COUNTER.PAGE_WAITERS, 1);
    try {
      for (;;) {
        const status = Atomics.load(this.pageStatus, page);
        if (status === PAGE.RECEIVED) return;
        Atomics.wait(this.pageStatus, page, status);
      }
    } finally {
      Atomics.sub(this.counters, COUNTER.PAGE_WAITERS, 1);
    }
  }

  /** True for the one thread that touches `page` first (it verifies the content). */
  firstToTouch(page: number): boolean {
    return this.firstTouch[page] === 0 && Atomics.compareExchange(this.firstTouch, page, 0, 1) === 0;
  }

  recordBadPage(page: number): void {
    Atomics.add(this.counters, COUNTER.VERIFY_FAILURES, 1);
    Atomics.compareExchange(this.counters, COUNTER.FIRST_BAD_PAGE, 0, page + 1);
  }

  // ---- fault queues (one per faulting thread; index = thread id)

  pushFault(thread: number, page: number, startMs: number): void {
    const base = thread * FAULT_QUEUE.STRIDE;
    const count = this.faultQueues[base + FAULT_QUEUE.COUNT]!;
    if (count < FAULT_QUEUE.CAPACITY) {
      this.faultQueues[base + FAULT_QUEUE.PAGES + count] = page;
      this.faultStarts[thread * FAULT_QUEUE.CAPACITY + count] = startMs;
    }
    Atomics.store(this.faultQueues, base + FAULT_QUEUE.COUNT, count + 1);
    Atomics.add(this.faultQueues, base + FAULT_QUEUE.FAULTS, 1);
  }

  popFault(thread: number, endMs: number): void {
    const base = thread * FAULT_QUEUE.STRIDE;
    const count = this.faultQueues[base + FAULT_QUEUE.COUNT]!;
    if (count > 0 && count <= FAULT_QUEUE.CAPACITY) {
      this.blockedTotals[thread] = this.blockedTotals[thread]! + (endMs - this.faultStarts[thread * FAULT_QUEUE.CAPACITY + count - 1]!);
    }
    Atomics.sub(this.faultQueues, base + FAULT_QUEUE.COUNT, 1);
  }

  /** Blocked time of `thread` so far, the fault in progress included (ms). */
  blockedSoFar(thread: number, nowMs: number): number {
    let total = this.blockedTotals[thread]!;
    for (const f of this.outstanding(thread)) total += nowMs - f.startMs;
    return total;
  }

  /** Outstanding faults of `thread`: pages and start times (for the watchdog). */
  outstanding(thread: number): { page: number; startMs: number }[] {
    const base = thread * FAULT_QUEUE.STRIDE;
    const count = Math.min(FAULT_QUEUE.CAPACITY, Atomics.load(this.faultQueues, base + FAULT_QUEUE.COUNT));
    const list: { page: number; startMs: number }[] = [];
    for (let i = 0; i < count; i++) {
      list.push({ page: this.faultQueues[base + FAULT_QUEUE.PAGES + i]!, startMs: this.faultStarts[thread * FAULT_QUEUE.CAPACITY + i]! });
    }
    return list;
  }

  faultsOf(thread: number): number {
    return Atomics.load(this.faultQueues, thread * FAULT_QUEUE.STRIDE + FAULT_QUEUE.FAULTS);
  }
}
