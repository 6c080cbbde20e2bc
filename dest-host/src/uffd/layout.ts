/**
 * Field indices of the emulated userfaultfd's shared control buffer (an
 * Int32Array over a SharedArrayBuffer every thread attaches to). Every index
 * used anywhere is named here.
 *
 *   [header][thread slots × maxThreads][context slots × maxContexts]
 */

export const HEADER = {
  MAX_THREADS: 0,
  MAX_CONTEXTS: 1,
  CONTEXTS_OPEN: 2,
  PAGE_SIZE: 3,
  TOTAL_PAGES: 4,
  // Counters, bumped with Atomics.add by whichever thread does the thing.
  FAULTS: 5,
  COPIES: 6,
  ZEROPAGES: 7,
  EEXIST: 8,
  WAKE_CALLS: 9,
  THREADS_WOKEN: 10,
  DISCARDS: 11,
  /** How threads sleep on SEQ and EVENTS words: 1 futex(2) through the addon, 0 Atomics.wait (see futex.ts). */
  FUTEX: 12,
  LENGTH: 16,
} as const;

/**
 * One slot per thread that can fault (vCPU, I/O thread, test thread).
 *
 * SEQ is the thread's wait word: even = running, odd = blocked on a fault.
 * A waker moves it from odd `s` to `s + 1` with compareExchange, so a stale
 * waker that read an older `s` can never wake a later fault (no ABA unless
 * 2^31 faults pass between its load and its CAS).
 */
export const THREAD = {
  SEQ: 0,
  /** Context the pending fault was queued on (valid while SEQ is odd). */
  WAIT_CTX: 1,
  /** Page the pending fault is on (valid while SEQ is odd). */
  WAIT_PAGE: 2,
  /** Context bound to this thread (per-thread userfaultfd), or -1. */
  BOUND_CTX: 3,
  STRIDE: 4,
} as const;

/**
 * Range entries a context may hold. Entries are never reused: UNREGISTER
 * empties an entry (end = start) and appends what is left of it, so a
 * thread scanning the ranges without a lock never sees a page registered
 * that was not (see Userfaultfd.unregister).
 */
export const MAX_RANGES = 16;
/** Pending messages a context can hold before a faulting thread has to wait for room. */
export const QUEUE_CAPACITY = 1024;

/** One message: struct uffd_msg's pagefault part. */
export const MSG = {
  ADDRESS_LO: 0,
  ADDRESS_HI: 1,
  FLAGS: 2,
  TID: 3,
  /** The faulting thread's SEQ when it queued this message: stale once the thread left the fault. */
  SEQ: 4,
  STRIDE: 5,
} as const;

export const CONTEXT = {
  /** 1 while open; 0 after close (readers return null, faults are refused). */
  OPEN: 0,
  /** Thread id this context belongs to (per-thread userfaultfd), or -1 for process-wide. */
  BOUND_TID: 1,
  /** Spin lock around HEAD/TAIL/COUNT and the ring: 0 free, 1 held. */
  LOCK: 2,
  HEAD: 3,
  TAIL: 4,
  /** Messages pending; a producer facing a full queue Atomics.waits on it. */
  COUNT: 5,
  RANGE_COUNT: 6,
  /**
   * Poll word: bumped after every enqueue and by close. Readers load it before
   * looking at COUNT and OPEN and Atomics.wait on that value, so neither a new
   * message nor a close can slip in between their check and their sleep.
   */
  EVENTS: 7,
  /** Pages [start, end) per range, MAX_RANGES pairs; an emptied entry has end = start. */
  RANGES: 8,
  RING: 8 + 2 * MAX_RANGES,
  STRIDE: 8 + 2 * MAX_RANGES + QUEUE_CAPACITY * MSG.STRIDE,
} as const;

/** uffd_msg.pagefault.flags (include/uapi/linux/userfaultfd.h). */
export const UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0;

/** UFFDIO_COPY_MODE_DONTWAKE / UFFDIO_ZEROPAGE_MODE_DONTWAKE. */
export const MODE_DONTWAKE = 1 << 0;
/**
 * UFFDIO_COPY_MODE_WP: install write-protected. Only for ranges registered
 * in WP mode, which nothing here registers, so a COPY with it is EINVAL.
 */
export const MODE_WP = 1 << 1;

/** errno values as the ioctls report them (negated in results). */
export const ERRNO = {
  ENOENT: 2,
  EAGAIN: 11,
  EEXIST: 17,
  EINVAL: 22,
  EFAULT: 14,
  ESRCH: 3,
  EBADF: 9,
  ENOMEM: 12,
  EBUSY: 16,
  EINTR: 4,
  ENOTTY: 25,
  EPERM: 1,
  ENOSYS: 38,
} as const;

/** pte states in the page table array. */
export const PTE = {
  /**
   * Missing. A missing page's bytes are all zero, as no pte maps memory
   * there: guest memory starts zeroed, a discard zeroes a page before it
   * goes back to NONE, and so does copyRelease for bytes a cut stream left
   * half written. ZEROPAGE and a fault on unregistered memory therefore
   * write nothing (the kernel maps its zero page, or gives a zeroed one).
   */
  NONE: 0,
  PRESENT: 1,
  /**
   * Someone holds the page (the page table lock): a COPY writing it, a
   * ZEROPAGE or a fault on unregistered memory installing it, a discard or a
   * release zeroing it. Faults still see it missing.
   */
  INSTALLING: 2,
} as const;

export function controlLength(maxThreads: number, maxContexts: number): number {
  return HEADER.LENGTH + maxThreads * THREAD.STRIDE + maxContexts * CONTEXT.STRIDE;
}

export function threadBase(tid: number): number {
  return HEADER.LENGTH + tid * THREAD.STRIDE;
}

export function contextBase(maxThreads: number, ctx: number): number {
  return HEADER.LENGTH + maxThreads * THREAD.STRIDE + ctx * CONTEXT.STRIDE;
}
