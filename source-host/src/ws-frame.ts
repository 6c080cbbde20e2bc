/**
 * The header of a WebSocket frame the source sends (RFC 6455 section 5.2):
 * one whole binary message (FIN set, opcode 2), not masked (a server must
 * not mask), no extension bits (perMessageDeflate is off), its payload
 * length in 7 bits, or 126 and 16 bits, or 127 and 64 bits. What ws's
 * Sender writes before a binary message when it does not compress.
 */
import { writeUint16BE, writeUint32BE } from '@postcopy/shared';

/** Bytes {@link binaryFrameHeaderInto} writes at most. */
export const FRAME_HEADER_BYTES = 10;

/** Writes the header of a binary frame of `payloadBytes` into `out` at `at`. Returns its length. */
export function binaryFrameHeaderInto(out: Uint8Array, at: number, payloadBytes: number): number {
  out[at] = 0x82;
  if (payloadBytes < 126) {
    out[at + 1] = payloadBytes;
    return 2;
  }
  if (payloadBytes < 0x10000) {
    out[at + 1] = 126;
    writeUint16BE(out, at + 2, payloadBytes);
    return 4;
  }
  out[at + 1] = 127;
  // Up to 2^53: the high 32 bits of the 64-bit length, then the low.
  writeUint32BE(out, at + 2, Math.floor(payloadBytes / 0x100000000));
  writeUint32BE(out, at + 6, payloadBytes >>> 0);
  return 10;
}
