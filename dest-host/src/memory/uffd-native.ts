/**
 * The uffd addon (dest-host/native/uffd/uffd.c), typed; shared/src/addon.ts
 * loads it once per thread, with the reason when it cannot be.
 *
 * The addon is one thin function per system call or ioctl returning what the
 * kernel returned (a result, or -errno); this file only names its fields.
 * What the results mean is decided in uffd-backend.ts.
 */
import { constants as osConstants } from 'node:os';
import { BackendUnavailableError, loadAddon, type AddonLoad } from '@postcopy/shared/core';

/** Field indices of the Float64Array `readMsg` fills (MSG_* in uffd.c). */
export const MSG_FIELD = {
  EVENT: 0,
  FLAGS: 1,
  ADDRESS: 2,
  PTID: 3,
  LENGTH: 4,
} as const;

export interface UffdNativeConstants {
  PROT_READ: number;
  PROT_WRITE: number;
  MAP_PRIVATE: number;
  MAP_ANONYMOUS: number;
  MAP_NORESERVE: number;
  MAP_HUGETLB: number;
  MAP_HUGE_2MB: number;
  MADV_DONTNEED: number;
  MADV_NOHUGEPAGE: number;
  O_CLOEXEC: number;
  O_NONBLOCK: number;
  UFFD_USER_MODE_ONLY: number;
  UFFD_FEATURE_MISSING_HUGETLBFS: number;
  UFFD_FEATURE_THREAD_ID: number;
  UFFDIO_REGISTER_MODE_MISSING: number;
  UFFDIO_COPY_MODE_DONTWAKE: number;
  UFFDIO_ZEROPAGE_MODE_DONTWAKE: number;
  UFFD_EVENT_PAGEFAULT: number;
  UFFD_PAGEFAULT_FLAG_WRITE: number;
  /** Bit number of UFFDIO_ZEROPAGE in uffdio_register.ioctls. */
  _UFFDIO_ZEROPAGE: number;
  POLLIN: number;
  POLLERR: number;
  POLLHUP: number;
  POLLNVAL: number;
  UFFD_MSG_SIZE: number;
  /** 1 when the addon was built with the TLS client (node's OpenSSL headers found), else 0. */
  HAVE_TLS: number;
}

/** Every function returns what the kernel returned: a result >= 0, or -errno. */
export interface UffdNative {
  gettid(): number;
  mmap(length: number, prot: number, flags: number): number;
  munmap(address: number, length: number): number;
  madvise(address: number, length: number, advice: number): number;
  /** An ArrayBuffer of this thread's own over [address, address + length); throws where Node refuses external buffers. */
  externalArrayBuffer(address: number, length: number): ArrayBuffer;
  userfaultfd(flags: number): number;
  userfaultfdIocNew(devfd: number, flags: number): number;
  close(fd: number): number;
  dup2(oldfd: number, newfd: number): number;
  /** poll(2) for POLLIN: revents, 0 on timeout; timeoutMs < 0 waits for ever. */
  pollIn(fd: number, timeoutMs: number): number;
  /** read(2) of one struct uffd_msg into out[MSG_FIELD.*]: bytes read, 0 at end of file. */
  readMsg(fd: number, out: Float64Array): number;
  /** UFFDIO_API: out = [features available, ioctls]. */
  uffdioApi(fd: number, features: number, out: BigUint64Array): number;
  /** UFFDIO_REGISTER: out = [ioctls the range supports]. */
  uffdioRegister(fd: number, start: number, len: number, mode: number, out: BigUint64Array): number;
  uffdioUnregister(fd: number, start: number, len: number): number;
  /** UFFDIO_COPY: the `copy` field, bytes copied or -errno. */
  uffdioCopy(fd: number, dst: number, src: ArrayBufferView, len: number, mode: number): number;
  /** UFFDIO_ZEROPAGE: the `zeropage` field, bytes zeroed or -errno. */
  uffdioZeropage(fd: number, dst: number, len: number, mode: number): number;
  uffdioWake(fd: number, start: number, len: number): number;
  /**
   * A native thread that polls `fd` (in slices of `sliceMs`) while armed and
   * calls `callback(revents)` on this thread once per arm; or -errno.
   * Idle (disarmed) it does not keep the event loop alive; armed it does.
   */
  pollerCreate(fd: number, sliceMs: number, callback: (revents: number) => void): UffdPoller | number;
  pollerArm(poller: UffdPoller): number;
  /** Lets the event loop end while disarmed (after a callback). */
  pollerIdle(poller: UffdPoller): number;
  /** Ends the poller's thread. Idempotent. */
  pollerStop(poller: UffdPoller): number;
  /** A blocking TCP connection to a numeric address (family 4 or 6), TCP_NODELAY: its fd, or -errno. */
  tcpConnect(address: string, port: number, family: number, timeoutMs: number): number;
  /** SO_RCVTIMEO and SO_SNDTIMEO: a blocked recv or send gives -EAGAIN after that long (0 = never). */
  sockSetTimeouts(fd: number, recvMs: number, sendMs: number): number;
  /** send(2) of view[offset, offset + length) until all is sent: the length, or -errno. */
  sockSend(fd: number, view: ArrayBufferView, offset: number, length: number): number;
  /** One recv(2) into view[offset, offset + length): bytes read, 0 at end of stream, -EAGAIN on timeout, or -errno. */
  sockRecv(fd: number, view: ArrayBufferView, offset: number, length: number): number;
  /** shutdown(2) both ways. */
  sockShutdown(fd: number): number;
  /** FUTEX_WAIT_PRIVATE on word `index`: 0 woken, -EAGAIN (not `expected`), -ETIMEDOUT or -EINTR. */
  futexWait(words: Int32Array, index: number, expected: number, timeoutMs: number): number;
  /** FUTEX_WAKE_PRIVATE on word `index`: threads woken, or -errno. */
  futexWake(words: Int32Array, index: number, count: number): number;
  /**
   * A TLS client handshake on a connected blocking socket (node's own
   * OpenSSL): the peer verified against `caPem` and `name` (an IP address
   * when isIp; else also sent as SNI), with an optional client certificate.
   * The connection, or -errno (then tlsError(null) says why). Absent (with
   * the other tls functions) where constants.HAVE_TLS is 0.
   */
  tlsConnect(fd: number, caPem: string, certPem: string | null, keyPem: string | null, name: string, isIp: boolean): TlsConnection | number;
  /** SSL_write of view[offset, offset + length) until all is written: the length, or -errno. */
  tlsSend(tls: TlsConnection, view: ArrayBufferView, offset: number, length: number): number;
  /** One SSL_read: bytes read, 0 at the end of the stream, -EAGAIN on timeout, or -errno. */
  tlsRecv(tls: TlsConnection, view: ArrayBufferView, offset: number, length: number): number;
  /** What the connection's last failure was (null: this thread's last failed tlsConnect). */
  tlsError(tls: TlsConnection | null): string;
  /** Frees the connection (its socket is the caller's). */
  tlsClose(tls: TlsConnection): number;
  constants: UffdNativeConstants;
}

/** An opaque TLS connection (a Node-API external). */
export interface TlsConnection {
  readonly __tlsConnection: never;
}

/** An opaque native poller (a Node-API external). */
export interface UffdPoller {
  readonly __uffdPoller: never;
}

export type NativeLoad = AddonLoad<UffdNative>;

/** Loads the addon in this thread (once), or says why it cannot be. */
export function loadUffdNative(): NativeLoad {
  return loadAddon<UffdNative>();
}

/** The addon, or a {@link BackendUnavailableError} saying why it is not there. */
export function requireUffdNative(): UffdNative {
  const load = loadUffdNative();
  if (!load.ok) throw new BackendUnavailableError('uffd', `the uffd memory backend is unavailable: ${load.reason}`);
  return load.native;
}

const errnoNames = new Map<number, string>();
// First name wins: EAGAIN before its alias EWOULDBLOCK, and so on.
for (const [name, value] of Object.entries(osConstants.errno)) if (!errnoNames.has(value)) errnoNames.set(value, name);

/** `-17` → `EEXIST`; a non-negative result → its number as text. */
export function errnoName(result: number): string {
  if (result >= 0) return String(result);
  return errnoNames.get(-result) ?? `errno ${-result}`;
}
