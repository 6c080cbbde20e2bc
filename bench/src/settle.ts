/**
 * The bench's own garbage out of the way of the next measurement. Some steps
 * run in this process (the floor's client, the net ceiling's receiver, which
 * takes 1 GiB in fresh buffers and a SharedArrayBuffer); V8 frees that later,
 * with concurrent marking, sweeping and munmap on a core the next run needs.
 * Measured: a push run right after the 'data' net ceiling did 297 MiB/s,
 * against 1241-1346 MiB/s after the other steps and 1220-1498 MiB/s after the
 * same ceiling followed by a full collection here. So every step is followed by
 * a full collection, before the next one starts timing.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

let collect: (() => void) | undefined;

/** A full, synchronous garbage collection of this process (V8's gc(), exposed for it). */
export function settle(): void {
  if (collect === undefined) {
    // --expose-gc at run time: gc() appears in contexts made from now on.
    setFlagsFromString('--expose_gc');
    collect = runInNewContext('gc') as () => void;
  }
  collect();
}
