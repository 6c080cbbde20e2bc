import { describeCombination, type RunSpec, type SweptParam } from './matrix.js';
import type { RunResult } from './run.js';

/** Progress of a sweep, one line per run. */
export interface Progress {
  start(run: RunSpec): void;
  done(result: RunResult): void;
}

function duration(ms: number): string {
  const s = Math.round(ms / 1000);
  return s < 60 ? `${s}s` : `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
}

/**
 * `run 3/24 strategy=kvm-exit vcpus=4 repeat=1/3 (eta 1m10s) ... ok 3.1s` on a
 * terminal; nothing at all when the stream is not a TTY (piped, in CI, in tests).
 */
export function progress(stream: NodeJS.WriteStream, params: readonly SweptParam[], total: number, repeats: number): Progress {
  if (stream.isTTY !== true) return { start: () => {}, done: () => {} };
  const started = performance.now();
  let finished = 0;
  return {
    start(run) {
      const eta = finished > 0 ? ` (eta ${duration(((performance.now() - started) / finished) * (total - finished))})` : '';
      const what = [describeCombination(params, run.combination.values), repeats > 1 ? `repeat=${run.repeat}/${repeats}` : ''].filter(Boolean).join(' ');
      stream.write(`run ${run.index + 1}/${total} ${what}${eta} ... `);
    },
    done(result) {
      finished++;
      stream.write(result.ok ? `ok ${(result.durationMs / 1000).toFixed(1)}s\n` : `FAILED: ${result.error ?? ''}\n`);
    },
  };
}
