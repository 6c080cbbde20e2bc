import { Command, Option } from 'commander';
import {
  MEMORY_BACKENDS,
  STRATEGIES,
  WORKLOADS,
  UsageError,
  loadTlsFiles,
  makeLayout,
  parseHost,
  parseChoice,
  parseFraction,
  parseIntOption,
  parseSize,
  readMdevCatalog,
  type MemoryBackendName,
  type StrategyName,
  type WorkloadName,
} from '@postcopy/shared';
import type { DestinationOptions } from './destination.js';
import type { ClientTls } from './net/page-client.js';
import { FAULT_CHANNEL_CHOICES } from './workers/protocol.js';
import { checkTracePath } from './trace/trace-path.js';

/** Option defaults in one literal. */
export const DEST_DEFAULTS = {
  memory: '64MiB',
  pageSize: '4KiB',
  memslotSize: '1GiB',
  strategy: 'shared-uffd' as StrategyName,
  memoryBackend: 'emulated' as MemoryBackendName,
  vcpus: '4',
  readers: '1',
  ioThreads: '0',
  ioAccesses: '256',
  workload: 'sequential' as WorkloadName,
  accesses: '0',
  writeFraction: '0.5',
  seed: '1',
  watchdogMs: '5000',
  connectTimeoutMs: '10000',
  reconnectTimeoutMs: '30000',
  keepaliveMs: '10000',
  pushNice: '10',
  host: '127.0.0.1',
  warmUpPages: '1024',
} as const;

/** Options of the run (the destination's, and the launcher's too). */
export function addRunOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option('--strategy <name>', 'fault-delivery strategy').choices(STRATEGIES).default(DEST_DEFAULTS.strategy))
    .addOption(
      new Option(
        '--memory-backend <name>',
        "what guest memory and the userfaultfd are: emulated (SharedArrayBuffers and the emulated userfaultfd, anywhere) or uffd (anonymous memory and the kernel's userfaultfd(2): Linux, the addon built by npm run build, and permission to open one)",
      )
        .choices(MEMORY_BACKENDS)
        .default(DEST_DEFAULTS.memoryBackend),
    )
    .option('--vcpus <n>', 'vCPU threads', DEST_DEFAULTS.vcpus)
    .option('--readers <n>', 'reader threads of the shared context (shared-uffd)', DEST_DEFAULTS.readers)
    .option('--io-threads <n>', 'non-vCPU threads that also touch guest memory (always fault through the userfaultfd)', DEST_DEFAULTS.ioThreads)
    .option('--io-accesses <n>', 'accesses each I/O thread makes (random pages)', DEST_DEFAULTS.ioAccesses)
    .addOption(new Option('--workload <name>', 'what the vCPUs touch').choices(WORKLOADS).default(DEST_DEFAULTS.workload))
    .option('--accesses <n>', 'accesses per vCPU (0 = the workload default: its partition, or guest pages / vCPUs, or the hot set)', DEST_DEFAULTS.accesses)
    .option('--write-fraction <f>', 'share of accesses that are writes', DEST_DEFAULTS.writeFraction)
    .option('--memslot-size <size>', 'size of one memslot (a SharedArrayBuffer of at most 1GiB)', DEST_DEFAULTS.memslotSize)
    .option('--no-push', 'do not push pages in the background (the run ends when the workload ends)')
    .option('--no-push-channel', 'push on the main channel instead of a push channel of its own (a raw stream beside the WebSockets, over TLS for a wss:// source; never with an emulated link)')
    .addOption(
      new Option(
        '--fault-channel <kind>',
        "how kvm-exit vCPUs and per-thread-uffd resolvers fetch their page: blocking (its own socket read with blocking system calls, no event loop; the uffd addon built, and over wss:// a --tls-ca), event-loop (a WebSocket client on the thread's event loop: any source), or auto (blocking where it can be)",
      )
        .choices(FAULT_CHANNEL_CHOICES)
        .default('auto'),
    )
    .option(
      '--warm-up-pages <n>',
      "before the guest runs, each vCPU faults on this many pages of scratch memory (at most its share of the guest, and 64 MiB in all), resolved by the same strategy from a local peer, so that every thread's JavaScript fault path is compiled before the run is measured (0 = no warm-up: the run's first faults then pay V8's compiling)",
      DEST_DEFAULTS.warmUpPages,
    )
    .option('--preempt', "requested pages come back on their own channel, apart from pushed pages (QEMU's postcopy-preempt)")
    .option('--push-nice <n>', 'with --preempt, the nice value the main thread (then only pushed pages and control) runs at, above the guest threads, so that faults get the CPU first (0 = as the guest threads)', DEST_DEFAULTS.pushNice)
    .option('--watchdog-ms <ms>', 'stop the run when nothing progresses for this long while vCPUs are blocked', DEST_DEFAULTS.watchdogMs)
    .option('--connect-timeout-ms <ms>', 'give up on a source that does not complete the handshake within this time', DEST_DEFAULTS.connectTimeoutMs)
    .option('--reconnect-timeout-ms <ms>', 'after a lost connection, give up when the migration cannot be resumed within this time', DEST_DEFAULTS.reconnectTimeoutMs)
    .option('--keepalive-ms <ms>', 'ping the peer on the main channel; a silence this long counts as a lost connection, as a dead link sends no reset (0 = never; npm start gives it to both hosts)', DEST_DEFAULTS.keepaliveMs)
    .option(
      '--inject <faults>',
      'fault injection, separated by commas or +: drop@PAGES (the destination cuts all its connections once after PAGES pages are installed, then recovers; before a switchover from precopy this cancels the migration), drop-postcopy@PAGES (the same once PAGES pages came after the switchover: demand-fetched or pushed), kill-source@PAGES (npm start only: SIGKILL the source and restart it with --resume)',
    )
    .option('--json <path>', 'also write the report as JSON to this file')
    .option('--hgrm <path>', "also write the vCPU fault-latency distribution as HdrHistogram's .hgrm (µs)")
    .option(
      '--trace <path>',
      "write the run as a timeline in Chrome's trace-event JSON (opens in Perfetto and chrome://tracing): a track per vCPU and I/O thread with every fault as a slice, resolver and push tracks, counters, recovery pauses",
    )
    .option('--status-port <port>', 'serve GET /status (a JSON snapshot like query-migrate) on 127.0.0.1:PORT while the run goes (0 = any free port)')
    .addOption(new Option('--unsafe-skip-owed-wake', 'testing only: resolvers skip the WAKE they owe after EEXIST or a page installed elsewhere').default(false))
    .addOption(new Option('--unsafe-skip-discard', 'testing only: keep the pages the switch to postcopy discards (the content check must fail)').default(false));
}

export function destCommand(): Command {
  const cmd = new Command('dest')
    .description('postcopy destination host: runs the guest\'s vCPUs over empty memory and demand-fetches pages from the source')
    .requiredOption('--source <url>', 'source URL, as the source printed it (ws://HOST:PORT, or wss://HOST:PORT for a TLS source)')
    .option('--host <addr>', 'address the destination\'s own server (the --status-port one) binds', DEST_DEFAULTS.host)
    .addOption(new Option('--token <token>', 'access token (default: $POSTCOPY_TOKEN)'))
    .option('--memory <size>', 'guest memory size; must match the source', DEST_DEFAULTS.memory)
    .option('--page-size <size>', 'guest page size: 4KiB or 2MiB; must match the source', DEST_DEFAULTS.pageSize)
    .option('--seed <n>', 'seed of the workload', DEST_DEFAULTS.seed);
  cmd
    .option('--tls-ca <file>', "CA certificates (PEM) the source's certificate must be signed by (wss:// only; default: the system's CAs)")
    .option('--tls-cert <file>', 'client certificate (PEM), for a source that verifies peers (--tls-verify-peer); needs --tls-key')
    .option('--tls-key <file>', "the client certificate's private key (PEM)")
    .option('--tls-server-name <name>', "the name the source's certificate must hold, when it is not the host in --source");
  addMdevOptions(cmd);
  return addRunOptions(cmd);
}

/** The destination's mdev options (npm start gives --mdev-types to both hosts). */
export function addMdevOptions(cmd: Command): Command {
  return cmd
    .option('--mdev-types <file>', 'the mdev parents and types of this host, as JSON (default: a built-in GPU whose 1GiB of framebuffer is shared by mgpu-128M, -256M, -512M and -1G)')
    .option('--list-mdev-types', 'print the mdev_supported_types tree with the current available_instances, and exit (no --source needed)');
}

export type RunOptions = Omit<DestinationOptions, 'source' | 'token' | 'layout' | 'tls'>;

/** What `--inject` asks for: drops the destination makes, kills of the source the launcher makes (pages installed). */
export interface Injections {
  drops: number[];
  /** Drops counted in pages installed after the switchover (demand or push): postcopy after precopy. */
  postcopyDrops: number[];
  killSource: number[];
}

/**
 * Parses `--inject drop@2000,drop@6000,kill-source@3000` (throws UsageError).
 * `+` separates faults too, so that an experiment, where a comma list sweeps
 * an option, can put several faults in one run: `drop@100+drop@900`.
 */
export function parseInjections(value: unknown): Injections {
  const injections: Injections = { drops: [], postcopyDrops: [], killSource: [] };
  if (value === undefined) return injections;
  for (const item of String(value).split(/[,+]/)) {
    const m = /^(drop|drop-postcopy|kill-source)@(\d{1,10})$/.exec(item.trim());
    if (!m) {
      throw new UsageError(`--inject: expected drop@PAGES, drop-postcopy@PAGES or kill-source@PAGES (separated by commas or +), got ${JSON.stringify(item.trim())}`);
    }
    const pages = Number(m[2]);
    (m[1] === 'drop' ? injections.drops : m[1] === 'drop-postcopy' ? injections.postcopyDrops : injections.killSource).push(pages);
  }
  return injections;
}

/** Checks injections against the guest: a threshold at or past its page count could never go off. */
export function checkInjections(injections: Injections, totalPages: number): void {
  for (const [kind, list] of [['drop', injections.drops], ['drop-postcopy', injections.postcopyDrops], ['kill-source', injections.killSource]] as const) {
    for (const pages of list) {
      if (pages >= totalPages) throw new UsageError(`--inject: expected ${kind}@PAGES below the guest's ${totalPages} pages, got ${kind}@${pages}`);
    }
  }
}

/** Parses the run options shared by the destination and the launcher (throws UsageError). */
export function parseRunOptions(raw: Record<string, unknown>): RunOptions {
  const str = (k: string): string => String(raw[k]);
  const vcpus = parseIntOption('--vcpus', str('vcpus'), 1, 256);
  const ioThreads = parseIntOption('--io-threads', str('ioThreads'), 0, 64);
  return {
    memslotBytes: parseSize('--memslot-size', str('memslotSize')),
    strategy: parseChoice('--strategy', str('strategy'), STRATEGIES),
    memoryBackend: parseChoice('--memory-backend', String(raw.memoryBackend ?? DEST_DEFAULTS.memoryBackend), MEMORY_BACKENDS),
    vcpus,
    readers: parseIntOption('--readers', str('readers'), 1, 64),
    ioThreads,
    ioAccesses: parseIntOption('--io-accesses', str('ioAccesses'), 1),
    workload: parseChoice('--workload', str('workload'), WORKLOADS),
    accesses: parseIntOption('--accesses', str('accesses'), 0),
    writeFraction: parseFraction('--write-fraction', str('writeFraction')),
    seed: parseIntOption('--seed', str('seed'), 0, 0xffffffff),
    push: raw.push !== false,
    pushChannel: raw.pushChannel !== false,
    faultChannel: parseChoice('--fault-channel', String(raw.faultChannel ?? 'auto'), FAULT_CHANNEL_CHOICES),
    preempt: raw.preempt === true,
    warmUpPages: parseIntOption('--warm-up-pages', String(raw.warmUpPages ?? DEST_DEFAULTS.warmUpPages), 0, 1 << 20),
    pushNice: parseIntOption('--push-nice', String(raw.pushNice ?? DEST_DEFAULTS.pushNice), 0, 19),
    statusPort: raw.statusPort === undefined ? undefined : parseIntOption('--status-port', str('statusPort'), 0, 65535),
    watchdogMs: parseIntOption('--watchdog-ms', str('watchdogMs'), 100),
    connectTimeoutMs: parseIntOption('--connect-timeout-ms', str('connectTimeoutMs'), 100),
    reconnectTimeoutMs: parseIntOption('--reconnect-timeout-ms', str('reconnectTimeoutMs'), 100, 3_600_000),
    keepaliveMs: parseIntOption('--keepalive-ms', String(raw.keepaliveMs ?? DEST_DEFAULTS.keepaliveMs), 0, 3_600_000),
    injectDrops: parseInjections(raw.inject).drops,
    injectPostcopyDrops: parseInjections(raw.inject).postcopyDrops,
    skipOwedWake: raw.unsafeSkipOwedWake === true,
    skipDiscard: raw.unsafeSkipDiscard === true,
    trace: traceOption(raw.trace),
  };
}

/** `--trace PATH`: on when given, once the path is known to be writable (checked before anything starts). */
function traceOption(value: unknown): boolean {
  if (value === undefined) return false;
  checkTracePath(String(value));
  return true;
}

/** `--source`: a ws:// or wss:// URL (IPv6 hosts in brackets). */
export function parseSourceUrl(text: string): string {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new UsageError(`--source: expected a URL like ws://127.0.0.1:PORT or wss://HOST:PORT, got ${JSON.stringify(text)}`);
  }
  if (url.protocol !== 'ws:' && url.protocol !== 'wss:') {
    throw new UsageError(`--source: expected a ws:// or wss:// URL, got ${JSON.stringify(text)}`);
  }
  return text;
}

/** The destination's TLS options: they go with a wss:// source only. */
function parseClientTls(raw: Record<string, unknown>, source: string): { tls: ClientTls; warnings: string[] } | undefined {
  const opt = (k: string): string | undefined => (raw[k] === undefined ? undefined : String(raw[k]));
  const given = (['tlsCa', 'tlsCert', 'tlsKey', 'tlsServerName'] as const).filter((k) => raw[k] !== undefined);
  if (!source.startsWith('wss:')) {
    if (given.length > 0) {
      const flag = '--' + given[0]!.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase());
      throw new UsageError(`${flag}: expected a wss:// source with it (TLS options apply to TLS sources), got --source ${source}`);
    }
    return undefined;
  }
  const { material, warnings } = loadTlsFiles({ ca: opt('tlsCa'), cert: opt('tlsCert'), key: opt('tlsKey') });
  const serverName = opt('tlsServerName');
  if (serverName !== undefined && !/^[A-Za-z0-9.-]{1,253}$/.test(serverName)) {
    throw new UsageError(`--tls-server-name: expected a host name such as source.example, got ${JSON.stringify(serverName)}`);
  }
  return { tls: { ...material, ...(serverName !== undefined ? { serverName } : {}) }, warnings };
}

export function parseDestOptions(
  raw: Record<string, unknown>,
): DestinationOptions & { json: string | undefined; hgrm: string | undefined; tracePath: string | undefined; tlsWarnings: string[] } {
  const token = (raw.token as string | undefined) ?? process.env.POSTCOPY_TOKEN;
  if (!token) throw new UsageError('--token: expected an access token (or $POSTCOPY_TOKEN), got none');
  const layout = makeLayout(parseSize('--memory', String(raw.memory)), parseSize('--page-size', String(raw.pageSize)));
  const run = parseRunOptions(raw);
  const injections = parseInjections(raw.inject);
  if (injections.killSource.length > 0) {
    throw new UsageError('--inject: kill-source@PAGES is done by the launcher (npm start), which can restart the source; the destination takes drop@PAGES only');
  }
  checkInjections(injections, layout.totalPages);
  const source = parseSourceUrl(String(raw.source));
  const tls = parseClientTls(raw, source);
  return {
    ...run,
    source,
    token,
    layout,
    ...(tls ? { tls: tls.tls, tlsWarnings: tls.warnings } : { tlsWarnings: [] }),
    statusHost: parseHost('--host', String(raw.host)),
    ...(raw.mdevTypes !== undefined ? { mdevCatalog: readMdevCatalog(String(raw.mdevTypes)) } : {}),
    json: raw.json as string | undefined,
    hgrm: raw.hgrm as string | undefined,
    tracePath: raw.trace as string | undefined,
  };
}
