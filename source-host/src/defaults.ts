/**
 * The source's option defaults, in a module of their own: the option
 * parsers (options.ts, precopy-options.ts) read them, and so does the
 * launcher behind `npm start`, which must not load the server, the
 * controller and ws to parse its command line (its start-up is on the path
 * of every run, before the source even starts).
 */
import type { PrecopyOptions } from './precopy.js';

/** Server option defaults in one literal. */
export const SERVER_DEFAULTS = {
  handshakeTimeoutMs: 10_000,
  resumeTimeoutMs: 10_000,
  maxConnections: 1024,
  keepaliveMs: 10_000,
} as const;

/** The guest's defaults on the source: one vCPU, 1000 pages/s, over all of memory. */
export const SOURCE_GUEST_DEFAULTS = { vcpus: 1, dirtyRate: 1000 } as const;

export const PRECOPY_DEFAULTS: PrecopyOptions = {
  mode: 'hybrid',
  downtimeLimitMs: 300,
  availSwitchoverBytesPerSec: 0,
  maxRounds: 30,
  autoConverge: false,
  postcopyAfterRounds: 1,
  batchBytes: 64 * 1024,
  highWaterBytes: 512 * 1024,
  streamBatchBytes: 1024 * 1024,
  streamHighWaterBytes: 2 * 1024 * 1024,
  unsafeSkipSync: false,
};
