/**
 * The source's options for the phases before postcopy (issue 10): the mode,
 * the guest that runs on the source during precopy, and precopy's decisions.
 * `npm start` takes the same options and hands them to the source.
 */
import { Command, Option } from 'commander';
import { MIGRATION_MODES, UsageError, formatBytes, parseChoice, parseIntOption, parseSize, type GuestLayout, type MigrationMode } from '@postcopy/shared';
import type { ControllerOptions } from './controller.js';
import { PRECOPY_DEFAULTS, SOURCE_GUEST_DEFAULTS } from './defaults.js';
import { parseBandwidth } from './link.js';

export const PRECOPY_OPTION_DEFAULTS = {
  mode: 'postcopy' as MigrationMode,
  sourceVcpus: String(SOURCE_GUEST_DEFAULTS.vcpus),
  dirtyRate: String(SOURCE_GUEST_DEFAULTS.dirtyRate),
  downtimeLimit: String(PRECOPY_DEFAULTS.downtimeLimitMs),
  availSwitchoverBandwidth: '0',
  maxPrecopyRounds: String(PRECOPY_DEFAULTS.maxRounds),
  autoConverge: false,
} as const;

/** The flags, as camelCase option keys, that these options use. */
export const PRECOPY_FLAGS = [
  'mode',
  'sourceVcpus',
  'dirtyRate',
  'dirtySet',
  'downtimeLimit',
  'availSwitchoverBandwidth',
  'maxPrecopyRounds',
  'autoConverge',
  'postcopyAfterRounds',
  'controlPort',
  'unsafeLoseDirtyBits',
] as const;

export function addPrecopyOptions(cmd: Command): Command {
  return cmd
    .addOption(
      new Option('--mode <mode>', 'postcopy (the guest starts on the destination), precopy (rounds, then stop-and-copy), hybrid (rounds, then the switch to postcopy)')
        .choices(MIGRATION_MODES)
        .default(PRECOPY_OPTION_DEFAULTS.mode),
    )
    .option('--source-vcpus <n>', 'vCPU threads that run the guest on the source during precopy and change its memory (npm start: default --vcpus)')
    .option('--dirty-rate <pages>', 'pages per second each source vCPU writes (0 = as fast as it can)', PRECOPY_OPTION_DEFAULTS.dirtyRate)
    .option('--dirty-set <size>', 'the hot memory the source vCPUs write, from the start of the guest (default: all of it)')
    .option('--downtime-limit <ms>', "precopy stops and copies once what is still dirty can go in this long (QEMU's downtime-limit)", PRECOPY_OPTION_DEFAULTS.downtimeLimit)
    .option('--avail-switchover-bandwidth <rate>', 'the bandwidth the switchover decision assumes instead of the one measured, e.g. 1gbit (0 = measured)', PRECOPY_OPTION_DEFAULTS.availSwitchoverBandwidth)
    .option('--max-precopy-rounds <n>', 'a precopy that has not converged after this many rounds fails (unless --auto-converge)', PRECOPY_OPTION_DEFAULTS.maxPrecopyRounds)
    .option('--auto-converge', "throttle the source vCPUs in steps (20 %, then 10 % more) until precopy converges (QEMU's auto-converge)", PRECOPY_OPTION_DEFAULTS.autoConverge)
    .option('--postcopy-after-rounds <n>', `hybrid: switch to postcopy after this many precopy rounds (default ${PRECOPY_DEFAULTS.postcopyAfterRounds}; or POST /migrate-start-postcopy at any time)`)
    .option('--control-port <port>', "serve GET /status and POST /migrate-start-postcopy on 127.0.0.1:PORT (0 = any free port, printed as 'control URL')")
    .addOption(new Option('--unsafe-lose-dirty-bits <n>', 'testing only: the dirty log forgets every Nth dirty bit at a sync (the content check must catch it)'));
}

export interface PrecopyCliOptions {
  mode: MigrationMode;
  controller: Pick<ControllerOptions, 'precopy' | 'guest' | 'loseDirtyBitsEvery'>;
  controlPort: number | undefined;
}

/** Parses and checks them against each other and the guest (throws UsageError). */
export function parsePrecopyOptions(raw: Record<string, unknown>, layout: GuestLayout): PrecopyCliOptions {
  const str = (k: string): string => String(raw[k]);
  const mode = parseChoice('--mode', String(raw.mode ?? PRECOPY_OPTION_DEFAULTS.mode), MIGRATION_MODES);
  const precopyMode = mode !== 'postcopy';
  const vcpus = parseIntOption('--source-vcpus', String(raw.sourceVcpus ?? PRECOPY_OPTION_DEFAULTS.sourceVcpus), precopyMode ? 1 : 0, 256);
  const dirtyRate = parseIntOption('--dirty-rate', String(raw.dirtyRate ?? PRECOPY_OPTION_DEFAULTS.dirtyRate), 0, 100_000_000);
  let dirtySetPages = layout.totalPages;
  if (raw.dirtySet !== undefined) {
    const bytes = parseSize('--dirty-set', str('dirtySet'));
    if (bytes < layout.pageSize || bytes > layout.guestBytes) {
      throw new UsageError(`--dirty-set: expected a size from one page (${formatBytes(layout.pageSize)}) to the guest's ${formatBytes(layout.guestBytes)}, got ${formatBytes(bytes)}`);
    }
    dirtySetPages = Math.floor(bytes / layout.pageSize);
  }
  const downtimeLimitMs = parseIntOption('--downtime-limit', String(raw.downtimeLimit ?? PRECOPY_OPTION_DEFAULTS.downtimeLimit), 1, 3_600_000);
  const bandwidthBps = parseBandwidth(String(raw.availSwitchoverBandwidth ?? PRECOPY_OPTION_DEFAULTS.availSwitchoverBandwidth));
  if (bandwidthBps === undefined) {
    throw new UsageError(`--avail-switchover-bandwidth: expected a rate such as 1gbit, 500mbit or 0 (measured), got ${JSON.stringify(raw.availSwitchoverBandwidth)}`);
  }
  const maxRounds = parseIntOption('--max-precopy-rounds', String(raw.maxPrecopyRounds ?? PRECOPY_OPTION_DEFAULTS.maxPrecopyRounds), 1, 100_000);
  if (raw.postcopyAfterRounds !== undefined && mode !== 'hybrid') {
    throw new UsageError(`--postcopy-after-rounds: expected it with --mode hybrid (the only mode that switches to postcopy after precopy), got --mode ${mode}`);
  }
  const postcopyAfterRounds = raw.postcopyAfterRounds === undefined ? PRECOPY_DEFAULTS.postcopyAfterRounds : parseIntOption('--postcopy-after-rounds', str('postcopyAfterRounds'), 1, 100_000);
  const autoConverge = raw.autoConverge === true;
  if (autoConverge && !precopyMode) throw new UsageError(`--auto-converge: expected it with --mode precopy or hybrid (it throttles the guest during precopy), got --mode ${mode}`);
  const controlPort = raw.controlPort === undefined ? undefined : parseIntOption('--control-port', str('controlPort'), 0, 65535);
  const lose = raw.unsafeLoseDirtyBits === undefined ? 0 : parseIntOption('--unsafe-lose-dirty-bits', str('unsafeLoseDirtyBits'), 1, 1_000_000_000);
  return {
    mode,
    controller: {
      guest: { vcpus, dirtyRate, dirtySetPages },
      precopy: { downtimeLimitMs, availSwitchoverBytesPerSec: bandwidthBps / 8, maxRounds, autoConverge, postcopyAfterRounds },
      loseDirtyBitsEvery: lose,
    },
    controlPort,
  };
}
