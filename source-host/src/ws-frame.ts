/**
 * The header of a WebSocket frame the source sends (RFC 6455 section 5.2):
 * one whole binary message (FIN set, opcode 2), not masked (a server must
 * not mask), no extension bits (perMessageDeflate is off), its payload
 * length in 7 bits, or 126 and 16 bits, or 127 and 64 bits. What ws's
 * Sender writes before a binary message when it does not compress.
 */

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
    out[at + 2] = payloadBytes >>> 8;
    out[at + 3] = payloadBytes & 0xff;
    return 4;
  }
  out[at + 1] = 127;
  // Up to 2^53: the high 32 bits of the 64-bit length, then the low.
  const high = Math.floor(payloadBytes / 0x100000000);
  out[at + 2] = high >>> 24;
  out[at + 3] = (high >>> 16) & 0xff;
  out[at + 4] = (high >>> 8) & 0xff;
  out[at + 5] = high & 0xff;
  out[at + 6] = payloadBytes >>> 24;
  out[at + 7] = (payloadBytes >>> 16) & 0xff;
  out[at + 8] = (payloadBytes >>> 8) & 0xff;
  out[at + 9] = payloadBytes & 0xff;
  return 10;
}
