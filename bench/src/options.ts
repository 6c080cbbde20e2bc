import { Command } from 'commander';
import { formatBytes, parseIntOption, parseSize } from '@postcopy/shared';
import { addBackendsOption, parseBackendsOptions, type BackendsOptions } from './backends.js';

/** Option defaults in one literal (the `ws` convention). */
export const BENCH_DEFAULTS = {
  memory: '256MiB',
  repeat: '2',
  floorRequests: '20000',
  bulkMib: '256',
  largeMemory: '4GiB',
  largeVcpus: '32',
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
  /** Where to write the results as JSON, if anywhere. */
  json: string | undefined;
  /** The memory-backends section (backends.ts). */
  backends: BackendsOptions;
}

export function benchCommand(): Command {
  return addBackendsOption(benchCommandWithoutBackends());
}

function benchCommandWithoutBackends(): Command {
  return new Command('postcopy-bench')
    .description(
      'Measures the floor (raw WebSocket round trip of a 4 KiB page and raw bulk throughput between two Node processes) ' +
        'and the tool against it (fault latency per strategy, urgent faults under push, push throughput), and postcopy recovery (no target), on this machine, in one run. ' +
        'Prints every figure, the ratios and their targets (met or MISSED); exits 0 unless something errored.',
    )
    .option('--memory <size>', 'guest memory of each migration run (B, KiB, MiB, GiB)', BENCH_DEFAULTS.memory)
    .option('--repeat <n>', 'runs of each measurement; the median is reported', BENCH_DEFAULTS.repeat)
    .option('--floor-requests <n>', 'timed round trips of the floor (a warm-up of a tenth, 100 to 2000, comes first)', BENCH_DEFAULTS.floorRequests)
    .option('--bulk-mib <n>', 'MiB streamed for the raw bulk throughput', BENCH_DEFAULTS.bulkMib)
    .option('--large-memory <size>', 'guest of the one large run that measures both hosts\' peak RSS', BENCH_DEFAULTS.largeMemory)
    .option('--large-vcpus <n>', 'vCPUs of the large run', BENCH_DEFAULTS.largeVcpus)
    .option('--json <path>', 'also write the results as JSON to this file')
    .addHelpText('after', '\nA tiny run of the whole code path: --memory 4MiB --repeat 1 --floor-requests 200 --bulk-mib 4 --large-memory 16MiB --large-vcpus 2');
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
    json: typeof raw.json === 'string' ? raw.json : undefined,
    backends: parseBackendsOptions(raw),
  };
}

export function describeOptions(o: BenchOptions): string {
  return `guest ${formatBytes(o.memoryBytes)}, repeat ${o.repeat} (medians), floor ${o.floorRequests} round trips after ${o.floorWarmup} warm-up, bulk ${o.bulkMiB} MiB, large guest ${formatBytes(o.largeMemoryBytes)} with ${o.largeVcpus} vCPUs`;
}
