/**
 * How the source's guest-side workers (the vCPUs, guest/vcpu-worker.ts, and
 * the devices' DMA, devices/device-worker.ts) meet their parent: `ready` once
 * loaded; the first message starts `run`, which returns when told to stop;
 * then `stopped`, or `error` with what went wrong.
 */
import { parentPort } from 'node:worker_threads';

export function serveGuestWorker(run: () => void): void {
  parentPort!.once('message', () => {
    try {
      run();
      parentPort!.postMessage({ type: 'stopped' });
    } catch (err) {
      parentPort!.postMessage({ type: 'error', message: (err as Error).message });
    }
  });
  parentPort!.postMessage({ type: 'ready' });
}
