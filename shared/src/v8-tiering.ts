import { setFlagsFromString } from 'node:v8';

/**
 * V8 flags both hosts set at start-up, before any worker exists (V8 flags
 * are process-wide; a worker's execArgv cannot carry them).
 *
 * `--interrupt-budget`: how much bytecode a function runs before V8 considers
 * optimizing it (default 67584 in Node 20's V8 11.3). The destination runs its
 * fault path in many short-lived isolates, one per vCPU and resolver thread,
 * each of which warms up on its own: with 16 MiB per vCPU a thread takes 4096
 * faults, most of them in unoptimized code at the default. At 8192 the path
 * is optimized after a few dozen faults. Measured (issue 9; 8 vCPUs x 16 MiB,
 * --no-push, 3 interleaved runs each): demand paging rate +25 % (shared-uffd)
 * to +45 % (kvm-exit), CPU per fault down as much; 4096 and 16384 did worse.
 */
export const V8_TIERING_FLAGS = ['--interrupt-budget=8192'] as const;

/** Sets {@link V8_TIERING_FLAGS} unless the process was started with its own value of a flag. */
export function tuneV8Tiering(execArgv: readonly string[] = process.execArgv): void {
  for (const flag of V8_TIERING_FLAGS) {
    const name = flag.slice(0, flag.indexOf('='));
    if (!execArgv.some((a) => a.startsWith(name) || a.startsWith(name.replace(/-/g, '_')))) setFlagsFromString(flag);
  }
}
