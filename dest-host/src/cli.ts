#!/usr/bin/env node
import { writeFileSync } from 'node:fs';
import { Command } from 'commander';
import { DEFAULT_MDEV_CATALOG, MdevHost, exitOnUsageError, tuneV8Tiering, formatReport, readMdevCatalog, runCli } from '@postcopy/shared';
import { assertVerified, runDestination } from './destination.js';
import { addMdevOptions, destCommand, parseDestOptions } from './options.js';
import { preflightMemoryBackend } from './preflight.js';
import { progressLine } from './progress.js';
import { writeTraceFile } from './trace/trace-event.js';

// Before any worker starts (see v8-tiering.ts).
tuneV8Tiering();

/** `npm run dest -- --list-mdev-types [--mdev-types FILE]`: the mdev tree of this host, nothing else. */
function listMdevTypes(): number {
  const cmd = addMdevOptions(new Command('dest').allowUnknownOption(true)).exitOverride(exitOnUsageError);
  cmd.parse(process.argv);
  const raw = cmd.opts();
  const host = new MdevHost(raw.mdevTypes === undefined ? DEFAULT_MDEV_CATALOG : readMdevCatalog(String(raw.mdevTypes)));
  process.stdout.write(host.formatTree() + '\n');
  return 0;
}

async function main(): Promise<number> {
  if (process.argv.includes('--list-mdev-types')) return listMdevTypes();
  const cmd = destCommand().exitOverride(exitOnUsageError);
  cmd.parse(process.argv);
  const options = parseDestOptions(cmd.opts());
  // Before connecting: a backend that cannot run here exits 2 saying why.
  preflightMemoryBackend(options);
  for (const warning of options.tlsWarnings) process.stderr.write(`dest: warning: ${warning}\n`);
  const showProgress = process.stderr.isTTY === true;
  const { report, hgrm, timeline } = await runDestination({
    ...options,
    onStatusUrl: (url) => process.stderr.write(`status ${url}\n`),
    onEvent: (line) => process.stderr.write(`${showProgress ? '\r\x1b[K' : ''}dest: ${line}\n`),
    ...(showProgress ? { onProgress: (installed: number, total: number, faults: number) => process.stderr.write(progressLine(installed, total, faults)) } : {}),
  });
  if (showProgress) process.stderr.write('\r\x1b[K');
  process.stdout.write(formatReport(report) + '\n');
  if (options.json) writeFileSync(options.json, JSON.stringify(report, null, 2) + '\n');
  if (options.hgrm) writeFileSync(options.hgrm, hgrm);
  if (options.tracePath && timeline) {
    const bytes = writeTraceFile(options.tracePath, timeline.doc);
    process.stderr.write(
      `dest: trace: wrote ${options.tracePath} (${timeline.doc.traceEvents.length} events, ${timeline.faultSlices} fault slices, ${(bytes / 1024 / 1024).toFixed(1)} MiB): open it in https://ui.perfetto.dev or chrome://tracing\n`,
    );
  }
  const asked = options.injectDrops.length + (options.injectPostcopyDrops?.length ?? 0);
  if (report.recovery.dropsInjected < asked) {
    process.stderr.write(
      `dest: --inject: ${asked - report.recovery.dropsInjected} drop(s) did not go off: only ${report.counters.pagesInstalled} pages were installed (${report.counters.pagesDemand + report.counters.pagesPushed} after the switchover)\n`,
    );
  }
  assertVerified(report);
  return 0;
}

runCli('dest', main);
