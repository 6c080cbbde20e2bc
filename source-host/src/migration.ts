import { PHASE, PUSH_RECORD, bitmapBytes, bitmapHas, digestPages, encode, maxPushPages, maxPushRunPages, pushRecordHeader, type Resume, type SourceSummary } from '@postcopy/shared';
import type { GuestImage } from './image.js';
import { Scheduler } from './scheduler.js';
import { Sentmap } from './sentmap.js';

/** A connection to the destination as the migration sees it (a WebSocket, or a fake in tests). */
export interface Channel {
  readonly label: string;
  readonly isOpen: boolean;
  /** Bytes queued for sending and not yet handed to the kernel. */
  readonly bufferedAmount: number;
  /**
   * `batch`: `turn` (default) lets the frame wait for the rest of this turn's
   * frames on the channel; `poll` for those of every request read in this
   * pass of the event loop (a requested page on the main channel: see TurnCork).
   */
  send(frame: Uint8Array, sent?: (err?: Error) => void, batch?: 'turn' | 'poll'): void;
  /**
   * The reply `{ type: 'page', id, page, data }`, a frame that decodes as
   * send(encode(...))'s does, without copying `data` into it first
   * (server.ts's WsChannel); where absent, send(encode(...)) it is.
   */
  sendPage?(id: number, page: number, data: Uint8Array, batch?: 'turn' | 'poll'): void;
}

/**
 * A push channel as the migration sees it (push-stream.ts in shared): a
 * byte stream that takes records, a header and the image's own bytes
 * (written as they are, not copied), batched by cork/uncork into one writev.
 */
export interface PushStream {
  readonly isOpen: boolean;
  /** Bytes written and not yet handed to the kernel. */
  readonly bufferedAmount: number;
  cork(): void;
  uncork(): void;
  /** `sent`: once these bytes (and so all before them) have gone to the kernel, or the stream closed. */
  write(bytes: Uint8Array, sent?: () => void): void;
  /** Resolves once the bytes written so far have gone to the kernel, or the stream closed. */
  drained(): Promise<void>;
}

export interface MigrationOptions {
  /** Pages a background task pushes before it yields to the event loop. */
  pushBatchBytes: number;
  /** Pushing pauses while the main channel holds more than this many unsent bytes. */
  pushHighWaterBytes: number;
  /**
   * Cap on the background push rate in bits/s (QEMU's max-postcopy-bandwidth;
   * 0 = none). Requested pages are never held back by it.
   */
  maxPushBps: number;
  /** Like pushBatchBytes, for a push channel (its records cost no copy: bigger batches). */
  pushStreamBatchBytes: number;
  /** Like pushHighWaterBytes, for a push channel. */
  pushStreamHighWaterBytes: number;
}

export const MIGRATION_DEFAULTS: MigrationOptions = {
  // Four 64 KiB pushed frames a turn, corked into one write (issue 9: one
  // frame a turn made the turn, not the bytes, the push's cost: 1 GiB pushed
  // at 366 MiB/s with 64 KiB, 523 with 256 KiB, 528 with 512 KiB, medians of
  // 3 interleaved runs). A request waits behind at most one batch.
  pushBatchBytes: 256 * 1024,
  pushHighWaterBytes: 512 * 1024,
  maxPushBps: 0,
  // A push channel's batch: one 1 MiB record a task, in one writev of the
  // image's own bytes (no copy, no frame to build); a request waits behind
  // one batch at most. Issue 9, interleaved pairs of runs (idle push of
  // 1 GiB; urgent p50 under push with preempt, 256 MiB, kvm-exit, random):
  // 256 KiB / 512 KiB high water 1230-1225 MiB/s, p50 133-65 µs;
  // 1 MiB / 2 MiB 1572-1162, 114-118 µs; 2 MiB / 4 MiB 1515-1553, 154-195 µs
  // (idle p50 80-85 µs in the same runs).
  pushStreamBatchBytes: 1024 * 1024,
  pushStreamHighWaterBytes: 2 * 1024 * 1024,
};

export interface SourceStats {
  requests: number;
  replies: number;
  repliesPage: number;
  repliesZero: number;
  repliesAlreadySent: number;
  /** Requests whose page went out on the main channel (no preempt). */
  repliesOnMain: number;
  pagesPushed: number;
  pagesZero: number;
  /** Requests whose channel closed before the answer could go out. */
  repliesUndeliverable: number;
  /**
   * Pages of a resume's requestedmap sent again on the main channel (counted
   * in repliesPage/repliesZero too, but not in replies: no request of this
   * session asked for them).
   */
  pagesResentRequested: number;
  /** Resumes after a lost connection (QEMU's postcopy-recover). */
  resumes: number;
}

/** What the destination's `resume` says: how to go on, and what it has and still waits for (one bit a page). */
export type ResumeRequest = Omit<Resume, 'type'>;

/**
 * The source's side of one postcopy migration: answers every request exactly
 * once (page, zero-page notice, or already-sent), sends each page's content at
 * most once (sentmap), and pushes the rest in the background when asked,
 * always behind requested pages.
 */
export class SourceMigration {
  readonly sentmap: Sentmap;
  /** Which phase last sent each page (PHASE in shared/precopy.ts): postcopy's sends mark it here, precopy's in precopy.ts. */
  readonly phases: Uint8Array;
  readonly stats: SourceStats = {
    requests: 0,
    replies: 0,
    repliesPage: 0,
    repliesZero: 0,
    repliesAlreadySent: 0,
    repliesOnMain: 0,
    pagesPushed: 0,
    pagesZero: 0,
    repliesUndeliverable: 0,
    pagesResentRequested: 0,
    resumes: 0,
  };
  private readonly scheduler = new Scheduler();
  private readonly options: MigrationOptions;
  private pushCursor = 0;
  private pushing = false;
  private pushChannel: Channel | undefined;
  /** The destination's push channel, if it opened one: pushed pages go there instead of the main channel. */
  private pushStream: PushStream | undefined;
  /**
   * Bumped by every pause: a push chain (a queued batch, a batch waiting for
   * the socket to drain or for push-rate tokens) of an earlier session ends
   * instead of running beside the one that resume starts.
   */
  private pushSession = 0;
  private completeSent = false;
  /** Push token bucket (bytes) for maxPushBps, and when it was last filled (ms). */
  private pushTokens = 0;
  private pushTokensAt = 0;
  /** Requested pages go back on the requesting channel (postcopy-preempt), else on the main channel. */
  preempt = true;
  /** The destination's main channel, once it said start (or resume). */
  mainChannel: Channel | undefined;

  constructor(
    readonly image: GuestImage,
    options: Partial<MigrationOptions> = {},
  ) {
    this.sentmap = new Sentmap(image.layout.totalPages);
    this.phases = new Uint8Array(image.layout.totalPages);
    this.options = { ...MIGRATION_DEFAULTS, ...options };
  }

  /** A request from the destination: queued ahead of every push. */
  request(channel: Channel, id: number, page: number): Promise<void> {
    this.stats.requests++;
    return this.scheduler.urgent(() => this.answer(channel, id, page));
  }

  private answer(channel: Channel, id: number, page: number): void {
    if (!channel.isOpen) {
      this.stats.repliesUndeliverable++;
      return;
    }
    const main = this.mainChannel;
    if (this.sentmap.isSent(page)) {
      channel.send(encode({ type: 'already-sent', id, page }));
      this.stats.repliesAlreadySent++;
    } else if (!this.preempt && main && main !== channel && main.isOpen) {
      // Without preempt the page shares the main channel with pushed pages
      // (ahead of pushes not yet sent, behind those already in the socket);
      // the request's one reply says where its content went. The main
      // channel carries pages for every fault channel: batched by poll. The
      // reply leaves with that batch, after it (setImmediate runs in order):
      // by the time the faulting thread reads it, its page is usually in,
      // and it need not sleep a second time waiting for it.
      this.sendContent(main, 0, page, 'poll');
      channel.send(encode({ type: 'sent-on-main', id, page }), undefined, 'poll');
      this.stats.repliesOnMain++;
    } else {
      this.sendContent(channel, id, page);
    }
    this.stats.replies++;
    this.maybeComplete();
  }

  /** A requested page's content (or zero notice) on `channel`, marked in the sentmap. */
  private sendContent(channel: Channel, id: number, page: number, batch: 'turn' | 'poll' = 'turn'): void {
    if (this.image.isZero(page)) {
      channel.send(encode({ type: 'zero-page', id, page }), undefined, batch);
      this.stats.repliesZero++;
      this.stats.pagesZero++;
    } else {
      const data = this.image.pageBytes(page);
      if (channel.sendPage) channel.sendPage(id, page, data, batch);
      else channel.send(encode({ type: 'page', id, page, data }), undefined, batch);
      this.stats.repliesPage++;
    }
    this.sentmap.mark(page);
    this.phases[page] = PHASE.POSTCOPY;
  }

  /**
   * The destination opened a push channel: the pushed pages from the next
   * batch on go there (frames already sent on the main channel stay valid:
   * the destination takes pushed pages from both).
   */
  attachPushStream(stream: PushStream): void {
    this.pushStream = stream;
  }

  /** The push channel closed: pushing goes on on the main channel (if the migration still runs). */
  detachPushStream(stream: PushStream): void {
    if (this.pushStream === stream) this.pushStream = undefined;
  }

  /** Starts pushing every page not yet sent on `channel`, in the background. */
  startPush(channel: Channel): void {
    if (this.pushing) return;
    this.pushing = true;
    this.pushChannel = channel;
    const session = this.pushSession;
    void this.scheduler.background(() => this.pushBatch(session));
  }

  /**
   * The destination's connection was lost (QEMU's postcopy-paused): pushing
   * stops and the channels are forgotten. The scheduler is not cleared:
   * answers already queued for channels now closed still run, and count
   * themselves undeliverable, so every request is answered or counted.
   */
  pause(): void {
    this.pushing = false;
    this.pushSession++;
    this.pushChannel = undefined;
    this.mainChannel = undefined;
    this.completeSent = false;
  }

  /**
   * Recovery (QEMU's postcopy-recover) on the destination's new main channel:
   * the sentmap becomes the receivedmap (pages lost on the way are unsent
   * again), the pages of the requestedmap the destination still lacks go out
   * first, on `main`, as urgent tasks, then the push restarts from page 0
   * (skipping pages sent) if `r.push`. `announce` runs once the sentmap is
   * reset and before any page goes out: the caller sends `resumed` there, so
   * that frame precedes the re-sent pages on the main channel. Returns the
   * pages marked unsent.
   */
  resume(main: Channel, r: ResumeRequest, announce?: (pagesMarkedUnsent: number) => void): number {
    const total = this.image.layout.totalPages;
    for (const [name, map] of [['receivedmap', r.receivedmap], ['requestedmap', r.requestedmap]] as const) {
      if (map.length < bitmapBytes(total)) {
        throw new RangeError(`expected a ${name} of ${bitmapBytes(total)} bytes (${total} pages), got ${map.length} bytes`);
      }
    }
    this.pause();
    const pagesMarkedUnsent = this.sentmap.reset(r.receivedmap);
    this.pushCursor = 0;
    this.preempt = r.preempt;
    this.mainChannel = main;
    this.stats.resumes++;
    announce?.(pagesMarkedUnsent);
    // One task a page, in page order; urgent, so ahead of every push.
    const { requestedmap, receivedmap } = r;
    for (let byte = 0; byte < bitmapBytes(total); byte++) {
      const wanted = requestedmap[byte]! & ~receivedmap[byte]!;
      if (wanted === 0) continue;
      for (let bit = 0; bit < 8; bit++) {
        const page = byte * 8 + bit;
        if ((wanted & (1 << bit)) !== 0 && page < total) {
          void this.scheduler.urgent(() => this.resendRequested(main, page));
        }
      }
    }
    if (r.push) this.startPush(main);
    // Everything was received already: complete goes out at once.
    this.maybeComplete();
    return pagesMarkedUnsent;
  }

  /**
   * A page the destination still waited for when its connection was lost:
   * its content goes out on the main channel like a requested page without
   * preempt (`page`/`zero-page` with id 0). The request it answers was sent
   * on a connection now gone; the destination matches it by page.
   */
  private resendRequested(main: Channel, page: number): void {
    // A resume attempt that dropped: the next resume's requestedmap has the page again.
    if (!main.isOpen || this.sentmap.isSent(page)) return;
    this.sendContent(main, 0, page);
    this.stats.pagesResentRequested++;
    this.maybeComplete();
  }

  /**
   * One background task: pushes up to pushBatchBytes of pages not yet sent,
   * from the push cursor on. Consecutive pages go out as one frame (up to
   * MAX_PUSH_FRAME_BYTES), zero pages as zero-page notices.
   */
  private pushBatch(session: number): void {
    const channel = this.pushChannel;
    if (!this.pushing || session !== this.pushSession || !channel?.isOpen) return;
    const { pageSize, totalPages } = this.image.layout;
    let budget = Math.max(1, Math.floor(this.options.pushBatchBytes / pageSize));
    const rate = this.options.maxPushBps / 8 / 1000; // bytes per ms
    if (rate > 0) {
      const now = performance.now();
      const burst = Math.max(this.options.pushBatchBytes, rate * 2);
      this.pushTokens = this.pushTokensAt === 0 ? pageSize : Math.min(burst, this.pushTokens + (now - this.pushTokensAt) * rate);
      this.pushTokensAt = now;
      if (this.pushTokens < pageSize) {
        const waitMs = Math.max(1, Math.ceil((pageSize - this.pushTokens) / rate));
        setTimeout(() => void this.scheduler.background(() => this.pushBatch(session)), waitMs);
        return;
      }
      budget = Math.min(budget, Math.floor(this.pushTokens / pageSize));
    }
    const stream = this.pushStream;
    if (stream?.isOpen) {
      this.pushRecords(stream, session, rate > 0 ? budget : Math.max(1, Math.floor(this.options.pushStreamBatchBytes / pageSize)), rate);
      return;
    }
    const perFrame = maxPushPages(pageSize);
    const frames: Buffer[] = [];
    let pushed = 0;
    while (pushed < budget && this.pushCursor < totalPages) {
      const page = this.pushCursor;
      if (this.sentmap.isSent(page)) {
        this.pushCursor++;
        continue;
      }
      if (this.image.isZero(page)) {
        // A zero page is a notice of its own on the main channel.
        frames.push(encode({ type: 'pushed-zero', page }));
        this.markPushed(page, page + 1, true);
        pushed++;
        continue;
      }
      const end = this.pushRunEnd(page, Math.min(perFrame, budget - pushed), false);
      frames.push(encode({ type: 'pushed', page, data: this.image.pagesBytes(page, end - page) }));
      this.markPushed(page, end, false);
      pushed += end - page;
    }
    if (rate > 0) this.pushTokens -= pushed * pageSize;
    let lastSent: Promise<void> | undefined;
    for (let i = 0; i < frames.length; i++) {
      if (i === frames.length - 1) lastSent = new Promise((resolve) => channel.send(frames[i]!, () => resolve()));
      else channel.send(frames[i]!);
    }
    this.maybeComplete();
    if (this.pushCursor < totalPages) {
      const next = (): void => void this.scheduler.background(() => this.pushBatch(session));
      // Back-pressure: while the socket holds more than the high-water mark,
      // queue the next batch only once this one has drained, so an urgent page
      // never waits behind more pushed bytes than that. The wait happens
      // outside the queue: answers to requests keep going out meanwhile.
      if (lastSent && channel.bufferedAmount > this.options.pushHighWaterBytes) void lastSent.then(next);
      else next();
    }
  }

  /**
   * pushBatch on a push channel: up to `budget` pages not yet sent, as
   * records of consecutive pages (contents, or zero pages) in one writev
   * (on TCP; a TLS channel takes them uncorked: push-channel.ts).
   */
  private pushRecords(stream: PushStream, session: number, budget: number, rate: number): void {
    const { totalPages } = this.image.layout;
    const perRecord = maxPushRunPages(this.image.layout.pageSize);
    let pushed = 0;
    stream.cork();
    while (pushed < budget && this.pushCursor < totalPages) {
      const page = this.pushCursor;
      if (this.sentmap.isSent(page)) {
        this.pushCursor++;
        continue;
      }
      const zero = this.image.isZero(page);
      const end = this.pushRunEnd(page, Math.min(perRecord, budget - pushed), zero);
      const count = end - page;
      stream.write(pushRecordHeader(zero ? PUSH_RECORD.ZERO : PUSH_RECORD.PAGES, page, count));
      if (!zero) stream.write(this.image.pagesBytes(page, count));
      this.markPushed(page, end, zero);
      pushed += count;
    }
    stream.uncork();
    if (rate > 0) this.pushTokens -= pushed * this.image.layout.pageSize;
    this.maybeComplete();
    if (this.pushCursor < totalPages) {
      const next = (): void => void this.scheduler.background(() => this.pushBatch(session));
      // Back-pressure as on the main channel; the wait is outside the queue.
      if (stream.bufferedAmount > this.options.pushStreamHighWaterBytes) void stream.drained().then(next);
      else next();
    }
  }

  /**
   * The end of the run the push sends from `page` (the cursor, not sent):
   * at most `max` pages, none sent yet, all zero pages (`zero`) or all with
   * contents from one chunk of the image (one buffer to send).
   */
  private pushRunEnd(page: number, max: number, zero: boolean): number {
    const { totalPages } = this.image.layout;
    let end = page + 1;
    while (end < totalPages && end - page < max && !this.sentmap.isSent(end) && this.image.isZero(end) === zero && (zero || this.image.sameChunk(page, end))) {
      end++;
    }
    return end;
  }

  /** Pages [page, end), from the cursor, went out by push: sent in postcopy, counted, and the cursor past them. */
  private markPushed(page: number, end: number, zero: boolean): void {
    for (let p = page; p < end; p++) {
      this.sentmap.mark(p);
      this.phases[p] = PHASE.POSTCOPY;
    }
    this.stats.pagesPushed += end - page;
    if (zero) this.stats.pagesZero += end - page;
    this.pushCursor = end;
  }

  private maybeComplete(): void {
    if (this.completeSent || !this.pushing || !this.sentmap.complete) return;
    const channel = this.pushChannel;
    if (!channel?.isOpen) return;
    this.completeSent = true;
    channel.send(encode({ type: 'complete', pagesSent: this.sentmap.sent }));
  }

  /**
   * The digest of the pages the destination received, over the image as it
   * is now (the guest stopped changing it): every page of an image the guest
   * never changed here is the digest computed at start-up, the same bytes in
   * the same order, so it is not hashed a second time; otherwise hashed on
   * every core (GuestImage.digestOf).
   */
  digestOfReceived(receivedmap: Uint8Array): Promise<string> {
    const total = this.image.layout.totalPages;
    let received = 0;
    for (let page = 0; page < total; page++) if (bitmapHas(receivedmap, page)) received++;
    if (!this.image.changed && received === total) return Promise.resolve(this.image.digest);
    return this.image.digestOf(receivedmap);
  }

  /**
   * The destination is done: compare its receivedmap with the sentmap and
   * digest what it received (`digestOfReceived` from {@link digestOfReceived};
   * hashed here on one thread without it).
   */
  summarize(receivedmap: Uint8Array, digestOfReceived?: string): Omit<SourceSummary, 'keepaliveTimeouts' | 'warmUpRequests' | 'warmUpMs' | 'migration' | 'cpuUs' | 'cpuMainThreadUs' | 'devices'> {
    const total = this.image.layout.totalPages;
    let sentNotReceived = 0;
    let receivedNotSent = 0;
    let received = 0;
    for (let page = 0; page < total; page++) {
      const has = bitmapHas(receivedmap, page);
      const sent = this.sentmap.isSent(page);
      if (has) received++;
      if (sent && !has) sentNotReceived++;
      if (has && !sent) receivedNotSent++;
    }
    return {
      requests: this.stats.requests,
      replies: this.stats.replies,
      repliesPage: this.stats.repliesPage,
      repliesZero: this.stats.repliesZero,
      repliesAlreadySent: this.stats.repliesAlreadySent,
      pagesSent: this.sentmap.sent,
      pagesPushed: this.stats.pagesPushed,
      pagesZero: this.stats.pagesZero,
      pagesSentTwice: this.sentmap.pagesSentTwice,
      digestOfReceived:
        digestOfReceived ??
        (received === total && !this.image.changed ? this.image.digest : digestPages(this.image, this.image.layout, (page) => bitmapHas(receivedmap, page))),
      sentNotReceived,
      receivedNotSent,
      peakRssBytes: process.resourceUsage().maxRSS * 1024,
      repliesUndeliverable: this.stats.repliesUndeliverable,
    };
  }

  /** Stops pushing; answers already queued still go out. */
  stopPush(): void {
    this.pushing = false;
  }

  stop(): void {
    this.pushing = false;
    this.scheduler.clear();
  }

  onIdle(): Promise<void> {
    return this.scheduler.onIdle();
  }
}
