/**
 * Precopy on the source (QEMU's migration/ram.c iterations): while the guest
 * keeps running here, its memory goes to the destination in rounds. Round 1
 * sends every page (QEMU's bulk stage); each later round sends the pages the
 * guest dirtied during the one before, found by a dirty sync (read-and-clear
 * of the dirty log). After each round the migration decides, as QEMU does
 * (see convergence.ts): switch to postcopy (hybrid, when told to), stop and
 * copy (the pending bytes fit the downtime limit), throttle the guest
 * (auto-converge), go on, or give up after `maxRounds`.
 *
 * At the switchover the guest stops, a final sync takes what it dirtied last,
 * and then:
 * - precopy: those pages go too (stop-and-copy), and the destination runs
 *   the guest with all of its memory;
 * - hybrid: the pages among them that were sent before form the discard set
 *   (QEMU's MIG_CMD_POSTCOPY_RAM_DISCARD): the destination drops them, and
 *   postcopy fetches or pushes them again. What was sent and not dirtied
 *   since counts as sent for postcopy's exactly-once rules.
 */
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';
import {
  MAX_DISCARD_RANGES,
  PHASE,
  PUSH_RECORD,
  PostcopyError,
  ProtocolError,
  coalesce,
  encode,
  maxPushPages,
  maxPushRunPages,
  pushRecordHeader,
  pushSyncHeader,
  type MigrationSummary,
  type PageRange,
  type PrecopyRound,
} from '@postcopy/shared';
import { AutoConverge, bandwidthBytesPerMs, convergence } from './convergence.js';
import { DirtyLog, bitSet, clearBit, popcount, setBit } from './dirty-log.js';
import type { GuestImage } from './image.js';
import type { Channel, PushStream } from './migration.js';
import { PRECOPY_DEFAULTS } from './defaults.js';

export type SwitchoverReason = 'converged' | 'rounds' | 'migrate-start-postcopy' | 'auto-converge' | 'skip-precopy';

/** What precopy needs of the guest running on the source (guest/source-guest.ts; tests give a scripted one). */
export interface PrecopyGuest {
  readonly throttlePercent: number;
  setThrottle(percent: number): void;
  /** Stops the guest; resolves, once its last write is done, with when the stop was asked (performance.now()). */
  stop(): Promise<number>;
}

/**
 * What precopy asks of the guest's devices (devices/source-devices.ts): a
 * small interface, so that precopy's rounds, sync and switchover are the
 * same with devices or without.
 */
export interface PrecopyDevices {
  /** No precopy rounds at all (--untracked-dma skip-precopy): straight to the switchover. */
  readonly skipPrecopy: boolean;
  /** Dirty logging starts, PRE_COPY devices enter PRE_COPY (QEMU's save_setup). */
  setup(): void;
  /** At every dirty sync, after the vCPU log: the DMA trackers ORed into `into`; returns the pages they added. */
  syncDirty(into: Int32Array): number;
  /** After a round's pages: the devices' pending precopy data (vfio_save_iterate). Returns the bytes sent. */
  iterate(channel: Channel): Promise<number>;
  /** Bytes the devices would still send in STOP_COPY (stop_copy_length): part of what must fit the downtime. */
  pendingBytes(): number;
  /** Switchover-ack: false while a device's initial data is not acknowledged by the destination. */
  canSwitchover(): boolean;
  /** Resolves on the ack, or after `ms`. */
  waitForAck(ms: number): Promise<void>;
  /** Each decision's bandwidth (for the downtime untracked DMA forces). */
  noteDecision(bytesPerMs: number): void;
  /** What a not-converged failure adds about the devices. */
  notConvergedDetail(): string;
  /** Switchover: P2P quiesce, then STOP_COPY or STOP: no DMA after it. Returns ms. */
  stop(): number;
  /** The rest of every device's state, to the end of its stream. Returns ms. */
  saveComplete(channel: Channel): Promise<number>;
}

/** How long a round that would switch over but for the switchover-ack waits for it before it goes round again. */
const ACK_WAIT_MS = 50;

export interface PrecopyOptions {
  mode: 'precopy' | 'hybrid';
  /** QEMU's downtime-limit (default 300 ms). */
  downtimeLimitMs: number;
  /** QEMU's avail-switchover-bandwidth, bytes/s: the bandwidth the decision assumes instead of the one measured (0 = measured). */
  availSwitchoverBytesPerSec: number;
  /** A precopy that has not converged after this many rounds fails (unless auto-converge). */
  maxRounds: number;
  autoConverge: boolean;
  /** Hybrid: switch to postcopy after this many rounds (QEMU never switches by itself; this stands for the user's migrate-start-postcopy). */
  postcopyAfterRounds: number;
  /** Bytes sent before yielding to the event loop (keepalive, control requests). */
  batchBytes: number;
  /** Sending pauses while the channel holds more than this. */
  highWaterBytes: number;
  /** Like batchBytes, on a push channel (records cost no copy: bigger batches, as postcopy's push). */
  streamBatchBytes: number;
  /** Like highWaterBytes, on a push channel. */
  streamHighWaterBytes: number;
  /**
   * Testing only: the switchover does not wait for the destination's
   * acknowledgement of the last SYNC (the barrier is broken: a precopy page
   * still on the push channel may land after the discard set).
   */
  unsafeSkipSync: boolean;
}

export { PRECOPY_DEFAULTS };

/** How often a switchover waiting for the SYNC's acknowledgement looks whether a channel closed meanwhile. */
const SYNC_POLL_MS = 50;

/** With auto-converge there is no round limit, but a migration that throttles at 99 % and still does not converge must end too. */
const AUTO_CONVERGE_ROUND_CAP = 1000;

/** Precopy did not converge: the guest dirties memory faster than the link can send it. */
export class NotConvergedError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_NOT_CONVERGED', message);
  }
}

/** The destination's main channel went away during precopy: the migration is cancelled (the guest never left). */
export class PrecopyCancelledError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_CANCELLED', message);
  }
}

export interface SwitchoverDecision {
  postcopy: boolean;
  reason: SwitchoverReason;
}

/** What the switchover did. */
export interface SwitchoverResult {
  /** performance.now() when the guest was told to stop: the downtime starts. */
  stoppedAt: number;
  /** Hybrid: the discard set. */
  discard: PageRange[];
  discardPages: number;
  /** The pages the sentmap counts as sent from now on, one bit a page, as a receivedmap: hybrid, those sent and not dirtied since; precopy, all. */
  sentForPostcopy: Uint8Array;
}

/** Progress for GET /status. */
export interface PrecopyProgress {
  round: number;
  /** Pages of this round not sent yet. */
  pagesRemaining: number;
  dirtyPagesRate: number;
  expectedDowntimeMs: number;
  throttlePercent: number;
}

export class Precopy {
  private readonly options: PrecopyOptions;
  /** Pages sent at least once (precopy or stop-and-copy). */
  private readonly everSent: Int32Array;
  /** The pages the current round sends; the next round's are gathered by the sync into `nextSet`. */
  private roundSet: Int32Array;
  private nextSet: Int32Array;
  private readonly autoConverge = new AutoConverge();
  private postcopyRequested = false;
  private roundNumber = 0;
  private remaining = 0;
  private pagesSent = 0;
  private pagesResent = 0;
  private bytes = 0;
  private syncs = 0;
  private dirtiedTotal = 0;
  private activeMs = 0;
  private lastExpectedDowntimeMs = 0;
  private lastDirtyRate = 0;
  private readonly rounds: PrecopyRound[] = [];
  private decision: SwitchoverDecision | undefined;
  private switchoverResult: SwitchoverResult | undefined;
  downtimeMs = 0;
  /** From start to round 1's first page (QEMU's setup-time). */
  setupTimeMs = 0;
  /** The switchover's RAM part (the last sync, stop-and-copy or the discard set) and its devices' part, ms. */
  switchoverRamMs = 0;
  switchoverDeviceMs = 0;
  /** Device state bytes sent during precopy. */
  deviceBytes = 0;
  /** The destination's push channel, if it opened one before start; `stream` is what the rounds use (fixed at round 1). */
  private attached: PushStream | undefined;
  private stream: PushStream | undefined;
  /** The last SYNC written on the push channel and the last the destination acknowledged. */
  private syncSeq = 0;
  private syncAcked = 0;
  private syncWake: (() => void) | undefined;
  /** Pages sent on the push channel (rounds and stop-and-copy). */
  pagesOnPushChannel = 0;
  /** Time the switchover waited for the last SYNC's acknowledgement, ms. */
  syncWaitMs = 0;

  constructor(
    private readonly image: GuestImage,
    private readonly dirtyLog: DirtyLog,
    private readonly guest: PrecopyGuest,
    /** The source's record of which phase last sent each page (see PHASE). */
    private readonly phases: Uint8Array,
    options: Partial<PrecopyOptions> = {},
    /** The guest's devices, if it has any. */
    private readonly devices?: PrecopyDevices,
  ) {
    this.options = { ...PRECOPY_DEFAULTS, ...options };
    const words = Math.ceil(image.layout.totalPages / 32);
    this.everSent = new Int32Array(words);
    this.roundSet = new Int32Array(words);
    this.nextSet = new Int32Array(words);
  }

  get mode(): 'precopy' | 'hybrid' {
    return this.options.mode;
  }

  /** The destination opened a push channel: the rounds go there if it is there before round 1. */
  attachStream(stream: PushStream): void {
    this.attached = stream;
  }

  /** Whether the rounds go on the push channel. */
  get onPushChannel(): boolean {
    return this.stream !== undefined;
  }

  /**
   * The destination's `precopy-synced`: every record before SYNC `seq` is
   * placed. Throws ProtocolError unless it acknowledges the next SYNC written.
   */
  synced(seq: number): void {
    if (seq !== this.syncAcked + 1 || seq > this.syncSeq) {
      throw new ProtocolError(`expected precopy-synced ${this.syncAcked + 1} (SYNC ${this.syncSeq} is the last written), got ${seq}`);
    }
    this.syncAcked = seq;
    this.syncWake?.();
  }

  /** The user's migrate-start-postcopy (hybrid only): the current round stops and postcopy begins. */
  requestPostcopy(): void {
    this.postcopyRequested = true;
  }

  progress(): PrecopyProgress {
    return {
      round: this.roundNumber,
      pagesRemaining: this.remaining,
      dirtyPagesRate: Math.round(this.lastDirtyRate),
      expectedDowntimeMs: Math.round(this.lastExpectedDowntimeMs * 1000) / 1000,
      throttlePercent: this.guest.throttlePercent,
    };
  }

  /**
   * Runs rounds on `channel` until it is time to switch over. `startedAt` is
   * when the migration started (for setup-time). Throws
   * NotConvergedError, or PrecopyCancelledError when the channel closes.
   */
  async run(channel: Channel, startedAt: number): Promise<SwitchoverDecision> {
    const { totalPages, pageSize } = this.image.layout;
    // Logging starts now; the first round sends every page anyway.
    this.dirtyLog.clear();
    this.roundSet.fill(-1);
    const tail = totalPages % 32;
    if (tail !== 0) this.roundSet[this.roundSet.length - 1] = (1 << tail) - 1;
    let roundPages = totalPages;
    this.setupTimeMs = performance.now() - startedAt;
    // The push channel carries every round or none: pages of one round on the main channel and of the next on the push
    // channel could arrive in the other order (an older content over a newer one).
    if (this.attached?.isOpen) this.stream = this.attached;
    const devices = this.devices;
    // --untracked-dma skip-precopy: no round; the switchover sends every page (precopy) or none (hybrid: postcopy brings them).
    if (devices?.skipPrecopy) return this.decide({ postcopy: this.options.mode === 'hybrid', reason: 'skip-precopy' });
    devices?.setup();
    for (;;) {
      this.roundNumber++;
      const round = this.roundNumber;
      const started = performance.now();
      const bytesBefore = this.bytes;
      const sent = await this.sendSet(channel, this.roundSet, roundPages, Math.min(round, PHASE.LAST_ROUND), () => this.postcopyRequested && this.options.mode === 'hybrid');
      const deviceBytes = devices ? await devices.iterate(channel) : 0;
      this.deviceBytes += deviceBytes;
      const ms = performance.now() - started;
      this.activeMs += ms;
      const roundBytes = this.bytes - bytesBefore;
      // The sync at the end of the round: what the guest dirtied while it ran (and what this round did not get to).
      this.nextSet.set(this.roundSet);
      const dirtied = this.syncDirty(this.nextSet);
      this.syncs++;
      this.dirtiedTotal += dirtied;
      const pending = countBits(this.nextSet);
      // The link carried the devices' data too: the bandwidth counts it.
      const measured = bandwidthBytesPerMs(roundBytes + deviceBytes, ms);
      const assumed = this.options.availSwitchoverBytesPerSec > 0 ? this.options.availSwitchoverBytesPerSec / 1000 : measured;
      devices?.noteDecision(assumed);
      const conv = convergence(pending * pageSize + (devices?.pendingBytes() ?? 0), assumed, this.options.downtimeLimitMs);
      this.lastExpectedDowntimeMs = conv.expectedDowntimeMs;
      this.lastDirtyRate = dirtied / Math.max(ms / 1000, 1e-6);
      this.rounds.push({ round, pagesSent: sent, pagesDirtied: dirtied, ms: round3(ms), mbps: round3((roundBytes * 8) / 1e6 / Math.max(ms / 1000, 1e-6)) });
      [this.roundSet, this.nextSet] = [this.nextSet, this.roundSet];
      this.nextSet.fill(0);
      roundPages = pending;

      // QEMU switches (to postcopy or stop-and-copy) only once the destination acknowledged every device's initial data
      // (migration_can_switchover, switchover-ack): until then it goes round again, without counting this wait against the round limit.
      const wouldSwitch = (this.options.mode === 'hybrid' && (this.postcopyRequested || round >= this.options.postcopyAfterRounds)) || conv.converged;
      if (wouldSwitch && devices && !devices.canSwitchover()) {
        await devices.waitForAck(ACK_WAIT_MS);
        if (!channel.isOpen) throw new PrecopyCancelledError(`the destination's main channel closed during precopy round ${this.roundNumber}`);
        continue;
      }
      if (this.options.mode === 'hybrid' && this.postcopyRequested) return this.decide({ postcopy: true, reason: 'migrate-start-postcopy' });
      if (this.options.mode === 'hybrid' && round >= this.options.postcopyAfterRounds) return this.decide({ postcopy: true, reason: 'rounds' });
      if (conv.converged) return this.decide({ postcopy: false, reason: this.autoConverge.throttlePercent > 0 ? 'auto-converge' : 'converged' });
      if (this.options.autoConverge) {
        const step = this.autoConverge.period(dirtied * pageSize, roundBytes);
        if (step !== undefined) this.guest.setThrottle(step);
        if (round >= AUTO_CONVERGE_ROUND_CAP) throw this.notConverged(round, measured, conv.expectedDowntimeMs, `even throttled to ${this.guest.throttlePercent} %`);
      } else if (round >= this.options.maxRounds) {
        throw this.notConverged(round, measured, conv.expectedDowntimeMs, '');
      }
    }
  }

  /** A dirty sync: the vCPU dirty log, then the devices' DMA trackers into the same bitmap (QEMU's vfio_listener_log_sync). */
  private syncDirty(into: Int32Array): number {
    return this.dirtyLog.sync(into) + (this.devices?.syncDirty(into) ?? 0);
  }

  private decide(decision: SwitchoverDecision): SwitchoverDecision {
    this.decision = decision;
    return decision;
  }

  private notConverged(round: number, bytesPerMs: number, expectedMs: number, extra: string): NotConvergedError {
    const rate = this.lastDirtyRate;
    const pageSize = this.image.layout.pageSize;
    return new NotConvergedError(
      `precopy did not converge in ${round} rounds${extra ? ` (${extra})` : ''}: the guest dirties ${Math.round(rate)} pages/s ` +
        `(${mibs(rate * pageSize)}) against a bandwidth of ${mibs(bytesPerMs * 1000)}, ` +
        `so the expected downtime is ${Math.round(expectedMs)} ms over the ${this.options.downtimeLimitMs} ms limit${this.devices?.notConvergedDetail() ?? ''}; ` +
        `expected a dirty rate below the bandwidth: try --auto-converge, a larger --downtime-limit, or --mode hybrid`,
    );
  }

  /**
   * Switchover: stops the guest, takes the last dirty pages, and sends what
   * must go before the destination runs: the rest of memory (precopy) or the
   * discard set (hybrid). The caller sends `switchover` after it.
   */
  async switchover(channel: Channel, decision: SwitchoverDecision): Promise<SwitchoverResult> {
    const stoppedAt = await this.guest.stop();
    // The devices stop too, before the final sync: no DMA may write after its trackers are read.
    const deviceStopMs = this.devices?.stop() ?? 0;
    const ramStarted = performance.now();
    // Everything still dirty: the last round's sync left its pages in roundSet; the final sync adds the rest.
    const dirtied = this.syncDirty(this.roundSet);
    this.syncs++;
    this.dirtiedTotal += dirtied;
    const totalPages = this.image.layout.totalPages;
    let result: SwitchoverResult;
    if (!decision.postcopy) {
      await this.sendSet(channel, this.roundSet, countBits(this.roundSet), PHASE.STOP_AND_COPY, () => false);
      // Nothing of the stop-and-copy may be in flight once `switchover` goes.
      await this.barrier(channel);
      // Every page has gone: the sentmap (what finish checks against the receivedmap) says so.
      const sent = new Uint8Array(Math.ceil(totalPages / 8));
      for (let page = 0; page < totalPages; page++) if (bitSet(this.everSent, page)) sent[page >>> 3]! |= 1 << (page & 7);
      result = { stoppedAt, discard: [], discardPages: 0, sentForPostcopy: sent };
    } else {
      // No precopy page may land after the discard set (it would resurrect a discarded page's stale content).
      await this.barrier(channel);
      // Discard: sent before and dirtied since. Postcopy counts as sent what was sent and not dirtied since.
      const discardPages: number[] = [];
      const sentForPostcopy = new Uint8Array(Math.ceil(totalPages / 8));
      for (let page = 0; page < totalPages; page++) {
        const sent = bitSet(this.everSent, page);
        const dirty = bitSet(this.roundSet, page);
        if (sent && dirty) discardPages.push(page);
        else if (sent) sentForPostcopy[page >>> 3]! |= 1 << (page & 7);
      }
      const discard = coalesce(discardPages);
      for (let i = 0; i < discard.length; i += MAX_DISCARD_RANGES) {
        channel.send(encode({ type: 'discard', ranges: discard.slice(i, i + MAX_DISCARD_RANGES) }));
      }
      result = { stoppedAt, discard, discardPages: discardPages.length, sentForPostcopy };
    }
    this.roundSet.fill(0);
    this.remaining = 0;
    this.switchoverRamMs = performance.now() - ramStarted;
    // Then the rest of the devices' state, to the end of each stream.
    this.switchoverDeviceMs = deviceStopMs + (this.devices ? await this.devices.saveComplete(channel) : 0);
    // The `switchover` frame is the caller's: it goes once postcopy is set up.
    this.switchoverResult = result;
    return result;
  }

  /** The round a set's records carry: the stop-and-copy counts as the round after the last. */
  private roundOf(phase: number): number {
    return phase === PHASE.STOP_AND_COPY ? this.roundNumber + 1 : this.roundNumber;
  }

  /**
   * Sends every page set in `set` (a round's pages), ascending, as runs of
   * consecutive pages (one frame each, up to MAX_PUSH_FRAME_BYTES) and zero
   * notices; clears each page's bit as it goes. Yields to the event loop
   * after every batch and waits while the channel is full. Returns the pages
   * sent; stops early when `stop()` says so (their bits stay set).
   */
  private async sendSet(channel: Channel, set: Int32Array, pages: number, phase: number, stop: () => boolean): Promise<number> {
    if (this.stream) return this.sendSetOnStream(channel, this.stream, set, pages, phase, stop);
    const { totalPages, pageSize } = this.image.layout;
    const perFrame = maxPushPages(pageSize);
    const batchPages = Math.max(1, Math.floor(this.options.batchBytes / pageSize));
    const round = this.roundOf(phase);
    this.remaining = pages;
    let sent = 0;
    let page = 0;
    let lastOfSet: Promise<void> | undefined;
    while (page < totalPages) {
      if (!channel.isOpen) throw new PrecopyCancelledError(`the destination's main channel closed during precopy round ${this.roundNumber}`);
      if (stop()) return sent;
      let inBatch = 0;
      let last: Promise<void> | undefined;
      while (inBatch < batchPages) {
        page = nextSetPage(set, page, totalPages);
        if (page >= totalPages) break;
        if (this.image.isZero(page)) {
          last = this.sendFrame(channel, encode({ type: 'precopy-zero', round, page }));
          this.took(set, page, phase, 0);
          page++;
          inBatch++;
          sent++;
          continue;
        }
        let end = page + 1;
        while (end < totalPages && end - page < perFrame && inBatch + (end - page) < batchPages && bitSet(set, end) && !this.image.isZero(end) && this.image.sameChunk(page, end)) end++;
        last = this.sendFrame(channel, encode({ type: 'precopy-pages', round, page, data: this.image.pagesBytes(page, end - page) }));
        for (let p = page; p < end; p++) this.took(set, p, phase, pageSize);
        inBatch += end - page;
        sent += end - page;
        page = end;
      }
      this.remaining = Math.max(0, pages - sent);
      if (last) lastOfSet = last;
      // Back-pressure, then a turn of the event loop (pongs, control requests, a close).
      if (last && channel.bufferedAmount > this.options.highWaterBytes) await last;
      await yieldToEventLoop();
    }
    // The set is sent once its last frame has left (the link and the socket
    // drained): a round's time, and so the bandwidth it measures, covers
    // its bytes, and the switchover does not queue behind a round's tail.
    await lastOfSet;
    return sent;
  }

  /**
   * sendSet on the push channel: runs of consecutive pages (contents from
   * one image chunk, or zero pages) as records of the round, corked into one
   * writev a batch, then a SYNC. Returns once the set's bytes have gone to
   * the kernel (the round's time covers them, as on the main channel).
   */
  private async sendSetOnStream(channel: Channel, stream: PushStream, set: Int32Array, pages: number, phase: number, stop: () => boolean): Promise<number> {
    const { totalPages, pageSize } = this.image.layout;
    const perRecord = maxPushRunPages(pageSize);
    const batchPages = Math.max(1, Math.floor(this.options.streamBatchBytes / pageSize));
    const round = this.roundOf(phase);
    this.remaining = pages;
    let sent = 0;
    let page = 0;
    const closed = (): PrecopyCancelledError =>
      new PrecopyCancelledError(`the destination's ${channel.isOpen ? 'push' : 'main'} channel closed during precopy round ${this.roundNumber}`);
    // Each batch's last write says when the batch has gone to the kernel (a socket's 'drain' comes only after a write it refused).
    let batchSent: Promise<void> | undefined;
    while (page < totalPages) {
      if (!stream.isOpen || !channel.isOpen) throw closed();
      if (stop()) break;
      let inBatch = 0;
      let lastData: Uint8Array | undefined;
      stream.cork();
      while (inBatch < batchPages) {
        page = nextSetPage(set, page, totalPages);
        if (page >= totalPages) break;
        const zero = this.image.isZero(page);
        let end = page + 1;
        while (end < totalPages && end - page < perRecord && inBatch + (end - page) < batchPages && bitSet(set, end) && this.image.isZero(end) === zero && (zero || this.image.sameChunk(page, end))) end++;
        const count = end - page;
        if (lastData) stream.write(lastData);
        lastData = pushRecordHeader(zero ? PUSH_RECORD.PRECOPY_ZERO : PUSH_RECORD.PRECOPY_PAGES, page, count, round);
        // The image's own bytes, not copied: the kernel takes them before the round's closing sync (awaited below).
        if (!zero) {
          stream.write(lastData);
          lastData = this.image.pagesBytes(page, count);
        }
        for (let p = page; p < end; p++) this.took(set, p, phase, zero ? 0 : pageSize);
        this.pagesOnPushChannel += count;
        inBatch += count;
        sent += count;
        page = end;
      }
      if (lastData) {
        const last = lastData;
        batchSent = new Promise((resolve) => stream.write(last, resolve));
      }
      stream.uncork();
      this.remaining = Math.max(0, pages - sent);
      // Back-pressure, then a turn of the event loop (pongs, control requests, a close).
      if (batchSent && stream.bufferedAmount > this.options.streamHighWaterBytes) await batchSent;
      await yieldToEventLoop();
    }
    // The barrier's mark: everything of this set comes before it. Once it has gone to the kernel, so has the set
    // (the round's time, and so the bandwidth it measures, covers its bytes).
    this.syncSeq++;
    const seq = this.syncSeq;
    await new Promise<void>((resolve) => stream.write(pushSyncHeader(seq), resolve));
    if (!stream.isOpen || !channel.isOpen) throw closed();
    return sent;
  }

  /**
   * QEMU's multifd_send_sync_main: waits until the destination acknowledged
   * the last SYNC written (every precopy page before it placed). Nothing to
   * wait for on the main channel (one socket keeps its order).
   */
  private async barrier(channel: Channel): Promise<void> {
    if (this.options.unsafeSkipSync) return;
    const started = performance.now();
    while (this.syncAcked < this.syncSeq) {
      if (!channel.isOpen) throw new PrecopyCancelledError(`the destination's main channel closed during the switchover`);
      if (!this.stream?.isOpen) throw new PrecopyCancelledError(`the destination's push channel closed during the switchover`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, SYNC_POLL_MS);
        this.syncWake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.syncWake = undefined;
    }
    this.syncWaitMs += performance.now() - started;
  }

  private sendFrame(channel: Channel, frame: Uint8Array): Promise<void> {
    return new Promise((resolve) => channel.send(frame, () => resolve()));
  }

  private took(set: Int32Array, page: number, phase: number, bytes: number): void {
    clearBit(set, page);
    if (bitSet(this.everSent, page)) this.pagesResent++;
    else setBit(this.everSent, page);
    this.phases[page] = phase;
    this.pagesSent++;
    this.bytes += bytes;
  }

  /** The source's figures for the summary. */
  summary(totalTimeMs: number): MigrationSummary {
    const r = this.switchoverResult;
    return {
      setupTimeMs: round3(this.setupTimeMs),
      totalTimeMs: round3(totalTimeMs),
      downtimeMs: round3(this.downtimeMs),
      expectedDowntimeMs: Number.isFinite(this.lastExpectedDowntimeMs) ? round3(this.lastExpectedDowntimeMs) : 0,
      downtimeLimitMs: this.options.downtimeLimitMs,
      switchoverReason: this.decision?.reason ?? 'none',
      rounds: this.roundNumber,
      dirtySyncCount: this.dirtyLog.syncCount,
      pagesSent: this.pagesSent,
      pagesResent: this.pagesResent,
      bytes: this.bytes,
      dirtyPagesRate: round3(this.dirtiedTotal / Math.max(this.activeMs / 1000, 1e-6)),
      throttlePercent: this.guest.throttlePercent,
      perRound: this.rounds,
      discardPages: r?.discardPages ?? 0,
      discardRanges: r?.discard.length ?? 0,
    };
  }
}

/** Bytes per second as MiB/s, two decimals. */
function mibs(bytesPerSec: number): string {
  return `${(bytesPerSec / 1048576).toFixed(2)} MiB/s`;
}

/** The first page from `page` on whose bit is set in `set`, or `totalPages` if none: clear words skipped at once. */
function nextSetPage(set: Int32Array, page: number, totalPages: number): number {
  while (page < totalPages) {
    if ((page & 31) === 0 && set[page >>> 5] === 0) page += 32;
    else if (!bitSet(set, page)) page++;
    else return page;
  }
  return totalPages;
}

function countBits(bits: Int32Array): number {
  let n = 0;
  for (let i = 0; i < bits.length; i++) if (bits[i] !== 0) n += popcount(bits[i]!);
  return n;
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

/** The summary's migration figures of a postcopy-only run. */
export function postcopyOnlySummary(totalTimeMs: number, downtimeLimitMs: number): MigrationSummary {
  return {
    setupTimeMs: 0,
    totalTimeMs: round3(totalTimeMs),
    downtimeMs: 0,
    expectedDowntimeMs: 0,
    downtimeLimitMs,
    switchoverReason: 'none',
    rounds: 0,
    dirtySyncCount: 0,
    pagesSent: 0,
    pagesResent: 0,
    bytes: 0,
    dirtyPagesRate: 0,
    throttlePercent: 0,
    perRound: [],
    discardPages: 0,
    discardRanges: 0,
  };
}
