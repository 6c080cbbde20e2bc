#!/usr/bin/env node
import { USAGE_EXIT_CODE, UsageError } from '@postcopy/shared';
import { launch } from './launcher.js';
import { launcherCommand, splitArgs } from './options.js';

async function main(): Promise<number> {
  const cmd = launcherCommand().exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : USAGE_EXIT_CODE));
  cmd.parse(process.argv);
  const { sourceArgs, destArgs } = splitArgs(cmd.opts());
  const result = await launch({ sourceArgs, destArgs });
  return result.code;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    const e = err as Error;
    process.stderr.write(`postcopy: ${e.message}\n`);
    process.exit(e instanceof UsageError ? USAGE_EXIT_CODE : 1);
  },
);
