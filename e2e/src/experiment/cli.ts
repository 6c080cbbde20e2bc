#!/usr/bin/env node
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { exitOnUsageError, runCli } from '@postcopy/shared';
import { expandRuns } from './matrix.js';
import { experimentCommand, parseExperimentOptions, validateMatrix } from './options.js';
import { progress } from './progress.js';
import { comparisonTable, summarizeRuns } from './summary.js';
import { runSweep, writeSummary } from './sweep.js';

/** The command line as typed, for the report. */
function commandLine(args: readonly string[]): string {
  const quote = (a: string): string => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`);
  return ['npm run experiment --', ...args.map(quote)].join(' ');
}

async function main(): Promise<number> {
  const cmd = experimentCommand().exitOverride(exitOnUsageError);
  cmd.parse(process.argv);
  const options = parseExperimentOptions(cmd.opts());
  // Every combination passes the launcher's own validation before anything runs.
  validateMatrix(options);
  const runs = expandRuns(options.params, options.repeat);
  const command = commandLine(process.argv.slice(2));
  const bar = progress(process.stderr, options.params, runs.length, options.repeat);
  const results = await runSweep(options, runs, command, { onStart: (r) => bar.start(r), onDone: (r) => bar.done(r) });
  if (results.length === 0) writeSummary(options, results, command);
  process.stdout.write(comparisonTable(options.params, summarizeRuns(options.params, results)) + '\n');
  process.stdout.write(`\nwrote ${join(options.out, 'report.html')}, ${join(options.out, 'summary.csv')} and ${results.length} reports in ${join(options.out, 'runs')}\n`);
  if (options.trace !== undefined) {
    const traces = results.filter((r) => r.files.trace !== undefined && existsSync(r.files.trace)).length;
    process.stdout.write(`wrote ${traces} timelines (${options.trace.includes('{name}') ? options.trace : join(options.trace, '<run name>.trace.json')})\n`);
  }
  const failed = results.filter((r) => !r.ok);
  if (failed.length > 0) {
    process.stderr.write(`experiment: ${failed.length} of ${results.length} runs failed:\n`);
    for (const r of failed) {
      const tail = r.stderrTail.split('\n').slice(-6).map((l) => `    ${l}`).join('\n');
      process.stderr.write(`  ${r.spec.name}: ${r.error ?? 'failed'}\n${tail ? tail + '\n' : ''}`);
    }
    return 1;
  }
  return 0;
}

runCli('experiment', main);
