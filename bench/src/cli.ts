#!/usr/bin/env node
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { exitOnUsageError, runCli } from '@postcopy/shared';
import { runBench } from './bench.js';
import { formatBench } from './format.js';
import { benchCommand, describeOptions, parseBenchOptions } from './options.js';

/**
 * `npm run bench`: measures, prints, and with --json writes. A missed target
 * is a finding, not a failure: the exit code is 0 unless something errored.
 */
async function main(): Promise<number> {
  const cmd = benchCommand().exitOverride(exitOnUsageError);
  cmd.parse(process.argv);
  const options = parseBenchOptions(cmd.opts());
  // Resolve now: the runs take minutes and the working directory could be gone later.
  const json = options.json === undefined ? undefined : resolve(options.json);
  process.stderr.write(`bench: ${describeOptions(options)}\n`);
  const result = await runBench(options, (line) => process.stderr.write(`bench: ${line}\n`));
  process.stdout.write(formatBench(result) + '\n');
  if (json !== undefined) {
    mkdirSync(dirname(json), { recursive: true });
    writeFileSync(json, JSON.stringify(result, null, 2) + '\n');
    process.stdout.write(`results written to ${json}\n`);
  }
  return 0;
}

runCli('bench', main);
