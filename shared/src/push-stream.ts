/**
 * Push channels: pages on a raw byte stream of their own, beside the
 * WebSockets (QEMU's multifd channels do the same). Protocol version 6
 * carried postcopy's pushed pages; version 7 carries precopy's pages too
 * (rounds and stop-and-copy), with a SYNC record as their barrier.
 *
 * A WebSocket message costs the receiver a copy of every page (ws joins the
 * reads a frame spans into one buffer) and the sender another (msgpack packs
 * the page into its frame); the stream costs neither: the source writes each
 * run's header and the image's own bytes (writev), and the destination reads
 * the run's bytes straight into guest memory (or a staging buffer it COPYs
 * from), the way Node's own socket ceiling does.
 *
 * The connection: an HTTP/1.1 `GET` with `Upgrade: postcopy-push` on the
 * source's port; after the `101`, the destination sends a `hello` (role
 * {@link ChannelRole.Push}, with the migration's secret, like every channel
 * but the first main one) as a length-prefixed msgpack frame, and the source
 * answers one `welcome`, or one `error` and closes. In precopy and hybrid
 * modes the destination opens it before `start`, so round 1 goes on it. From
 * then on the source sends records, the destination nothing:
 *
 *     offset 0  u8   kind   PUSH_RECORD.*
 *            1  u24  round  (little-endian) PRECOPY_PAGES / PRECOPY_ZERO: the
 *                           round that sent them, 1 to MAX_PUSH_ROUND (the stop-
 *                           and-copy is the last round + 1); any other kind: 0
 *            4  u32  first  page index (little-endian); SYNC: the sequence number
 *            8  u32  count  pages, 1 to maxPushRunPages(pageSize), first + count <= totalPages; SYNC: 0
 *
 * Kinds:
 * - PAGES (1), ZERO (2): postcopy's pushed pages (count pages' bytes follow,
 *   or none). Only after the switchover; a page already present is EEXIST
 *   (counted, its bytes dropped). A record never claims a page twice, and
 *   the source sends no page's contents twice across all channels (the
 *   sentmap).
 * - PRECOPY_PAGES (3), PRECOPY_ZERO (4): precopy's pages of round `round`
 *   (count pages' bytes follow, or none). Only before the switchover, rounds
 *   never going down. A page's first arrival is installed (COPY, ZEROPAGE);
 *   a later one overwrites it in place (the guest dirtied it on the source
 *   since), as the main channel's `precopy-pages` do.
 * - SYNC (5): no bytes follow; `first` is a sequence number, 1 for the first
 *   and one more each time. The source writes one after each round's pages
 *   and after the stop-and-copy; the destination, once every record before
 *   it is placed, answers `precopy-synced` with the number on the main
 *   channel. The source sends the discard set and `switchover` only once
 *   the last SYNC is acknowledged (QEMU's multifd sync: MULTIFD_FLAG_SYNC,
 *   RAM_SAVE_FLAG_MULTIFD_FLUSH, multifd_send_sync_main /
 *   multifd_recv_sync_main), so that no precopy page still on the push
 *   channel can land after them: one landing on a discarded page would
 *   bring its stale content back unseen. Only before the switchover.
 *
 * Any other kind, a non-zero pad, a record out of its phase or a SYNC out
 * of sequence is a protocol error. The destination installs a record's pages
 * as their bytes complete; a connection lost in the middle of a record
 * leaves the rest of it missing (after the switchover, the resume's
 * receivedmap says so and the source sends them again; before it, the
 * migration is cancelled).
 */
import { ProtocolError, describe } from './errors.js';
import type { GuestLayout } from './layout.js';

/** The HTTP upgrade token of a push channel. */
export const PUSH_UPGRADE = 'postcopy-push';

export const PUSH_RECORD = { PAGES: 1, ZERO: 2, PRECOPY_PAGES: 3, PRECOPY_ZERO: 4, SYNC: 5 } as const;

/** The highest round a precopy record can carry (24 bits). */
export const MAX_PUSH_ROUND = 0xffffff;

/** Whether a record kind carries precopy pages (PRECOPY_PAGES or PRECOPY_ZERO). */
export function isPrecopyRecord(kind: number): boolean {
  return kind === PUSH_RECORD.PRECOPY_PAGES || kind === PUSH_RECORD.PRECOPY_ZERO;
}

export const PUSH_HEADER_BYTES = 12;

/** A record's page bytes at most (fewer headers; runs also stop at image chunk boundaries). */
export const MAX_PUSH_RUN_BYTES = 1024 * 1024;

/** A handshake frame (hello, welcome, error) is at most this long. */
export const MAX_PUSH_HANDSHAKE_BYTES = 4096;

export function maxPushRunPages(pageSize: number): number {
  return Math.max(1, Math.floor(MAX_PUSH_RUN_BYTES / pageSize));
}

/** A record's header (`round`: precopy records only, 1 to MAX_PUSH_ROUND). */
export function pushRecordHeader(kind: number, first: number, count: number, round = 0): Buffer {
  const header = Buffer.allocUnsafe(PUSH_HEADER_BYTES);
  header.writeUInt32LE((kind | (round << 8)) >>> 0, 0);
  header.writeUInt32LE(first, 4);
  header.writeUInt32LE(count, 8);
  return header;
}

/** A SYNC record's header: sequence number `seq` (from 1). */
export function pushSyncHeader(seq: number): Buffer {
  return pushRecordHeader(PUSH_RECORD.SYNC, seq, 0);
}

export interface PushRecordHeader {
  kind: number;
  /** Page index; for SYNC the sequence number. */
  first: number;
  /** Pages; 0 for SYNC. */
  count: number;
  /** Precopy records: their round (from 1); 0 otherwise. */
  round: number;
}

/** Reads and validates a record's header (every field, against the guest's layout). Throws ProtocolError. */
export function decodePushRecordHeader(header: Uint8Array, layout: GuestLayout): PushRecordHeader {
  const view = new DataView(header.buffer, header.byteOffset, PUSH_HEADER_BYTES);
  const kind = view.getUint8(0);
  const pad = view.getUint32(0, true) >>> 8;
  const first = view.getUint32(4, true);
  const count = view.getUint32(8, true);
  if (kind === PUSH_RECORD.SYNC) {
    if (pad !== 0) throw new ProtocolError(`push record: expected bytes 1 to 3 of a SYNC header to be 0, got ${describe(pad)}`);
    if (first < 1) throw new ProtocolError(`push record: expected a SYNC sequence number from 1, got ${first}`);
    if (count !== 0) throw new ProtocolError(`push record: expected a SYNC count of 0, got ${count}`);
    return { kind, first, count, round: 0 };
  }
  const precopy = isPrecopyRecord(kind);
  if (!precopy && kind !== PUSH_RECORD.PAGES && kind !== PUSH_RECORD.ZERO) {
    throw new ProtocolError(
      `push record: expected kind ${PUSH_RECORD.PAGES} (pages), ${PUSH_RECORD.ZERO} (zero pages), ${PUSH_RECORD.PRECOPY_PAGES} (precopy pages), ` +
        `${PUSH_RECORD.PRECOPY_ZERO} (precopy zero pages) or ${PUSH_RECORD.SYNC} (sync), got ${kind}`,
    );
  }
  if (precopy && pad === 0) throw new ProtocolError(`push record: expected a precopy record's round (bytes 1 to 3) from 1 to ${MAX_PUSH_ROUND}, got 0`);
  if (!precopy && pad !== 0) throw new ProtocolError(`push record: expected bytes 1 to 3 of the header to be 0, got ${describe(pad)}`);
  const most = maxPushRunPages(layout.pageSize);
  if (count < 1 || count > most) throw new ProtocolError(`push record: expected a count from 1 to ${most}, got ${count}`);
  if (first + count > layout.totalPages) {
    throw new ProtocolError(`push record: expected pages inside the guest (< ${layout.totalPages}), got ${count} from page ${first}`);
  }
  return { kind, first, count, round: precopy ? pad : 0 };
}

/** A handshake frame on the stream: a u32 length (big-endian), then the msgpack frame. */
export function lengthPrefixed(frame: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(4 + frame.length);
  out.writeUInt32BE(frame.length, 0);
  out.set(frame, 4);
  return out;
}

/**
 * Collects one length-prefixed frame from the chunks of a stream. `push`
 * returns the frame once it is whole (and the bytes after it, which belong
 * to what follows), undefined while more is needed; throws ProtocolError for
 * a frame longer than {@link MAX_PUSH_HANDSHAKE_BYTES}.
 */
export class LengthPrefixedFrame {
  private buffered = Buffer.alloc(0);

  push(chunk: Uint8Array): { frame: Buffer; rest: Buffer } | undefined {
    this.buffered = this.buffered.length === 0 ? Buffer.from(chunk) : Buffer.concat([this.buffered, chunk]);
    if (this.buffered.length < 4) return undefined;
    const length = this.buffered.readUInt32BE(0);
    if (length > MAX_PUSH_HANDSHAKE_BYTES) {
      throw new ProtocolError(`push channel: expected a handshake frame of at most ${MAX_PUSH_HANDSHAKE_BYTES} bytes, got one of ${length}`);
    }
    if (this.buffered.length < 4 + length) return undefined;
    return { frame: this.buffered.subarray(4, 4 + length), rest: this.buffered.subarray(4 + length) };
  }
}
