#!/usr/bin/env node
/**
 * The bench's devices section on its own:
 *
 *   node bench/dist/devices-cli.js --memory 64MiB --repeat 2 --json devices.json
 *
 * The same guest and device with tracking=device, tracking=iommu, all-dirty
 * and skip-precopy (real two-process migrations): total time, downtime and
 * its RAM and device parts, and the dirty-tracking cost per sync; `npm run
 * bench` runs the same section among its other measurements.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { Command } from 'commander';
import { exitOnUsageError, formatBytes, parseIntOption, parseSize, runCli } from '@postcopy/shared';
import { DevicesBench, formatDevices } from './devices.js';
import { addWarmUpOptions, parseWarmUpOptions } from './options.js';
import { runSteps } from './steps.js';

async function main(): Promise<number> {
  const cmd = addWarmUpOptions(new Command('postcopy-bench-devices')
    .description('Migrates the same guest and device with tracking=device, tracking=iommu, all-dirty and skip-precopy; prints total time, downtime (RAM and device parts) and the dirty-tracking cost per sync.')
    .option('--memory <size>', 'guest memory of each migration run', '64MiB')
    .option('--repeat <n>', 'runs of each variant (interleaved); the median is reported', '1')
    .option('--json <path>', 'also write the results as JSON to this file'))
    .exitOverride(exitOnUsageError);
  cmd.parse(process.argv);
  const raw = cmd.opts<Record<string, unknown>>();
  const memoryBytes = parseSize('--memory', String(raw.memory));
  const repeat = parseIntOption('--repeat', String(raw.repeat), 1, 1000);
  const json = typeof raw.json === 'string' ? resolve(raw.json) : undefined;
  const bench = new DevicesBench(memoryBytes, parseWarmUpOptions(raw));
  process.stderr.write(`bench-devices: guest ${formatBytes(memoryBytes)}, repeat ${repeat}\n`);
  const steps = Array.from({ length: repeat }, () => bench.steps()).flat();
  await runSteps(steps, (line) => process.stderr.write(`bench-devices: ${line}\n`));
  const result = bench.result();
  process.stdout.write(formatDevices(result) + '\n');
  if (json !== undefined) {
    mkdirSync(dirname(json), { recursive: true });
    writeFileSync(json, JSON.stringify({ bench: 'postcopy-devices', date: new Date().toISOString(), memoryBytes, repeat, ...result }, null, 2) + '\n');
    process.stdout.write(`results written to ${json}\n`);
  }
  return 0;
}

runCli('bench-devices', main);
