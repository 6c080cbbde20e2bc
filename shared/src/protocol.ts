/**
 * The wire protocol between destination and source. Each WebSocket frame is
 * one msgpack array whose first element is the message type. Hot messages
 * (request, page, pushed) are small positional arrays; nothing is sent as text.
 *
 * Recovery after a lost connection (QEMU's postcopy-recover): the destination
 * opens a new main channel and sends `resume` (its receivedmap and the pages
 * it still waits for) in place of `start`; after the source's `resumed`, its
 * fault channels reconnect and re-send their pending requests with their ids.
 *
 * The phases before postcopy (precopy, issue 10): after `start` the source
 * sends the guest's pages in rounds (`precopy-pages`, `precopy-zero`, or,
 * from version 7, precopy records on the push channel with a SYNC after each
 * round that the destination acknowledges with `precopy-synced`) while
 * its vCPUs keep writing; at switchover it sends the `discard` set (pages
 * sent before and dirtied again since, QEMU's MIG_CMD_POSTCOPY_RAM_DISCARD)
 * and `switchover`, and the destination answers `running` once its vCPUs run
 * (the end of the downtime). A digest mismatch at the end makes the
 * destination ask for `page-hashes` to name the pages that differ.
 *
 * Reserved so that old peers reject it cleanly: a separate listener for
 * urgent pages (22, QEMU's postcopy-preempt channel; today preempt reuses the
 * fault channels).
 */

import type { MigrationMode, PageRange } from './precopy.js';
import { DeviceMessageType } from './devices/message-types.js';
import type { DeviceMessage, DevicesSummary } from './devices/wire.js';

/**
 * Version 2: hello and welcome carry the migration's secret (every channel
 * is bound to its migration), and the summary the source's keepalive count.
 * Version 3: precopy (the welcome's mode, precopy pages, discard,
 * switchover, running, page hashes; the summary's migration figures).
 * Version 4: the summary carries the source's CPU time (`cpuUs`,
 * `cpuMainThreadUs`).
 * Version 5: devices (message types 30 to 35, see devices/wire.ts; the
 * summary's device figures).
 * Version 6: push channels (role 2): a raw stream of pushed runs beside the
 * WebSockets (see push-stream.ts).
 * Version 7: precopy's pages on the push channel (records PRECOPY_PAGES,
 * PRECOPY_ZERO and SYNC, see push-stream.ts) and `precopy-synced` (36), the
 * destination's acknowledgement of a SYNC on the main channel.
 * Version 8: the memory digest (the welcome's image digest, the summary's
 * digest of the received pages) is two-level, SHA-256 over the SHA-256 of
 * each 64 MiB segment (digest.ts), so that both hosts hash on every core; a
 * version-7 peer's digest would never match.
 * Version 9: each segment's hash is the eight-lane hash of segment-hash.ts
 * instead of SHA-256 (twice as fast); the digest over the segment hashes
 * stays SHA-256. A version-8 peer's digest would never match.
 * Version 10: the page content generator (content.ts) runs four xorshift32
 * lanes instead of one, so a page's content differs from version 9's: a
 * version-9 peer's pages would fail every content check.
 */
export const PROTOCOL_VERSION = 11;

/**
 * A migration's secret: 32 random bytes as 64 lowercase hex digits (QEMU's
 * multifd channels carry the migration's UUID for the same purpose). The
 * source makes it when it listens and gives it to the migration's main
 * channel in `welcome`; every other channel of the migration (fault
 * channels, a main channel that resumes after a drop) presents it in its
 * `hello`. The access token says who may start a migration; the secret says
 * who is part of this one.
 */
export const MIGRATION_SECRET_PATTERN = /^[0-9a-f]{64}$/;
export const MIGRATION_SECRET_BYTES = 32;

export const MessageType = {
  Hello: 1,
  Welcome: 2,
  Start: 3,
  Request: 4,
  Page: 5,
  ZeroPage: 6,
  AlreadySent: 7,
  Pushed: 8,
  PushedZero: 9,
  Complete: 10,
  Finish: 11,
  Summary: 12,
  Error: 13,
  SentOnMain: 14,
  Discard: 20,
  Resume: 21,
  // Reserved (decoders reject it as unknown today): 22 PreemptHello (urgent channel).
  Resumed: 23,
  PrecopyPages: 24,
  PrecopyZero: 25,
  Switchover: 26,
  Running: 27,
  HashRequest: 28,
  PageHashes: 29,
  // 30 to 35: devices (devices/wire.ts).
  ...DeviceMessageType,
  PrecopySynced: 36,
} as const;
export type MessageTypeCode = (typeof MessageType)[keyof typeof MessageType];

/** What a connection is for: the main channel (push, control) or a fault channel (requests of one resolver or vCPU). */
/**
 * What a channel is for: the main channel, a fault channel (requests and
 * their replies), or a push channel (push-stream.ts: pushed pages only, on a
 * raw stream rather than a WebSocket).
 */
export const ChannelRole = { Main: 0, Fault: 1, Push: 2 } as const;
export type ChannelRoleCode = (typeof ChannelRole)[keyof typeof ChannelRole];

export interface Hello {
  type: 'hello';
  protocolVersion: number;
  token: string;
  role: ChannelRoleCode;
  guestBytes: number;
  pageSize: number;
  /** Free-form label of the channel's owner, e.g. `vcpu3`, `resolver0` (for error messages and stats). */
  channel: string;
  /**
   * The secret of the migration this channel belongs to (see
   * {@link MIGRATION_SECRET_PATTERN}), or '' on the main channel of a new
   * migration, which receives the secret in its welcome.
   */
  secret: string;
}

export interface Welcome {
  type: 'welcome';
  protocolVersion: number;
  guestBytes: number;
  pageSize: number;
  totalPages: number;
  /** SHA-256 of the whole source image. */
  imageDigest: string;
  /** Generator parameters, so the destination can verify content at first touch. */
  imageSeed: number;
  zeroFraction: number;
  /** The emulated link at the source: one-way delay (µs) and bandwidth (bits/s, 0 = unlimited). */
  linkDelayUs: number;
  linkBandwidthBps: number;
  /** The new migration's secret, on the main channel that started it; '' on every other channel (never echoed). */
  secret: string;
  /** How the migration runs (the source decides): see {@link MigrationMode}. */
  mode: MigrationMode;
}

export interface Start {
  type: 'start';
  /** Whether the source pushes pages that were not requested. */
  push: boolean;
  /**
   * QEMU's postcopy-preempt: requested pages go back on the channel that asked
   * for them, apart from pushed pages. Without it they go on the main channel,
   * ahead of pushes not yet sent but behind those already in flight.
   */
  preempt: boolean;
}

/**
 * Recovery (QEMU's postcopy-recover): on a new main channel after a lost
 * connection, in place of `start`. The source makes its sentmap equal to the
 * receivedmap (every page the destination lacks is unsent again, as QEMU's
 * ram_dirty_bitmap_reload does), sends the pages of `requestedmap` first, on
 * the main channel (QEMU re-sends the page_requested tree), then pushes the
 * rest as `start` said.
 */
export interface Resume {
  type: 'resume';
  push: boolean;
  preempt: boolean;
  /** The destination's receivedmap, one bit a page. */
  receivedmap: Uint8Array;
  /** Pages the destination asked for and still waits for, one bit a page. */
  requestedmap: Uint8Array;
}

/** The source's answer to `resume`: fault channels may reconnect now. */
export interface Resumed {
  type: 'resumed';
  /** Pages this source had sent that the receivedmap lacked (lost on the way): marked unsent, to be sent again. */
  pagesMarkedUnsent: number;
  /** The source process was restarted (`--resume`): it cannot know what its predecessor sent. */
  restarted: boolean;
}

export interface Request {
  type: 'request';
  /** Per-connection request id, chosen by the destination, echoed in the reply. */
  id: number;
  page: number;
}

export interface PageReply {
  type: 'page';
  id: number;
  page: number;
  data: Uint8Array;
}

export interface ZeroPageReply {
  type: 'zero-page';
  id: number;
  page: number;
}

export interface AlreadySentReply {
  type: 'already-sent';
  id: number;
  page: number;
}

/**
 * Without preempt: the requested page's content (or zero notice) went out on
 * the main channel, as a `page`/`zero-page` with id 0. This is the request's one reply.
 */
export interface SentOnMainReply {
  type: 'sent-on-main';
  id: number;
  page: number;
}

/**
 * Pushed pages: a run of consecutive pages starting at `page`, their contents
 * back to back in `data` (a whole number of pages, at most
 * {@link MAX_PUSH_FRAME_BYTES} or one page, whichever is larger).
 */
export interface Pushed {
  type: 'pushed';
  page: number;
  data: Uint8Array;
}

export interface PushedZero {
  type: 'pushed-zero';
  page: number;
}

export interface Complete {
  type: 'complete';
  /** Pages whose content (or zero notice) the source has sent: all of them. */
  pagesSent: number;
}

export interface Finish {
  type: 'finish';
  /** The destination's receivedmap, one bit a page. */
  receivedmap: Uint8Array;
}

/** The source's side of the accounting, sent in answer to `finish`. */
export interface SourceSummary {
  requests: number;
  replies: number;
  repliesPage: number;
  repliesZero: number;
  repliesAlreadySent: number;
  pagesSent: number;
  pagesPushed: number;
  pagesZero: number;
  /** Pages the source sent twice (must be 0). */
  pagesSentTwice: number;
  /** SHA-256 over the pages in the destination's receivedmap, from the source image. */
  digestOfReceived: string;
  /** Pages in the sentmap that the receivedmap lacks, and the reverse. */
  sentNotReceived: number;
  receivedNotSent: number;
  /** The source process's peak resident set size so far (bytes). */
  peakRssBytes: number;
  /** Requests whose channel closed before the answer could go out (a lost connection). */
  repliesUndeliverable: number;
  /** Times the source's keepalive found the destination's main channel silent and cut it. */
  keepaliveTimeouts: number;
  /** The source's warm-up before it listened (source-host's warm-up.ts): requests it answered for a scratch image, and how long it took (ms, whole). */
  warmUpRequests: number;
  warmUpMs: number;
  /**
   * CPU time of the source process (user + system, every thread) from the
   * migration's start (or, for a source restarted with --resume, its resume)
   * to the destination's finish, in µs.
   */
  cpuUs: number;
  /** The same for the source's main thread alone (its event loop), or null where the platform cannot tell (see cpu.ts). */
  cpuMainThreadUs: number | null;
  /** How the migration ran before (and instead of) postcopy: the source's figures. */
  migration: MigrationSummary;
  /** The guest's devices: their states and data, DMA dirty tracking, the untracked-DMA policy (devices/wire.ts). */
  devices: DevicesSummary;
}

/** One precopy round (QEMU counts a dirty sync per round). */
export interface PrecopyRound {
  round: number;
  /** Pages sent in the round (its dirty set at the sync that began it). */
  pagesSent: number;
  /** Pages the guest dirtied while it ran: found dirty at the sync that ended it. */
  pagesDirtied: number;
  ms: number;
  /** Page bytes sent over the round's time, megabits per second. */
  mbps: number;
}

/** What the source reports about the phases before postcopy (QEMU's query-migrate names where it has them). */
export interface MigrationSummary {
  /** From start to the first page sent, ms (QEMU's setup-time). */
  setupTimeMs: number;
  /** From start to the destination's finish, ms (QEMU's total-time). */
  totalTimeMs: number;
  /** From the source's vCPUs stopping to the destination's `running`, ms (includes one trip of the link); 0 in postcopy mode. */
  downtimeMs: number;
  /** The expected downtime at the last decision: pending bytes / bandwidth, ms (QEMU's expected-downtime). */
  expectedDowntimeMs: number;
  downtimeLimitMs: number;
  /** `converged`, `rounds` (--postcopy-after-rounds), `migrate-start-postcopy`, `auto-converge`; `none` in postcopy mode. */
  switchoverReason: string;
  rounds: number;
  dirtySyncCount: number;
  /** Pages sent in precopy rounds and stop-and-copy, re-sends included. */
  pagesSent: number;
  /** Of those, sends of a page sent before (it was dirtied again). */
  pagesResent: number;
  /** Page bytes sent in precopy. */
  bytes: number;
  /** Pages the guest dirtied per second while precopy ran (QEMU's dirty-pages-rate). */
  dirtyPagesRate: number;
  /** The source vCPUs' throttle at switchover, percent (auto-converge). */
  throttlePercent: number;
  perRound: PrecopyRound[];
  /** Pages dropped on the destination at the switch to postcopy, and in how many ranges. */
  discardPages: number;
  discardRanges: number;
}

export interface Summary extends SourceSummary {
  type: 'summary';
}

/**
 * Precopy: a run of consecutive pages sent in round `round` (1 = the first,
 * whole-memory pass), their contents back to back (a whole number of pages,
 * at most {@link MAX_PUSH_FRAME_BYTES}). The guest still runs on the source:
 * a later round may send a page again, and the destination overwrites it.
 */
export interface PrecopyPages {
  type: 'precopy-pages';
  round: number;
  page: number;
  data: Uint8Array;
}

export interface PrecopyZero {
  type: 'precopy-zero';
  round: number;
  page: number;
}

/**
 * At the switch to postcopy: pages the destination received in precopy that
 * the guest dirtied again since; the destination drops them (receivedmap
 * cleared, the page missing again so that the next touch faults). Sorted,
 * coalesced, non-overlapping ranges.
 */
export interface Discard {
  type: 'discard';
  ranges: PageRange[];
}

/**
 * The source's vCPUs have stopped and what had to go before the guest may run
 * on the destination has gone: with `postcopy` false (precopy) every page, and
 * the destination starts its vCPUs with all of its memory; with `postcopy`
 * true (hybrid) the discard set, and postcopy begins.
 */
export interface Switchover {
  type: 'switchover';
  postcopy: boolean;
}

/** Destination to source: its vCPUs run (the downtime ends). */
export interface Running {
  type: 'running';
}

/**
 * Destination to source, during precopy: every record its push channel
 * carried before SYNC `seq` (push-stream.ts) is placed. The source's
 * barrier: the discard set and `switchover` wait for the last SYNC's.
 */
export interface PrecopySynced {
  type: 'precopy-synced';
  seq: number;
}

/** Destination to source, after `summary`: the digests differ; which pages? */
export interface HashRequest {
  type: 'hash-request';
}

/**
 * A 32-bit FNV-1a hash of every page of the source's memory as it is now (its
 * vCPUs stopped at switchover), little-endian, and the phase that last sent
 * each page (see PHASE in precopy.ts), one byte a page.
 */
export interface PageHashes {
  type: 'page-hashes';
  hashes: Uint8Array;
  phases: Uint8Array;
}

export interface ErrorMessage {
  type: 'error';
  code: string;
  message: string;
}

export type Message =
  | Hello
  | Welcome
  | Start
  | Request
  | PageReply
  | ZeroPageReply
  | AlreadySentReply
  | SentOnMainReply
  | Pushed
  | PushedZero
  | Complete
  | Finish
  | Summary
  | Resume
  | Resumed
  | PrecopyPages
  | PrecopyZero
  | Discard
  | Switchover
  | Running
  | PrecopySynced
  | HashRequest
  | PageHashes
  | DeviceMessage
  | ErrorMessage;

export type Reply = PageReply | ZeroPageReply | AlreadySentReply | SentOnMainReply;

/** Pushed frames carry up to this many bytes of page contents (fewer frames, fewer syscalls). */
export const MAX_PUSH_FRAME_BYTES = 64 * 1024;

/** Pages one pushed frame may carry. */
export function maxPushPages(pageSize: number): number {
  return Math.max(1, Math.floor(MAX_PUSH_FRAME_BYTES / pageSize));
}

/** Most ranges one `discard` frame carries (a bigger set goes in several frames). */
export const MAX_DISCARD_RANGES = 8192;

/**
 * Largest legal frame a source may receive: a page or a pushed run plus a
 * small header, or a resume's two bitmaps.
 */
export function maxFrameBytes(pageSize: number, totalPages: number): number {
  return Math.max(pageSize * maxPushPages(pageSize), 2 * Math.ceil(totalPages / 8)) + 1024;
}

/** Largest legal frame a destination may receive: that, a full discard frame, the page hashes (5 bytes a page), or a summary of many rounds. */
export function maxDestFrameBytes(pageSize: number, totalPages: number): number {
  return Math.max(maxFrameBytes(pageSize, totalPages), MAX_DISCARD_RANGES * 8 + 1024, 5 * totalPages + 1024, 256 * 1024);
}
