import { Worker, type WorkerOptions } from 'node:worker_threads';

/**
 * Starts a worker thread from a module next to the caller. Built code runs the
 * `.js` file directly; under the test runner the caller is a `.ts` file, and
 * Node 20 cannot start a `.ts` worker, so a small `.mjs` bootstrap registers
 * tsx first and then imports the entry.
 */
export function startWorker(callerUrl: string, name: string, options: WorkerOptions = {}): Worker {
  const fromSource = callerUrl.endsWith('.ts');
  const entry = new URL(`./${name}.${fromSource ? 'ts' : 'js'}`, callerUrl);
  if (!fromSource) return new Worker(entry, options);
  const bootstrap = new URL('../worker-bootstrap.mjs', import.meta.url);
  // The worker's process.argv is [execPath, scriptPath, ...argv]: the entry goes first.
  const argv = [entry.href, ...(options.argv ?? [])];
  return new Worker(bootstrap, { ...options, argv });
}
