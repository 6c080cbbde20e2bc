#!/usr/bin/env node
/**
 * The net ceiling on its own:
 *
 *   node bench/dist/net-ceiling-cli.js --mib 1024 --receive onread,data --sender stream,image --repeat 2
 *
 * Each run is a fresh sender process streaming `--mib` MiB over a `net`
 * socket into a fresh SharedArrayBuffer here; prints each run on stderr and
 * the median (min–max) MiB/s per receive mode and sender memory on stdout;
 * --json writes every run.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { dirname, resolve } from 'node:path';
import { Command } from 'commander';
import { exitOnUsageError, parseIntOption, runCli } from '@postcopy/shared';
import { median } from './figures.js';
import { parseChoiceList } from './list-options.js';
import { NET_SENDER_MEMORY } from './net-ceiling-layout.js';
import { NET_CEILING_DEFAULTS, NET_RECEIVE_MODES, measureNetCeiling, type NetCeilingResult } from './net-ceiling.js';

function command(): Command {
  return new Command('net-ceiling')
    .description(
      "Measures the ceiling of Node's own sockets: a net stream from a sender process to this one on 127.0.0.1, " +
        'each read copied into a SharedArrayBuffer (onread: one reused 1 MiB read buffer, the ceiling; data: plain data events), ' +
        "sent from memory of the receiver's size the sender filled first (stream, the ceiling) or from a 16 MiB image (image).",
    )
    .option('--mib <n>', 'MiB streamed per run', String(NET_CEILING_DEFAULTS.mib))
    .option('--receive <list>', `receive modes, comma-separated (${NET_RECEIVE_MODES.join(', ')})`, NET_CEILING_DEFAULTS.receive)
    .option('--sender <list>', `what the sender sends from, comma-separated (${NET_SENDER_MEMORY.join(', ')})`, NET_CEILING_DEFAULTS.sender)
    .option('--repeat <n>', 'runs of each mode (interleaved); medians are printed', '2')
    .option('--timeout-ms <ms>', 'per run; then its sender is killed', String(NET_CEILING_DEFAULTS.timeoutMs))
    .option('--json <path>', 'also write every run as JSON to this file');
}

async function main(): Promise<number> {
  const cmd = command().exitOverride(exitOnUsageError);
  cmd.parse(process.argv);
  const raw = cmd.opts<Record<string, string | undefined>>();
  const mib = parseIntOption('--mib', raw.mib!, 1, 1_048_576);
  const modes = parseChoiceList('--receive', raw.receive!, NET_RECEIVE_MODES);
  const senders = parseChoiceList('--sender', raw.sender!, NET_SENDER_MEMORY);
  const repeat = parseIntOption('--repeat', raw.repeat!, 1, 1000);
  const timeoutMs = parseIntOption('--timeout-ms', raw.timeoutMs!, 1);
  const json = raw.json === undefined ? undefined : resolve(raw.json);
  const loadAverage1mAtStart = Math.round(loadavg()[0]! * 100) / 100;

  const runs: NetCeilingResult[] = [];
  const kinds = modes.flatMap((receive) => senders.map((sender) => ({ receive, sender })));
  const total = repeat * kinds.length;
  for (let r = 0; r < repeat; r++) {
    for (const { receive, sender } of kinds) {
      const result = await measureNetCeiling({ mib, receive, sender, timeoutMs });
      runs.push(result);
      process.stderr.write(
        `net-ceiling: [${runs.length}/${total}] ${receive}, sender ${sender}: ${result.mibPerSec.toFixed(1)} MiB/s (${mib} MiB in ${result.elapsedMs.toFixed(0)} ms, ${result.reads} reads)\n`,
      );
    }
  }
  const summary = kinds.map(({ receive, sender }) => {
    const xs = runs.filter((r) => r.receive === receive && r.sender === sender).map((r) => r.mibPerSec);
    return { receive, sender, runs: xs.length, mibPerSec: { median: median(xs), min: Math.min(...xs), max: Math.max(...xs) } };
  });
  for (const s of summary) {
    process.stdout.write(`net ceiling (${s.receive}, sender ${s.sender}): ${s.mibPerSec.median.toFixed(1)} MiB/s median (${s.mibPerSec.min.toFixed(1)}–${s.mibPerSec.max.toFixed(1)}) over ${s.runs} runs of ${mib} MiB\n`);
  }
  if (json !== undefined) {
    mkdirSync(dirname(json), { recursive: true });
    writeFileSync(json, JSON.stringify({ floor: 'net', date: new Date().toISOString(), loadAverage1mAtStart, options: { mib, modes, senders, repeat }, summary, runs }, null, 2) + '\n');
    process.stdout.write(`results written to ${json}\n`);
  }
  return 0;
}

runCli('net-ceiling', main);
