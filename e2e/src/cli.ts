#!/usr/bin/env node
import { preflightMemoryBackend } from '@postcopy/dest-host/options';
import { exitOnUsageError, runCli } from '@postcopy/shared';
import { launch } from './launcher.js';
import { launcherCommand, splitArgs } from './options.js';

async function main(): Promise<number> {
  const cmd = launcherCommand().exitOverride(exitOnUsageError);
  cmd.parse(process.argv);
  const { sourceArgs, destArgs, killSourceAt, tls, host, preflight } = splitArgs(cmd.opts());
  // Before the source starts: a memory backend that cannot run here exits 2 saying why.
  preflightMemoryBackend(preflight);
  const result = await launch({ sourceArgs, destArgs, killSourceAt, tls, host });
  return result.code;
}

runCli('postcopy', main);
