/**
 * Push channels (protocol version 6): pushed pages on a raw byte stream of
 * their own, beside the WebSockets (QEMU's multifd channels do the same).
 *
 * A WebSocket message costs the receiver a copy of every page (ws joins the
 * reads a frame spans into one buffer) and the sender another (msgpack packs
 * the page into its frame); the stream costs neither: the source writes each
 * run's header and the image's own bytes (writev), and the destination reads
 * the run's bytes straight into guest memory (or a staging buffer it COPYs
 * from), the way Node's own socket ceiling does.
 *
 * The connection: an HTTP/1.1 `GET` with `Upgrade: postcopy-push` on the
 * source's port (TLS runs keep pushing on the main channel); after the `101`,
 * the destination sends a `hello` (role {@link ChannelRole.Push}, with the
 * migration's secret, like every channel but the first main one) as a
 * length-prefixed msgpack frame, and the source answers one `welcome`, or
 * one `error` and closes. From then on the source sends records, the
 * destination nothing:
 *
 *     offset 0  u8   kind   PUSH_RECORD.PAGES (count pages' bytes follow) or PUSH_RECORD.ZERO (none)
 *            1  u8×3 0
 *            4  u32  first  page index (little-endian)
 *            8  u32  count  pages, 1 to maxPushRunPages(pageSize), first + count <= totalPages
 *
 * A record never claims a page twice, and the source sends no page's
 * contents twice across all channels (the sentmap). The destination installs
 * a record's pages as their bytes complete; a connection lost in the middle
 * of a record leaves the rest of it missing, and the resume's receivedmap
 * says so (the source sends them again).
 */
import { ProtocolError, describe } from './errors.js';
import type { GuestLayout } from './layout.js';

/** The HTTP upgrade token of a push channel. */
export const PUSH_UPGRADE = 'postcopy-push';

export const PUSH_RECORD = { PAGES: 1, ZERO: 2 } as const;

export const PUSH_HEADER_BYTES = 12;

/** A record's page bytes at most (fewer headers; runs also stop at image chunk boundaries). */
export const MAX_PUSH_RUN_BYTES = 1024 * 1024;

/** A handshake frame (hello, welcome, error) is at most this long. */
export const MAX_PUSH_HANDSHAKE_BYTES = 4096;

export function maxPushRunPages(pageSize: number): number {
  return Math.max(1, Math.floor(MAX_PUSH_RUN_BYTES / pageSize));
}

/** A record's header. */
export function pushRecordHeader(kind: number, first: number, count: number): Buffer {
  const header = Buffer.allocUnsafe(PUSH_HEADER_BYTES);
  header.writeUInt32LE(kind, 0);
  header.writeUInt32LE(first, 4);
  header.writeUInt32LE(count, 8);
  return header;
}

export interface PushRecordHeader {
  kind: number;
  first: number;
  count: number;
}

/** Reads and validates a record's header (every field, against the guest's layout). Throws ProtocolError. */
export function decodePushRecordHeader(header: Uint8Array, layout: GuestLayout): PushRecordHeader {
  const view = new DataView(header.buffer, header.byteOffset, PUSH_HEADER_BYTES);
  const kind = view.getUint8(0);
  const pad = view.getUint32(0, true) >>> 8;
  const first = view.getUint32(4, true);
  const count = view.getUint32(8, true);
  if (kind !== PUSH_RECORD.PAGES && kind !== PUSH_RECORD.ZERO) {
    throw new ProtocolError(`push record: expected kind ${PUSH_RECORD.PAGES} (pages) or ${PUSH_RECORD.ZERO} (zero pages), got ${kind}`);
  }
  if (pad !== 0) throw new ProtocolError(`push record: expected bytes 1 to 3 of the header to be 0, got ${describe(pad)}`);
  const most = maxPushRunPages(layout.pageSize);
  if (count < 1 || count > most) throw new ProtocolError(`push record: expected a count from 1 to ${most}, got ${count}`);
  if (first + count > layout.totalPages) {
    throw new ProtocolError(`push record: expected pages inside the guest (< ${layout.totalPages}), got ${count} from page ${first}`);
  }
  return { kind, first, count };
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
