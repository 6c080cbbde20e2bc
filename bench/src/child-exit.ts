import type { ChildProcess } from 'node:child_process';
import { constants as osConstants } from 'node:os';

/**
 * A child process's exit code, 128 + the signal's number when a signal ended
 * it (the shell's convention), or 127 if it never started (the shell's "not
 * found"). Resolves at once if it has already exited.
 */
export function exitCode(child: ChildProcess): Promise<number> {
  const fromSignal = (signal: NodeJS.Signals): number => 128 + (osConstants.signals[signal] ?? 1);
  return new Promise((resolve) => {
    if (child.exitCode !== null) resolve(child.exitCode);
    else if (child.signalCode !== null) resolve(fromSignal(child.signalCode));
    else {
      child.once('exit', (code, signal) => resolve(code ?? (signal ? fromSignal(signal) : 1)));
      // A spawn that fails emits 'error' and never 'exit'.
      child.once('error', () => child.pid === undefined && resolve(127));
    }
  });
}
