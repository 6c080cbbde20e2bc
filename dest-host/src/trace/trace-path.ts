import { closeSync, existsSync, openSync, statSync, unlinkSync } from 'node:fs';
import { UsageError } from '@postcopy/shared';

/**
 * Checks that `--trace PATH` can be written, before anything starts: the
 * trace is written at the end of the run, and a migration that ran for
 * minutes must not then fail on a typo. Opens the file for appending (so an
 * existing file is left as it is) and removes it again if it was not there.
 * Throws UsageError (exit 2) saying why not.
 */
export function checkTracePath(path: string, flag = '--trace'): void {
  if (path.trim() === '') throw new UsageError(`${flag}: expected a file path to write the timeline to, got ""`);
  const existed = existsSync(path);
  if (existed && statSync(path).isDirectory()) throw new UsageError(`${flag}: expected a file path to write the timeline to, got the directory ${path}`);
  try {
    closeSync(openSync(path, 'a'));
  } catch (err) {
    throw new UsageError(`${flag}: cannot write the timeline to ${path}: ${(err as Error).message}`);
  }
  if (!existed) unlinkSync(path);
}
