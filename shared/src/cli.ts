import { BackendUnavailableError, USAGE_EXIT_CODE, UsageError } from './errors.js';

/** Commander's exit hook for every command of the project: help exits 0, any usage error exits 2. */
export function exitOnUsageError(err: { exitCode: number }): never {
  process.exit(err.exitCode === 0 ? 0 : USAGE_EXIT_CODE);
}

/**
 * Runs a command's `main` and exits with its code; an error is printed as
 * `NAME: message` and exits 2 for a usage error or a memory backend that
 * cannot run here, 1 for anything else.
 */
export function runCli(name: string, main: () => Promise<number>): void {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      const e = err as Error;
      process.stderr.write(`${name}: ${e.message}\n`);
      process.exit(e instanceof UsageError || e instanceof BackendUnavailableError ? USAGE_EXIT_CODE : 1);
    },
  );
}
