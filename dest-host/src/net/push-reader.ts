/**
 * The records of a push channel (shared/push-stream.ts), read the way Node's
 * `onread` reads a socket: {@link PushRecordReader.buffer} says where the
 * next read goes (the rest of a header, or guest memory for the pages being
 * read: see {@link PushPlacement}), {@link PushRecordReader.consumed} how
 * many bytes it got. A header is read into its own 12 bytes, so a read never
 * takes bytes of what follows; a run's bytes go straight to where its pages
 * are installed from, and every page is installed as soon as its last byte
 * is in. {@link PushRecordReader.end} gives back the pages of a record the
 * stream stopped in the middle of: nothing of them was installed, and the
 * resume's receivedmap says so.
 *
 * Precopy's records (PRECOPY_PAGES, PRECOPY_ZERO: see push-stream.ts) go to
 * a placement of their own ({@link PrecopyPushPlacement}: a page already
 * here is overwritten, not EEXIST), told each record's round first; a SYNC
 * is handed on once every record before it is placed, and its sequence
 * numbers must go 1, 2, 3, ...: anything else is a protocol error.
 */
import { ProtocolError, PUSH_HEADER_BYTES, PUSH_RECORD, decodePushRecordHeader, isPrecopyRecord, type GuestLayout } from '@postcopy/shared/net';

/** Pages taken for bytes about to arrive, and where those bytes go. */
export interface PushClaim {
  first: number;
  pages: number;
  /** `pages` pages of bytes: guest memory, a staging buffer, or (present pages) a scratch page. */
  view: Uint8Array;
  /** The first page was installed already (EEXIST): its bytes are read and dropped. */
  present: boolean;
}

/** Where pushed pages go (vmm/push-placement.ts). */
export interface PushPlacement {
  /** Takes up to `count` pages from `first` for bytes about to arrive (at least one page). */
  claim(first: number, count: number): PushClaim;
  /** `pages` pages of `claim` from `first` have all their bytes: install them. */
  commit(claim: PushClaim, first: number, pages: number): void;
  /** The stream ended before these pages of `claim` were complete. */
  release(claim: PushClaim, first: number, pages: number): void;
  /** A record of `count` zero pages from `first`. */
  zero(first: number, count: number): void;
}

/** Where precopy's records go (vmm/precopy-push-placement.ts). */
export interface PrecopyPushPlacement extends PushPlacement {
  /** The next record was sent in round `round` (throws when precopy records may not come now). */
  round(round: number): void;
  /** SYNC `seq`: every record before it is placed. */
  synced(seq: number): void;
}

export class PushRecordReader {
  private readonly header = new Uint8Array(PUSH_HEADER_BYTES);
  private headerBytes = 0;
  /** The record being read (PAGES), end exclusive; undefined between records. */
  private recordEnd = 0;
  private claim: PushClaim | undefined;
  /** Bytes of the current claim that arrived, and its pages installed. */
  private claimBytes = 0;
  private claimDone = 0;
  private readonly pageSize: number;
  /** Records read whole (tests, diagnostics). */
  records = 0;
  /** The placement of the record being read (postcopy's or precopy's). */
  private active: PushPlacement;
  /** The last SYNC's sequence number (0: none yet). */
  private lastSync = 0;

  constructor(
    private readonly layout: GuestLayout,
    private readonly placement: PushPlacement,
    /** Where precopy records go; without it, one is a protocol error. */
    private readonly precopy?: PrecopyPushPlacement,
  ) {
    this.pageSize = layout.pageSize;
    this.active = placement;
  }

  /** Where the next read goes (never past the current header or claim). */
  buffer(): Uint8Array {
    const claim = this.claim;
    if (claim === undefined) return this.header.subarray(this.headerBytes);
    return claim.view.subarray(this.claimBytes, claim.pages * this.pageSize);
  }

  /** `n` bytes were read into {@link buffer}. Throws ProtocolError for a bad header. */
  consumed(n: number): void {
    const claim = this.claim;
    if (claim === undefined) {
      this.headerBytes += n;
      if (this.headerBytes < PUSH_HEADER_BYTES) return;
      this.headerBytes = 0;
      const { kind, first, count, round } = decodePushRecordHeader(this.header, this.layout);
      if (kind === PUSH_RECORD.SYNC) {
        if (this.precopy === undefined) throw new ProtocolError(`push record: expected no SYNC on a push channel without precopy, got SYNC ${first}`);
        if (first !== this.lastSync + 1) throw new ProtocolError(`push record: expected SYNC ${this.lastSync + 1}, got SYNC ${first}`);
        this.lastSync = first;
        this.records++;
        this.precopy.synced(first);
        return;
      }
      if (isPrecopyRecord(kind)) {
        if (this.precopy === undefined) throw new ProtocolError(`push record: expected no precopy records on a push channel without precopy, got kind ${kind} of round ${round}`);
        this.precopy.round(round);
        this.active = this.precopy;
      } else this.active = this.placement;
      if (kind === PUSH_RECORD.ZERO || kind === PUSH_RECORD.PRECOPY_ZERO) {
        this.active.zero(first, count);
        this.records++;
        return;
      }
      this.recordEnd = first + count;
      this.take(first);
      return;
    }
    this.claimBytes += n;
    const done = Math.floor(this.claimBytes / this.pageSize);
    if (done > this.claimDone) {
      const from = this.claimDone;
      // Counted as done first: a commit may end the stream from inside (an
      // injected drop pauses the run, which cuts the channel: end()), and
      // end() must give back only the pages not installed.
      this.claimDone = done;
      this.active.commit(claim, claim.first + from, done - from);
      if (this.claim !== claim) return;
    }
    if (done < claim.pages) return;
    const next = claim.first + claim.pages;
    this.claim = undefined;
    if (next < this.recordEnd) this.take(next);
    else this.records++;
  }

  /** The stream ended: the pages of the current record not installed yet are given back. Returns how many. */
  end(): number {
    const claim = this.claim;
    this.claim = undefined;
    this.headerBytes = 0;
    if (claim === undefined) return 0;
    const left = claim.pages - this.claimDone;
    if (left > 0) this.active.release(claim, claim.first + this.claimDone, left);
    return left;
  }

  private take(first: number): void {
    this.claim = this.active.claim(first, this.recordEnd - first);
    this.claimBytes = 0;
    this.claimDone = 0;
  }
}
