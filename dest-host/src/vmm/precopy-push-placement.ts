/**
 * Where a push channel's precopy records go (shared/push-stream.ts,
 * net/push-reader.ts), with precopy-receiver.ts's semantics: a page's first
 * arrival is installed (COPY, ZEROPAGE: memory the userfaultfd registers is
 * never touched while missing), a later one overwrites the page in place
 * and counts as a rewrite, never as EEXIST.
 * - {@link DirectPrecopyPlacement}, on a backend with
 *   {@link BackendMemory.direct} (the emulation): the socket reads a run of
 *   missing pages straight into guest memory (taken off missing first,
 *   published as their bytes complete, as push-placement.ts does), and a run
 *   of pages already here straight over them;
 * - {@link StagedPrecopyPlacement}, on any backend (uffd): the socket reads
 *   into one reused staging buffer, and each run goes through the precopy
 *   receiver (installRun's UFFDIO_COPY for first arrivals, an overwrite for
 *   the rest).
 * Both tell the run (the sink) each record's round, which checks that
 * precopy records may come now (before the switchover, rounds not going
 * down), and each SYNC, which the run acknowledges on the main channel.
 */
import { ProtocolError } from '@postcopy/shared';
import type { DirectCopy } from '../memory/backend.js';
import type { PrecopyPushPlacement, PushClaim } from '../net/push-reader.js';
import type { PageInstaller } from './page-installer.js';
import { StagingBuffer, installSpan } from './push-placement.js';
import type { PrecopyReceiver } from './precopy-receiver.js';
import { COUNTER, ORIGIN } from './state.js';

/** What the placements tell the run. */
export interface PrecopyPushSink {
  /** A record of round `round` comes: throws (a ProtocolError) when precopy records may not come now. */
  round(round: number): void;
  /** SYNC `seq`: everything before it is placed (the run answers `precopy-synced`). */
  synced(seq: number): void;
  /** `pages` precopy pages were placed (installed or overwritten). */
  placed(pages: number): void;
  fail(err: Error): void;
}


abstract class PrecopyPlacement implements PrecopyPushPlacement {
  protected readonly pageSize: number;
  protected currentRound = 0;

  constructor(
    protected readonly installer: PageInstaller,
    protected readonly receiver: PrecopyReceiver,
    protected readonly sink: PrecopyPushSink,
  ) {
    this.pageSize = installer.memory.layout.pageSize;
  }

  round(round: number): void {
    if (round < this.currentRound) throw new ProtocolError(`push record: expected precopy rounds not to go down, got round ${round} after round ${this.currentRound}`);
    this.sink.round(round);
    this.currentRound = round;
    if (round > this.receiver.round) this.receiver.round = round;
  }

  synced(seq: number): void {
    this.sink.synced(seq);
  }

  abstract claim(first: number, count: number): PushClaim;
  abstract commit(claim: PushClaim, first: number, pages: number): void;
  abstract release(claim: PushClaim, first: number, pages: number): void;

  zero(first: number, count: number): void {
    for (let page = first; page < first + count; page++) {
      const r = this.receiver.receive(this.currentRound, page, undefined);
      if (r < 0) {
        this.sink.fail(new Error(`installing precopy zero page ${page} failed with errno ${-r}`));
        return;
      }
    }
    this.placed(count);
  }

  protected placed(pages: number): void {
    this.installer.vmm.count(COUNTER.PRECOPY_PUSH_CHANNEL_PAGES, pages);
    this.sink.placed(pages);
  }

  protected span(first: number, count: number): number {
    return installSpan(this.installer, first, count);
  }
}

export class DirectPrecopyPlacement extends PrecopyPlacement {
  constructor(
    installer: PageInstaller,
    receiver: PrecopyReceiver,
    sink: PrecopyPushSink,
    private readonly direct: DirectCopy,
  ) {
    super(installer, receiver, sink);
  }

  claim(first: number, count: number): PushClaim {
    const span = this.span(first, count);
    const vmm = this.installer.vmm;
    if (vmm.isReceived(first)) {
      // Here already (the guest dirtied it on the source since): its bytes go over it, in place.
      let pages = 1;
      while (pages < span && vmm.isReceived(first + pages)) pages++;
      return { first, pages, view: this.direct.view(first, pages), present: true };
    }
    // First arrivals: taken off missing (claim stops at the first page present).
    const taken = this.direct.claim(first, span);
    if (taken <= 0) throw new Error(`taking precopy pages from ${first} failed with ${taken === 0 ? 'the page present' : `errno ${-taken}`}`);
    return { first, pages: taken, view: this.direct.view(first, taken), present: false };
  }

  commit(claim: PushClaim, first: number, pages: number): void {
    const vmm = this.installer.vmm;
    if (claim.present) {
      vmm.count(COUNTER.PRECOPY_REWRITES, pages);
    } else {
      this.direct.publish(this.installer.ownerOf(first), first, pages);
      for (let p = first; p < first + pages; p++) vmm.markReceived(p, ORIGIN.PRECOPY);
      vmm.count(COUNTER.PAGES_PRECOPY, pages);
    }
    this.placed(pages);
  }

  release(claim: PushClaim, first: number, pages: number): void {
    // Pages being overwritten stay installed (torn: the migration is cancelled anyway, the stream ended in precopy).
    if (!claim.present) this.direct.release(first, pages);
  }
}

export class StagedPrecopyPlacement extends PrecopyPlacement {
  private readonly staging: StagingBuffer;

  constructor(installer: PageInstaller, receiver: PrecopyReceiver, sink: PrecopyPushSink) {
    super(installer, receiver, sink);
    this.staging = new StagingBuffer(this.pageSize);
  }

  claim(first: number, count: number): PushClaim {
    return this.staging.claim(first, this.span(first, count));
  }

  commit(claim: PushClaim, first: number, pages: number): void {
    const from = (first - claim.first) * this.pageSize;
    // First arrivals COPYed from the staging buffer (never a touch of a missing page), the rest overwritten.
    const r = this.receiver.receive(this.currentRound, first, claim.view.subarray(from, from + pages * this.pageSize));
    if (r < 0) {
      this.sink.fail(new Error(`installing precopy pages from ${first} failed with errno ${-r}`));
      return;
    }
    this.placed(pages);
  }

  release(): void {
    // Nothing was taken: the staging buffer is simply read over.
  }
}

/** The precopy placement for the installer's backend: direct where the backend allows it. */
export function precopyPushPlacement(installer: PageInstaller, receiver: PrecopyReceiver, sink: PrecopyPushSink): PrecopyPushPlacement {
  const direct = installer.memory.direct;
  return direct !== undefined ? new DirectPrecopyPlacement(installer, receiver, sink, direct) : new StagedPrecopyPlacement(installer, receiver, sink);
}
