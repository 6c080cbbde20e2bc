/**
 * The codec against the protocol: every message survives a round trip, every
 * malformed frame is rejected with a ProtocolError that says what was expected
 * and what came, and nothing (random bytes, mutated frames) makes decode throw
 * anything else.
 */
import { pack } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import { PAGE_REPLY_HEADER_BYTES, REQUEST_BYTES, decode, decodeReplyFast, decodeRequestFast, encode, encodePageReplyHeaderInto, encodeRequestInto, pageReplyHeaderBytes, type DecodeLimits } from './codec.js';
import { ProtocolError } from './errors.js';
import { makeLayout } from './layout.js';
import { rng } from './random.js';
import { coalesce, decodeRanges, encodeRanges } from './precopy.js';
import { ChannelRole, MessageType, PROTOCOL_VERSION, type Message, type Summary } from './protocol.js';

const PAGE = 4096;
const layout = makeLayout(64 * PAGE, PAGE);
const limits: DecodeLimits = { layout };
const DIGEST = 'ab'.repeat(32);

/** Deterministic PRNG, so the fuzz cases are the same on every run. */
const prng = rng;

function pageData(fill: number): Uint8Array {
  const data = new Uint8Array(PAGE);
  for (let i = 0; i < PAGE; i++) data[i] = (i * 31 + fill) & 0xff;
  return data;
}

/** msgpackr hands back Buffers; compare bytes as plain Uint8Arrays. */
function normalize(message: Message): unknown {
  const out: Record<string, unknown> = { ...message };
  for (const [key, value] of Object.entries(out)) {
    if (value instanceof Uint8Array) out[key] = Uint8Array.from(value);
  }
  return out;
}

const summary: Summary = {
  type: 'summary',
  requests: 10,
  replies: 10,
  repliesPage: 6,
  repliesZero: 3,
  repliesAlreadySent: 1,
  pagesSent: 64,
  pagesPushed: 55,
  pagesZero: 9,
  pagesSentTwice: 0,
  digestOfReceived: DIGEST,
  sentNotReceived: 0,
  receivedNotSent: 0,
  peakRssBytes: 123 * 1024 * 1024,
  repliesUndeliverable: 2,
  keepaliveTimeouts: 1,
  warmUpRequests: 2048,
  warmUpMs: 491,
  migration: {
    setupTimeMs: 1.5,
    totalTimeMs: 812.25,
    downtimeMs: 12.5,
    expectedDowntimeMs: 9.75,
    downtimeLimitMs: 300,
    switchoverReason: 'rounds',
    rounds: 2,
    dirtySyncCount: 3,
    pagesSent: 70,
    pagesResent: 6,
    bytes: 70 * 4096,
    dirtyPagesRate: 1234.5,
    throttlePercent: 20,
    perRound: [
      { round: 1, pagesSent: 64, pagesDirtied: 6, ms: 10.5, mbps: 199.7 },
      { round: 2, pagesSent: 6, pagesDirtied: 2, ms: 1.25, mbps: 157.3 },
    ],
    discardPages: 2,
    discardRanges: 1,
  },
  cpuUs: 1_234_567,
  cpuMainThreadUs: 1_000_001,
  devices: {
    devices: [
      {
        name: 'nic0',
        type: 'mgpu-128M',
        capabilities: ['stop-copy', 'p2p', 'pre-copy'],
        tracking: 'device',
        statePath: ['RUNNING', 'PRE_COPY', 'PRE_COPY_P2P', 'STOP_COPY', 'STOP'],
        precopy: { initialBytesAtStart: 8192, bytesSent: 12288, dirtyBytesMax: 4096 },
        stopCopyBytes: 4096,
        stateDigest: DIGEST,
      },
    ],
    providers: {
      device: { syncs: 3, bitmapBytes: 24, pagesDirty: 9, ms: 0.25 },
      iommu: { syncs: 0, bitmapBytes: 0, pagesDirty: 0, ms: 0 },
      none: { syncs: 0, bitmapBytes: 0, pagesDirty: 0, ms: 0 },
    },
    policy: { untrackedDma: 'block', actedOn: [], reason: "every device's DMA is tracked", forcedDowntimeMs: 0 },
    downtime: { ramMs: 1.5, deviceMs: 2.25 },
    switchoverAck: { needed: true, waitedMs: 0.5 },
  },
};

const receivedmap = new Uint8Array(8);
receivedmap[0] = 0b1010_0101;
receivedmap[7] = 0xff;

const samples: Message[] = [
  {
    type: 'hello',
    protocolVersion: PROTOCOL_VERSION,
    token: 'secret-token',
    role: ChannelRole.Fault,
    guestBytes: layout.guestBytes,
    pageSize: PAGE,
    channel: 'vcpu3',
    secret: 'ab'.repeat(32),
  },
  {
    type: 'hello',
    protocolVersion: PROTOCOL_VERSION,
    token: '',
    role: ChannelRole.Main,
    guestBytes: layout.guestBytes,
    pageSize: PAGE,
    channel: 'main',
    secret: '',
  },
  {
    type: 'welcome',
    protocolVersion: PROTOCOL_VERSION,
    guestBytes: layout.guestBytes,
    pageSize: PAGE,
    totalPages: layout.totalPages,
    imageDigest: DIGEST,
    imageSeed: 0xdeadbeef,
    zeroFraction: 0.1,
    linkDelayUs: 200,
    linkBandwidthBps: 10_000_000_000,
    secret: '0123456789abcdef'.repeat(4),
    mode: 'hybrid',
  },
  { type: 'start', push: true, preempt: false },
  { type: 'start', push: false, preempt: true },
  { type: 'sent-on-main', id: 9, page: 63 },
  { type: 'request', id: 0xffffffff, page: 63 },
  { type: 'request', id: 0, page: 0 },
  { type: 'page', id: 7, page: 12, data: pageData(12) },
  { type: 'zero-page', id: 8, page: 13 },
  { type: 'already-sent', id: 9, page: 14 },
  { type: 'pushed', page: 63, data: pageData(63) },
  { type: 'pushed-zero', page: 0 },
  { type: 'complete', pagesSent: 64 },
  { type: 'finish', receivedmap },
  { type: 'resume', push: true, preempt: false, receivedmap, requestedmap: new Uint8Array(8).fill(0x10) },
  { type: 'resumed', pagesMarkedUnsent: 12, restarted: true },
  summary,
  { type: 'precopy-pages', round: 1, page: 60, data: Buffer.concat([pageData(60), pageData(61)]) },
  { type: 'precopy-zero', round: 3, page: 2 },
  { type: 'discard', ranges: [{ first: 0, count: 2 }, { first: 5, count: 1 }, { first: 10, count: 54 }] },
  { type: 'switchover', postcopy: true },
  { type: 'running' },
  { type: 'precopy-synced', seq: 7 },
  { type: 'hash-request' },
  { type: 'page-hashes', hashes: new Uint8Array(4 * 64).fill(7), phases: new Uint8Array(64).fill(1) },
  { type: 'error', code: 'ERR_POSTCOPY_PROTOCOL', message: 'request.page: expected a whole number from 0 to 63, got 64 (number)' },
  { type: 'device-setup', devices: [{ name: 'nic0', type: 'mgpu-128M', version: '1.0', flags: 7, stateBytes: 8192, dmaRanges: [{ first: 0, count: 16 }, { first: 32, count: 32 }] }] },
  { type: 'devices-ready', uuids: ['83b8f4f2-509f-382f-3c1e-e6bfe0fa1001'] },
  { type: 'device-data', device: 0, seq: 3, offset: 4096, data: pageData(1) },
  { type: 'device-init-data-sent', device: 0 },
  { type: 'switchover-ack' },
  { type: 'device-end', device: 0, records: 4, bytes: 16384, digest: DIGEST },
];

describe('round trip', () => {
  it('covers every message type of the protocol', () => {
    const types = new Set(samples.map((m) => m.type));
    expect(types.size).toBe(Object.keys(MessageType).length);
  });

  samples.forEach((message, i) => {
    it(`${message.type} (sample ${i})`, () => {
      const frame = encode(message);
      expect(frame).toBeInstanceOf(Uint8Array);
      const decoded = decode(frame, limits);
      expect(normalize(decoded)).toEqual(normalize(message));
      if ('data' in message) {
        const data = (decoded as { data: Uint8Array }).data;
        expect(data.length).toBe(message.data.length);
        expect(Buffer.compare(Buffer.from(data), Buffer.from(message.data))).toBe(0);
      }
    });
  });

  it('handshake messages decode without a layout', () => {
    for (const message of samples.filter((m) => ['hello', 'welcome', 'start', 'summary', 'error'].includes(m.type))) {
      expect(normalize(decode(encode(message)))).toEqual(normalize(message));
    }
  });
});

/** Decodes `frame` expecting a ProtocolError; returns its message. */
function rejection(frame: Uint8Array, decodeLimits: DecodeLimits = limits): string {
  let caught: unknown;
  try {
    decode(frame, decodeLimits);
  } catch (err) {
    caught = err;
  }
  expect(caught, 'decode should have thrown').toBeInstanceOf(ProtocolError);
  const err = caught as ProtocolError;
  expect(err.code).toBe('ERR_POSTCOPY_PROTOCOL');
  expect(err.name).toBe('ProtocolError');
  return err.message;
}

/** A rejection whose message says what was expected and names what came. */
function expectRejected(frame: Uint8Array, ...mentions: string[]): string {
  const message = rejection(frame);
  expect(message).toContain('expected');
  for (const m of mentions) expect(message).toContain(m);
  return message;
}

const goodSummaryFields = (): Record<string, unknown> => {
  const { type: _type, ...fields } = summary;
  return fields;
};

describe('rejects malformed frames with ProtocolError', () => {
  it('bytes that are not msgpack', () => {
    // [0x93, 0x01] is an array of 3 cut after 1; 0xd9 0x05 a str8 of 5 with 2 bytes.
    expectRejected(Uint8Array.of(0x93, 0x01), 'msgpack', '2 bytes');
    expectRejected(Uint8Array.of(0xd9, 0x05, 0x61, 0x62), 'msgpack', '4 bytes');
    expectRejected(Uint8Array.of(), 'msgpack', '0 bytes');
    // A valid value followed by garbage is not one frame either.
    expectRejected(Uint8Array.of(0x91, 0x04, 0x00), 'msgpack', '3 bytes');
  });

  it('an undecodable frame whose bytes msgpackr quotes: control characters escaped (found by fast-check)', () => {
    // msgpackr's "end of buffer not reached" error quotes the trailing bytes (DEL raw).
    const frame = Uint8Array.of(0xa5, 0x02, 0x00, 0x00, 0xce, 0x7f, 0x00, 0x00, 0x00, 0x00);
    const message = rejection(frame);
    expect(message).toContain('\\x7f');
    expect(message).not.toMatch(/[\x00-\x1f\x7f]/);
  });

  it('valid msgpack that is not an array', () => {
    expectRejected(pack({ type: 4, id: 1, page: 2 }), 'message array', 'object');
    expectRejected(pack('request'), 'message array', '"request" (string)');
    expectRejected(pack(42), 'message array', '42 (number)');
    expectRejected(pack(null), 'message array', 'null');
    // 0xc1, the byte msgpack never uses: msgpackr reads it as a marker object.
    expectRejected(Uint8Array.of(0xc1), 'message array', 'object');
    expectRejected(pack(Buffer.from([4, 1, 2])), 'message array', '3 bytes');
  });

  it('an empty array', () => {
    expectRejected(pack([]), 'message array', 'array of 0');
  });

  it('an unknown or non-number type', () => {
    expectRejected(pack([99, 1, 2]), 'message type from 1 to 14, 20, 21 or 23 to 36', '99 (number)');
    expectRejected(pack([0]), 'message type', '0 (number)');
    expectRejected(pack([22, 1]), 'message type', '22 (number)');
    expectRejected(pack(['request', 1, 2]), 'message type', '"request" (string)');
    expectRejected(pack([4.5, 1, 2]), 'message type', '4.5 (number)');
    expectRejected(pack([null, 1, 2]), 'message type', 'null');
  });

  it('a discard whose ranges leave the guest, overlap, are unsorted or empty', () => {
    const ranges = (...pairs: number[]): Uint8Array => {
      const b = Buffer.alloc(pairs.length * 4);
      pairs.forEach((v, i) => b.writeUInt32LE(v, i * 4));
      return b;
    };
    expect(decode(pack([MessageType.Discard, ranges(0, 2, 2, 3, 63, 1)]), limits)).toEqual({
      type: 'discard',
      ranges: [{ first: 0, count: 2 }, { first: 2, count: 3 }, { first: 63, count: 1 }],
    });
    expectRejected(pack([MessageType.Discard, ranges(60, 5)]), 'discard.ranges', 'inside the guest', 'pages 60 to 64');
    expectRejected(pack([MessageType.Discard, ranges(64, 1)]), 'discard.ranges', 'inside the guest');
    expectRejected(pack([MessageType.Discard, ranges(0, 4, 3, 2)]), 'discard.ranges', 'sorted ranges that do not overlap', 'from page 3 after one that ends at page 3');
    expectRejected(pack([MessageType.Discard, ranges(10, 1, 5, 1)]), 'discard.ranges', 'sorted ranges that do not overlap');
    expectRejected(pack([MessageType.Discard, ranges(3, 0)]), 'discard.ranges', 'at least 1 page');
    expectRejected(pack([MessageType.Discard, new Uint8Array(7)]), 'discard.ranges', 'pairs of 8 bytes', '7 bytes');
    expectRejected(pack([MessageType.Discard, new Uint8Array(0)]), 'discard.ranges', '1 to 8192 ranges');
    expectRejected(pack([MessageType.Discard, [0, 1]]), 'discard.ranges', 'array of 2');
    // Before the handshake the guest's size is unknown: no discard can be checked.
    expect(rejection(pack([MessageType.Discard, ranges(0, 1)]), {})).toMatch(/expected the handshake/);
  });

  it('precopy pages, page hashes and a welcome mode out of range', () => {
    expectRejected(pack([MessageType.PrecopyPages, 0, 1, pageData(1)]), 'precopy-pages.round', 'from 1, got 0');
    expectRejected(pack([MessageType.PrecopyPages, 1, 63, Buffer.concat([pageData(63), pageData(0)])]), 'precopy-pages.data', '1 to 1 whole pages');
    expectRejected(pack([MessageType.PrecopyPages, 1, 2, new Uint8Array(100)]), 'precopy-pages.data', 'whole pages');
    expectRejected(pack([MessageType.PrecopyZero, 1, 64]), 'precopy-zero', 'page');
    expectRejected(pack([MessageType.PageHashes, new Uint8Array(4 * 63), new Uint8Array(64)]), 'page-hashes.hashes', `${4 * 64} bytes`);
    expectRejected(pack([MessageType.PageHashes, new Uint8Array(4 * 64), new Uint8Array(63)]), 'page-hashes.phases', '64 bytes');
    expectRejected(pack([MessageType.Welcome, PROTOCOL_VERSION, layout.guestBytes, PAGE, layout.totalPages, DIGEST, 1, 0, 0, 0, '', 3]), 'welcome.mode', 'from 0 to 2', '3 (number)');
    const { type: _t, ...fields } = summary;
    const badReason = { ...fields, migration: { ...fields.migration, switchoverReason: 'whenever' } };
    expectRejected(pack([MessageType.Summary, badReason]), 'summary.migration.switchoverReason', 'converged', '"whenever" (string)');
    const badRound = { ...fields, migration: { ...fields.migration, perRound: [{ round: 1, pagesSent: -1, pagesDirtied: 0, ms: 1, mbps: 1 }] } };
    expectRejected(pack([MessageType.Summary, badRound]), 'summary.migration.perRound[0].pagesSent', '-1 (number)');
    const noMigration: Record<string, unknown> = { ...fields };
    delete noMigration.migration;
    expectRejected(pack([MessageType.Summary, noMigration]), 'summary.migration', 'object of figures', 'undefined');
  });

  it('a wrong field count', () => {
    expectRejected(pack([MessageType.Request, 1, 2, 3]), 'request', 'expected 2 fields, got 3');
    expectRejected(pack([MessageType.Request, 1]), 'request', 'expected 2 fields, got 1');
    expectRejected(pack([MessageType.Start]), 'start', 'expected 2 fields, got 0');
    expectRejected(pack([MessageType.Pushed, 1]), 'pushed', 'expected 2 fields, got 1');
    expectRejected(pack([MessageType.Summary]), 'summary', 'expected 1 fields, got 0');
    expectRejected(pack([MessageType.Hello, 1, 't', 0, PAGE, PAGE]), 'hello', 'expected 7 fields, got 5');
    expectRejected(pack([MessageType.Hello, PROTOCOL_VERSION, 't', 0, PAGE, PAGE, 'main']), 'hello', 'expected 7 fields, got 6');
  });

  it('a page index out of range', () => {
    for (const type of [MessageType.Request, MessageType.ZeroPage, MessageType.AlreadySent]) {
      expectRejected(pack([type, 1, 64]), 'page', 'from 0 to 63', '64 (number)');
      expectRejected(pack([type, 1, -1]), 'page', '-1 (number)');
      expectRejected(pack([type, 1, 1.5]), 'page', '1.5 (number)');
      expectRejected(pack([type, 1, '3']), 'page', '"3" (string)');
      expectRejected(pack([type, 1, null]), 'page', 'null');
    }
    expectRejected(pack([MessageType.Page, 1, layout.totalPages, pageData(0)]), 'page.page', '64 (number)');
    expectRejected(pack([MessageType.Pushed, -1, pageData(0)]), 'pushed.page', '-1 (number)');
    expectRejected(pack([MessageType.PushedZero, 1.5]), 'pushed-zero.page', '1.5 (number)');
    expectRejected(pack([MessageType.PushedZero, 2 ** 40]), 'pushed-zero.page', `${2 ** 40} (number)`);
    // The last page is fine.
    expect(decode(pack([MessageType.Request, 1, 63]), limits)).toEqual({ type: 'request', id: 1, page: 63 });
  });

  it('page data of the wrong size', () => {
    expectRejected(pack([MessageType.Page, 1, 2, new Uint8Array(PAGE - 1)]), 'page.data', `expected ${PAGE} bytes`, `${PAGE - 1} bytes`);
    expectRejected(pack([MessageType.Pushed, 2, new Uint8Array(PAGE + 1)]), 'pushed.data', `${PAGE + 1} bytes`);
    expectRejected(pack([MessageType.Pushed, 2, new Uint8Array(0)]), 'pushed.data', '0 bytes');
    expectRejected(pack([MessageType.Pushed, 2, 'x'.repeat(PAGE)]), 'pushed.data', '(string)');
    expectRejected(pack([MessageType.Page, 1, 2, Array.from({ length: 8 }, () => 0)]), 'page.data', 'array of 8');
    expectRejected(pack([MessageType.Finish, new Uint8Array(9)]), 'finish.receivedmap', 'expected 8 bytes', '9 bytes');
    expectRejected(pack([MessageType.Resume, true, false, new Uint8Array(8), new Uint8Array(7)]), 'resume.requestedmap', 'expected 8 bytes', '7 bytes');
    expectRejected(pack([MessageType.Resume, 1, false, new Uint8Array(8), new Uint8Array(8)]), 'resume.push', 'expected a boolean');
    expectRejected(pack([MessageType.Resumed, 65, false]), 'resumed.pagesMarkedUnsent', 'from 0 to 64');
  });

  it('pushed runs: whole pages, at most 16 (64 KiB), never past the end of the guest', () => {
    const run = (page: number, pages: number): Uint8Array => pack([MessageType.Pushed, page, new Uint8Array(pages * PAGE)]);
    expect(decode(run(2, 16), limits)).toMatchObject({ type: 'pushed', page: 2 });
    expect((decode(run(48, 16), limits) as { data: Uint8Array }).data.length).toBe(16 * PAGE);
    expectRejected(run(2, 17), 'pushed.data', 'expected 1 to 16 whole pages', `${17 * PAGE} bytes`);
    // The guest has 64 pages: a run from page 60 may carry 4 at most.
    expectRejected(run(60, 5), 'pushed.data', 'expected 1 to 4 whole pages of 4096 bytes from page 60');
    expectRejected(pack([MessageType.Pushed, 2, new Uint8Array(2 * PAGE + 1)]), 'pushed.data', `${2 * PAGE + 1} bytes`);
  });

  it('page messages before the handshake (no layout yet)', () => {
    const frames = [
      encode({ type: 'request', id: 1, page: 2 }),
      encode({ type: 'page', id: 1, page: 2, data: pageData(2) }),
      encode({ type: 'zero-page', id: 1, page: 2 }),
      encode({ type: 'already-sent', id: 1, page: 2 }),
      encode({ type: 'pushed', page: 2, data: pageData(2) }),
      encode({ type: 'pushed-zero', page: 2 }),
      encode({ type: 'complete', pagesSent: 64 }),
      encode({ type: 'finish', receivedmap }),
      encode({ type: 'resume', push: true, preempt: true, receivedmap, requestedmap: receivedmap }),
      encode({ type: 'resumed', pagesMarkedUnsent: 1, restarted: false }),
    ];
    const names = ['request', 'page', 'zero-page', 'already-sent', 'pushed', 'pushed-zero', 'complete', 'finish', 'resume', 'resumed'];
    frames.forEach((frame, i) => {
      const message = rejection(frame, {});
      expect(message).toContain('handshake');
      expect(message).toContain('expected');
      expect(message.startsWith(`${names[i]}:`)).toBe(true);
    });
  });

  it('an id above 2^32-1', () => {
    expectRejected(pack([MessageType.Request, 2 ** 32, 1]), 'request.id', 'from 0 to 4294967295', '4294967296 (number)');
    expectRejected(pack([MessageType.ZeroPage, -1, 1]), 'zero-page.id', '-1 (number)');
    expectRejected(pack([MessageType.AlreadySent, 0.5, 1]), 'already-sent.id', '0.5 (number)');
    expectRejected(pack([MessageType.Page, 'a', 1, pageData(1)]), 'page.id', '"a" (string)');
  });

  it('a hello whose token is longer than 256 characters', () => {
    const hello = (token: unknown): Uint8Array => pack([MessageType.Hello, PROTOCOL_VERSION, token, 0, layout.guestBytes, PAGE, 'main', '']);
    expect(decode(hello('t'.repeat(256)))).toMatchObject({ type: 'hello', token: 't'.repeat(256) });
    expectRejected(hello('t'.repeat(257)), 'hello.token', 'at most 256 characters', '"tttt', '(string)');
    expectRejected(pack([MessageType.Hello, PROTOCOL_VERSION, 't', 3, layout.guestBytes, PAGE, 'main', '']), 'hello.role', 'from 0 to 2', '3 (number)');
    expectRejected(pack([MessageType.Hello, PROTOCOL_VERSION, 't', 0, layout.guestBytes, PAGE, 'c'.repeat(65), '']), 'hello.channel', 'at most 64');
    // The secret is '' or exactly 64 lowercase hex digits: nothing else gets as far as a comparison.
    for (const bad of ['a'.repeat(63), 'a'.repeat(65), 'A'.repeat(64), 'g'.repeat(64), 'x'.repeat(10_000)]) {
      expectRejected(pack([MessageType.Hello, PROTOCOL_VERSION, 't', 1, layout.guestBytes, PAGE, 'vcpu0', bad]), 'hello.secret', "expected '' or 64 hex digits");
    }
    expectRejected(pack([MessageType.Hello, PROTOCOL_VERSION, 't', 1, layout.guestBytes, PAGE, 'vcpu0', 42]), 'hello.secret', "expected '' or 64 hex digits", '42 (number)');
  });

  it('a welcome with a bad digest', () => {
    const welcome = (digest: unknown, zeroFraction: unknown = 0): Uint8Array =>
      pack([MessageType.Welcome, PROTOCOL_VERSION, layout.guestBytes, PAGE, layout.totalPages, digest, 1, zeroFraction, 0, 0, '', 0]);
    expect(decode(welcome(DIGEST))).toMatchObject({ type: 'welcome', imageDigest: DIGEST });
    expectRejected(welcome('not-a-digest'), 'welcome.imageDigest', '64 hex digits', '"not-a-digest" (string)');
    expectRejected(welcome('AB'.repeat(32)), 'welcome.imageDigest', '64 hex digits', '"ABAB');
    expectRejected(welcome('a'.repeat(63)), 'welcome.imageDigest', '64 hex digits');
    expectRejected(welcome('z'.repeat(64)), 'welcome.imageDigest', '64 hex digits', '"zzzz');
    expectRejected(welcome(12), 'welcome.imageDigest', '12 (number)');
    expectRejected(welcome(DIGEST, 1.5), 'welcome.zeroFraction', 'from 0 to 1', '1.5 (number)');
    expectRejected(welcome(DIGEST, Number.NaN), 'welcome.zeroFraction', 'NaN (number)');
  });

  it('a summary missing a field or with a negative counter', () => {
    expect(decode(pack([MessageType.Summary, goodSummaryFields()]))).toEqual(summary);

    const missing = goodSummaryFields();
    delete missing.replies;
    expectRejected(pack([MessageType.Summary, missing]), 'summary.replies', 'whole number >= 0', 'undefined');

    const negative = { ...goodSummaryFields(), pagesSentTwice: -1 };
    expectRejected(pack([MessageType.Summary, negative]), 'summary.pagesSentTwice', '-1 (number)');

    const fractional = { ...goodSummaryFields(), requests: 2.5 };
    expectRejected(pack([MessageType.Summary, fractional]), 'summary.requests', '2.5 (number)');

    const noDigest = goodSummaryFields();
    delete noDigest.digestOfReceived;
    expectRejected(pack([MessageType.Summary, noDigest]), 'summary.digestOfReceived', '64 hex digits', 'undefined');

    const noCpu = goodSummaryFields();
    delete noCpu.cpuUs;
    expectRejected(pack([MessageType.Summary, noCpu]), 'summary.cpuUs', 'whole number >= 0', 'undefined');

    expectRejected(pack([MessageType.Summary, [1, 2, 3]]), 'summary', 'object of counters', 'array of 3');
    expectRejected(pack([MessageType.Summary, 7]), 'summary', 'object of counters', '7 (number)');

    const noDevices = goodSummaryFields();
    delete noDevices.devices;
    expectRejected(pack([MessageType.Summary, noDevices]), 'summary.devices', 'an object', 'undefined');
    const badTracking = { ...goodSummaryFields(), devices: { ...summary.devices, devices: [{ ...summary.devices.devices[0], tracking: 'psychic' }] } };
    expectRejected(pack([MessageType.Summary, badTracking]), 'summary.devices.devices[0].tracking', 'one of device, iommu, none', '"psychic" (string)');
    const badProvider = { ...goodSummaryFields(), devices: { ...summary.devices, providers: { ...summary.devices.providers, iommu: { syncs: -1, bitmapBytes: 0, pagesDirty: 0, ms: 0 } } } };
    expectRejected(pack([MessageType.Summary, badProvider]), 'summary.devices.providers.iommu.syncs', 'a number >= 0', '-1 (number)');
  });

  it('device messages: every field checked (devices, sizes, names, UUIDs, digests)', () => {
    const ranges = Buffer.alloc(8);
    ranges.writeUInt32LE(0, 0);
    ranges.writeUInt32LE(16, 4);
    const setup = (entry: unknown[]): Uint8Array => pack([MessageType.DeviceSetup, [entry]]);
    expect(decode(setup(['nic0', 'mgpu-128M', '1.0', 5, 8192, ranges]), limits)).toMatchObject({ type: 'device-setup', devices: [{ name: 'nic0', flags: 5, dmaRanges: [{ first: 0, count: 16 }] }] });
    expect(rejection(setup(['nic0', 'mgpu-128M', '1.0', 2, 8192, ranges]))).toMatch(/device-setup.devices\[0\].flags: expected VFIO_MIGRATION_STOP_COPY \(1\) among the flags, got 2/);
    expect(rejection(setup(['nic0', 'mgpu-128M', '1.0', 8, 8192, ranges]))).toMatch(/flags: expected a whole number from 0 to 7, got 8/);
    expect(rejection(setup(['nic0', 'mgpu-128M', '1.0', 1, 8193, ranges]))).toMatch(/stateBytes: expected a multiple of 4, got 8193/);
    expect(rejection(setup(['nic 0', 'mgpu-128M', '1.0', 1, 8192, ranges]))).toMatch(/device-setup.devices\[0\].name: expected a device name/);
    expect(rejection(setup(['nic0', 'mgpu-128M', 'v1', 1, 8192, ranges]))).toMatch(/version: expected a version MAJOR.MINOR/);
    const outside = Buffer.alloc(8);
    outside.writeUInt32LE(60, 0);
    outside.writeUInt32LE(5, 4);
    expect(rejection(setup(['nic0', 'mgpu-128M', '1.0', 1, 8192, outside]))).toMatch(/dmaRanges: expected ranges inside the guest's 64 pages, got pages 60 to 64/);
    expect(rejection(pack([MessageType.DevicesReady, ['not-a-uuid']]))).toMatch(/devices-ready.uuids\[0\]: expected a lowercase UUID, got "not-a-uuid"/);
    expect(rejection(pack([MessageType.DeviceData, 16, 0, 0, pageData(0)]))).toMatch(/device-data.device: expected a whole number from 0 to 15, got 16/);
    expect(rejection(pack([MessageType.DeviceData, 0, 0, 0, new Uint8Array(0)]))).toMatch(/device-data.data: expected 1 to 65536 bytes of device state, got 0 bytes/);
    expect(rejection(pack([MessageType.DeviceData, 0, 0, 0, new Uint8Array(65537)]))).toMatch(/got 65537 bytes/);
    expect(rejection(pack([MessageType.DeviceEnd, 0, 1, 4096, 'abc']))).toMatch(/device-end.digest: expected 64 hex digits \(SHA-256\), got "abc"/);
    expect(rejection(pack([MessageType.SwitchoverAck, 1]))).toMatch(/switchover-ack: expected 0 fields, got 1/);
    expect(rejection(pack([MessageType.PrecopySynced, 0]))).toMatch(/precopy-synced.seq: expected a sequence number from 1, got 0/);
    expect(rejection(pack([MessageType.PrecopySynced, -1]))).toMatch(/precopy-synced.seq: expected a whole number/);
    expect(rejection(pack([MessageType.PrecopySynced]))).toMatch(/precopy-synced/);
    expect(rejection(pack([MessageType.DeviceInitDataSent, 0]), {})).toMatch(/device-init-data-sent: expected the handshake \(hello, welcome\) first/);
  });

  it("a summary's main-thread CPU: a whole number, or nil where the source cannot tell; nothing else", () => {
    const unknown = { ...summary, cpuMainThreadUs: null };
    expect(decode(encode(unknown))).toEqual(unknown);
    expect(decode(pack([MessageType.Summary, { ...goodSummaryFields(), cpuMainThreadUs: 0 }]))).toMatchObject({ cpuMainThreadUs: 0 });
    const missing = goodSummaryFields();
    delete missing.cpuMainThreadUs;
    expectRejected(pack([MessageType.Summary, missing]), 'summary.cpuMainThreadUs', 'whole number >= 0 or nil', 'undefined');
    expectRejected(pack([MessageType.Summary, { ...goodSummaryFields(), cpuMainThreadUs: -3 }]), 'summary.cpuMainThreadUs', '-3 (number)');
    expectRejected(pack([MessageType.Summary, { ...goodSummaryFields(), cpuMainThreadUs: 1.5 }]), 'summary.cpuMainThreadUs', '1.5 (number)');
    expectRejected(pack([MessageType.Summary, { ...goodSummaryFields(), cpuMainThreadUs: '12' }]), 'summary.cpuMainThreadUs', '"12"');
  });

  it('a text field of the wrong type', () => {
    expectRejected(pack([MessageType.Hello, PROTOCOL_VERSION, 12345, 0, layout.guestBytes, PAGE, 'main', '']), 'hello.token', 'string', '12345 (number)');
    expectRejected(pack([MessageType.Hello, PROTOCOL_VERSION, 't', 0, layout.guestBytes, PAGE, null, '']), 'hello.channel', 'string', 'null');
    expectRejected(pack([MessageType.Error, 42, 'boom']), 'error.code', 'string', '42 (number)');
    expectRejected(pack([MessageType.Error, 'E', new Uint8Array(3)]), 'error.message', 'string', '3 bytes');
    expectRejected(pack([MessageType.Start, 'yes', false]), 'start.push', 'boolean', '"yes" (string)');
    expectRejected(pack([MessageType.Start, 1, false]), 'start.push', 'boolean', '1 (number)');
    expectRejected(pack([MessageType.Start, true, 'no']), 'start.preempt', 'boolean', '"no" (string)');
  });
});

/** Checks the invariants a successfully decoded message must hold. */
function checkDecoded(message: Message): void {
  if ('page' in message) {
    expect(Number.isInteger(message.page) && message.page >= 0 && message.page < layout.totalPages).toBe(true);
  }
  if ('id' in message) expect(Number.isInteger(message.id) && message.id >= 0 && message.id <= 0xffffffff).toBe(true);
  if ('data' in message) expect(message.data.length % PAGE === 0 && message.data.length > 0).toBe(true);
  if (message.type === 'finish') expect(message.receivedmap.length).toBe(8);
}

/** Runs decode on `frame` with and without a layout; returns a description of anything thrown that is not a ProtocolError. */
function fuzzOne(frame: Uint8Array): string | undefined {
  for (const decodeLimits of [limits, {}]) {
    try {
      checkDecoded(decode(frame, decodeLimits));
    } catch (err) {
      if (!(err instanceof ProtocolError) || err.code !== 'ERR_POSTCOPY_PROTOCOL') {
        return `${Buffer.from(frame).toString('hex').slice(0, 200)}: ${String(err)}`;
      }
    }
  }
  return undefined;
}

describe('decode throws nothing but ProtocolError', () => {
  it('for 2,000 random byte arrays of length 0..64', () => {
    const random = prng(0x5eed);
    const failures: string[] = [];
    let pastMsgpack = 0;
    for (let n = 0; n < 2000; n++) {
      const length = Math.floor(random() * 65);
      const bytes = new Uint8Array(length);
      for (let i = 0; i < length; i++) bytes[i] = Math.floor(random() * 256);
      // Half of them are shaped like a message array [type 0..15, ...] of mostly
      // one-byte values, so that many get past msgpack into the validation code.
      if (n % 2 === 0 && length > 1) {
        bytes[0] = 0x90 | Math.min(15, length - 1);
        bytes[1] = bytes[1]! % 16;
        const oneByte = [0x00, 0x01, 0x3f, 0x40, 0x7f, 0xff, 0xe0, 0xc0, 0xc2, 0xc3];
        for (let i = 2; i < length; i++) if (random() < 0.9) bytes[i] = oneByte[bytes[i]! % oneByte.length]!;
      }
      const failure = fuzzOne(bytes);
      if (failure) failures.push(failure);
      try {
        decode(bytes, limits);
        pastMsgpack++;
      } catch (err) {
        if (!(err as Error).message.startsWith('expected a msgpack frame')) pastMsgpack++;
      }
    }
    expect(failures.slice(0, 5), `${failures.length} failures`).toEqual([]);
    // The corpus reaches the validation code, not only msgpack's own errors.
    expect(pastMsgpack).toBeGreaterThan(200);
  });

  it('for 2,000 random msgpack arrays [type, ...random fields]', () => {
    const random = prng(0xabc);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)]!;
    const value = (depth: number): unknown => {
      switch (Math.floor(random() * 10)) {
        case 0:
          return pick([0, 1, 63, 64, -1, 1.5, 2 ** 32, 2 ** 53, -(2 ** 40), Number.NaN, Infinity]);
        case 1:
          return Math.floor(random() * 100);
        case 2:
          return pick(['', 'x', 'a'.repeat(64), DIGEST, 'é'.repeat(300)]);
        case 3:
          return pick([true, false, null]);
        case 4:
          return new Uint8Array(pick([0, 1, 8, PAGE - 1, PAGE, PAGE + 1]));
        case 5:
          return depth > 2 ? 0 : Array.from({ length: Math.floor(random() * 4) }, () => value(depth + 1));
        case 6:
          return depth > 2 ? {} : { ...goodSummaryFields(), [pick(['requests', 'digestOfReceived', 'extra'])]: value(depth + 1) };
        default:
          return Math.floor(random() * 70);
      }
    };
    const failures: string[] = [];
    const seen = new Set<string>();
    for (let n = 0; n < 2000; n++) {
      const fields = Array.from({ length: Math.floor(random() * 9) }, () => value(0));
      const frame = pack([Math.floor(random() * 16), ...fields]);
      const failure = fuzzOne(frame);
      if (failure) failures.push(failure);
      try {
        seen.add(decode(frame, limits).type);
      } catch {
        // rejected
      }
    }
    expect(failures.slice(0, 5), `${failures.length} failures`).toEqual([]);
    // Some random frames are valid messages: the corpus exercises the accepting paths too.
    expect(seen.size).toBeGreaterThan(3);
  });

  it('for 2,000 random mutations of valid frames', () => {
    const random = prng(0xf1ee);
    const frames = samples.map((m) => Uint8Array.from(encode(m)));
    const failures: string[] = [];
    for (let n = 0; n < 2000; n++) {
      const source = frames[n % frames.length]!;
      let mutated: Uint8Array;
      if (n % 10 === 9) {
        // Truncate.
        mutated = source.slice(0, Math.floor(random() * source.length));
      } else {
        mutated = Uint8Array.from(source);
        const flips = 1 + Math.floor(random() * 3);
        for (let k = 0; k < flips; k++) {
          // Headers are where the structure is: bias flips toward the first bytes.
          const at = random() < 0.7 ? Math.floor(random() * Math.min(16, mutated.length)) : Math.floor(random() * mutated.length);
          mutated[at] = mutated[at]! ^ (1 + Math.floor(random() * 255));
        }
      }
      const failure = fuzzOne(mutated);
      if (failure) failures.push(failure);
    }
    expect(failures.slice(0, 5), `${failures.length} failures`).toEqual([]);
  });
});

describe('discard ranges', () => {
  it('coalesces ascending pages into runs, and refuses pages out of order', () => {
    expect(coalesce([])).toEqual([]);
    expect(coalesce([5])).toEqual([{ first: 5, count: 1 }]);
    expect(coalesce([0, 1, 2, 4, 5, 9])).toEqual([
      { first: 0, count: 3 },
      { first: 4, count: 2 },
      { first: 9, count: 1 },
    ]);
    expect(() => coalesce([3, 3])).toThrow(/expected ascending pages, got 3 after 3/);
    expect(() => coalesce([4, 2])).toThrow(/expected ascending pages/);
    // What coalesce makes, the decoder takes back unchanged.
    const ranges = coalesce([0, 1, 7, 8, 9, 63]);
    expect(decodeRanges(encodeRanges(ranges), 64, 'discard.ranges')).toEqual(ranges);
  });
});

describe('the blocking fault channel fast paths', () => {
  const layout = makeLayout(1 << 20, 4096);

  it('encodeRequestInto writes a request that decode() reads back, for ids and pages of every width', () => {
    const out = new Uint8Array(REQUEST_BYTES);
    for (const [id, page] of [[1, 0], [127, 128], [255, 254], [65535, 255], [65536, 200], [0xffffffff, 255]] as const) {
      const n = encodeRequestInto(out, id, page);
      expect(n).toBe(REQUEST_BYTES);
      expect(decode(out.subarray(0, n), { layout })).toEqual({ type: 'request', id, page });
    }
  });

  it('a page reply header, followed by the bytes, is the reply encode() writes, for every id, page and page size', () => {
    // bin 16 for 4 KiB, bin 32 for 2 MiB (the boundary: below).
    expect([pageReplyHeaderBytes(65535), pageReplyHeaderBytes(65536)]).toEqual([15, 17]);
    for (const pageSize of [4096, 2 * 1024 * 1024]) {
      const big = makeLayout(64 * pageSize, pageSize);
      const data = new Uint8Array(pageSize);
      for (let i = 0; i < pageSize; i += 97) data[i] = (i >>> 3) & 0xff;
      for (const [id, page] of [[1, 0], [127, 63], [65536, 1], [0xffffffff, 62]] as const) {
        const head = new Uint8Array(3 + PAGE_REPLY_HEADER_BYTES);
        const n = encodePageReplyHeaderInto(head, 3, id, page, pageSize);
        expect(n).toBe(pageReplyHeaderBytes(pageSize));
        expect(n).toBeLessThanOrEqual(PAGE_REPLY_HEADER_BYTES);
        const frame = new Uint8Array(n + pageSize);
        frame.set(head.subarray(3, 3 + n));
        frame.set(data, n);
        const want = { type: 'page', id, page, data };
        // Compared field by field: a deep equality of 2 MiB of bytes takes longer than the test may.
        const same = (got: Message | undefined): void => {
          const reply = got as typeof want;
          expect({ type: reply.type, id: reply.id, page: reply.page }).toEqual({ type: 'page', id, page });
          expect(Buffer.compare(Buffer.from(reply.data), Buffer.from(data))).toBe(0);
        };
        same(decode(frame, { layout: big }));
        same(decodeReplyFast(frame, big));
        // What encode() writes decodes to the same reply (it may pick narrower integers).
        same(decode(encode(want as Message), { layout: big }));
      }
    }
  });

  it('decodeReplyFast gives what decode() gives for every reply the source sends', () => {
    const random = rng(7);
    for (let i = 0; i < 500; i++) {
      const id = Math.floor(random() * 0xffffffff) >>> (Math.floor(random() * 4) * 8);
      const page = Math.floor(random() * layout.totalPages) >>> Math.floor(random() * 8);
      const kind = Math.floor(random() * 4);
      const data = new Uint8Array(layout.pageSize).map((_, j) => (j * 31 + i) & 0xff);
      const message: Message =
        kind === 0 ? { type: 'page', id, page, data } : { type: (['zero-page', 'already-sent', 'sent-on-main'] as const)[kind - 1]!, id, page };
      const frame = encode(message);
      const fast = decodeReplyFast(frame, layout);
      expect(fast).toEqual(decode(frame, { layout }));
      if (fast?.type === 'page') expect(fast.data.buffer).toBe(frame.buffer); // a view, not a copy
    }
  });

  it('decodeReplyFast leaves everything else to decode(), which says what is wrong', () => {
    const bad: Uint8Array[] = [
      encode({ type: 'zero-page', id: 1, page: layout.totalPages }), // a page past the guest
      pack([MessageType.Page, 1, 2, new Uint8Array(100)]), // data not one page
      pack([MessageType.Page, 1, 2, new Uint8Array(4096), 5]), // a field too many
      pack([MessageType.ZeroPage, -1, 2]), // a negative id
      pack([MessageType.ZeroPage, 1, 2.5]), // not an integer
      new Uint8Array([...encode({ type: 'zero-page', id: 1, page: 2 }), 0]), // a byte after the message
      encode({ type: 'request', id: 1, page: 2 }), // not a reply
    ];
    for (const frame of bad) {
      expect(decodeReplyFast(frame, layout)).toBeUndefined();
    }
    expect(() => decode(bad[0]!, { layout })).toThrow(ProtocolError);
    expect(() => decode(bad[1]!, { layout })).toThrow(/expected 4096 bytes/);
  });

  it('decodeRequestFast gives what decode() gives for every request, whatever the integers\' widths', () => {
    const random = rng(11);
    const frame = new Uint8Array(REQUEST_BYTES);
    for (let i = 0; i < 500; i++) {
      const id = Math.floor(random() * 0xffffffff) >>> (Math.floor(random() * 4) * 8);
      const page = Math.floor(random() * layout.totalPages) >>> Math.floor(random() * 8);
      // encode() picks the narrowest integers, the blocking channel uint32 ones.
      for (const bytes of [encode({ type: 'request', id, page }), frame.subarray(0, encodeRequestInto(frame, id, page))]) {
        const fast = decodeRequestFast(bytes, layout);
        expect(fast).toEqual({ type: 'request', id, page });
        expect(fast).toEqual(decode(bytes, { layout }));
      }
    }
  });

  it('decodeRequestFast leaves everything else to decode(), which says what is wrong', () => {
    const bad: Uint8Array[] = [
      encode({ type: 'request', id: 1, page: layout.totalPages }), // a page past the guest
      pack([MessageType.Request, 1, 2, 3]), // a field too many
      pack([MessageType.Request, 1]), // a field short
      pack([MessageType.Request, -1, 2]), // a negative id
      pack([MessageType.Request, 1, 2.5]), // not an integer
      pack([MessageType.Request, 0x100000000, 2]), // an id past uint32
      new Uint8Array([...encode({ type: 'request', id: 1, page: 2 }), 0]), // a byte after the message
      encode({ type: 'zero-page', id: 1, page: 2 }), // not a request
      new Uint8Array([0x93]), // cut short
    ];
    for (const frame of bad) {
      expect(decodeRequestFast(frame, layout)).toBeUndefined();
    }
    expect(() => decode(bad[0]!, { layout })).toThrow(ProtocolError);
    expect(() => decode(bad[3]!, { layout })).toThrow(ProtocolError);
  });
});
