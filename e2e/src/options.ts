import { Command } from 'commander';
import { UsageError, parseHost } from '@postcopy/shared';
import {
  DEVICE_FLAGS,
  PRECOPY_FLAGS,
  addDeviceOptions,
  addImageOptions,
  addLinkOptions,
  addWarmUpOption,
  addPrecopyOptions,
  deviceSourceArgs,
  parseDeviceOptions,
  parseImageOptions,
  parseLinkOptions,
  parseMaxPushBps,
  parsePrecopyOptions,
} from '@postcopy/source-host/options';
import { addRunOptions, checkInjections, parseInjections, parseRunOptions, type PreflightSpec } from '@postcopy/dest-host/options';

/** `npm start`'s options: the image's (source) and the run's (destination). */
export function launcherCommand(): Command {
  const cmd = new Command('postcopy')
    .description('Runs a two-process local postcopy migration (source host + destination host on 127.0.0.1) and prints its report.');
  addImageOptions(cmd);
  addWarmUpOption(cmd);
  addLinkOptions(cmd);
  addPrecopyOptions(cmd);
  // The devices go to the source; --mdev-types to both hosts (each creates or checks instances of its own types).
  addDeviceOptions(cmd);
  addRunOptions(cmd);
  cmd
    .option('--tls', 'run over TLS: make a throwaway CA and certificates for this run (removed afterwards); the source listens on wss:// and verifies the destination (--tls-verify-peer)')
    .option('--host <addr>', 'address both hosts bind (IPv6 too: ::1)', '127.0.0.1');
  return cmd;
}

/** Options the source takes: the image, its warm-up, and the emulated link (applied at the source). */
const SOURCE_FLAGS = ['memory', 'pageSize', 'seed', 'zeroFraction', 'warmUpRequests', 'linkDelayUs', 'linkBandwidth', 'maxPostcopyBandwidth'] as const;
/** Of those, the ones the destination must also know (the layout) or uses itself (the seed). */
const SHARED_FLAGS = ['memory', 'pageSize', 'seed'] as const;
/** The destination's options the source takes too. */
const BOTH_FLAGS = ['keepaliveMs'] as const;
/** The launcher's own. */
const LAUNCHER_FLAGS = ['tls', 'host'] as const;

function flag(name: string): string {
  return '--' + name.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase());
}

/**
 * Validates every option (throws UsageError before anything starts) and
 * splits them into the two hosts' argument lists.
 */
export function splitArgs(raw: Record<string, unknown>): {
  sourceArgs: string[];
  destArgs: string[];
  killSourceAt: number[];
  tls: boolean;
  host: string;
  /** What the destination's memory backend must allow (preflightMemoryBackend checks it before anything starts). */
  preflight: PreflightSpec;
} {
  const { layout } = parseImageOptions(raw as Record<string, string>);
  // The guest on the source has as many vCPUs as the destination's, unless told otherwise.
  const withSourceVcpus = { ...raw, sourceVcpus: raw.sourceVcpus ?? raw.vcpus };
  const precopy = parsePrecopyOptions(withSourceVcpus, layout);
  const link = parseLinkOptions(raw);
  const avail = (precopy.controller.precopy?.availSwitchoverBytesPerSec ?? 0) * 8;
  parseDeviceOptions(raw, { layout, mode: precopy.mode, downtimeLimitMs: precopy.controller.precopy?.downtimeLimitMs ?? 300, bandwidthBps: avail > 0 ? avail : link.bandwidthBps });
  parseMaxPushBps(raw);
  const run = parseRunOptions(raw);
  // --inject: drops go to the destination, kills of the source stay here.
  const injections = parseInjections(raw.inject);
  checkInjections(injections, layout.totalPages);
  if (injections.killSource.length > 0 && precopy.mode !== 'postcopy') {
    throw new UsageError(
      `--inject: expected kill-source@PAGES with --mode postcopy only (a restarted source rebuilds the guest from the seed and cannot know what the guest wrote during precopy), got --mode ${precopy.mode}`,
    );
  }
  const sourceArgs: string[] = [];
  for (const k of SOURCE_FLAGS) sourceArgs.push(flag(k), String(raw[k]));
  for (const k of BOTH_FLAGS) if (raw[k] !== undefined) sourceArgs.push(flag(k), String(raw[k]));
  for (const k of PRECOPY_FLAGS) {
    const v = k === 'sourceVcpus' ? withSourceVcpus.sourceVcpus : raw[k];
    if (v === true) sourceArgs.push(flag(k));
    else if (v !== undefined && v !== false) sourceArgs.push(flag(k), String(v));
  }
  sourceArgs.push(...deviceSourceArgs(raw));
  const host = parseHost('--host', String(raw.host ?? '127.0.0.1'));
  const destArgs: string[] = [];
  for (const k of SHARED_FLAGS) destArgs.push(flag(k), String(raw[k]));
  for (const [k, v] of Object.entries(raw)) {
    if (
      (SOURCE_FLAGS as readonly string[]).includes(k) ||
      (LAUNCHER_FLAGS as readonly string[]).includes(k) ||
      (PRECOPY_FLAGS as readonly string[]).includes(k) ||
      ((DEVICE_FLAGS as readonly string[]).includes(k) && k !== 'mdevTypes')
    ) {
      continue;
    }
    if (k === 'inject') {
      const drops = [...injections.drops.map((n) => `drop@${n}`), ...injections.postcopyDrops.map((n) => `drop-postcopy@${n}`)];
      if (drops.length > 0) destArgs.push('--inject', drops.join(','));
    } else if (k === 'push' || k === 'pushChannel') {
      if (v === false) destArgs.push(k === 'push' ? '--no-push' : '--no-push-channel');
    } else if (v === true) {
      destArgs.push(flag(k));
    } else if (v !== false && v !== undefined) {
      destArgs.push(flag(k), String(v));
    }
  }
  const preflight: PreflightSpec = {
    memoryBackend: run.memoryBackend,
    strategy: run.strategy,
    layout,
    memslotBytes: run.memslotBytes,
    vcpus: run.vcpus,
    ioThreads: run.ioThreads,
    readers: run.readers,
  };
  return { sourceArgs, destArgs, killSourceAt: injections.killSource, tls: raw.tls === true, host, preflight };
}
