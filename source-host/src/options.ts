import { Command, Option } from 'commander';
import { UsageError, describe, makeLayout, parseFraction, parseIntOption, parseSize, type GuestLayout, type ImageSpec } from '@postcopy/shared';
import { parseBandwidth, type LinkSpec } from './link.js';
import { SERVER_DEFAULTS } from './server.js';

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

export function sourceCommand(): Command {
  const cmd = new Command('source')
    .description('postcopy source host: owns the guest image, answers page requests, pushes the rest')
    .option('--host <addr>', 'address to listen on', SOURCE_DEFAULTS.host)
    .option('--port <n>', 'port to listen on (0 = any free port)', SOURCE_DEFAULTS.port)
    .option('--handshake-timeout-ms <ms>', 'drop a peer that has not sent a valid hello within this time', SOURCE_DEFAULTS.handshakeTimeoutMs)
    .addOption(new Option('--token <token>', 'access token the destination must present (default: $POSTCOPY_TOKEN, else a generated one, printed once)'))
    .option('--resume', 'continue a migration whose source process died: wait for the destination to resume it (start with the same image options)', SOURCE_DEFAULTS.resume)
    .option('--resume-timeout-ms <ms>', 'how long a paused migration waits for the destination to resume before the source gives up (exit 1)', SOURCE_DEFAULTS.resumeTimeoutMs)
    .option('--max-connections <n>', 'connections open at once at most; one more is refused (ERR_POSTCOPY_BUSY) and the source keeps serving', SOURCE_DEFAULTS.maxConnections);
  addLinkOptions(cmd);
  return addImageOptions(cmd);
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
  return {
    ...parseImageOptions(raw),
    host: raw.host!,
    port: parseIntOption('--port', raw.port!, 0, 65535),
    token: raw.token,
    handshakeTimeoutMs: parseIntOption('--handshake-timeout-ms', raw.handshakeTimeoutMs!, 10, 3_600_000),
    link: parseLinkOptions(raw),
    maxPushBps: parseMaxPushBps(raw),
    // A flag: commander gives a boolean, whatever the record's type says.
    resume: parseBooleanOption('--resume', (raw.resume as unknown) ?? SOURCE_DEFAULTS.resume),
    resumeTimeoutMs: parseIntOption('--resume-timeout-ms', String(raw.resumeTimeoutMs ?? SOURCE_DEFAULTS.resumeTimeoutMs), 10, 3_600_000),
    maxConnections: parseIntOption('--max-connections', String(raw.maxConnections ?? SOURCE_DEFAULTS.maxConnections), 1, 65_536),
  };
}
