/**
 * The project's one native addon (dest-host/native/uffd/uffd.c), loaded once
 * per thread, or the reason it cannot be.
 *
 * The root `build` script (dest-host/native/uffd/build.mjs) builds it and
 * records in build/status.json why it did not build where it could not (not
 * Linux, no compiler, no Node headers). The destination types it in full
 * (dest-host/src/memory/uffd-native.ts); both hosts' digests use its hash
 * lanes (segment-hash.ts) and the source's image build its page generator
 * (content.ts) where it loads. This file lies two levels below
 * the repository in src/ (tests) and in dist/ (built), so the same relative
 * path finds the addon.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

export type AddonLoad<T> = { ok: true; native: T } | { ok: false; reason: string };

const addonDir = new URL('../../dest-host/native/uffd/build/', import.meta.url);

let loaded: AddonLoad<unknown> | undefined;

/** Loads the addon in this thread (once), or says why it cannot be; the caller names its type. */
export function loadAddon<T>(): AddonLoad<T> {
  loaded ??= load();
  return loaded as AddonLoad<T>;
}

/**
 * The addon where it loads and has function `name`, else undefined: the
 * TypeScript fallbacks (an addon built before the function existed has
 * none, and the fallback serves).
 */
export function addonWith<T>(name: keyof T & string): T | undefined {
  const load = loadAddon<Record<string, unknown>>();
  return load.ok && typeof load.native[name] === 'function' ? (load.native as T) : undefined;
}

function load(): AddonLoad<unknown> {
  if (process.platform !== 'linux') {
    return { ok: false, reason: `userfaultfd(2) is Linux only, and this is ${process.platform}; use --memory-backend emulated` };
  }
  const path = fileURLToPath(new URL('uffd.node', addonDir));
  if (!existsSync(path)) {
    return { ok: false, reason: `the addon was not built (${path} is missing): ${buildStatusReason()}` };
  }
  try {
    return { ok: true, native: createRequire(import.meta.url)(path) as unknown };
  } catch (err) {
    return { ok: false, reason: `the addon ${path} failed to load: ${(err as Error).message}` };
  }
}

function buildStatusReason(): string {
  const statusPath = fileURLToPath(new URL('status.json', addonDir));
  try {
    const status = JSON.parse(readFileSync(statusPath, 'utf8')) as { built?: boolean; reason?: string };
    if (status.built === false && typeof status.reason === 'string') return `the build said: ${status.reason}`;
  } catch {
    // no status: the build step never ran
  }
  return 'run `npm run build` (it builds dest-host/native/uffd with the machine\'s C compiler and Node\'s headers)';
}
