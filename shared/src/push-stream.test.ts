import { describe, expect, it } from 'vitest';
import { ProtocolError } from './errors.js';
import { makeLayout } from './layout.js';
import { LengthPrefixedFrame, MAX_PUSH_HANDSHAKE_BYTES, PUSH_HEADER_BYTES, PUSH_RECORD, decodePushRecordHeader, lengthPrefixed, maxPushRunPages, pushRecordHeader } from './push-stream.js';

const layout = makeLayout(1024 * 4096, 4096);

describe('push records', () => {
  it('a header decodes to what was encoded, for both kinds and the largest run', () => {
    const most = maxPushRunPages(4096);
    expect(most).toBe(256);
    for (const [kind, first, count] of [
      [PUSH_RECORD.PAGES, 0, 1],
      [PUSH_RECORD.ZERO, 1023, 1],
      [PUSH_RECORD.PAGES, 1024 - most, most],
    ] as const) {
      const header = pushRecordHeader(kind, first, count);
      expect(header.length).toBe(PUSH_HEADER_BYTES);
      expect(decodePushRecordHeader(header, layout)).toEqual({ kind, first, count });
    }
    // 2 MiB pages: one page a record.
    expect(maxPushRunPages(2 * 1024 * 1024)).toBe(1);
  });

  it('refuses every malformed header with a ProtocolError that says what was expected', () => {
    const bad = (header: Buffer, what: RegExp): void => {
      expect(() => decodePushRecordHeader(header, layout)).toThrow(ProtocolError);
      expect(() => decodePushRecordHeader(header, layout)).toThrow(what);
    };
    bad(pushRecordHeader(0, 0, 1), /expected kind 1 \(pages\) or 2 \(zero pages\), got 0/);
    const padded = pushRecordHeader(PUSH_RECORD.PAGES, 0, 1);
    padded[2] = 1;
    bad(padded, /bytes 1 to 3/);
    bad(pushRecordHeader(PUSH_RECORD.PAGES, 0, 0), /count from 1 to 256, got 0/);
    bad(pushRecordHeader(PUSH_RECORD.ZERO, 0, 257), /count from 1 to 256, got 257/);
    bad(pushRecordHeader(PUSH_RECORD.PAGES, 1000, 25), /inside the guest \(< 1024\), got 25 from page 1000/);
  });
});

describe('LengthPrefixedFrame', () => {
  it('collects a frame split over chunks, and hands back what follows it', () => {
    const framed = Buffer.concat([lengthPrefixed(Buffer.from('hello')), Buffer.from('next')]);
    const reader = new LengthPrefixedFrame();
    expect(reader.push(framed.subarray(0, 2))).toBeUndefined();
    expect(reader.push(framed.subarray(2, 6))).toBeUndefined();
    const got = reader.push(framed.subarray(6));
    expect(got?.frame.toString()).toBe('hello');
    expect(got?.rest.toString()).toBe('next');
  });

  it('refuses a frame longer than a handshake needs', () => {
    const header = Buffer.alloc(4);
    header.writeUInt32BE(MAX_PUSH_HANDSHAKE_BYTES + 1, 0);
    expect(() => new LengthPrefixedFrame().push(header)).toThrow(/at most 4096 bytes, got one of 4097/);
  });
});
