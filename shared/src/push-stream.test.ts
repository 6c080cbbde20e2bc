import { describe, expect, it } from 'vitest';
import { ProtocolError } from './errors.js';
import { makeLayout } from './layout.js';
import {
  LengthPrefixedFrame,
  MAX_PUSH_HANDSHAKE_BYTES,
  MAX_PUSH_ROUND,
  PUSH_HEADER_BYTES,
  PUSH_RECORD,
  decodePushRecordHeader,
  isPrecopyRecord,
  lengthPrefixed,
  maxPushRunPages,
  pushRecordHeader,
  pushSyncHeader,
} from './push-stream.js';

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
      expect(decodePushRecordHeader(header, layout)).toEqual({ kind, first, count, round: 0 });
    }
    // 2 MiB pages: one page a record.
    expect(maxPushRunPages(2 * 1024 * 1024)).toBe(1);
  });

  it('refuses every malformed header with a ProtocolError that says what was expected', () => {
    const bad = (header: Buffer, what: RegExp): void => {
      expect(() => decodePushRecordHeader(header, layout)).toThrow(ProtocolError);
      expect(() => decodePushRecordHeader(header, layout)).toThrow(what);
    };
    bad(pushRecordHeader(0, 0, 1), /expected kind 1 \(pages\), 2 \(zero pages\), 3 \(precopy pages\), 4 \(precopy zero pages\) or 5 \(sync\), got 0/);
    bad(pushRecordHeader(6, 0, 1), /got 6/);
    const padded = pushRecordHeader(PUSH_RECORD.PAGES, 0, 1);
    padded[2] = 1;
    bad(padded, /bytes 1 to 3/);
    bad(pushRecordHeader(PUSH_RECORD.PAGES, 0, 0), /count from 1 to 256, got 0/);
    bad(pushRecordHeader(PUSH_RECORD.ZERO, 0, 257), /count from 1 to 256, got 257/);
    bad(pushRecordHeader(PUSH_RECORD.PAGES, 1000, 25), /inside the guest \(< 1024\), got 25 from page 1000/);
  });
});

describe('precopy records and SYNC', () => {
  it('a precopy header carries its round in bytes 1 to 3, up to 24 bits', () => {
    for (const [kind, first, count, round] of [
      [PUSH_RECORD.PRECOPY_PAGES, 0, 1, 1],
      [PUSH_RECORD.PRECOPY_ZERO, 1023, 1, 2],
      [PUSH_RECORD.PRECOPY_PAGES, 768, 256, 300],
      [PUSH_RECORD.PRECOPY_ZERO, 5, 3, MAX_PUSH_ROUND],
    ] as const) {
      const header = pushRecordHeader(kind, first, count, round);
      expect(header[0]).toBe(kind);
      expect(header.readUIntLE(1, 3)).toBe(round);
      expect(decodePushRecordHeader(header, layout)).toEqual({ kind, first, count, round });
    }
    expect(isPrecopyRecord(PUSH_RECORD.PRECOPY_PAGES)).toBe(true);
    expect(isPrecopyRecord(PUSH_RECORD.PRECOPY_ZERO)).toBe(true);
    expect(isPrecopyRecord(PUSH_RECORD.PAGES)).toBe(false);
    expect(isPrecopyRecord(PUSH_RECORD.SYNC)).toBe(false);
  });

  it('a SYNC header carries its sequence number and no pages', () => {
    const header = pushSyncHeader(42);
    expect(header.length).toBe(PUSH_HEADER_BYTES);
    expect(decodePushRecordHeader(header, layout)).toEqual({ kind: PUSH_RECORD.SYNC, first: 42, count: 0, round: 0 });
    // A sequence number is not a page index: past the guest is fine.
    expect(decodePushRecordHeader(pushSyncHeader(0xffffffff), layout).first).toBe(0xffffffff);
  });

  it('refuses a precopy record without a round, a postcopy record with one, and a malformed SYNC', () => {
    const bad = (header: Buffer, what: RegExp): void => expect(() => decodePushRecordHeader(header, layout)).toThrow(what);
    bad(pushRecordHeader(PUSH_RECORD.PRECOPY_PAGES, 0, 1, 0), /precopy record's round \(bytes 1 to 3\) from 1 to 16777215, got 0/);
    bad(pushRecordHeader(PUSH_RECORD.PRECOPY_ZERO, 0, 1, 0), /precopy record's round/);
    bad(pushRecordHeader(PUSH_RECORD.PAGES, 0, 1, 3), /bytes 1 to 3 of the header to be 0/);
    bad(pushRecordHeader(PUSH_RECORD.ZERO, 0, 1, 1), /bytes 1 to 3 of the header to be 0/);
    bad(pushRecordHeader(PUSH_RECORD.PRECOPY_PAGES, 0, 0, 1), /count from 1 to 256, got 0/);
    bad(pushRecordHeader(PUSH_RECORD.PRECOPY_PAGES, 1000, 25, 1), /inside the guest \(< 1024\), got 25 from page 1000/);
    bad(pushRecordHeader(PUSH_RECORD.PRECOPY_ZERO, 0, 257, 1), /count from 1 to 256, got 257/);
    bad(pushSyncHeader(0), /SYNC sequence number from 1, got 0/);
    bad(pushRecordHeader(PUSH_RECORD.SYNC, 1, 1), /SYNC count of 0, got 1/);
    bad(pushRecordHeader(PUSH_RECORD.SYNC, 1, 0, 2), /bytes 1 to 3 of a SYNC header to be 0/);
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
