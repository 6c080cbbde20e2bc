/**
 * The memory backend: what guest memory and the userfaultfd are (DESIGN.md,
 * "Memory backends"). Two implement it:
 *
 *   emulated  SharedArrayBuffers + the emulated userfaultfd (emulated-backend.ts)
 *   uffd      anonymous memory mapped by the addon + the kernel's userfaultfd (uffd-backend.ts)
 *
 * Both speak guest addresses (byte offsets from the start of guest memory,
 * page p at p * pageSize) and give the same errno-style results: a
 * non-negative result or a negated errno, as the kernel fills
 * `uffdio_copy.copy`. A context is a number any thread of the process can
 * use (a file descriptor on uffd). One conformance suite
 * (dest-host/src/conformance) holds both to the same results.
 */
import type { GuestLayout, MemslotLayout } from '@postcopy/shared';

/** The names, shared with the report (its `memoryBackend`) and the options. */
export { MEMORY_BACKENDS, type MemoryBackendName } from '@postcopy/shared/core';
import type { MemoryBackendName } from '@postcopy/shared';

/** struct uffd_msg (UFFD_EVENT_PAGEFAULT), filled in place by reads. */
export interface FaultMessage {
  /** Guest address of the faulting page, page-aligned. */
  address: number;
  /** UFFD_PAGEFAULT_FLAG_WRITE (1) for a write, 0 for a read. */
  flags: number;
  /** The faulting thread's id: what its {@link GuestThread.tid} says. */
  tid: number;
}

export interface GuestMemorySpec {
  layout: GuestLayout;
  /** Bytes per memslot (at most 1 GiB; the last one may be shorter). */
  memslotBytes: number;
  /** Threads that may fault, as slots 0..maxThreads-1 (the emulation's thread table). */
  maxThreads: number;
  /** Contexts that may be opened over the memory's life (the emulation's context table). */
  maxContexts: number;
}

/** What a worker needs to attach: structured-cloneable, tagged with its backend. */
export interface BackendHandle {
  readonly backend: MemoryBackendName;
}

export interface MemoryBackend {
  readonly name: MemoryBackendName;
  /**
   * Creates guest memory and the state its contexts live in, on the thread
   * that will own it (and dispose of it). Throws BackendUnavailableError
   * where the backend cannot run, saying why.
   */
  create(spec: GuestMemorySpec): BackendMemory;
  /** Attaches, in another thread, to memory created elsewhere. */
  attach(handle: BackendHandle): BackendMemory;
}

export interface OpenOptions {
  /**
   * A context of that thread's own (the proposed per-thread userfaultfd):
   * only that thread's faults reach it. The kernel has none: on uffd this
   * throws BackendUnavailableError.
   */
  thread?: number;
}

/** One thread's view of guest memory and of every context. */
export interface BackendMemory {
  readonly backend: MemoryBackendName;
  readonly layout: GuestLayout;
  readonly memslots: MemslotLayout;
  /** Post this to a worker, which calls {@link MemoryBackend.attach} with it. */
  readonly handle: BackendHandle;

  /**
   * This thread's buffer over memslot `index` (on uffd an ArrayBuffer of its
   * own over the one mapping). Touching a missing page through it outside
   * {@link GuestThread} is a fault on uffd (the thread blocks in the kernel)
   * and not one in the emulation: use it for pages known to be installed.
   */
  memslot(index: number): ArrayBufferLike;

  /**
   * Makes this thread a faulting thread in slot `slot` (< maxThreads): its
   * accesses to missing pages fault and block until a COPY, ZEROPAGE or WAKE
   * of the context that got the fault wakes them.
   */
  bindThread(slot: number): GuestThread;

  /** Whether thread `tid` (a {@link GuestThread.tid}) is blocked in a fault now. Diagnostics. */
  isBlockedInFault(tid: number): boolean;

  /** userfaultfd(2) + UFFDIO_API: a new context. */
  open(options?: OpenOptions): number;
  /** UFFDIO_REGISTER (missing mode): 0, -EINVAL (misaligned, outside the guest), -EBUSY (another context has it). */
  register(ctx: number, start: number, len: number): number;
  /**
   * UFFDIO_UNREGISTER: 0, or -EINVAL (misaligned, outside the guest, pages
   * another context registers); wakes the range's waiters, which then read
   * zero-filled memory.
   */
  unregister(ctx: number, start: number, len: number): number;
  /** Non-blocking read(2) of one message: 0 (filled), -EAGAIN (none pending), -EBADF (context closed). */
  tryRead(ctx: number, msg: FaultMessage): number;
  /** Blocking read(2): 0, -EAGAIN after `timeoutMs` (Infinity: no timeout), -EBADF (closed). Blocks the thread. */
  read(ctx: number, msg: FaultMessage, timeoutMs: number): number;
  /**
   * read(2) for a thread with an event loop (a resolver on a WebSocket):
   * resolves 0 with `msg` filled, or -EBADF once the context is closed,
   * without blocking the loop. One pending call per context in a thread.
   * The uffd one keeps the event loop alive while pending; the emulation's
   * does not (Atomics.waitAsync, nodejs/node#44729).
   *
   * With `signal`, an abort ends the pending call with -EINTR (a read(2)
   * interrupted) and takes no message: one that arrives later stays queued
   * for the next read. This is how a resolver stops reading before its
   * context is closed, so that the installs it still has in flight do not
   * meet a closed context (EBADF on the kernel).
   */
  readAsync(ctx: number, msg: FaultMessage, signal?: AbortSignal): Promise<number>;
  /**
   * UFFDIO_COPY of `len` bytes of `src` to guest address `dst`: bytes copied
   * (less than `len` when it stopped at an installed page: the kernel's
   * EAGAIN), or -EEXIST / -ENOENT / -EINVAL / -EFAULT. Wakes this context's
   * waiters on the copied range unless `mode` has {@link MODE_DONTWAKE}
   * (its only valid bit here: ranges are never registered for WP). The range
   * may be another context's: it is installed, and wakes nobody there.
   */
  copy(ctx: number, dst: number, src: ArrayBufferView, len: number, mode?: number): number;
  /**
   * A COPY in two halves, for bytes that arrive later straight into guest
   * memory (a push channel's socket reads into {@link DirectCopy.view}); the
   * emulation's only: on uffd no thread may touch a missing page, so bytes
   * go to a buffer and {@link copy} from there.
   */
  readonly direct?: DirectCopy;
  /** UFFDIO_ZEROPAGE: like copy, with zeros; -EINVAL on 2 MiB pages (hugetlb has no zero page). */
  zeropage(ctx: number, dst: number, len: number, mode?: number): number;
  /** UFFDIO_WAKE: 0 (also with nobody waiting) or -EINVAL. Wakes this context's waiters only. */
  wake(ctx: number, start: number, len: number): number;
  /**
   * Drops installed pages so they are missing again and the next touch
   * faults (MADV_DONTNEED on uffd; QEMU's ram_discard_range): 0 or -EINVAL.
   */
  discard(start: number, len: number): number;
  /**
   * close(2): 0, or -EBADF if already closed. Every thread blocked on the
   * context wakes and reads zero-filled memory (its page was never
   * installed: a run after this must not be reported verified); the
   * context's ranges are no longer registered. On uffd the close takes
   * effect once no thread is inside a poll(2) of it; read and readAsync poll
   * in slices of 100 ms (POLL_SLICE_MS), so that is within 100 ms, and they
   * then return -EBADF.
   */
  close(ctx: number): number;
  /**
   * Closes the contexts this thread opened, then releases guest memory
   * (munmap on uffd, by its creator only). Call it once every thread
   * attached to the memory has exited (close the contexts first if some may
   * be blocked in a fault: they cannot be terminated): a thread touching
   * unmapped memory kills the process.
   */
  dispose(): void;
}

/** See {@link BackendMemory.direct} (and the emulation's copyClaim). */
export interface DirectCopy {
  /** Takes up to `count` missing pages from `first` (within one memslot): how many (0: `first` is present), or -ENOENT. */
  claim(first: number, count: number): number;
  /** Guest memory of `count` pages from `first` (taken by claim; within one memslot): where their bytes go. */
  view(first: number, count: number): Uint8Array;
  /** The bytes of `count` taken pages are in: installs them, waking `ctx`'s waiters. Returns the bytes installed. */
  publish(ctx: number, first: number, count: number): number;
  /** Taken pages whose bytes will not come: missing again. */
  release(first: number, count: number): void;
}

/** A faulting thread's accesses (vCPU, I/O thread, test thread). */
export interface GuestThread {
  /** The id fault messages carry for this thread: its slot (emulated), its gettid() (uffd). */
  readonly tid: number;
  /** The guest's load of 32-bit word `word` of `page`: a missing page faults (read) and blocks. */
  load(page: number, word: number): number;
  /** The guest's store: a missing page faults (write) and blocks. */
  store(page: number, word: number, value: number): void;
}

/** UFFDIO_COPY_MODE_DONTWAKE, uffd_msg's write flag, and the errno values results are negated from. */
export { ERRNO, MODE_DONTWAKE, MODE_WP, UFFD_PAGEFAULT_FLAG_WRITE } from '../uffd/layout.js';
