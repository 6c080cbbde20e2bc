#!/usr/bin/env node
/**
 * The native floor on its own:
 *
 *   node bench/dist/native-floor-cli.js --vcpus 1,8,16 --modes shared,per-region,exit --repeat 2
 *
 * Builds bench/native/fault-floor.c (cached by hash in bench/build/native),
 * runs every (vCPUs, mode) `--repeat` times, interleaved, prints each run on
 * stderr and a table of medians (min–max) on stdout; --json writes every run.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { dirname, resolve } from 'node:path';
import { Command } from 'commander';
import { exitOnUsageError, parseIntOption, runCli } from '@postcopy/shared';
import { parseChoiceList, parseIntList } from './list-options.js';
import { NATIVE_FLOOR_DEFAULTS, NATIVE_FLOOR_MODES, buildNativeFloor, measureNativeFloor, summarizeNativeFloor, type NativeFloorSummary } from './native-floor.js';

function command(): Command {
  return new Command('native-floor')
    .description(
      "Runs the bench's native floor: a C program on the real kernel's userfaultfd, pages over loopback TCP from a forked server, " +
        'N vCPU threads each reading its own partition in order; modes shared (one userfaultfd, a handler per vCPU), ' +
        'per-region (a userfaultfd and handler per vCPU partition), exit (the vCPU fetches and installs with UFFDIO_COPY_MODE_DONTWAKE).',
    )
    .option('--vcpus <list>', 'vCPU counts, comma-separated', '1,8,16')
    .option('--modes <list>', `fault paths, comma-separated (${NATIVE_FLOOR_MODES.join(', ')})`, NATIVE_FLOOR_MODES.join(','))
    .option('--mib-per-vcpu <n>', "each vCPU's partition in MiB", String(NATIVE_FLOOR_DEFAULTS.mibPerVcpu))
    .option('--repeat <n>', 'runs of each combination (interleaved); the table shows medians', '2')
    .option('--timeout-ms <ms>', 'per run; then its processes are killed', String(NATIVE_FLOOR_DEFAULTS.timeoutMs))
    .option('--json <path>', 'also write every run as JSON to this file');
}

function formatTable(rows: NativeFloorSummary[]): string {
  const header = ['mode', 'vCPUs', 'pages/s median (min–max)', 'p50 µs median (min–max)', 'runs'];
  const k = (x: number): string => `${(x / 1000).toFixed(1)} k`;
  const body = rows.map((r) => [
    r.mode,
    String(r.vcpus),
    `${k(r.pagesPerSec.median)} (${k(r.pagesPerSec.min)}–${k(r.pagesPerSec.max)})`,
    `${r.p50Us.median.toFixed(1)} (${r.p50Us.min.toFixed(1)}–${r.p50Us.max.toFixed(1)})`,
    String(r.runs),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i]!.length)));
  return [header, ...body].map((row) => row.map((cell, i) => cell.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n');
}

async function main(): Promise<number> {
  const cmd = command().exitOverride(exitOnUsageError);
  cmd.parse(process.argv);
  const raw = cmd.opts<Record<string, string | undefined>>();
  const vcpus = parseIntList('--vcpus', raw.vcpus!, 1, 1024);
  const modes = parseChoiceList('--modes', raw.modes!, NATIVE_FLOOR_MODES);
  const mibPerVcpu = parseIntOption('--mib-per-vcpu', raw.mibPerVcpu!, 1, 65536);
  const repeat = parseIntOption('--repeat', raw.repeat!, 1, 1000);
  const timeoutMs = parseIntOption('--timeout-ms', raw.timeoutMs!, 1);
  const json = raw.json === undefined ? undefined : resolve(raw.json);
  const loadAverage1mAtStart = Math.round(loadavg()[0]! * 100) / 100;

  const built = await buildNativeFloor();
  process.stderr.write(`native-floor: ${built.cached ? 'using' : 'built'} ${built.path}\n`);
  const results = await measureNativeFloor({
    vcpus,
    modes,
    repeat,
    mibPerVcpu,
    timeoutMs,
    onResult: (r, i, total) =>
      process.stderr.write(
        `native-floor: [${i}/${total}] ${r.mode}, ${r.vcpus} vCPUs: ${(r.pagesPerSec / 1000).toFixed(1)} k pages/s, p50 ${r.latencyUs.p50.toFixed(1)} µs, p99 ${r.latencyUs.p99.toFixed(1)} µs (${r.pages} pages in ${r.elapsedMs.toFixed(0)} ms)\n`,
      ),
  });
  const summary = summarizeNativeFloor(results);
  process.stdout.write(formatTable(summary) + '\n');
  if (json !== undefined) {
    mkdirSync(dirname(json), { recursive: true });
    const cpuList = cpus();
    const doc = {
      floor: 'native',
      date: new Date().toISOString(),
      machine: { cpus: cpuList.length, cpuModel: cpuList[0]?.model.trim() ?? 'unknown', loadAverage1mAtStart },
      binary: built.path,
      options: { vcpus, modes, mibPerVcpu, repeat },
      summary,
      runs: results,
    };
    writeFileSync(json, JSON.stringify(doc, null, 2) + '\n');
    process.stdout.write(`results written to ${json}\n`);
  }
  return 0;
}

runCli('native-floor', main);
