import { describe, expect, it } from 'vitest';
import { Sender } from 'ws';
import { FRAME_HEADER_BYTES, binaryFrameHeaderInto } from './ws-frame.js';

/** What ws's own Sender puts before an unmasked, uncompressed, final binary frame of `length` bytes. */
function wsHeader(length: number): Uint8Array {
  // Sender.frame (readOnly, unmasked) reads only the data's length for the header: a stand-in with that length, so no 4 GiB buffer is made.
  const data = { length, byteLength: length } as unknown as Buffer;
  const [header] = (Sender as unknown as { frame(d: Buffer, o: object): Buffer[] }).frame(data, { fin: true, rsv1: false, opcode: 0x02, mask: false, readOnly: true });
  return new Uint8Array(header!);
}

describe('the source\u2019s binary frame header (RFC 6455 5.2)', () => {
  it('is what ws writes, at every length boundary', () => {
    for (const length of [0, 1, 125, 126, 4111, 65535, 65536, 2 * 1024 * 1024 + 17, 2 ** 32 + 5]) {
      const out = new Uint8Array(4 + FRAME_HEADER_BYTES).fill(0xee);
      const n = binaryFrameHeaderInto(out, 4, length);
      expect(Array.from(out.subarray(4, 4 + n)), `length ${length}`).toEqual(Array.from(wsHeader(length)));
      // Nothing written outside it.
      expect(Array.from(out.subarray(0, 4))).toEqual([0xee, 0xee, 0xee, 0xee]);
    }
  });

  it('is FIN and binary, unmasked, with the length in 7, 16 or 64 bits', () => {
    const out = new Uint8Array(FRAME_HEADER_BYTES);
    expect(binaryFrameHeaderInto(out, 0, 125)).toBe(2);
    expect(Array.from(out.subarray(0, 2))).toEqual([0x82, 125]);
    expect(binaryFrameHeaderInto(out, 0, 4111)).toBe(4);
    expect(Array.from(out.subarray(0, 4))).toEqual([0x82, 126, 0x10, 0x0f]);
    expect(binaryFrameHeaderInto(out, 0, 65536)).toBe(10);
    expect(Array.from(out)).toEqual([0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
  });
});
