/**
 * How the emulated userfaultfd's threads sleep on a word of its shared state
 * and wake each other: V8's Atomics.wait/notify, or the kernel's futex(2)
 * straight from the uffd addon.
 *
 * Atomics.wait and Atomics.notify go through a mutex of V8's that every
 * thread of the process shares, and a condition variable per waiter; a
 * handoff costs a wake-up more than the futex itself when the woken thread
 * meets that mutex still held. Measured (two worker threads handing one word
 * back and forth, 50,000 round trips, two runs each on the 2-core VM): 41.6
 * to 45.0 µs of CPU a round trip with Atomics, 27.3 to 40.2 with futex(2).
 *
 * A word's sleepers and wakers must agree on the mechanism (a futex wake does
 * not reach an Atomics.wait, nor the reverse), so the choice is made once for
 * a whole emulated userfaultfd, by its creator, and every thread attaching
 * to it uses the same (see Userfaultfd). Sleeps on the raw futex are slices
 * of at most {@link FUTEX_SLICE_MS}: a worker.terminate() lands between two
 * (it cannot interrupt a system call, where it does interrupt Atomics.wait).
 */
import { loadUffdNative, type UffdNative } from '../memory/uffd-native.js';

export interface Futex {
  /** 'futex' (the kernel's, through the addon) or 'atomics' (V8's). */
  readonly kind: 'futex' | 'atomics';
  /** Sleeps while words[index] is `value`, at most `timeoutMs` (one slice for 'futex'); may return early. */
  wait(words: Int32Array, index: number, value: number, timeoutMs: number): void;
  /** Wakes every thread sleeping on words[index] through this mechanism. */
  wake(words: Int32Array, index: number): void;
}

/** The longest one futex(2) sleep lasts (ms), so that a terminating worker leaves within it. */
export const FUTEX_SLICE_MS = 50;

export const ATOMICS_FUTEX: Futex = {
  kind: 'atomics',
  wait: (words, index, value, timeoutMs) => void Atomics.wait(words, index, value, timeoutMs),
  wake: (words, index) => void Atomics.notify(words, index),
};

function nativeFutex(native: UffdNative): Futex {
  return {
    kind: 'futex',
    wait: (words, index, value, timeoutMs) => void native.futexWait(words, index, value, Math.min(timeoutMs, FUTEX_SLICE_MS)),
    wake: (words, index) => void native.futexWake(words, index, 0x7fffffff),
  };
}

/** The kernel's futex through the addon when it loads in this thread (and has futexWait), else undefined. */
export function loadNativeFutex(): Futex | undefined {
  const load = loadUffdNative();
  return load.ok && typeof load.native.futexWait === 'function' ? nativeFutex(load.native) : undefined;
}

/** The mechanism a creator chose ('futex' needs the addon here too: it is an error if it does not load). */
export function futexOfKind(kind: 'futex' | 'atomics'): Futex {
  if (kind === 'atomics') return ATOMICS_FUTEX;
  const f = loadNativeFutex();
  if (f === undefined) throw new Error("expected the uffd addon's futexWait in this thread: the emulated userfaultfd was created to sleep on futex(2)");
  return f;
}
