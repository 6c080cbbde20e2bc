import { Command, Option } from 'commander';
import {
  UsageError,
  describe,
  loadTlsFiles,
  makeLayout,
  parseFraction,
  parseHost,
  parseIntOption,
  parseSize,
  type GuestLayout,
  type ImageSpec,
} from '@postcopy/shared';
import type { ListenerTls } from './listener.js';
import { addPrecopyOptions, parsePrecopyOptions, type PrecopyCliOptions } from './precopy-options.js';
import { addDeviceOptions, parseDeviceOptions, type DeviceCliOptions } from './devices/options.js';
import { parseBandwidth, type LinkSpec } from './link.js';
import { SERVER_DEFAULTS } from './defaults.js';

/** Option defaults in one literal (the `ws` convention). */
export const SOURCE_DEFAULTS = {
  memory: '64MiB',
  pageSize: '4KiB',
  seed: '1',
  zeroFraction: '0.1',
  host: '127.0.0.1',
  port: '0',
  handshakeTimeoutMs: String(SERVER_DEFAULTS.handshakeTimeoutMs),
  linkDelayUs: '0',
  linkBandwidth: '0',
  maxPostcopyBandwidth: '0',
  resume: false,
  resumeTimeoutMs: String(SERVER_DEFAULTS.resumeTimeoutMs),
  maxConnections: String(SERVER_DEFAULTS.maxConnections),
  keepaliveMs: String(SERVER_DEFAULTS.keepaliveMs),
  warmUpRequests: '2048',
  tlsVerifyPeer: false,
} as const;

export interface SourceOptions {
  layout: GuestLayout;
  image: ImageSpec;
  host: string;
  port: number;
  token: string | undefined;
  handshakeTimeoutMs: number;
  link: LinkSpec;
  /** Cap on the background push rate, bits/s (0 = none). */
  maxPushBps: number;
  /** This process replaces a source that died: wait for the destination to resume the migration. */
  resume: boolean;
  /** How long a paused migration waits for the destination to resume it. */
  resumeTimeoutMs: number;
  /** Open connections at most. */
  maxConnections: number;
  /** Cut a silent main channel after this long (0 = never). */
  keepaliveMs: number;
  /** Requests the source answers for a scratch image of its own before it listens (warm-up.ts); 0 = none. */
  warmUpRequests: number;
  /** wss:// with these; undefined for plain ws://. */
  tls: ListenerTls | undefined;
  /** Warnings about the TLS files (a certificate outside its validity). */
  tlsWarnings: string[];
  /** Where the migration's secret is kept for a restarted source (`--resume` reads it). */
  secretFile: string | undefined;
  /** Testing only: admit fault channels without the migration's secret. */
  unsafeUnboundChannels: boolean;
  /** The mode and, for precopy, the source's guest and precopy's decisions. */
  precopy: PrecopyCliOptions;
  /** The guest's devices, their DMA tracking and the untracked-DMA policy. */
  devices: DeviceCliOptions;
}

/** The emulated link between the hosts; the launcher passes them to the source. */
export function addLinkOptions(cmd: Command): Command {
  return cmd
    .option('--link-delay-us <us>', 'one-way delay added in each direction, in microseconds (emulated at the source)', SOURCE_DEFAULTS.linkDelayUs)
    .option('--link-bandwidth <rate>', 'link bandwidth, e.g. 1gbit, 10gbit, 500mbit (0 = unlimited)', SOURCE_DEFAULTS.linkBandwidth)
    .option('--max-postcopy-bandwidth <rate>', "cap on the background push rate, e.g. 800mbit (QEMU's max-postcopy-bandwidth; 0 = none); requested pages are never held back", SOURCE_DEFAULTS.maxPostcopyBandwidth);
}

export function parseMaxPushBps(raw: Record<string, unknown>): number {
  const bps = parseBandwidth(String(raw.maxPostcopyBandwidth));
  if (bps === undefined) {
    throw new UsageError(`--max-postcopy-bandwidth: expected a rate such as 800mbit, 2gbit or 0 (no cap), got ${JSON.stringify(raw.maxPostcopyBandwidth)}`);
  }
  return bps;
}

export function parseLinkOptions(raw: Record<string, unknown>): LinkSpec {
  const delayUs = parseIntOption('--link-delay-us', String(raw.linkDelayUs), 0, 10_000_000);
  const bandwidthBps = parseBandwidth(String(raw.linkBandwidth));
  if (bandwidthBps === undefined) {
    throw new UsageError(`--link-bandwidth: expected a rate such as 1gbit, 10gbit, 500mbit, 100kbit or 0 (unlimited), got ${JSON.stringify(raw.linkBandwidth)}`);
  }
  return { delayUs, bandwidthBps };
}

/** Options that describe the guest image; the launcher shares them. */
export function addImageOptions(cmd: Command): Command {
  return cmd
    .option('--memory <size>', 'guest memory size (B, KiB, MiB, GiB)', SOURCE_DEFAULTS.memory)
    .option('--page-size <size>', 'guest page size: 4KiB or 2MiB', SOURCE_DEFAULTS.pageSize)
    .option('--seed <n>', 'seed of the page-content generator and the workload', SOURCE_DEFAULTS.seed)
    .option('--zero-fraction <f>', 'share of guest pages that are all zero (sent as zero-page notices)', SOURCE_DEFAULTS.zeroFraction);
}

/** The source's warm-up (warm-up.ts): on the source's command and on `npm start`'s. */
export function addWarmUpOption(cmd: Command): Command {
  return cmd.option(
    '--warm-up-requests <n>',
    "before the source listens, it answers this many requests for a scratch image from a client of its own on loopback (two rounds: a quarter, then the rest), so that V8 has compiled its request path before the run is measured (0 = none)",
    SOURCE_DEFAULTS.warmUpRequests,
  );
}

export function sourceCommand(): Command {
  const cmd = new Command('source')
    .description('postcopy source host: owns the guest image, answers page requests, pushes the rest')
    .option('--host <addr>', 'address to listen on', SOURCE_DEFAULTS.host)
    .option('--port <n>', 'port to listen on (0 = any free port)', SOURCE_DEFAULTS.port)
    .option('--handshake-timeout-ms <ms>', 'drop a peer that has not sent a valid hello within this time', SOURCE_DEFAULTS.handshakeTimeoutMs)
    .addOption(new Option('--token <token>', 'access token the destination must present (default: $POSTCOPY_TOKEN, else a generated one, printed once)'))
    .option('--resume', 'continue a migration whose source process died: wait for the destination to resume it (start with the same image options)', SOURCE_DEFAULTS.resume)
    .option('--resume-timeout-ms <ms>', 'how long a paused migration waits for the destination to resume before the source gives up (exit 1)', SOURCE_DEFAULTS.resumeTimeoutMs)
    .option('--max-connections <n>', 'connections open at once at most; one more is refused (ERR_POSTCOPY_BUSY) and the source keeps serving', SOURCE_DEFAULTS.maxConnections)
    .option('--secret-file <path>', "write the migration's secret here (owner-only); with --resume, read the secret of the migration to resume from it")
    .option('--keepalive-ms <ms>', 'ping the destination; cut its main channel (a pause) when it says nothing for this long, as a dead link sends no reset (0 = never)', SOURCE_DEFAULTS.keepaliveMs);
  addWarmUpOption(cmd);
  addTlsOptions(cmd);
  cmd.addOption(new Option('--unsafe-unbound-channels', "testing only: admit fault channels that do not present the migration's secret (shows what an outsider with the token does to a migration)").default(false));
  addPrecopyOptions(cmd);
  addDeviceOptions(cmd);
  addLinkOptions(cmd);
  return addImageOptions(cmd);
}

/** The source's TLS options (the destination takes the same three, seen from its side). */
function addTlsOptions(cmd: Command): Command {
  return cmd
    .option('--tls-cert <file>', 'listen on wss:// with this certificate (PEM); needs --tls-key')
    .option('--tls-key <file>', "the certificate's private key (PEM)")
    .option('--tls-ca <file>', 'CA certificates (PEM) that client certificates must be signed by (with --tls-verify-peer)')
    .option('--tls-verify-peer', "require a client certificate signed by --tls-ca (QEMU's verify-peer)", SOURCE_DEFAULTS.tlsVerifyPeer);
}

/** A flag's value: commander gives a boolean; anything else is a caller's mistake, said as a usage error. */
function parseBooleanOption(option: string, value: unknown): boolean {
  if (typeof value !== 'boolean') throw new UsageError(`${option}: expected a flag (true or false), got ${describe(value)}`);
  return value;
}

export function parseImageOptions(raw: Record<string, string>): { layout: GuestLayout; image: ImageSpec } {
  const layout = makeLayout(parseSize('--memory', raw.memory!), parseSize('--page-size', raw.pageSize!));
  const image = { seed: parseIntOption('--seed', raw.seed!, 0, 0xffffffff), zeroFraction: parseFraction('--zero-fraction', raw.zeroFraction!) };
  return { layout, image };
}

export function parseSourceOptions(raw: Record<string, string>): SourceOptions {
  const image = parseImageOptions(raw);
  const precopy = parsePrecopyOptions(raw, image.layout);
  if ((raw.resume as unknown) === true && precopy.mode !== 'postcopy') {
    throw new UsageError(
      `--resume: expected --mode postcopy with it (a restarted source rebuilds the guest from the seed and cannot know what the guest wrote during precopy), got --mode ${precopy.mode}`,
    );
  }
  const link = parseLinkOptions(raw);
  const avail = (precopy.controller.precopy?.availSwitchoverBytesPerSec ?? 0) * 8;
  const devices = parseDeviceOptions(raw, {
    layout: image.layout,
    mode: precopy.mode,
    downtimeLimitMs: precopy.controller.precopy?.downtimeLimitMs ?? 300,
    bandwidthBps: avail > 0 ? avail : link.bandwidthBps,
  });
  return {
    ...image,
    precopy,
    devices,
    host: parseHost('--host', raw.host!),
    port: parseIntOption('--port', raw.port!, 0, 65535),
    token: raw.token,
    handshakeTimeoutMs: parseIntOption('--handshake-timeout-ms', raw.handshakeTimeoutMs!, 10, 3_600_000),
    link,
    maxPushBps: parseMaxPushBps(raw),
    // A flag: commander gives a boolean, whatever the record's type says.
    resume: parseBooleanOption('--resume', (raw.resume as unknown) ?? SOURCE_DEFAULTS.resume),
    resumeTimeoutMs: parseIntOption('--resume-timeout-ms', String(raw.resumeTimeoutMs ?? SOURCE_DEFAULTS.resumeTimeoutMs), 10, 3_600_000),
    maxConnections: parseIntOption('--max-connections', String(raw.maxConnections ?? SOURCE_DEFAULTS.maxConnections), 1, 65_536),
    keepaliveMs: parseIntOption('--keepalive-ms', String(raw.keepaliveMs ?? SOURCE_DEFAULTS.keepaliveMs), 0, 3_600_000),
    warmUpRequests: parseIntOption('--warm-up-requests', String(raw.warmUpRequests ?? SOURCE_DEFAULTS.warmUpRequests), 0, 1 << 20),
    ...parseSourceTls(raw),
    secretFile: parseSecretFile(raw),
    unsafeUnboundChannels: (raw.unsafeUnboundChannels as unknown) === true,
  };
}

function parseSecretFile(raw: Record<string, string>): string | undefined {
  const file = raw.secretFile;
  if ((raw.resume as unknown) === true && file === undefined) {
    throw new UsageError(
      "--resume: expected --secret-file with it (the file the source that died wrote its migration's secret to): without the secret, a resumed migration could be taken over by anyone with the token",
    );
  }
  return file;
}

/** The source's TLS options: cert and key make it a wss:// source; --tls-verify-peer needs --tls-ca. */
function parseSourceTls(raw: Record<string, string>): { tls: ListenerTls | undefined; tlsWarnings: string[] } {
  const verifyPeer = parseBooleanOption('--tls-verify-peer', (raw.tlsVerifyPeer as unknown) ?? SOURCE_DEFAULTS.tlsVerifyPeer);
  const { material, warnings } = loadTlsFiles({ cert: raw.tlsCert, key: raw.tlsKey, ca: raw.tlsCa });
  if (material.cert === undefined || material.key === undefined) {
    if (verifyPeer || material.ca !== undefined) {
      throw new UsageError(`${verifyPeer ? '--tls-verify-peer' : '--tls-ca'}: expected --tls-cert and --tls-key with it (TLS needs the source's own certificate), got neither`);
    }
    return { tls: undefined, tlsWarnings: [] };
  }
  if (verifyPeer && material.ca === undefined) {
    throw new UsageError('--tls-verify-peer: expected --tls-ca with it (the CA that client certificates must be signed by), got none');
  }
  return { tls: { cert: material.cert, key: material.key, ...(material.ca !== undefined ? { ca: material.ca } : {}), verifyPeer }, tlsWarnings: warnings };
}
