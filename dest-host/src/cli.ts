#!/usr/bin/env node
import { writeFileSync } from 'node:fs';
import { CheckError, USAGE_EXIT_CODE, UsageError, formatReport } from '@postcopy/shared';
import { assertVerified, runDestination } from './destination.js';
import { destCommand, parseDestOptions } from './options.js';
import { progressLine } from './progress.js';

async function main(): Promise<number> {
  const cmd = destCommand().exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : USAGE_EXIT_CODE));
  cmd.parse(process.argv);
  const options = parseDestOptions(cmd.opts());
  const showProgress = process.stderr.isTTY === true;
  const { report, hgrm } = await runDestination({
    ...options,
    onStatusUrl: (url) => process.stderr.write(`status ${url}\n`),
    ...(showProgress ? { onProgress: (installed: number, total: number, faults: number) => process.stderr.write(progressLine(installed, total, faults)) } : {}),
  });
  if (showProgress) process.stderr.write('\r\x1b[K');
  process.stdout.write(formatReport(report) + '\n');
  if (options.json) writeFileSync(options.json, JSON.stringify(report, null, 2) + '\n');
  if (options.hgrm) writeFileSync(options.hgrm, hgrm);
  assertVerified(report);
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    const e = err as Error;
    process.stderr.write(`dest: ${e instanceof CheckError ? e.message : e.message}\n`);
    process.exit(e instanceof UsageError ? USAGE_EXIT_CODE : 1);
  },
);
