/**
 * What guest and resolver threads record for the timeline while tracing
 * (--trace), in preallocated typed arrays that double when full (a handful
 * of times per run), so that a fault adds a few stores and no allocation.
 * Without --trace nothing here exists: the threads check one flag per fault.
 *
 * Times are ms since the run's epoch (the main thread's timeOrigin: each
 * thread adds its clockOffset), so the threads' records line up.
 */

/** Bits of a fault's flags byte. */
export const FAULT_FLAG = {
  /** The access was a write. */
  WRITE: 1,
  /** Bits from here: the thread's own Resolution + 1 (kvm-exit's vCPUs resolve their faults themselves), 0 when a resolver did. */
  OWN_SHIFT: 1,
} as const;

/** A guest thread's faults, in order, beside its intervals (GuestThreadResult.intervals). */
export interface FaultTrace {
  /** Page of each fault. */
  pages: Uint32Array;
  /** FAULT_FLAG bits of each fault. */
  flags: Uint8Array;
}

function grown<T extends Uint32Array | Uint8Array | Float64Array | Int32Array>(a: T, min: number): T {
  const b = new (a.constructor as new (n: number) => T)(Math.max(min, a.length * 2));
  b.set(a);
  return b;
}

/** A guest thread's log: fault n's page and flags (its times are intervals[2n], intervals[2n + 1]). */
export class FaultLog {
  private pages: Uint32Array;
  private flags: Uint8Array;

  constructor(capacity: number) {
    this.pages = new Uint32Array(Math.max(16, capacity));
    this.flags = new Uint8Array(Math.max(16, capacity));
  }

  /** Fault number `n`: its page, whether a write, and `own`, the thread's own Resolution (or -1: a resolver's). */
  record(n: number, page: number, write: boolean, own: number): void {
    if (n >= this.pages.length) {
      this.pages = grown(this.pages, n + 1);
      this.flags = grown(this.flags, n + 1);
    }
    this.pages[n] = page;
    this.flags[n] = (write ? FAULT_FLAG.WRITE : 0) | ((own + 1) << FAULT_FLAG.OWN_SHIFT);
  }

  /** The first `count` faults, in buffers of their own (to transfer). */
  take(count: number): FaultTrace {
    return { pages: this.pages.slice(0, count), flags: this.flags.slice(0, count) };
  }
}

/** A resolver thread's fault messages: when it took each, when its resolution ended, for whom, and how. */
export interface ResolverTrace {
  /** [start, end] ms per message. */
  times: Float64Array;
  /** [page, thread slot, Resolution] per message. */
  info: Int32Array;
  count: number;
}

export class ResolverLog {
  private times = new Float64Array(2 * 1024);
  private info = new Int32Array(3 * 1024);
  private count = 0;

  add(startMs: number, endMs: number, page: number, slot: number, resolution: number): void {
    const n = this.count++;
    if (3 * n + 3 > this.info.length) {
      this.times = grown(this.times, 2 * n + 2);
      this.info = grown(this.info, 3 * n + 3);
    }
    this.times[2 * n] = startMs;
    this.times[2 * n + 1] = endMs;
    this.info[3 * n] = page;
    this.info[3 * n + 1] = slot;
    this.info[3 * n + 2] = resolution;
  }

  take(): ResolverTrace {
    return { times: this.times.slice(0, 2 * this.count), info: this.info.slice(0, 3 * this.count), count: this.count };
  }
}
