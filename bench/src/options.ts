import { Command } from 'commander';
import { UsageError, formatBytes, parseChoice, parseIntOption, parseSize } from '@postcopy/shared';
import { addBackendsOption, parseBackendsOptions, type BackendsOptions } from './backends.js';
import type { RunWarmUp } from './migrations.js';

/** Option defaults in one literal (the `ws` convention). */
export const BENCH_DEFAULTS = {
  memory: '256MiB',
  // Three: a median of two is their mean, and one bad run on a shared VM moved a ratio 2x (kvm-exit p50 105.9 and 366.8 µs).
  repeat: '3',
  floorRequests: '20000',
  bulkMib: '256',
  largeMemory: '4GiB',
  largeVcpus: '32',
  throughputVcpus: '8,16',
  mibPerVcpu: '16',
  netMib: '1024',
  pushMemory: '1GiB',
} as const;

export interface BenchOptions {
  /** Guest size of every migration run, in bytes. */
  memoryBytes: number;
  /** Times each measurement runs; the median is reported. */
  repeat: number;
  /** Timed request/reply round trips of the floor (after the warm-up). */
  floorRequests: number;
  /** Round trips before timing starts (JIT, socket buffers, allocator). */
  floorWarmup: number;
  /** MiB the floor server streams for the raw bulk throughput. */
  bulkMiB: number;
  /** Guest of the one large run that measures peak RSS of both hosts. */
  largeMemoryBytes: number;
  largeVcpus: number;
  /** vCPU counts of the demand-paging-rate runs (tool and native floor). */
  throughputVcpus: number[];
  /** Each vCPU's partition in the throughput runs, MiB. */
  mibPerVcpu: number;
  /** MiB the net ceiling streams. */
  netMiB: number;
  /** Guest of the idle push run (one vCPU) and its TLS twin, in bytes. */
  pushMemoryBytes: number;
  /** Where to write the results as JSON, if anywhere. */
  json: string | undefined;
  /** The memory-backends section (backends.ts). */
  backends: BackendsOptions;
  /** The devices section (devices.ts). */
  deviceSection: boolean;
  /** The warm-ups every migration run asks for (the tool's defaults where absent). */
  warmUp: RunWarmUp;
}

/**
 * The two hosts' warm-ups of the bench's runs, on each of its commands:
 * by default the tool's own, what a user's run gets; smaller makes a quick
 * bench (its test) quicker.
 */
export function addWarmUpOptions(cmd: Command): Command {
  return cmd
    .option('--warm-up-pages <n>', "each run's destination warm-up, pages a vCPU (npm start's --warm-up-pages; default: the tool's)")
    .option('--warm-up-requests <n>', "each run's source warm-up, requests (npm start's --warm-up-requests; default: the tool's)");
}

export function parseWarmUpOptions(raw: Record<string, unknown>): RunWarmUp {
  return {
    ...(raw.warmUpPages !== undefined ? { pages: parseIntOption('--warm-up-pages', String(raw.warmUpPages), 0, 1 << 20) } : {}),
    ...(raw.warmUpRequests !== undefined ? { requests: parseIntOption('--warm-up-requests', String(raw.warmUpRequests), 0, 1 << 20) } : {}),
  };
}

/** The whole code path in seconds (the bench's own test runs this). */
export const TINY_ARGS = [
  '--memory', '4MiB', '--repeat', '1', '--floor-requests', '200', '--bulk-mib', '4', '--large-memory', '16MiB', '--large-vcpus', '2',
  '--throughput-vcpus', '2', '--mib-per-vcpu', '1', '--net-mib', '4', '--push-memory', '4MiB', '--warm-up-pages', '64', '--warm-up-requests', '64',
] as const;

export function benchCommand(): Command {
  return addWarmUpOptions(addBackendsOption(benchCommandWithoutBackends()));
}

function benchCommandWithoutBackends(): Command {
  return new Command('postcopy-bench')
    .description(
      'Measures the floors (raw WebSocket round trip of a 4 KiB page and raw bulk throughput between two Node processes; the native fault floor in C on the real userfaultfd; ' +
        "the ceiling of Node's own sockets) and the tool against them (fault latency per strategy, demand paging rates with many vCPUs and their ranking, urgent faults under push, " +
        'push throughput idle and with many faulting vCPUs, a large guest, TLS against plain), postcopy recovery (no target), precopy, hybrid and postcopy of the same guest, ' +
        'and each strategy on each memory backend, on this machine, in one run. ' +
        'Prints every figure, the ratios and their targets (met or MISSED); exits 0 unless something errored.',
    )
    .option('--memory <size>', 'guest memory of the latency, urgent, TLS fault and recovery runs (B, KiB, MiB, GiB)', BENCH_DEFAULTS.memory)
    .option('--repeat <n>', 'runs of each measurement; the median is reported', BENCH_DEFAULTS.repeat)
    .option('--floor-requests <n>', 'timed round trips of the floor (a warm-up of a tenth, 100 to 2000, comes first)', BENCH_DEFAULTS.floorRequests)
    .option('--bulk-mib <n>', 'MiB streamed for the raw bulk throughput', BENCH_DEFAULTS.bulkMib)
    .option('--large-memory <size>', 'guest of the one large run that measures both hosts\' peak RSS', BENCH_DEFAULTS.largeMemory)
    .option('--large-vcpus <n>', 'vCPUs of the large run', BENCH_DEFAULTS.largeVcpus)
    .option('--throughput-vcpus <list>', 'vCPU counts of the demand paging rate runs, tool and native floor (comma list)', BENCH_DEFAULTS.throughputVcpus)
    .option('--mib-per-vcpu <n>', 'MiB each vCPU touches in the demand paging rate runs', BENCH_DEFAULTS.mibPerVcpu)
    .option('--net-mib <n>', "MiB the net ceiling streams (Node's net into a SharedArrayBuffer)", BENCH_DEFAULTS.netMib)
    .option('--push-memory <size>', 'guest of the idle push run (one vCPU touching one page)', BENCH_DEFAULTS.pushMemory)
    .option('--json <path>', 'also write the results as JSON to this file')
    .option('--device-section <on|off>', 'the devices section: the same guest and device with tracking=device, tracking=iommu, all-dirty and skip-precopy (devices.ts)', 'on')
    .addHelpText('after', `\nA tiny run of the whole code path: ${TINY_ARGS.join(' ')}`);
}

/** Validates the raw options (throws UsageError naming the option). */
export function parseBenchOptions(raw: Record<string, unknown>): BenchOptions {
  const memoryBytes = parseSize('--memory', String(raw.memory));
  // The guest layout itself (page multiple, memslots) is validated by the runs' own option parsing.
  const floorRequests = parseIntOption('--floor-requests', String(raw.floorRequests), 1, 100_000_000);
  return {
    memoryBytes,
    repeat: parseIntOption('--repeat', String(raw.repeat), 1, 1000),
    floorRequests,
    floorWarmup: Math.min(2000, Math.max(100, Math.floor(floorRequests / 10))),
    bulkMiB: parseIntOption('--bulk-mib', String(raw.bulkMib), 1, 1_048_576),
    largeMemoryBytes: parseSize('--large-memory', String(raw.largeMemory)),
    largeVcpus: parseIntOption('--large-vcpus', String(raw.largeVcpus), 1, 256),
    throughputVcpus: parseVcpuList(String(raw.throughputVcpus)),
    mibPerVcpu: parseIntOption('--mib-per-vcpu', String(raw.mibPerVcpu), 1, 65536),
    netMiB: parseIntOption('--net-mib', String(raw.netMib), 1, 1_048_576),
    pushMemoryBytes: parseSize('--push-memory', String(raw.pushMemory)),
    json: typeof raw.json === 'string' ? raw.json : undefined,
    backends: parseBackendsOptions(raw),
    deviceSection: parseChoice('--device-section', String(raw.deviceSection ?? 'on'), ['on', 'off'] as const) === 'on',
    warmUp: parseWarmUpOptions(raw),
  };
}

/** `--throughput-vcpus 8,16`: distinct vCPU counts from 1 to 256, in the order given. */
export function parseVcpuList(text: string): number[] {
  const items = text.split(',').map((t) => t.trim());
  const list = items.map((t) => parseIntOption('--throughput-vcpus', t, 1, 256));
  if (new Set(list).size !== list.length) throw new UsageError(`--throughput-vcpus: expected distinct vCPU counts, got ${JSON.stringify(text)}`);
  return list;
}

export function describeOptions(o: BenchOptions): string {
  return (
    `guest ${formatBytes(o.memoryBytes)}, repeat ${o.repeat} (medians), floor ${o.floorRequests} round trips after ${o.floorWarmup} warm-up, bulk ${o.bulkMiB} MiB, ` +
    `net ceiling ${o.netMiB} MiB, idle push guest ${formatBytes(o.pushMemoryBytes)}, demand paging rate at ${o.throughputVcpus.join(', ')} vCPUs x ${o.mibPerVcpu} MiB, ` +
    `large guest ${formatBytes(o.largeMemoryBytes)} with ${o.largeVcpus} vCPUs`
  );
}
