/**
 * The `uffd` memory backend: guest memory is anonymous memory mapped by the
 * addon (uffd-native.ts) and registered with the kernel's userfaultfd(2).
 * A faulting thread's plain JavaScript load of a missing page blocks in the
 * kernel (fs/userfaultfd.c, handle_userfault) until a UFFDIO_COPY,
 * UFFDIO_ZEROPAGE or UFFDIO_WAKE on the context that got the fault.
 *
 * Layout: the whole guest is one mapping, so guest address a is host address
 * base + a, and one vma. Memslots are windows on it: each thread makes its
 * own ArrayBuffer over each (napi_create_external_arraybuffer), since an
 * ArrayBuffer cannot cross threads and a SharedArrayBuffer cannot be made
 * over foreign memory.
 *
 * A context is the userfaultfd's file descriptor: every thread of the
 * process can use the number. Two things follow from that:
 * - close(ctx) does not free the number: it dup2()s /dev/null over it. The
 *   userfaultfd is released (its waiters wake, its ranges are unregistered)
 *   but no file opened later by anyone (a socket...) can take the number
 *   while some thread still reads "ctx". Reads of the placeholder give end
 *   of file and ioctls ENOTTY, both reported as EBADF. The creator's
 *   dispose() frees the numbers it opened.
 * - A thread blocked in poll(2) on the fd holds the file: the release, and
 *   so the wake-up of the threads blocked in faults, waits until that poll
 *   returns. So read() polls in slices of at most POLL_SLICE_MS, whatever
 *   its timeout: a close is seen (and takes effect) within one slice.
 *
 * Facts the callers must design for (DESIGN.md, "Memory backends"): a
 * thread blocked in a fault cannot be interrupted or terminated
 * (worker.terminate() waits for it); closing or unregistering wakes it and
 * it reads zero-filled memory; the kernel has no per-thread userfaultfd;
 * 2 MiB pages need hugetlbfs pages reserved (vm.nr_hugepages).
 *
 * And one of Node's: process.exit() joins every worker thread, so a worker
 * blocked in a fault would hang the exit for ever. Each thread that opens
 * contexts closes the ones still open from a process 'exit' listener, which
 * runs before that join: the blocked threads wake (on zeros) and the exit
 * goes through. Open contexts on the main thread, so its exit covers them.
 */
import { closeSync, constants as fsConstants, openSync, readFileSync, readlinkSync } from 'node:fs';
import { BackendUnavailableError, formatBytes, makeMemslotLayout, type GuestLayout, type MemslotLayout } from '@postcopy/shared/core';
import { ERRNO } from '../uffd/layout.js';
import type { BackendHandle, BackendMemory, FaultMessage, GuestMemorySpec, GuestThread, MemoryBackend, OpenOptions } from './backend.js';
import { errnoName, MSG_FIELD, requireUffdNative, type UffdNative, type UffdPoller } from './uffd-native.js';

export interface UffdHandle extends BackendHandle {
  readonly backend: 'uffd';
  /** Host address of guest address 0. */
  readonly base: number;
  readonly layout: GuestLayout;
  readonly memslots: MemslotLayout;
  readonly maxThreads: number;
}

const BASE_PAGE = 4096;
/** Longest one poll(2) of read() lasts: how late a close of the context can take effect. */
export const POLL_SLICE_MS = 100;

/**
 * Contexts this thread opened and has not disposed of, closed at process
 * exit (see the header). Module state: one set per thread.
 */
const openAtExit = new Set<number>();
let exitGuard: (() => void) | undefined;

function guardExit(native: UffdNative, fd: number): void {
  openAtExit.add(fd);
  if (exitGuard !== undefined) return;
  exitGuard = () => {
    for (const open of openAtExit) native.close(open);
    openAtExit.clear();
  };
  process.on('exit', exitGuard);
}
/** What readlink(/proc/self/fd/N) says of a userfaultfd. */
const UFFD_LINK = 'anon_inode:[userfaultfd]';

export const uffdBackend: MemoryBackend = {
  name: 'uffd',
  create: (spec) => UffdMemory.create(spec),
  attach: (handle) => new UffdMemory(handle as UffdHandle, false),
};

export class UffdMemory implements BackendMemory {
  readonly backend = 'uffd' as const;
  readonly layout: GuestLayout;
  readonly memslots: MemslotLayout;
  readonly handle: UffdHandle;
  private readonly native: UffdNative;
  private readonly base: number;
  private readonly huge: boolean;
  private readonly buffers: ArrayBuffer[];
  private readonly words: Int32Array[];
  private readonly wordsPerPage: number;
  private readonly msgOut = new Float64Array(MSG_FIELD.LENGTH);
  /** Contexts this thread opened: dispose() frees their numbers. */
  private readonly opened = new Set<number>();
  /** readAsync's pollers, one per context this thread reads asynchronously. */
  private readonly readers = new Map<number, AsyncReader>();
  private disposed = false;

  static create(spec: GuestMemorySpec): UffdMemory {
    const native = requireUffdNative();
    const c = native.constants;
    const { layout } = spec;
    const memslots = makeMemslotLayout(layout, spec.memslotBytes);
    const huge = layout.pageSize !== BASE_PAGE;
    // hugetlb without MAP_NORESERVE: the mmap itself fails when too few huge
    // pages are reserved, instead of a later fault killing the process (SIGBUS).
    const flags = c.MAP_PRIVATE | c.MAP_ANONYMOUS | (huge ? c.MAP_HUGETLB | c.MAP_HUGE_2MB : c.MAP_NORESERVE);
    const base = native.mmap(layout.guestBytes, c.PROT_READ | c.PROT_WRITE, flags);
    if (base < 0) {
      if (huge && (base === -ERRNO.ENOMEM || base === -ERRNO.EINVAL)) throw noHugePages(layout, base);
      throw new Error(`mmap of ${formatBytes(layout.guestBytes)} of guest memory failed: ${errnoName(base)}`);
    }
    if (!huge) {
      // 4 KiB faults need 4 KiB ptes: no transparent huge pages here (QEMU
      // does the same for postcopy). EINVAL means a kernel without THP.
      const r = native.madvise(base, layout.guestBytes, c.MADV_NOHUGEPAGE);
      if (r < 0 && r !== -ERRNO.EINVAL) {
        native.munmap(base, layout.guestBytes);
        throw new Error(`madvise(MADV_NOHUGEPAGE) on guest memory failed: ${errnoName(r)}`);
      }
    }
    return new UffdMemory({ backend: 'uffd', base, layout, memslots, maxThreads: spec.maxThreads }, true);
  }

  constructor(
    handle: UffdHandle,
    private readonly owner: boolean,
  ) {
    this.native = requireUffdNative();
    this.handle = handle;
    this.layout = handle.layout;
    this.memslots = handle.memslots;
    this.base = handle.base;
    this.huge = handle.layout.pageSize !== BASE_PAGE;
    this.wordsPerPage = handle.layout.pageSize >>> 2;
    this.buffers = [];
    for (let i = 0; i < handle.memslots.count; i++) {
      const first = i * handle.memslots.pagesPerMemslot;
      const pages = Math.min(handle.memslots.pagesPerMemslot, handle.layout.totalPages - first);
      this.buffers.push(externalBuffer(this.native, this.base + first * handle.layout.pageSize, pages * handle.layout.pageSize));
    }
    this.words = this.buffers.map((b) => new Int32Array(b));
  }

  memslot(index: number): ArrayBuffer {
    const buffer = this.buffers[index];
    if (buffer === undefined) throw new RangeError(`expected a memslot index < ${this.buffers.length}, got ${index}`);
    return buffer;
  }

  bindThread(slot: number): GuestThread {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.handle.maxThreads) {
      throw new RangeError(`expected a thread slot from 0 to ${this.handle.maxThreads - 1}, got ${slot}`);
    }
    const words = this.words;
    const perSlot = this.memslots.pagesPerMemslot;
    const wordsPerPage = this.wordsPerPage;
    // The access is the fault: a missing page blocks this thread in the
    // kernel right here, and the message carries gettid().
    return {
      tid: this.native.gettid(),
      load(page: number, word: number): number {
        const slotIndex = Math.floor(page / perSlot);
        return words[slotIndex]![(page - slotIndex * perSlot) * wordsPerPage + word]!;
      },
      store(page: number, word: number, value: number): void {
        const slotIndex = Math.floor(page / perSlot);
        words[slotIndex]![(page - slotIndex * perSlot) * wordsPerPage + word] = value;
      },
    };
  }

  /** The task sleeps in handle_userfault (its wchan): blocked in a userfault, on any context. */
  isBlockedInFault(tid: number): boolean {
    try {
      return readFileSync(`/proc/self/task/${tid}/wchan`, 'utf8') === 'handle_userfault';
    } catch {
      return false; // no such thread (any more)
    }
  }

  // ---------------------------------------------------------------- contexts

  open(options: OpenOptions = {}): number {
    if (options.thread !== undefined) {
      throw new BackendUnavailableError(
        'uffd',
        'the kernel has no per-thread userfaultfd (it exists only as a proposal): per-thread-uffd runs on --memory-backend emulated; ' +
          "on uffd use --strategy per-region-uffd (one userfaultfd per vCPU's memory partition, which the kernel has)",
      );
    }
    const c = this.native.constants;
    const flags = c.O_CLOEXEC | c.O_NONBLOCK;
    const fd = openUserfaultfd(this.native, flags);
    const features = c.UFFD_FEATURE_THREAD_ID | (this.huge ? c.UFFD_FEATURE_MISSING_HUGETLBFS : 0);
    const api = new BigUint64Array(2);
    const r = this.native.uffdioApi(fd, features, api);
    if (r < 0) {
      this.native.close(fd);
      throw new BackendUnavailableError(
        'uffd',
        `UFFDIO_API refused features 0x${features.toString(16)} (UFFD_FEATURE_THREAD_ID${this.huge ? ' | UFFD_FEATURE_MISSING_HUGETLBFS' : ''}): ${errnoName(r)}; the kernel offers 0x${api[0]!.toString(16)}`,
      );
    }
    this.opened.add(fd);
    guardExit(this.native, fd);
    return fd;
  }

  register(ctx: number, start: number, len: number): number {
    const bad = this.checkRange(start, len, -ERRNO.EINVAL);
    if (bad !== 0) return bad;
    const ioctls = new BigUint64Array(1);
    return closedAsEbadf(this.native.uffdioRegister(ctx, this.base + start, len, this.native.constants.UFFDIO_REGISTER_MODE_MISSING, ioctls));
  }

  unregister(ctx: number, start: number, len: number): number {
    const bad = this.checkRange(start, len, -ERRNO.EINVAL);
    if (bad !== 0) return bad;
    return closedAsEbadf(this.native.uffdioUnregister(ctx, this.base + start, len));
  }

  tryRead(ctx: number, msg: FaultMessage): number {
    const out = this.msgOut;
    const n = this.native.readMsg(ctx, out);
    if (n < 0) return n; // -EAGAIN: nothing pending; -EBADF
    if (n === 0) return -ERRNO.EBADF; // end of file: the /dev/null a close left
    const c = this.native.constants;
    if (n !== c.UFFD_MSG_SIZE) throw new Error(`expected a ${c.UFFD_MSG_SIZE}-byte uffd_msg from context ${ctx}, got ${n} bytes`);
    if (out[MSG_FIELD.EVENT] !== c.UFFD_EVENT_PAGEFAULT) {
      throw new Error(`expected UFFD_EVENT_PAGEFAULT (0x${c.UFFD_EVENT_PAGEFAULT.toString(16)}) from context ${ctx}, got event 0x${out[MSG_FIELD.EVENT]!.toString(16)}`);
    }
    const address = out[MSG_FIELD.ADDRESS]! - this.base;
    if (address < 0 || address >= this.layout.guestBytes) {
      throw new Error(`expected a fault inside the guest's ${formatBytes(this.layout.guestBytes)}, got guest address ${address}`);
    }
    msg.address = address;
    msg.flags = out[MSG_FIELD.FLAGS]!;
    msg.tid = out[MSG_FIELD.PTID]!;
    return 0;
  }

  read(ctx: number, msg: FaultMessage, timeoutMs: number): number {
    const deadline = performance.now() + timeoutMs;
    const c = this.native.constants;
    for (;;) {
      const r = this.tryRead(ctx, msg);
      if (r !== -ERRNO.EAGAIN) return r;
      const left = deadline - performance.now();
      if (left <= 0) return -ERRNO.EAGAIN;
      // Another reader may take the message poll saw: then tryRead says
      // EAGAIN again and we poll for what is left of the timeout.
      // Never poll without a bound: our poll would hold off a close (see the header).
      const revents = this.native.pollIn(ctx, Math.min(POLL_SLICE_MS, Math.ceil(left)));
      if (revents === -ERRNO.EINTR || revents === 0) continue;
      if (revents < 0) return revents;
      if ((revents & c.POLLNVAL) !== 0) return -ERRNO.EBADF;
      if ((revents & c.POLLERR) !== 0) throw new Error(`poll of userfaultfd context ${ctx} gave POLLERR (not O_NONBLOCK, or no UFFDIO_API)`);
    }
  }

  async readAsync(ctx: number, msg: FaultMessage, signal?: AbortSignal): Promise<number> {
    if (signal?.aborted) return -ERRNO.EINTR;
    const now = this.tryRead(ctx, msg);
    if (now !== -ERRNO.EAGAIN) return now;
    let reader = this.readers.get(ctx);
    if (reader === undefined) {
      reader = new AsyncReader(this.native, ctx);
      this.readers.set(ctx, reader);
    }
    const armed = reader;
    // An abort stops the poller (its thread joined: no callback of it runs
    // after this), so the pending read can take no message: it ends -EINTR.
    const onAbort = (): void => {
      armed.stop(-ERRNO.EINTR);
      if (this.readers.get(ctx) === armed) this.readers.delete(ctx);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      const r = await armed.next(() => this.tryRead(ctx, msg));
      if (r === -ERRNO.EBADF) {
        // Closed: its poller has nothing left to watch.
        armed.stop();
        this.readers.delete(ctx);
      }
      return r;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  copy(ctx: number, dst: number, src: ArrayBufferView, len: number, mode = 0): number {
    const bad = this.checkRange(dst, len, -ERRNO.ENOENT);
    if (bad !== 0) return bad;
    if (src.byteLength < len) return -ERRNO.EFAULT;
    return closedAsEbadf(this.native.uffdioCopy(ctx, this.base + dst, src, len, mode));
  }

  zeropage(ctx: number, dst: number, len: number, mode = 0): number {
    const bad = this.checkRange(dst, len, -ERRNO.ENOENT);
    if (bad !== 0) return bad;
    // On hugetlb the kernel answers EINVAL itself (mm/userfaultfd.c, mfill_atomic_hugetlb).
    return closedAsEbadf(this.native.uffdioZeropage(ctx, this.base + dst, len, mode));
  }

  wake(ctx: number, start: number, len: number): number {
    if (!this.aligned(start, len)) return -ERRNO.EINVAL;
    return closedAsEbadf(this.native.uffdioWake(ctx, this.base + start, len));
  }

  discard(start: number, len: number): number {
    const bad = this.checkRange(start, len, -ERRNO.EINVAL);
    if (bad !== 0) return bad;
    // MADV_DONTNEED zaps the ptes: the next touch of a registered page is a
    // missing fault again. Without UFFD_FEATURE_EVENT_REMOVE no event is queued.
    return this.native.madvise(this.base + start, len, this.native.constants.MADV_DONTNEED);
  }

  close(ctx: number): number {
    if (!isUserfaultfd(ctx)) return -ERRNO.EBADF;
    // Keep the number (see the header): /dev/null takes its place, the
    // userfaultfd's last reference goes, userfaultfd_release() runs.
    const placeholder = openSync('/dev/null', fsConstants.O_RDONLY);
    try {
      const r = this.native.dup2(placeholder, ctx);
      return r < 0 ? r : 0;
    } finally {
      closeSync(placeholder);
    }
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const reader of this.readers.values()) reader.stop();
    this.readers.clear();
    // Close first: no thread may stay blocked on memory about to go away.
    for (const fd of this.opened) {
      this.native.close(fd);
      openAtExit.delete(fd);
    }
    this.opened.clear();
    if (this.owner) {
      const r = this.native.munmap(this.base, this.layout.guestBytes);
      if (r < 0) throw new Error(`munmap of guest memory failed: ${errnoName(r)}`);
    }
  }

  // ---------------------------------------------------------------- internals

  private aligned(start: number, len: number): boolean {
    const size = this.layout.pageSize;
    return Number.isSafeInteger(start) && Number.isSafeInteger(len) && start >= 0 && len > 0 && start % size === 0 && len % size === 0;
  }

  /**
   * The guest's own check, before the kernel sees an address: misaligned →
   * EINVAL; past the guest → `outside` (for COPY the ENOENT an unregistered
   * range gives). Past the guest the kernel would act on whatever else is
   * mapped there, possibly another guest's memory.
   */
  private checkRange(start: number, len: number, outside: number): number {
    if (!this.aligned(start, len)) return -ERRNO.EINVAL;
    if (start + len > this.layout.guestBytes) return outside;
    return 0;
  }
}

/**
 * readAsync's side of a native poller (uffd.c): arms it, and on each
 * readiness tries the read; a message another reader took first (EAGAIN)
 * arms it again. The poller's slices (POLL_SLICE_MS) let a close through,
 * after which the read finds the /dev/null and gives EBADF.
 */
class AsyncReader {
  private readonly poller: UffdPoller;
  private pending: { attempt: () => number; resolve: (result: number) => void } | undefined;

  constructor(
    private readonly native: UffdNative,
    ctx: number,
  ) {
    const poller = native.pollerCreate(ctx, POLL_SLICE_MS, (revents) => this.ready(revents));
    if (typeof poller === 'number') throw new Error(`expected a poller for userfaultfd context ${ctx}, got ${errnoName(poller)}`);
    this.poller = poller;
  }

  next(attempt: () => number): Promise<number> {
    if (this.pending !== undefined) throw new Error('expected one readAsync at a time per context in a thread, got a second while the first is pending');
    return new Promise((resolve) => {
      this.pending = { attempt, resolve };
      this.native.pollerArm(this.poller);
    });
  }

  /** Ends the poller's thread; a pending read resolves with `result` (-EBADF: closed, -EINTR: aborted). */
  stop(result: number = -ERRNO.EBADF): void {
    this.native.pollerStop(this.poller);
    const pending = this.pending;
    this.pending = undefined;
    pending?.resolve(result);
  }

  private ready(_revents: number): void {
    const pending = this.pending;
    if (pending === undefined) {
      this.native.pollerIdle(this.poller);
      return;
    }
    const r = pending.attempt();
    if (r === -ERRNO.EAGAIN) {
      this.native.pollerArm(this.poller);
      return;
    }
    this.pending = undefined;
    this.native.pollerIdle(this.poller);
    pending.resolve(r);
  }
}

/** ENOTTY: the ioctl hit the /dev/null a close left in the context's place. */
function closedAsEbadf(result: number): number {
  return result === -ERRNO.ENOTTY ? -ERRNO.EBADF : result;
}

function isUserfaultfd(fd: number): boolean {
  if (!Number.isInteger(fd) || fd < 0) return false;
  try {
    return readlinkSync(`/proc/self/fd/${fd}`) === UFFD_LINK;
  } catch {
    return false;
  }
}

function externalBuffer(native: UffdNative, address: number, length: number): ArrayBuffer {
  try {
    return native.externalArrayBuffer(address, length);
  } catch (err) {
    throw new BackendUnavailableError(
      'uffd',
      `this Node refuses an ArrayBuffer over the guest's memory (${(err as Error).message}); Node builds with the V8 sandbox allow no external buffers: use an official Node 20 build, or --memory-backend emulated`,
    );
  }
}

/**
 * userfaultfd(2), falling back to /dev/userfaultfd (Linux 6.1), whose access
 * is by file permission rather than by vm.unprivileged_userfaultfd.
 */
function openUserfaultfd(native: UffdNative, flags: number): number {
  const fd = native.userfaultfd(flags);
  if (fd >= 0) return fd;
  if (fd === -ERRNO.ENOSYS) {
    throw new BackendUnavailableError('uffd', 'this kernel has no userfaultfd(2) (ENOSYS: built without CONFIG_USERFAULTFD)');
  }
  if (fd !== -ERRNO.EPERM) throw new Error(`userfaultfd(2) failed: ${errnoName(fd)}`);
  let devfd: number;
  try {
    devfd = openSync('/dev/userfaultfd', fsConstants.O_RDWR);
  } catch (err) {
    throw permissionError(`open of /dev/userfaultfd failed (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
  try {
    const r = native.userfaultfdIocNew(devfd, flags);
    if (r < 0) throw permissionError(`USERFAULTFD_IOC_NEW on /dev/userfaultfd failed (${errnoName(r)})`);
    return r;
  } finally {
    closeSync(devfd);
  }
}

function permissionError(devResult: string): BackendUnavailableError {
  let sysctl = 'unknown';
  try {
    sysctl = readFileSync('/proc/sys/vm/unprivileged_userfaultfd', 'utf8').trim();
  } catch {
    // not readable: say so as "unknown"
  }
  return new BackendUnavailableError(
    'uffd',
    `no permission to open a userfaultfd: userfaultfd(2) gave EPERM (this process lacks CAP_SYS_PTRACE and vm.unprivileged_userfaultfd is ${sysctl}), and ${devResult}. ` +
      'Allow it with `sysctl vm.unprivileged_userfaultfd=1`, or read-write access to /dev/userfaultfd for this user (chmod, chgrp or an ACL), or run as root; or use --memory-backend emulated',
  );
}

function noHugePages(layout: GuestLayout, result: number): BackendUnavailableError {
  const meminfo = (() => {
    try {
      return readFileSync('/proc/meminfo', 'utf8');
    } catch {
      return '';
    }
  })();
  const free = /HugePages_Free:\s+(\d+)/.exec(meminfo)?.[1] ?? 'unknown';
  const needed = layout.guestBytes / layout.pageSize;
  return new BackendUnavailableError(
    'uffd',
    `2 MiB pages on uffd need hugetlbfs pages: mapping ${formatBytes(layout.guestBytes)} with MAP_HUGETLB failed (${errnoName(result)}); expected ${needed} free 2 MiB huge pages, got ${free} (HugePages_Free). Reserve them with \`sysctl vm.nr_hugepages=${needed}\` (as root), or use --page-size 4KiB`,
  );
}
