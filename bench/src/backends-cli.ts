#!/usr/bin/env node
/**
 * The bench's memory-backends section on its own:
 *
 *   node bench/dist/backends-cli.js --memory 64MiB --repeat 2 --json backends.json
 *
 * Every strategy on both memory backends (real two-process migrations),
 * the ratio emulated / uffd of each figure, and each backend's local floor;
 * `npm run bench` runs the same section among its other measurements.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { Command } from 'commander';
import { exitOnUsageError, formatBytes, parseIntOption, parseSize, runCli } from '@postcopy/shared';
import { addBackendsOption, BackendsBench, formatBackends, parseBackendsOptions } from './backends.js';
import { addWarmUpOptions, parseWarmUpOptions } from './options.js';
import { runSteps } from './steps.js';

async function main(): Promise<number> {
  const cmd = addWarmUpOptions(addBackendsOption(
    new Command('postcopy-bench-backends')
      .description("Runs every strategy on both memory backends (emulated, and uffd: the kernel's userfaultfd), prints the figures and the ratio emulated / uffd, and each backend's local floor.")
      .option('--memory <size>', 'guest memory of each migration run', '64MiB')
      .option('--repeat <n>', 'runs of each measurement (interleaved); the median is reported', '1')
      .option('--json <path>', 'also write the results as JSON to this file'),
  )).exitOverride(exitOnUsageError);
  cmd.parse(process.argv);
  const raw = cmd.opts<Record<string, unknown>>();
  const memoryBytes = parseSize('--memory', String(raw.memory));
  const repeat = parseIntOption('--repeat', String(raw.repeat), 1, 1000);
  const json = typeof raw.json === 'string' ? resolve(raw.json) : undefined;
  const bench = new BackendsBench(parseBackendsOptions(raw), memoryBytes, parseWarmUpOptions(raw));
  process.stderr.write(`bench-backends: guest ${formatBytes(memoryBytes)}, repeat ${repeat}\n`);
  if (bench.note) process.stderr.write(`bench-backends: ${bench.note}\n`);
  const steps = Array.from({ length: repeat }, () => bench.steps()).flat();
  await runSteps(steps, (line) => process.stderr.write(`bench-backends: ${line}\n`));
  const result = bench.result();
  process.stdout.write(formatBackends(result) + '\n');
  if (json !== undefined) {
    mkdirSync(dirname(json), { recursive: true });
    writeFileSync(json, JSON.stringify({ bench: 'postcopy-backends', date: new Date().toISOString(), memoryBytes, repeat, ...result }, null, 2) + '\n');
    process.stdout.write(`results written to ${json}\n`);
  }
  return 0;
}

runCli('bench-backends', main);
