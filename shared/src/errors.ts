/**
 * Every error the tool raises on purpose, each with a stable `code` (the `ws`
 * and undici convention). Messages say what was expected and what came.
 */
export class PostcopyError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = new.target.name;
    this.code = code;
  }
}

/** A bad command-line value. Hosts exit with {@link USAGE_EXIT_CODE}. */
export class UsageError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_USAGE', message);
  }
}

/** An incoming frame that is not a valid message of this protocol. */
export class ProtocolError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_PROTOCOL', message);
  }
}

/** The peers disagree on version, layout or token. */
export class HandshakeError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_HANDSHAKE', message);
  }
}

/** The source could not be reached or the connection was lost. */
export class ConnectionError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_CONNECTION', message);
  }
}

/**
 * The migration is paused (its connection was lost): the source refuses fault
 * channels until the destination's main channel has resumed it. Retryable.
 */
export class PausedError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_PAUSED', message);
  }
}

/** A run-time check of the migration failed (content, digest, exactly-once, ...). */
export class CheckError extends PostcopyError {
  readonly check: string;
  constructor(check: string, message: string) {
    super('ERR_POSTCOPY_CHECK', `check ${check} failed: ${message}`);
    this.check = check;
  }
}

/** vCPUs stayed blocked with no progress: the watchdog stopped the run. */
export class WatchdogError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_WATCHDOG', message);
  }
}

/**
 * A memory backend cannot run here: not Linux, the addon not built, the kernel
 * refuses a userfaultfd (permissions), no huge pages reserved, or something the
 * kernel does not have (a per-thread userfaultfd). The message says which, and
 * what would allow it. Hosts exit with {@link USAGE_EXIT_CODE}, as for a bad option.
 */
export class BackendUnavailableError extends PostcopyError {
  readonly backend: string;
  constructor(backend: string, message: string) {
    super('ERR_POSTCOPY_BACKEND_UNAVAILABLE', message);
    this.backend = backend;
  }
}

/**
 * A device's migration failed: a state it could not reach, its data stream
 * out of order, beyond its size or not matching, a device the other side
 * does not have.
 */
export class DeviceError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_DEVICE', message);
  }
}

/**
 * The destination cannot take the source's devices (no instance of an mdev
 * type can be created, an incompatible type or version): refused before any
 * page moved.
 */
export class DeviceRefusedError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_DEVICE_REFUSED', message);
  }
}

export const USAGE_EXIT_CODE = 2;

/** Describes a value for an error message: `70000 (number)`, `"x" (string)`. */
export function describe(value: unknown): string {
  if (typeof value === 'string') {
    // JSON.stringify escapes C0 controls but not DEL (0x7f) or C1 controls: a
    // peer's text must never put raw control characters in a message or a log.
    const quoted = JSON.stringify(value.length > 40 ? value.slice(0, 40) + '…' : value).replace(/[\x7f-\x9f]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
    return `${quoted} (string)`;
  }
  if (value === null) return 'null';
  if (value instanceof Uint8Array) return `${value.length} bytes`;
  if (Array.isArray(value)) return `array of ${value.length}`;
  if (typeof value === 'object') return 'object';
  return `${String(value)} (${typeof value})`;
}
