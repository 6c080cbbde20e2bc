/**
 * Who may talk to the source, and as what. The access token says who may
 * start a migration; the migration's secret says who is part of the running
 * one. The source makes the secret when it listens (or, restarted with
 * `--resume`, reads its predecessor's from `--secret-file`) and gives it to
 * the main channel that starts the migration, in `welcome`. Every other
 * channel must present it in its `hello`: fault channels, and a main channel
 * that resumes the migration after a drop. A peer with the token but without
 * the secret (a leaked token, a second destination started by mistake) is
 * refused before it can ask for anything, so it can neither take pages from
 * the real destination (each page is sent once: a page it got would be
 * "already sent" to the destination that needs it) nor squat the main
 * channel of a paused migration.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import { ChannelRole, HandshakeError, MIGRATION_SECRET_BYTES, MIGRATION_SECRET_PATTERN, UsageError, type Hello } from '@postcopy/shared';

function digest(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}

/** Constant-time comparison (hashing first makes lengths equal). */
export function tokensEqual(expected: string, given: string): boolean {
  return timingSafeEqual(digest(expected), digest(given));
}

export function generateToken(): string {
  return randomBytes(18).toString('base64url');
}

/** A new migration's secret: 256 random bits as hex. */
export function generateSecret(): string {
  return randomBytes(MIGRATION_SECRET_BYTES).toString('hex');
}

/** Writes the secret where a source restarted with `--resume` will read it (owner-only, like a key file). */
export function writeSecretFile(path: string, secret: string): void {
  try {
    writeFileSync(path, secret + '\n', { mode: 0o600 });
    chmodSync(path, 0o600);
  } catch (err) {
    throw new UsageError(`--secret-file: expected a file this source can write, got ${JSON.stringify(path)} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
}

/** Reads the secret a source that died wrote (for `--resume`). */
export function readSecretFile(path: string): string {
  let text: string;
  try {
    text = readFileSync(path, 'utf8').trim();
  } catch (err) {
    throw new UsageError(`--secret-file: expected the secret file the source that died wrote, got ${JSON.stringify(path)} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
  if (!MIGRATION_SECRET_PATTERN.test(text)) {
    throw new UsageError(`--secret-file: expected a migration secret (64 hex digits) in ${JSON.stringify(path)}, got ${text.length} characters of something else`);
  }
  return text;
}

/** Where the source's migration stands, as far as admitting a channel goes. */
export interface AdmissionState {
  /**
   * `fresh` (no start yet), `precopy` (rounds, or the switchover: the guest
   * has not left), `running` (postcopy, or precopy done), `paused`, `ended`
   * (the summary went out, or the migration failed or was cancelled).
   */
  phase: 'fresh' | 'precopy' | 'running' | 'paused' | 'ended';
  /** How it ended, for the refusal (`finished`, `failed`, `cancelled`). */
  endedAs?: string;
  /** A main channel holds the migration now. */
  hasMain: boolean;
  /** The secret was given out (a main channel took the migration) or inherited (`--resume`). */
  secretIssued: boolean;
  secret: string;
  /** Label of the channel asking (for messages). */
  label: string;
  /**
   * Testing only (`--unsafe-unbound-channels`): admit fault channels that
   * present no secret, as before channels were bound to their migration, to
   * show what an outsider with the token then does to a migration.
   */
  unbound?: boolean;
}

/**
 * What a hello may become:
 * - `new-main`: the main channel of a new migration (it gets the secret);
 * - `resume-main`: a main channel of the running migration coming back after
 *   a drop; `takeover` if the source still holds an old main channel the
 *   destination has evidently lost (a dead link sends no close);
 * - `fault`: a fault channel of the running migration.
 */
export type Admission = { kind: 'new-main' } | { kind: 'resume-main'; takeover: boolean } | { kind: 'fault' };

/**
 * Decides whether a hello (token already checked) joins the migration, and
 * as what; throws a HandshakeError saying what was expected otherwise. A
 * refusal changes nothing: the channel never gets to send a request.
 */
export function admit(hello: Hello, s: AdmissionState): Admission {
  const presented = hello.secret !== '';
  const matches = presented && s.secretIssued && tokensEqual(s.secret, hello.secret);
  if (presented && !matches) {
    throw new HandshakeError(
      s.secretIssued
        ? `expected the secret of the migration this source runs, got another one: ${s.label} is not part of it`
        : `expected no migration secret (this source has no migration to resume; to continue a migration whose source died, start the source with --resume and the dead source's --secret-file), got one`,
    );
  }
  // Only the migration's own channels learn that it has ended.
  const ended = (): HandshakeError => new HandshakeError(`expected a channel of a running migration, got ${s.label} after the migration ${s.endedAs ?? 'ended'}`);
  if (hello.role === ChannelRole.Main) {
    if (!presented) {
      if (s.hasMain || s.secretIssued) {
        // The migration has begun: only its own destination may hold its main channel.
        throw new HandshakeError(
          s.hasMain
            ? `expected one main channel, got a second one (${s.label})`
            : `expected the migration's secret on a main channel that resumes it, got none: ${s.label} is not part of the migration`,
        );
      }
      return { kind: 'new-main' };
    }
    // The secret: the migration's own destination. Before start there is nothing to resume.
    if (s.phase === 'ended') throw ended();
    if (s.phase === 'fresh') throw new HandshakeError(`expected one main channel, got a second one (${s.label}) before the migration started`);
    // A connection lost before the switchover cancels the migration (the guest never left): nothing to resume.
    if (s.phase === 'precopy') throw new HandshakeError(`expected no resume during precopy (a lost connection cancels it), got a main channel with the secret (${s.label})`);
    return { kind: 'resume-main', takeover: s.hasMain };
  }
  if (!presented && s.unbound && s.secretIssued && s.phase !== 'ended') return { kind: 'fault' };
  if (!presented) {
    throw new HandshakeError(
      s.secretIssued
        ? `expected the migration's secret in a fault channel's hello, got none: ${s.label} is not part of the migration`
        : `expected a fault channel of a running migration, got ${s.label} before any migration started (its main channel comes first)`,
    );
  }
  if (s.phase === 'ended') throw ended();
  return { kind: 'fault' };
}
