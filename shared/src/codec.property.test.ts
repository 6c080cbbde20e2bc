/**
 * Property tests of the codec (fast-check): whatever comes off the wire —
 * arbitrary bytes, arbitrary msgpack values, arrays that start with a real
 * message type and carry arbitrary fields, mutated valid frames — `decode`
 * either returns a message whose every field is in range for the layout it
 * was given, or throws a ProtocolError. Never a crash, never another kind of
 * exception. And every message built from valid fields round-trips.
 *
 * Seeds are fixed so a failure reproduces; fast-check prints the shrunk
 * counterexample and the seed/path to replay it.
 */
import { createHash } from 'node:crypto';
import fc from 'fast-check';
import { pack, unpack } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import { decode, encode, type DecodeLimits } from './codec.js';
import { ProtocolError } from './errors.js';
import { makeLayout, type GuestLayout } from './layout.js';
import { coalesce } from './precopy.js';
import { ChannelRole, MessageType, PROTOCOL_VERSION, maxPushPages, type Message } from './protocol.js';

const SEED = 0x5eed_c0de;
const RUNS = 3000;

const KiB = 1024;
const MiB = 1024 * KiB;
const MAX_U32 = 0xffffffff;

/** Layouts that put the bounds in different places: tiny, not a multiple of 8 pages, ordinary, huge pages, the largest guest. */
const LAYOUTS: readonly GuestLayout[] = [
  makeLayout(1 * 4 * KiB, 4 * KiB),
  makeLayout(13 * 4 * KiB, 4 * KiB),
  makeLayout(64 * 4 * KiB, 4 * KiB),
  makeLayout(3 * 2 * MiB, 2 * MiB),
  makeLayout((2 ** 31 - 1) * 4 * KiB, 4 * KiB),
];

/** No layout (before the handshake) or one of the layouts above. */
const limitsArb: fc.Arbitrary<DecodeLimits> = fc.oneof(
  fc.constant<DecodeLimits>({}),
  fc.constantFrom(...LAYOUTS).map((layout): DecodeLimits => ({ layout })),
);

const TYPE_CODES = Object.values(MessageType) as number[];
/** Message types that only make sense once the layout is known. */
const NEEDS_LAYOUT = new Set<Message['type']>([
  'request', 'page', 'zero-page', 'already-sent', 'sent-on-main', 'pushed', 'pushed-zero', 'complete', 'finish',
  'resume', 'resumed', 'precopy-pages', 'precopy-zero', 'discard', 'switchover', 'running', 'precopy-synced', 'hash-request', 'page-hashes',
  'device-setup', 'devices-ready', 'device-data', 'device-init-data-sent', 'switchover-ack', 'device-end',
]);

const isU32 = (v: unknown): boolean => typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= MAX_U32;
const isCount = (v: unknown): boolean => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
const isHex64 = (v: unknown): boolean => typeof v === 'string' && /^[0-9a-f]{64}$/.test(v);

/**
 * Every field of a decoded message is in range for `limits`. Returns what is
 * wrong, or undefined. (The decoder's contract, restated independently.)
 */
function invalidity(m: Message, limits: DecodeLimits): string | undefined {
  const layout = limits.layout;
  if (NEEDS_LAYOUT.has(m.type) && !layout) return `${m.type} decoded without a layout`;
  const inGuest = (page: unknown): boolean => isU32(page) && layout !== undefined && (page as number) < layout.totalPages;
  switch (m.type) {
    case 'hello':
      if (!isU32(m.protocolVersion)) return `hello.protocolVersion ${m.protocolVersion}`;
      if (typeof m.token !== 'string' || m.token.length > 256) return 'hello.token';
      if (m.role !== ChannelRole.Main && m.role !== ChannelRole.Fault) return `hello.role ${String(m.role)}`;
      if (!isCount(m.guestBytes) || !isU32(m.pageSize)) return 'hello layout fields';
      if (typeof m.channel !== 'string' || m.channel.length > 64) return 'hello.channel';
      if (m.secret !== '' && !/^[0-9a-f]{64}$/.test(m.secret)) return 'hello.secret';
      return undefined;
    case 'welcome':
      if (![m.protocolVersion, m.pageSize, m.totalPages, m.imageSeed, m.linkDelayUs].every(isU32)) return 'welcome u32 fields';
      if (!isCount(m.guestBytes) || !isCount(m.linkBandwidthBps)) return 'welcome counts';
      if (!isHex64(m.imageDigest)) return 'welcome.imageDigest';
      if (typeof m.zeroFraction !== 'number' || !(m.zeroFraction >= 0 && m.zeroFraction <= 1)) return 'welcome.zeroFraction';
      if (m.secret !== '' && !/^[0-9a-f]{64}$/.test(m.secret)) return 'welcome.secret';
      return ['postcopy', 'precopy', 'hybrid'].includes(m.mode) ? undefined : `welcome.mode ${String(m.mode)}`;
    case 'start':
      return typeof m.push === 'boolean' && typeof m.preempt === 'boolean' ? undefined : 'start flags';
    case 'request':
    case 'zero-page':
    case 'already-sent':
    case 'sent-on-main':
      if (!isU32(m.id)) return `${m.type}.id ${m.id}`;
      return inGuest(m.page) ? undefined : `${m.type}.page ${m.page} outside ${layout?.totalPages} pages`;
    case 'page':
      if (!isU32(m.id)) return `page.id ${m.id}`;
      if (!inGuest(m.page)) return `page.page ${m.page}`;
      return m.data instanceof Uint8Array && m.data.length === layout!.pageSize ? undefined : `page.data of ${m.data.length} bytes`;
    case 'pushed': {
      if (!inGuest(m.page)) return `pushed.page ${m.page}`;
      const { pageSize, totalPages } = layout!;
      const n = m.data.length / pageSize;
      if (!(m.data instanceof Uint8Array) || !Number.isInteger(n) || n < 1) return `pushed.data of ${m.data.length} bytes`;
      if (n > maxPushPages(pageSize)) return `pushed run of ${n} pages`;
      return m.page + n <= totalPages ? undefined : `pushed run ${m.page}+${n} past ${totalPages}`;
    }
    case 'pushed-zero':
      return inGuest(m.page) ? undefined : `pushed-zero.page ${m.page}`;
    case 'complete':
      return isCount(m.pagesSent) && m.pagesSent <= layout!.totalPages ? undefined : `complete.pagesSent ${m.pagesSent}`;
    case 'finish':
      return m.receivedmap instanceof Uint8Array && m.receivedmap.length === Math.ceil(layout!.totalPages / 8)
        ? undefined
        : `finish.receivedmap of ${m.receivedmap.length} bytes`;
    case 'resume': {
      const bytes = Math.ceil(layout!.totalPages / 8);
      if (typeof m.push !== 'boolean' || typeof m.preempt !== 'boolean') return 'resume flags';
      const ok = (b: unknown): boolean => b instanceof Uint8Array && b.length === bytes;
      return ok(m.receivedmap) && ok(m.requestedmap) ? undefined : 'resume bitmaps';
    }
    case 'resumed':
      if (typeof m.restarted !== 'boolean') return 'resumed.restarted';
      return isCount(m.pagesMarkedUnsent) && m.pagesMarkedUnsent <= layout!.totalPages ? undefined : `resumed.pagesMarkedUnsent ${m.pagesMarkedUnsent}`;
    case 'summary': {
      const counters = [
        m.requests, m.replies, m.repliesPage, m.repliesZero, m.repliesAlreadySent, m.pagesSent,
        m.pagesPushed, m.pagesZero, m.pagesSentTwice, m.sentNotReceived, m.receivedNotSent, m.peakRssBytes,
        m.repliesUndeliverable, m.keepaliveTimeouts, m.warmUpRequests, m.warmUpMs, m.cpuUs,
      ];
      if (!counters.every(isCount)) return 'summary counters';
      const g = m.migration;
      const figures = [g.setupTimeMs, g.totalTimeMs, g.downtimeMs, g.expectedDowntimeMs, g.downtimeLimitMs, g.rounds, g.dirtySyncCount, g.pagesSent, g.pagesResent, g.bytes, g.dirtyPagesRate, g.throttlePercent, g.discardPages, g.discardRanges];
      const nonNegative = (v: unknown): boolean => typeof v === 'number' && Number.isFinite(v) && v >= 0;
      if (!figures.every(nonNegative)) return 'summary.migration figures';
      if (!g.perRound.every((r) => [r.round, r.pagesSent, r.pagesDirtied, r.ms, r.mbps].every(nonNegative))) return 'summary.migration.perRound';
      if (m.cpuMainThreadUs !== null && !isCount(m.cpuMainThreadUs)) return 'summary.cpuMainThreadUs';
      return isHex64(m.digestOfReceived) ? undefined : 'summary.digestOfReceived';
    }
    case 'precopy-pages': {
      if (!isU32(m.round) || m.round === 0) return `precopy-pages.round ${m.round}`;
      if (!inGuest(m.page)) return `precopy-pages.page ${m.page}`;
      const n = m.data.length / layout!.pageSize;
      if (!Number.isInteger(n) || n < 1 || n > maxPushPages(layout!.pageSize) || m.page + n > layout!.totalPages) return `precopy-pages.data of ${m.data.length} bytes`;
      return undefined;
    }
    case 'precopy-zero':
      if (!isU32(m.round) || m.round === 0) return `precopy-zero.round ${m.round}`;
      return inGuest(m.page) ? undefined : `precopy-zero.page ${m.page}`;
    case 'discard': {
      let end = 0;
      for (const r of m.ranges) {
        if (!(r.count >= 1) || r.first < end || r.first + r.count > layout!.totalPages) return `discard range ${r.first}+${r.count}`;
        end = r.first + r.count;
      }
      return m.ranges.length >= 1 ? undefined : 'discard with no ranges';
    }
    case 'switchover':
      return typeof m.postcopy === 'boolean' ? undefined : 'switchover.postcopy';
    case 'running':
    case 'hash-request':
      return undefined;
    case 'precopy-synced':
      return isU32(m.seq) && m.seq >= 1 ? undefined : `precopy-synced.seq ${m.seq}`;
    case 'page-hashes':
      return m.hashes.length === 4 * layout!.totalPages && m.phases.length === layout!.totalPages ? undefined : 'page-hashes sizes';
    case 'error':
      if (typeof m.code !== 'string' || m.code.length > 64) return 'error.code';
      return typeof m.message === 'string' && m.message.length <= 4096 ? undefined : 'error.message';
    case 'device-setup':
      if (m.devices.length > 16) return 'device-setup with more than 16 devices';
      for (const d of m.devices) {
        if ((d.flags & 1) === 0 || d.flags > 7) return `device-setup.flags ${d.flags}`;
        if (!isCount(d.stateBytes) || d.stateBytes % 4 !== 0 || d.stateBytes > 1024 ** 3) return `device-setup.stateBytes ${d.stateBytes}`;
        if (d.dmaRanges.length === 0 || d.dmaRanges.some((r) => r.count < 1 || r.first + r.count > layout!.totalPages)) return 'device-setup.dmaRanges';
      }
      return undefined;
    case 'devices-ready':
      return m.uuids.length <= 16 && m.uuids.every((u) => /^[0-9a-f-]{36}$/.test(u)) ? undefined : 'devices-ready.uuids';
    case 'device-data':
      if (!(m.device < 16) || !isU32(m.seq) || !isCount(m.offset)) return 'device-data fields';
      return m.data.length >= 1 && m.data.length <= 65536 ? undefined : `device-data.data of ${m.data.length} bytes`;
    case 'device-init-data-sent':
      return m.device < 16 ? undefined : 'device-init-data-sent.device';
    case 'switchover-ack':
      return undefined;
    case 'device-end':
      return m.device < 16 && isU32(m.records) && isCount(m.bytes) && isHex64(m.digest) ? undefined : 'device-end fields';
    default: {
      const never: never = m;
      return `unknown message ${JSON.stringify(never)}`;
    }
  }
}

/**
 * The property: a valid message, or a ProtocolError that says what was
 * expected. Anything else fails the property (fast-check reports the input).
 */
function decodesToValidOrProtocolError(frame: Uint8Array, limits: DecodeLimits): void {
  let message: Message;
  try {
    message = decode(frame, limits);
  } catch (err) {
    if (err instanceof ProtocolError) {
      if (err.code !== 'ERR_POSTCOPY_PROTOCOL' || !/expected/.test(err.message)) {
        throw new Error(`ProtocolError without a clear message: ${err.code} ${err.message}`);
      }
      // The message goes to the peer and into the source's log: no raw control
      // characters (newlines, terminal escapes) from the frame may get into it.
      if (/[\x00-\x1f\x7f]/.test(err.message)) throw new Error(`ProtocolError message with control characters: ${JSON.stringify(err.message)}`);
      return;
    }
    const e = err as { name?: unknown; message?: unknown };
    throw new Error(`decode threw ${String(e?.name)} (not a ProtocolError): ${String(e?.message ?? err)}`);
  }
  const problem = invalidity(message, limits);
  if (problem !== undefined) throw new Error(`decode returned an invalid message: ${problem}`);
}

// ---------------------------------------------------------------------------
// Valid messages, each field drawn from its whole valid range
// ---------------------------------------------------------------------------

/** A string of at most `max` UTF-16 units with no lone surrogates (they cannot survive UTF-8). */
const text = (max: number): fc.Arbitrary<string> =>
  fc.string({ unit: 'binary', maxLength: max }).filter((s) => s.length <= max);

/** `n` bytes: a random pattern tiled over the length (cheap for 4 KiB pages and 2 MiB huge pages). */
function bytesOf(n: number): fc.Arbitrary<Uint8Array> {
  return fc.uint8Array({ minLength: 1, maxLength: 33 }).map((pattern) => Buffer.alloc(n, pattern));
}

const u32 = fc.nat({ max: MAX_U32 });
const count = fc.oneof(fc.nat(), fc.constantFrom(0, MAX_U32, MAX_U32 + 1, 2 ** 40, Number.MAX_SAFE_INTEGER));
const hex64 = fc.uint8Array({ minLength: 32, maxLength: 32 }).map((b) => Buffer.from(b).toString('hex'));

const figure = fc.oneof(fc.nat(), fc.double({ min: 0, max: 1e9, noNaN: true }).map((x) => x + 0));
const migrationArb = fc.record({
  setupTimeMs: figure,
  totalTimeMs: figure,
  downtimeMs: figure,
  expectedDowntimeMs: figure,
  downtimeLimitMs: figure,
  switchoverReason: fc.constantFrom('none', 'converged', 'rounds', 'migrate-start-postcopy', 'auto-converge', 'skip-precopy'),
  rounds: fc.nat(),
  dirtySyncCount: fc.nat(),
  pagesSent: fc.nat(),
  pagesResent: fc.nat(),
  bytes: fc.nat(),
  dirtyPagesRate: figure,
  throttlePercent: fc.nat({ max: 99 }),
  perRound: fc.array(fc.record({ round: fc.nat(), pagesSent: fc.nat(), pagesDirtied: fc.nat(), ms: figure, mbps: figure }), { maxLength: 3 }),
  discardPages: fc.nat(),
  discardRanges: fc.nat(),
});

const providerArb = fc.record({ syncs: fc.nat(), bitmapBytes: fc.nat(), pagesDirty: fc.nat(), ms: figure });
const devicesSummaryArb = fc.record({
  devices: fc.array(
    fc.record({
      name: fc.constantFrom('nic0', 'gpu0', 'x'),
      type: fc.constantFrom('mgpu-128M', 'nvgpu-2Q'),
      capabilities: fc.subarray(['stop-copy', 'p2p', 'pre-copy']),
      tracking: fc.constantFrom('device' as const, 'iommu' as const, 'none' as const),
      statePath: fc.array(fc.constantFrom('RUNNING', 'PRE_COPY', 'STOP_COPY', 'STOP'), { maxLength: 6 }),
      precopy: fc.record({ initialBytesAtStart: fc.nat(), bytesSent: fc.nat(), dirtyBytesMax: fc.nat() }),
      stopCopyBytes: fc.nat(),
      stateDigest: fc.oneof(fc.constant(''), hex64),
    }),
    { maxLength: 2 },
  ),
  providers: fc.record({ device: providerArb, iommu: providerArb, none: providerArb }),
  policy: fc.record({ untrackedDma: fc.constantFrom('block', 'all-dirty', 'skip-precopy'), actedOn: fc.array(fc.constantFrom('nic0', 'gpu0'), { maxLength: 2 }), reason: text(200), forcedDowntimeMs: figure }),
  downtime: fc.record({ ramMs: figure, deviceMs: figure }),
  switchoverAck: fc.record({ needed: fc.boolean(), waitedMs: figure }),
});

/** Every message type, each field drawn from its whole valid range for `layout`. */
function messageArb(layout: GuestLayout): fc.Arbitrary<Message> {
  const { pageSize, totalPages } = layout;
  const page = fc.oneof(fc.nat({ max: totalPages - 1 }), fc.constantFrom(0, totalPages - 1));
  const reply = <T extends 'zero-page' | 'already-sent' | 'sent-on-main' | 'request'>(type: T) =>
    fc.record({ type: fc.constant(type), id: u32, page });
  const pushed = page.chain((first) => {
    const most = Math.min(maxPushPages(pageSize), totalPages - first);
    return fc.integer({ min: 1, max: most }).chain((n) => bytesOf(n * pageSize).map((data): Message => ({ type: 'pushed', page: first, data })));
  });
  const bitmap = fc.uint8Array({ minLength: Math.ceil(totalPages / 8), maxLength: Math.ceil(totalPages / 8) });
  return fc.oneof(
    fc.record({
      type: fc.constant('hello' as const),
      protocolVersion: fc.oneof(fc.constant(PROTOCOL_VERSION), u32),
      token: text(256),
      role: fc.constantFrom(ChannelRole.Main, ChannelRole.Fault),
      guestBytes: count,
      pageSize: u32,
      channel: text(64),
      secret: fc.oneof(fc.constant(''), hex64),
    }),
    fc.record({
      type: fc.constant('welcome' as const),
      protocolVersion: u32,
      guestBytes: count,
      pageSize: u32,
      totalPages: u32,
      imageDigest: hex64,
      imageSeed: u32,
      zeroFraction: fc.oneof(fc.double({ min: 0, max: 1, noNaN: true }).map((x) => x + 0), fc.constantFrom(0, 1)),
      linkDelayUs: u32,
      linkBandwidthBps: count,
      secret: fc.oneof(fc.constant(''), hex64),
      mode: fc.constantFrom('postcopy' as const, 'precopy' as const, 'hybrid' as const),
    }),
    fc.record({ type: fc.constant('start' as const), push: fc.boolean(), preempt: fc.boolean() }),
    reply('request'),
    fc.record({ type: fc.constant('page' as const), id: u32, page, data: bytesOf(pageSize) }),
    reply('zero-page'),
    reply('already-sent'),
    reply('sent-on-main'),
    pushed,
    fc.record({ type: fc.constant('pushed-zero' as const), page }),
    fc.record({ type: fc.constant('complete' as const), pagesSent: fc.nat({ max: totalPages }) }),
    // (The largest guest's receivedmap is 256 MiB: finish is left out for it.)
    ...(totalPages <= 2 ** 20
      ? [
          fc.record({ type: fc.constant('finish' as const), receivedmap: bitmap }),
          fc.record({ type: fc.constant('resume' as const), push: fc.boolean(), preempt: fc.boolean(), receivedmap: bitmap, requestedmap: bitmap }),
        ]
      : []),
    fc.record({ type: fc.constant('resumed' as const), pagesMarkedUnsent: fc.nat({ max: totalPages }), restarted: fc.boolean() }),
    fc.record({
      type: fc.constant('summary' as const),
      requests: count,
      replies: count,
      repliesPage: count,
      repliesZero: count,
      repliesAlreadySent: count,
      pagesSent: count,
      pagesPushed: count,
      pagesZero: count,
      pagesSentTwice: count,
      digestOfReceived: hex64,
      sentNotReceived: count,
      receivedNotSent: count,
      peakRssBytes: count,
      repliesUndeliverable: count,
      keepaliveTimeouts: count,
      warmUpRequests: count,
      warmUpMs: count,
      migration: migrationArb,
      cpuUs: count,
      cpuMainThreadUs: fc.option(count, { nil: null }),
      devices: devicesSummaryArb,
    }),
    fc.record({ type: fc.constant('precopy-pages' as const), round: fc.integer({ min: 1, max: MAX_U32 }), page, data: bytesOf(pageSize) }),
    fc.record({ type: fc.constant('precopy-zero' as const), round: fc.integer({ min: 1, max: MAX_U32 }), page }),
    fc.uniqueArray(fc.nat({ max: totalPages - 1 }), { minLength: 1, maxLength: Math.min(50, totalPages) }).map((pages): Message => ({ type: 'discard', ranges: coalesce([...pages].sort((a, b) => a - b)) })),
    fc.record({ type: fc.constant('switchover' as const), postcopy: fc.boolean() }),
    fc.constant<Message>({ type: 'running' }),
    fc.record({ type: fc.constant('precopy-synced' as const), seq: fc.integer({ min: 1, max: MAX_U32 }) }),
    fc.constant<Message>({ type: 'hash-request' }),
    ...(totalPages <= 2 ** 16
      ? [fc.record({ type: fc.constant('page-hashes' as const), hashes: bytesOf(4 * totalPages), phases: bytesOf(totalPages) })]
      : []),
    fc.record({ type: fc.constant('error' as const), code: text(64), message: text(4096) }),
    fc.array(
      fc.record({
        name: fc.constantFrom('nic0', 'gpu0'),
        type: fc.constantFrom('mgpu-128M', 'mgpu-1G'),
        version: fc.constantFrom('1.0', '2.13'),
        flags: fc.constantFrom(1, 3, 5, 7),
        stateBytes: fc.nat({ max: 2 ** 28 }).map((w) => w * 4),
        dmaRanges: fc
          .uniqueArray(fc.nat({ max: totalPages - 1 }), { minLength: 1, maxLength: Math.min(20, totalPages) })
          .map((pages) => coalesce([...pages].sort((a, b) => a - b))),
      }),
      { maxLength: 3 },
    ).map((devices): Message => ({ type: 'device-setup', devices })),
    fc.record({ type: fc.constant('devices-ready' as const), uuids: fc.array(fc.uuid(), { maxLength: 3 }) }),
    fc.integer({ min: 1, max: 65536 }).chain((n) =>
      fc.record({ type: fc.constant('device-data' as const), device: fc.nat({ max: 15 }), seq: u32, offset: fc.nat({ max: 1024 ** 3 }), data: bytesOf(n) }),
    ),
    fc.record({ type: fc.constant('device-init-data-sent' as const), device: fc.nat({ max: 15 }) }),
    fc.constant<Message>({ type: 'switchover-ack' }),
    fc.record({ type: fc.constant('device-end' as const), device: fc.nat({ max: 15 }), records: u32, bytes: count, digest: hex64 }),
  );
}

// ---------------------------------------------------------------------------
// Hostile inputs
// ---------------------------------------------------------------------------

/** Numbers near every bound the decoder checks, plus the awkward ones. */
const edgyNumber: fc.Arbitrary<number> = fc.oneof(
  fc.constantFrom(
    0, 1, -1, 2, 7, 8, 12, 13, 63, 64, 65, 4095, 4096, 4097, 2 * MiB, 2 ** 31 - 2, 2 ** 31 - 1, 2 ** 31,
    MAX_U32, MAX_U32 + 1, Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER + 2, -0, 0.5, 1.5, -1.5,
    Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, Number.MIN_VALUE, 1e300, -(2 ** 63),
  ),
  fc.integer(),
  fc.nat({ max: 100 }),
  fc.double(),
);

/** A byte string whose size is near a page, a run of pages or a receivedmap. */
const edgyBytes: fc.Arbitrary<Uint8Array> = fc.oneof(
  fc.uint8Array({ maxLength: 16 }),
  fc
    .constantFrom(0, 1, 2, 7, 8, 4095, 4096, 4097, 8192, 12 * 4096, 16 * 4096, 17 * 4096, 64 * KiB + 1, 2 * MiB)
    .map((n) => new Uint8Array(n)),
);

const edgyString: fc.Arbitrary<string> = fc.oneof(
  fc.string({ maxLength: 70 }),
  fc.constantFrom('', 'ab'.repeat(32), 'AB'.repeat(32), 'a'.repeat(257), 'x'.repeat(5000), '__proto__', 'constructor'),
);

const summaryKeys = [
  'requests', 'replies', 'repliesPage', 'repliesZero', 'repliesAlreadySent', 'pagesSent', 'pagesPushed',
  'pagesZero', 'pagesSentTwice', 'sentNotReceived', 'receivedNotSent', 'peakRssBytes', 'repliesUndeliverable', 'keepaliveTimeouts', 'warmUpRequests', 'warmUpMs', 'cpuUs', 'cpuMainThreadUs', 'digestOfReceived', '__proto__',
] as const;

/** Any value a field might hold: scalars near the bounds, bytes, strings, and nested junk. */
const anyField: fc.Arbitrary<unknown> = fc.oneof(
  { weight: 4, arbitrary: edgyNumber },
  { weight: 2, arbitrary: edgyBytes },
  { weight: 2, arbitrary: edgyString },
  { weight: 1, arbitrary: fc.boolean() },
  { weight: 1, arbitrary: fc.constantFrom(null, undefined) },
  { weight: 1, arbitrary: fc.bigInt({ min: -(2n ** 63n), max: 2n ** 64n - 1n }) },
  { weight: 1, arbitrary: fc.dictionary(fc.constantFrom(...summaryKeys), fc.oneof(edgyNumber, edgyString)) },
  { weight: 1, arbitrary: fc.array(edgyNumber, { maxLength: 4 }) },
  { weight: 1, arbitrary: fc.date({ noInvalidDate: true }) },
);

/** Length of each message type's array, so most generated arrays have the right shape. */
const ARITY: Record<number, number> = {
  [MessageType.Hello]: 8,
  [MessageType.Welcome]: 12,
  [MessageType.Start]: 3,
  [MessageType.Request]: 3,
  [MessageType.Page]: 4,
  [MessageType.ZeroPage]: 3,
  [MessageType.AlreadySent]: 3,
  [MessageType.SentOnMain]: 3,
  [MessageType.Pushed]: 3,
  [MessageType.PushedZero]: 2,
  [MessageType.Complete]: 2,
  [MessageType.Finish]: 2,
  [MessageType.Summary]: 2,
  [MessageType.Error]: 3,
  [MessageType.Resume]: 5,
  [MessageType.Resumed]: 3,
  [MessageType.PrecopyPages]: 4,
  [MessageType.PrecopyZero]: 3,
  [MessageType.Discard]: 2,
  [MessageType.Switchover]: 2,
  [MessageType.Running]: 1,
  [MessageType.HashRequest]: 1,
  [MessageType.PageHashes]: 3,
};

/** [valid type, ...arbitrary fields]: mostly the right count, sometimes not. */
const typedArray: fc.Arbitrary<unknown[]> = fc
  .tuple(fc.constantFrom(...TYPE_CODES), fc.oneof({ weight: 4, arbitrary: fc.constant(undefined) }, { weight: 1, arbitrary: fc.nat({ max: 12 }) }))
  .chain(([type, count]) => {
    const fields = count ?? (ARITY[type] ?? 1) - 1;
    return fc.array(anyField, { minLength: fields, maxLength: fields }).map((rest) => [type, ...rest]);
  });

/**
 * A valid message of some layout as its raw array, with 0 to 2 fields
 * replaced by arbitrary values: close enough to real that every field check
 * is reached, and decoded (by the property) with that layout, another or none.
 */
const nearValidArray: fc.Arbitrary<unknown[]> = fc
  .constantFrom(...LAYOUTS)
  .chain((layout) => messageArb(layout))
  .chain((message) => {
    const array = unpack(encode(message)) as unknown[];
    return fc
      .array(fc.tuple(fc.integer({ min: 1, max: Math.max(1, array.length - 1) }), anyField), { maxLength: 2 })
      .map((replacements) => {
        const copy = [...array];
        for (const [at, value] of replacements) copy[at] = value;
        return copy;
      });
  });

function packSafely(value: unknown): Uint8Array | undefined {
  try {
    return pack(value);
  } catch {
    return undefined; // a value msgpackr cannot pack (e.g. a bigint out of range): not a frame
  }
}

const fcOptions = (offset: number): fc.Parameters<unknown> => ({ seed: SEED + offset, numRuns: RUNS });

describe('decode: a valid message or a ProtocolError, never anything else', () => {
  it('arbitrary bytes (up to 2 KiB)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 2 * KiB }), limitsArb, (bytes, limits) => decodesToValidOrProtocolError(bytes, limits)),
      fcOptions(1),
    );
  });

  it('arbitrary bytes behind an array header and a real type byte', () => {
    // Random bytes rarely start like a message; this prefix gets past the
    // first two checks so the field validation sees the garbage.
    const framed = fc
      .tuple(fc.integer({ min: 0x91, max: 0x9f }), fc.constantFrom(...TYPE_CODES), fc.uint8Array({ maxLength: 2 * KiB }))
      .map(([header, type, rest]) => Uint8Array.from([header, type, ...rest]));
    fc.assert(fc.property(framed, limitsArb, (bytes, limits) => decodesToValidOrProtocolError(bytes, limits)), fcOptions(2));
  });

  it('arbitrary msgpack values (fc.anything, fc.jsonValue)', () => {
    const values = fc.oneof(
      fc.anything({ withBigInt: true, withDate: true, withTypedArray: true, withNullPrototype: true, withMap: true, withSet: true }),
      fc.jsonValue(),
      fc.array(fc.anything(), { minLength: 1, maxLength: 12 }),
    );
    fc.assert(
      fc.property(values, limitsArb, (value, limits) => {
        const frame = packSafely(value);
        if (frame) decodesToValidOrProtocolError(frame, limits);
      }),
      fcOptions(3),
    );
  });

  it('arrays [message type, ...arbitrary fields]', () => {
    fc.assert(
      fc.property(fc.oneof(typedArray, nearValidArray), limitsArb, (array, limits) => {
        const frame = packSafely(array);
        if (frame) decodesToValidOrProtocolError(frame, limits);
      }),
      fcOptions(4),
    );
  });

  it('valid frames with bytes flipped, cut or appended', () => {
    const mutated = fc
      .tuple(
        messageArb(LAYOUTS[2]!),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 4 }),
        fc.option(fc.nat()),
        fc.uint8Array({ maxLength: 4 }),
      )
      .map(([message, flips, cut, tail]) => {
        const bytes = Uint8Array.from(encode(message));
        for (const [at, value] of flips) bytes[at % bytes.length] = value;
        const kept = cut === null ? bytes : bytes.subarray(0, cut % (bytes.length + 1));
        return Buffer.concat([kept, tail]);
      });
    fc.assert(fc.property(mutated, limitsArb, (bytes, limits) => decodesToValidOrProtocolError(bytes, limits)), fcOptions(5));
  });

  it('a rejected frame leaves the decoder able to decode the next good one', () => {
    const layout = LAYOUTS[2]!;
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 256 }), messageArb(layout), (garbage, message) => {
        try {
          decode(garbage, { layout });
        } catch {
          // whatever it was, the next frame must decode as if nothing happened
        }
        expect(normalize(decode(encode(message), { layout }))).toEqual(normalize(message));
      }),
      { seed: SEED + 6, numRuns: 1000 },
    );
  });
});

// ---------------------------------------------------------------------------
// Valid messages round-trip
// ---------------------------------------------------------------------------

/**
 * A comparable form of a message: byte fields become their length and hash
 * (msgpackr hands back Buffers, and a deep equal over megabytes of bytes one
 * element at a time would dominate the run time).
 */
function normalize(message: Message): unknown {
  const out: Record<string, unknown> = { ...message };
  for (const [key, value] of Object.entries(out)) {
    if (value instanceof Uint8Array) out[key] = `${value.length} bytes sha256:${createHash('sha256').update(value).digest('hex')}`;
  }
  return out;
}

describe('every valid message round-trips: decode(encode(m), { layout }) equals m', () => {
  // The largest guest is left out here: its receivedmap alone is 256 MiB.
  const small = LAYOUTS.filter((l) => l.pageSize === 4 * KiB && l.totalPages <= 64);
  for (const layout of small) {
    it(`${layout.totalPages} pages of ${layout.pageSize / KiB} KiB`, () => {
      fc.assert(
        fc.property(messageArb(layout), (message) => {
          const decoded = decode(encode(message), { layout });
          expect(normalize(decoded)).toEqual(normalize(message));
          expect(invalidity(decoded, { layout })).toBeUndefined();
        }),
        { seed: SEED + 10 + layout.totalPages, numRuns: 1000 },
      );
    });
  }

  it('2 MiB huge pages (fewer runs: each page frame is 2 MiB)', () => {
    const layout = LAYOUTS[3]!;
    fc.assert(
      fc.property(messageArb(layout), (message) => {
        expect(normalize(decode(encode(message), { layout }))).toEqual(normalize(message));
      }),
      { seed: SEED + 20, numRuns: 60 },
    );
  });

  it('handshake and control messages round-trip without a layout too', () => {
    const layout = LAYOUTS[2]!;
    const handshake = messageArb(layout).filter((m) => !NEEDS_LAYOUT.has(m.type));
    fc.assert(
      fc.property(handshake, (message) => {
        expect(normalize(decode(encode(message)))).toEqual(normalize(message));
      }),
      { seed: SEED + 21, numRuns: 1000 },
    );
  });
});
