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
 *
 * `--max-inlined-bytecode-size-cumulative` (default 920): how much bytecode
 * TurboFan inlines into one function. Each isolate compiles the same fault
 * path anew, and in a short run that compiling competes with the faults
 * (TurboFan's threads: up to 60 % of two cores in a kvm-exit run's first
 * second at 8 vCPUs x 16 MiB). At 300 the compiler threads' CPU per fault
 * fell from 25-30 to 20-23 µs for per-thread-uffd (two isolates a vCPU).
 * Measured (8 and 16 vCPUs x 16 MiB, --no-push --preempt, interleaved pairs,
 * medians): per-thread-uffd at 8 vCPUs 16.9 k -> 18.5 k pages/s (3 pairs)
 * and 14.3 k -> 15.5 k (4 pairs), at 16 vCPUs 15.7 k -> 16.3 k (4 pairs);
 * kvm-exit 27.4 k -> 27.5 k and shared-uffd 21.7 k -> 21.4 k (3 pairs); the
 * idle push of 1 GiB 1199 -> 1369 MiB/s (4 pairs): no loss anywhere.
 */
export const V8_TIERING_FLAGS = ['--interrupt-budget=8192', '--max-inlined-bytecode-size-cumulative=300'] as const;

/** Sets {@link V8_TIERING_FLAGS} unless the process was started with its own value of a flag. */
export function tuneV8Tiering(execArgv: readonly string[] = process.execArgv): void {
  for (const flag of V8_TIERING_FLAGS) {
    const name = flag.slice(0, flag.indexOf('='));
    // The flag itself, not one whose name it begins (--interrupt-budget-for-feedback-allocation).
    const given = (a: string): boolean => a === name || a.startsWith(name + '=');
    if (!execArgv.some((a) => given(a) || given(a.replace(/_/g, '-')))) setFlagsFromString(flag);
  }
}

/**
 * How both hosts' warm-ups split their work (dest-host's warm-up/warm-up.ts,
 * source-host's warm-up.ts): in two rounds, each run on objects of its own.
 * V8 records a field's type as the class of its first value and throws
 * away code that depends on it when another comes; the second round's
 * objects take that step, not the run's. `n` in two, the first round
 * `firstShare` of it (rounded up, at least one unit), the second the rest;
 * a single unit is one round, none is none. Both hosts give the first round
 * a quarter (DEST_FIRST_ROUND_SHARE in dest-host's warm-up/warm-up.ts,
 * SOURCE_FIRST_ROUND_SHARE in source-host's warm-up.ts).
 */
export function warmUpRoundSizes(n: number, firstShare: number): number[] {
  if (!(firstShare > 0 && firstShare < 1)) throw new RangeError(`expected the first warm-up round's share between 0 and 1, got ${firstShare}`);
  if (n <= 0) return [];
  if (n < 2) return [n];
  // ceil of a positive share of n >= 2 is at least 1; n - 1 leaves the second round one.
  const first = Math.min(n - 1, Math.ceil(n * firstShare));
  return [first, n - first];
}
