#!/usr/bin/env node
import { exitOnUsageError, runCli } from '@postcopy/shared';
import { launch } from './launcher.js';
import { launcherCommand, splitArgs } from './options.js';

async function main(): Promise<number> {
  const cmd = launcherCommand().exitOverride(exitOnUsageError);
  cmd.parse(process.argv);
  const { sourceArgs, destArgs, killSourceAt, tls, host } = splitArgs(cmd.opts());
  const result = await launch({ sourceArgs, destArgs, killSourceAt, tls, host });
  return result.code;
}

runCli('postcopy', main);
