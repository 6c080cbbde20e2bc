import { Packr, Unpackr } from 'msgpackr';
import { ProtocolError, describe } from './errors.js';
import type { GuestLayout } from './layout.js';
import { decodeDeviceFrame, decodeDevicesSummary, deviceFrame } from './devices/wire.js';
import { MIGRATION_MODES, MODE_CODE, decodeRanges, encodeRanges, type MigrationMode } from './precopy.js';
import {
  ChannelRole,
  MAX_DISCARD_RANGES,
  MIGRATION_SECRET_PATTERN,
  MessageType,
  maxPushPages,
  type Message,
  type MigrationSummary,
  type PrecopyRound,
  type Reply,
  type SourceSummary,
} from './protocol.js';

const packr = new Packr({ useRecords: false, moreTypes: false });
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number' });

const SUMMARY_FIELDS = [
  'requests',
  'replies',
  'repliesPage',
  'repliesZero',
  'repliesAlreadySent',
  'pagesSent',
  'pagesPushed',
  'pagesZero',
  'pagesSentTwice',
  'sentNotReceived',
  'receivedNotSent',
  'peakRssBytes',
  'repliesUndeliverable',
  'keepaliveTimeouts',
  'warmUpRequests',
  'warmUpMs',
  'cpuUs',
] as const satisfies readonly (keyof SourceSummary)[];

/** The numbers of the summary's `migration` figures (its switchover reason is the one string). */
const MIGRATION_FIELDS = [
  'setupTimeMs',
  'totalTimeMs',
  'downtimeMs',
  'expectedDowntimeMs',
  'downtimeLimitMs',
  'rounds',
  'dirtySyncCount',
  'pagesSent',
  'pagesResent',
  'bytes',
  'dirtyPagesRate',
  'throttlePercent',
  'discardPages',
  'discardRanges',
] as const satisfies readonly (keyof MigrationSummary)[];
const ROUND_FIELDS = ['round', 'pagesSent', 'pagesDirtied', 'ms', 'mbps'] as const satisfies readonly (keyof PrecopyRound)[];
const SWITCHOVER_REASONS = ['none', 'converged', 'rounds', 'migrate-start-postcopy', 'auto-converge', 'skip-precopy'] as const;
/** The summary carries at most this many rounds (the rest are counted, not listed). */
export const MAX_REPORTED_ROUNDS = 1000;

/** Encodes one message into one frame. */
export function encode(message: Message): Buffer {
  switch (message.type) {
    case 'hello':
      return packr.pack([
        MessageType.Hello,
        message.protocolVersion,
        message.token,
        message.role,
        message.guestBytes,
        message.pageSize,
        message.channel,
        message.secret,
      ]);
    case 'welcome':
      return packr.pack([
        MessageType.Welcome,
        message.protocolVersion,
        message.guestBytes,
        message.pageSize,
        message.totalPages,
        message.imageDigest,
        message.imageSeed,
        message.zeroFraction,
        message.linkDelayUs,
        message.linkBandwidthBps,
        message.secret,
        MODE_CODE[message.mode],
      ]);
    case 'start':
      return packr.pack([MessageType.Start, message.push, message.preempt]);
    case 'request':
      return packr.pack([MessageType.Request, message.id, message.page]);
    case 'page':
      return packr.pack([MessageType.Page, message.id, message.page, message.data]);
    case 'zero-page':
      return packr.pack([MessageType.ZeroPage, message.id, message.page]);
    case 'already-sent':
      return packr.pack([MessageType.AlreadySent, message.id, message.page]);
    case 'sent-on-main':
      return packr.pack([MessageType.SentOnMain, message.id, message.page]);
    case 'pushed':
      return packr.pack([MessageType.Pushed, message.page, message.data]);
    case 'pushed-zero':
      return packr.pack([MessageType.PushedZero, message.page]);
    case 'complete':
      return packr.pack([MessageType.Complete, message.pagesSent]);
    case 'finish':
      return packr.pack([MessageType.Finish, message.receivedmap]);
    case 'summary': {
      const fields: Record<string, unknown> = { digestOfReceived: message.digestOfReceived, cpuMainThreadUs: message.cpuMainThreadUs };
      for (const f of SUMMARY_FIELDS) fields[f] = message[f];
      const m = message.migration;
      const migration: Record<string, unknown> = {
        switchoverReason: m.switchoverReason,
        perRound: m.perRound.slice(0, MAX_REPORTED_ROUNDS).map((r) => Object.fromEntries(ROUND_FIELDS.map((k) => [k, r[k]]))),
      };
      for (const f of MIGRATION_FIELDS) migration[f] = m[f];
      fields.migration = migration;
      fields.devices = message.devices;
      return packr.pack([MessageType.Summary, fields]);
    }
    case 'precopy-pages':
      return packr.pack([MessageType.PrecopyPages, message.round, message.page, message.data]);
    case 'precopy-zero':
      return packr.pack([MessageType.PrecopyZero, message.round, message.page]);
    case 'discard':
      return packr.pack([MessageType.Discard, encodeRanges(message.ranges)]);
    case 'switchover':
      return packr.pack([MessageType.Switchover, message.postcopy]);
    case 'running':
      return packr.pack([MessageType.Running]);
    case 'precopy-synced':
      return packr.pack([MessageType.PrecopySynced, message.seq]);
    case 'hash-request':
      return packr.pack([MessageType.HashRequest]);
    case 'page-hashes':
      return packr.pack([MessageType.PageHashes, message.hashes, message.phases]);
    case 'resume':
      return packr.pack([MessageType.Resume, message.push, message.preempt, message.receivedmap, message.requestedmap]);
    case 'resumed':
      return packr.pack([MessageType.Resumed, message.pagesMarkedUnsent, message.restarted]);
    case 'error':
      return packr.pack([MessageType.Error, message.code, message.message]);
    case 'device-setup':
    case 'devices-ready':
    case 'device-data':
    case 'device-init-data-sent':
    case 'switchover-ack':
    case 'device-end':
      return packr.pack(deviceFrame(message));
  }
}

/**
 * What the decoder needs to know to validate page indices and sizes. Before
 * the handshake the layout is unknown and only handshake-safe bounds apply.
 */
export interface DecodeLimits {
  layout?: GuestLayout;
}

const MAX_U32 = 0xffffffff;
const MAX_TEXT = 256;

function field(frame: unknown[], index: number, name: string): unknown {
  return frame[index];
}

function expectUint(frame: unknown[], index: number, name: string, max = Number.MAX_SAFE_INTEGER): number {
  const value = field(frame, index, name);
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > max) {
    throw new ProtocolError(`${typeName(frame)}.${name}: expected a whole number from 0 to ${max}, got ${describe(value)}`);
  }
  return value;
}

function expectString(frame: unknown[], index: number, name: string, max = MAX_TEXT): string {
  const value = field(frame, index, name);
  if (typeof value !== 'string' || value.length > max) {
    throw new ProtocolError(`${typeName(frame)}.${name}: expected a string of at most ${max} characters, got ${describe(value)}`);
  }
  return value;
}

/** A migration secret field: '' (none) or 64 lowercase hex digits. */
function expectSecret(frame: unknown[], index: number): string {
  const value = field(frame, index, 'secret');
  if (typeof value !== 'string' || (value !== '' && !MIGRATION_SECRET_PATTERN.test(value))) {
    throw new ProtocolError(`${typeName(frame)}.secret: expected '' or 64 hex digits, got ${describe(value)}`);
  }
  return value;
}

function expectBoolean(frame: unknown[], index: number, name: string): boolean {
  const value = field(frame, index, name);
  if (typeof value !== 'boolean') throw new ProtocolError(`${typeName(frame)}.${name}: expected a boolean, got ${describe(value)}`);
  return value;
}

function expectBytes(frame: unknown[], index: number, name: string, length: number): Uint8Array {
  const value = field(frame, index, name);
  if (!(value instanceof Uint8Array) || value.length !== length) {
    throw new ProtocolError(`${typeName(frame)}.${name}: expected ${length} bytes, got ${describe(value)}`);
  }
  return value;
}

function expectPage(frame: unknown[], index: number, limits: DecodeLimits): number {
  const layout = requireLayout(frame, limits);
  return expectUint(frame, index, 'page', layout.totalPages - 1);
}

function requireLayout(frame: unknown[], limits: DecodeLimits): GuestLayout {
  if (!limits.layout) {
    const name = typeName(frame);
    throw new ProtocolError(`${name}: expected the handshake (hello, welcome) first, got ${name} before it`);
  }
  return limits.layout;
}

function expectLength(frame: unknown[], length: number): void {
  if (frame.length !== length) {
    throw new ProtocolError(`${typeName(frame)}: expected ${length - 1} fields, got ${frame.length - 1}`);
  }
}

const TYPE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(MessageType).map(([name, code]) => [code, name.replace(/[A-Z]/g, (c, i: number) => (i ? '-' : '') + c.toLowerCase())]),
);

function typeName(frame: unknown[]): string {
  const t = frame[0];
  return typeof t === 'number' ? (TYPE_NAMES[t] ?? `type ${t}`) : 'message';
}

/**
 * Decodes and validates one frame. Throws {@link ProtocolError} (and only
 * that) for anything that is not a valid message: bad msgpack, wrong shape,
 * unknown type, out-of-range page, wrong data size.
 */
export function decode(frame: Uint8Array, limits: DecodeLimits = {}): Message {
  let value: unknown;
  try {
    value = unpackr.unpack(frame);
  } catch (err) {
    // msgpackr quotes the frame's raw bytes in some messages: escape control
    // characters, which would otherwise reach the peer and the source's log.
    const detail = String((err as Error).message).replace(/[\x00-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
    throw new ProtocolError(`expected a msgpack frame, got ${frame.length} bytes that do not decode (${detail})`);
  }
  if (!Array.isArray(value) || value.length === 0) {
    throw new ProtocolError(`expected a message array [type, ...fields], got ${describe(value)}`);
  }
  const f = value as unknown[];
  const type = f[0];
  switch (type) {
    case MessageType.Hello: {
      expectLength(f, 8);
      const role = expectUint(f, 3, 'role', ChannelRole.Push);
      return {
        type: 'hello',
        protocolVersion: expectUint(f, 1, 'protocolVersion', MAX_U32),
        token: expectString(f, 2, 'token'),
        role: role === ChannelRole.Main ? ChannelRole.Main : role === ChannelRole.Fault ? ChannelRole.Fault : ChannelRole.Push,
        guestBytes: expectUint(f, 4, 'guestBytes'),
        pageSize: expectUint(f, 5, 'pageSize', MAX_U32),
        channel: expectString(f, 6, 'channel', 64),
        secret: expectSecret(f, 7),
      };
    }
    case MessageType.Welcome: {
      expectLength(f, 12);
      const zeroFraction = f[7];
      if (typeof zeroFraction !== 'number' || !(zeroFraction >= 0 && zeroFraction <= 1)) {
        throw new ProtocolError(`welcome.zeroFraction: expected a number from 0 to 1, got ${describe(zeroFraction)}`);
      }
      const imageDigest = expectString(f, 5, 'imageDigest', 64);
      if (!/^[0-9a-f]{64}$/.test(imageDigest)) {
        throw new ProtocolError(`welcome.imageDigest: expected 64 hex digits, got ${describe(imageDigest)}`);
      }
      return {
        type: 'welcome',
        protocolVersion: expectUint(f, 1, 'protocolVersion', MAX_U32),
        guestBytes: expectUint(f, 2, 'guestBytes'),
        pageSize: expectUint(f, 3, 'pageSize', MAX_U32),
        totalPages: expectUint(f, 4, 'totalPages', MAX_U32),
        imageDigest,
        imageSeed: expectUint(f, 6, 'imageSeed', MAX_U32),
        zeroFraction,
        linkDelayUs: expectUint(f, 8, 'linkDelayUs', MAX_U32),
        linkBandwidthBps: expectUint(f, 9, 'linkBandwidthBps'),
        secret: expectSecret(f, 10),
        mode: MIGRATION_MODES[expectUint(f, 11, 'mode', MIGRATION_MODES.length - 1)] as MigrationMode,
      };
    }
    case MessageType.Start:
      expectLength(f, 3);
      return { type: 'start', push: expectBoolean(f, 1, 'push'), preempt: expectBoolean(f, 2, 'preempt') };
    case MessageType.Resume: {
      expectLength(f, 5);
      const bytes = Math.ceil(requireLayout(f, limits).totalPages / 8);
      return {
        type: 'resume',
        push: expectBoolean(f, 1, 'push'),
        preempt: expectBoolean(f, 2, 'preempt'),
        receivedmap: expectBytes(f, 3, 'receivedmap', bytes),
        requestedmap: expectBytes(f, 4, 'requestedmap', bytes),
      };
    }
    case MessageType.Resumed: {
      expectLength(f, 3);
      const layout = requireLayout(f, limits);
      return {
        type: 'resumed',
        pagesMarkedUnsent: expectUint(f, 1, 'pagesMarkedUnsent', layout.totalPages),
        restarted: expectBoolean(f, 2, 'restarted'),
      };
    }
    case MessageType.Request:
      expectLength(f, 3);
      return { type: 'request', id: expectUint(f, 1, 'id', MAX_U32), page: expectPage(f, 2, limits) };
    case MessageType.Page: {
      expectLength(f, 4);
      const layout = requireLayout(f, limits);
      return {
        type: 'page',
        id: expectUint(f, 1, 'id', MAX_U32),
        page: expectPage(f, 2, limits),
        data: expectBytes(f, 3, 'data', layout.pageSize),
      };
    }
    case MessageType.ZeroPage:
      expectLength(f, 3);
      return { type: 'zero-page', id: expectUint(f, 1, 'id', MAX_U32), page: expectPage(f, 2, limits) };
    case MessageType.AlreadySent:
      expectLength(f, 3);
      return { type: 'already-sent', id: expectUint(f, 1, 'id', MAX_U32), page: expectPage(f, 2, limits) };
    case MessageType.SentOnMain:
      expectLength(f, 3);
      return { type: 'sent-on-main', id: expectUint(f, 1, 'id', MAX_U32), page: expectPage(f, 2, limits) };
    case MessageType.Pushed: {
      expectLength(f, 3);
      const layout = requireLayout(f, limits);
      const page = expectPage(f, 1, limits);
      const data = f[2];
      const most = Math.min(maxPushPages(layout.pageSize), layout.totalPages - page);
      if (!(data instanceof Uint8Array) || data.length === 0 || data.length % layout.pageSize !== 0 || data.length > most * layout.pageSize) {
        throw new ProtocolError(
          `pushed.data: expected 1 to ${most} whole pages of ${layout.pageSize} bytes from page ${page}, got ${describe(data)}`,
        );
      }
      return { type: 'pushed', page, data };
    }
    case MessageType.PushedZero:
      expectLength(f, 2);
      return { type: 'pushed-zero', page: expectPage(f, 1, limits) };
    case MessageType.Complete: {
      expectLength(f, 2);
      const layout = requireLayout(f, limits);
      return { type: 'complete', pagesSent: expectUint(f, 1, 'pagesSent', layout.totalPages) };
    }
    case MessageType.Finish: {
      expectLength(f, 2);
      const layout = requireLayout(f, limits);
      return { type: 'finish', receivedmap: expectBytes(f, 1, 'receivedmap', Math.ceil(layout.totalPages / 8)) };
    }
    case MessageType.Summary: {
      expectLength(f, 2);
      const body = f[1];
      if (typeof body !== 'object' || body === null || Array.isArray(body) || body instanceof Uint8Array) {
        throw new ProtocolError(`summary: expected an object of counters, got ${describe(body)}`);
      }
      const fields = body as Record<string, unknown>;
      const summary = { type: 'summary' } as Record<string, unknown>;
      for (const name of SUMMARY_FIELDS) {
        const v = fields[name];
        if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
          throw new ProtocolError(`summary.${name}: expected a whole number >= 0, got ${describe(v)}`);
        }
        summary[name] = v;
      }
      const digest = fields.digestOfReceived;
      if (typeof digest !== 'string' || !/^[0-9a-f]{64}$/.test(digest)) {
        throw new ProtocolError(`summary.digestOfReceived: expected 64 hex digits, got ${describe(digest)}`);
      }
      summary.digestOfReceived = digest;
      summary.migration = decodeMigration(fields.migration);
      // null: the source cannot tell its main thread's time apart (not Linux).
      const mainThread = fields.cpuMainThreadUs;
      if (mainThread !== null && (typeof mainThread !== 'number' || !Number.isSafeInteger(mainThread) || mainThread < 0)) {
        throw new ProtocolError(`summary.cpuMainThreadUs: expected a whole number >= 0 or nil, got ${describe(mainThread)}`);
      }
      summary.cpuMainThreadUs = mainThread;
      summary.devices = decodeDevicesSummary(fields.devices);
      return summary as unknown as Message;
    }
    case MessageType.PrecopyPages: {
      expectLength(f, 4);
      const layout = requireLayout(f, limits);
      const round = expectUint(f, 1, 'round', MAX_U32);
      const page = expectPage(f, 2, limits);
      const data = f[3];
      const most = Math.min(maxPushPages(layout.pageSize), layout.totalPages - page);
      if (!(data instanceof Uint8Array) || data.length === 0 || data.length % layout.pageSize !== 0 || data.length > most * layout.pageSize) {
        throw new ProtocolError(`precopy-pages.data: expected 1 to ${most} whole pages of ${layout.pageSize} bytes from page ${page}, got ${describe(data)}`);
      }
      if (round === 0) throw new ProtocolError(`precopy-pages.round: expected a round from 1, got 0`);
      return { type: 'precopy-pages', round, page, data };
    }
    case MessageType.PrecopyZero: {
      expectLength(f, 3);
      const round = expectUint(f, 1, 'round', MAX_U32);
      if (round === 0) throw new ProtocolError(`precopy-zero.round: expected a round from 1, got 0`);
      return { type: 'precopy-zero', round, page: expectPage(f, 2, limits) };
    }
    case MessageType.Discard: {
      expectLength(f, 2);
      const layout = requireLayout(f, limits);
      const bytes = f[1];
      if (!(bytes instanceof Uint8Array) || bytes.length === 0 || bytes.length > MAX_DISCARD_RANGES * 8) {
        throw new ProtocolError(`discard.ranges: expected 1 to ${MAX_DISCARD_RANGES} ranges of 8 bytes, got ${describe(bytes)}`);
      }
      return { type: 'discard', ranges: decodeRanges(bytes, layout.totalPages, 'discard.ranges') };
    }
    case MessageType.Switchover:
      expectLength(f, 2);
      requireLayout(f, limits);
      return { type: 'switchover', postcopy: expectBoolean(f, 1, 'postcopy') };
    case MessageType.Running:
      expectLength(f, 1);
      requireLayout(f, limits);
      return { type: 'running' };
    case MessageType.PrecopySynced: {
      expectLength(f, 2);
      requireLayout(f, limits);
      const seq = expectUint(f, 1, 'seq', MAX_U32);
      if (seq === 0) throw new ProtocolError(`precopy-synced.seq: expected a sequence number from 1, got 0`);
      return { type: 'precopy-synced', seq };
    }
    case MessageType.HashRequest:
      expectLength(f, 1);
      requireLayout(f, limits);
      return { type: 'hash-request' };
    case MessageType.PageHashes: {
      expectLength(f, 3);
      const layout = requireLayout(f, limits);
      return { type: 'page-hashes', hashes: expectBytes(f, 1, 'hashes', 4 * layout.totalPages), phases: expectBytes(f, 2, 'phases', layout.totalPages) };
    }
    case MessageType.Error:
      expectLength(f, 3);
      return { type: 'error', code: expectString(f, 1, 'code', 64), message: expectString(f, 2, 'message', 4096) };
    case MessageType.DeviceSetup:
    case MessageType.DevicesReady:
    case MessageType.DeviceData:
    case MessageType.DeviceInitDataSent:
    case MessageType.SwitchoverAck:
    case MessageType.DeviceEnd:
      return decodeDeviceFrame(f, limits.layout);
    default:
      throw new ProtocolError(`expected a message type from 1 to 14, 20, 21 or 23 to 36, got ${describe(type)}`);
  }
}

function isCount(v: unknown): v is number {
  return typeof v === 'number' && Number.isFinite(v) && v >= 0;
}

/** The summary's `migration` figures: every field present and in range. */
function decodeMigration(value: unknown): MigrationSummary {
  if (typeof value !== 'object' || value === null || Array.isArray(value) || value instanceof Uint8Array) {
    throw new ProtocolError(`summary.migration: expected an object of figures, got ${describe(value)}`);
  }
  const m = value as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  for (const name of MIGRATION_FIELDS) {
    const v = m[name];
    if (!isCount(v)) throw new ProtocolError(`summary.migration.${name}: expected a number >= 0, got ${describe(v)}`);
    out[name] = v;
  }
  const reason = m.switchoverReason;
  if (typeof reason !== 'string' || !(SWITCHOVER_REASONS as readonly string[]).includes(reason)) {
    throw new ProtocolError(`summary.migration.switchoverReason: expected one of ${SWITCHOVER_REASONS.join(', ')}, got ${describe(reason)}`);
  }
  out.switchoverReason = reason;
  const rounds = m.perRound;
  if (!Array.isArray(rounds) || rounds.length > MAX_REPORTED_ROUNDS) {
    throw new ProtocolError(`summary.migration.perRound: expected an array of at most ${MAX_REPORTED_ROUNDS} rounds, got ${describe(rounds)}`);
  }
  out.perRound = rounds.map((r: unknown, i) => {
    if (typeof r !== 'object' || r === null || Array.isArray(r) || r instanceof Uint8Array) {
      throw new ProtocolError(`summary.migration.perRound[${i}]: expected an object of ${ROUND_FIELDS.join(', ')}, got ${describe(r)}`);
    }
    const round = r as Record<string, unknown>;
    return Object.fromEntries(
      ROUND_FIELDS.map((k) => {
        const v = round[k];
        if (!isCount(v)) throw new ProtocolError(`summary.migration.perRound[${i}].${k}: expected a number >= 0, got ${describe(v)}`);
        return [k, v];
      }),
    );
  });
  return out as unknown as MigrationSummary;
}

/**
 * Writes the request `{ type: 'request', id, page }` into `out` (at least
 * {@link REQUEST_BYTES}) without allocating: the msgpack array
 * [Request, id, page], both integers as uint32 (a decoder takes any width
 * alike). Returns the length. For the blocking fault channel's hot path;
 * encode() gives the same message.
 */
export function encodeRequestInto(out: Uint8Array, id: number, page: number): number {
  out[0] = 0x93;
  out[1] = MessageType.Request;
  out[2] = 0xce;
  writeUint32BE(out, 3, id);
  out[7] = 0xce;
  writeUint32BE(out, 8, page);
  return REQUEST_BYTES;
}

/** Writes `value` (0 to 2^32-1) at out[at..at+4), most significant byte first (network order, msgpack's and RFC 6455's). */
export function writeUint32BE(out: Uint8Array, at: number, value: number): void {
  out[at] = value >>> 24;
  out[at + 1] = (value >>> 16) & 0xff;
  out[at + 2] = (value >>> 8) & 0xff;
  out[at + 3] = value & 0xff;
}

/** Writes `value` (0 to 65535) at out[at..at+2), most significant byte first. */
export function writeUint16BE(out: Uint8Array, at: number, value: number): void {
  out[at] = value >>> 8;
  out[at + 1] = value & 0xff;
}

/** The length {@link encodeRequestInto} writes. */
export const REQUEST_BYTES = 12;

/** Bytes {@link encodePageReplyHeaderInto} writes at most. */
export const PAGE_REPLY_HEADER_BYTES = 17;

/** The length {@link encodePageReplyHeaderInto} writes before `dataBytes` bytes of a page. */
export function pageReplyHeaderBytes(dataBytes: number): number {
  return dataBytes < 0x10000 ? 15 : 17;
}

/**
 * Writes what comes before a page's bytes in the reply `{ type: 'page',
 * id, page, data }` of `dataBytes` bytes into `out` at `at` (room for
 * {@link PAGE_REPLY_HEADER_BYTES}): the msgpack array [Page, id, page, bin]
 * up to the bin's length, id and page as uint32, the bin's length as
 * bin 16 or bin 32. Followed by the bytes themselves, it is a reply
 * decode() and decodeReplyFast() read as encode() would have written it,
 * and the bytes need not be copied behind it first (the source writes them
 * from its image as they lie). Returns the length ({@link pageReplyHeaderBytes}).
 */
export function encodePageReplyHeaderInto(out: Uint8Array, at: number, id: number, page: number, dataBytes: number): number {
  out[at] = 0x94;
  out[at + 1] = MessageType.Page;
  out[at + 2] = 0xce;
  writeUint32BE(out, at + 3, id);
  out[at + 7] = 0xce;
  writeUint32BE(out, at + 8, page);
  if (dataBytes < 0x10000) {
    out[at + 12] = 0xc5;
    writeUint16BE(out, at + 13, dataBytes);
    return 15;
  }
  out[at + 12] = 0xc6;
  writeUint32BE(out, at + 13, dataBytes);
  return 17;
}

/** A msgpack unsigned integer at frame[at], up to uint32: its value (fastAt set past it), or -1 for any other encoding. */
function readUint(frame: Uint8Array, at: number): number {
  const b = frame[at];
  if (b === undefined) return -1;
  if (b < 0x80) {
    fastAt = at + 1;
    return b;
  }
  if (b === 0xcc && at + 1 < frame.length) {
    fastAt = at + 2;
    return frame[at + 1]!;
  }
  if (b === 0xcd && at + 2 < frame.length) {
    fastAt = at + 3;
    return (frame[at + 1]! << 8) | frame[at + 2]!;
  }
  if (b === 0xce && at + 4 < frame.length) {
    fastAt = at + 5;
    return ((frame[at + 1]! << 24) >>> 0) + ((frame[at + 2]! << 16) | (frame[at + 3]! << 8) | frame[at + 4]!);
  }
  return -1;
}
/** Where the last {@link readUint} ended (a module variable: no tuple allocated per field). */
let fastAt = 0;

/**
 * decode() of a request ([Request, id, page], integers of any msgpack width
 * up to uint32), for the source's hot path: without msgpackr, with the same
 * checks (id a uint32, page inside the guest, nothing after the page).
 * Anything else, valid or not, gives undefined: the caller then calls
 * decode(), which gives the message or says what is wrong with it.
 */
export function decodeRequestFast(frame: Uint8Array, layout: GuestLayout): Message | undefined {
  if (frame[0] !== 0x93 || frame[1] !== MessageType.Request) return undefined;
  const id = readUint(frame, 2);
  if (id < 0) return undefined;
  const page = readUint(frame, fastAt);
  if (page < 0 || page >= layout.totalPages || fastAt !== frame.length) return undefined;
  return { type: 'request', id, page };
}

/**
 * decode() of a reply to a request, for the shapes the source sends
 * ([Page, id, page, bin] and [ZeroPage | AlreadySent | SentOnMain, id, page])
 * without msgpackr, with the same checks (id a uint32, page inside the
 * guest, data exactly one page). Anything else, valid or not, gives
 * undefined: the caller then calls decode(), which gives the message or
 * says what is wrong with it. A page's data is a view into `frame`.
 */
export function decodeReplyFast(frame: Uint8Array, layout: GuestLayout): Reply | undefined {
  const head = frame[0];
  const type = frame[1];
  if (head === 0x94 && type === MessageType.Page) {
    const id = readUint(frame, 2);
    if (id < 0) return undefined;
    const page = readUint(frame, fastAt);
    if (page < 0 || page >= layout.totalPages) return undefined;
    let at = fastAt;
    const bin = frame[at];
    let length: number;
    if (bin === 0xc5 && at + 2 < frame.length) {
      length = (frame[at + 1]! << 8) | frame[at + 2]!;
      at += 3;
    } else if (bin === 0xc6 && at + 4 < frame.length) {
      length = ((frame[at + 1]! << 24) >>> 0) + ((frame[at + 2]! << 16) | (frame[at + 3]! << 8) | frame[at + 4]!);
      at += 5;
    } else if (bin === 0xc4 && at + 1 < frame.length) {
      length = frame[at + 1]!;
      at += 2;
    } else return undefined;
    if (length !== layout.pageSize || at + length !== frame.length) return undefined;
    return { type: 'page', id, page, data: frame.subarray(at, at + length) };
  }
  if (head === 0x93 && (type === MessageType.ZeroPage || type === MessageType.AlreadySent || type === MessageType.SentOnMain)) {
    const id = readUint(frame, 2);
    if (id < 0) return undefined;
    const page = readUint(frame, fastAt);
    if (page < 0 || page >= layout.totalPages || fastAt !== frame.length) return undefined;
    return { type: type === MessageType.ZeroPage ? 'zero-page' : type === MessageType.AlreadySent ? 'already-sent' : 'sent-on-main', id, page };
  }
  return undefined;
}
