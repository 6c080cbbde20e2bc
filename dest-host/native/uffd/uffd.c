/*
 * uffd.node: the system calls and ioctls of the `uffd` memory backend, over
 * Node-API only (node_api.h; no V8, no libuv).
 *
 * One small function per system call or ioctl. Each returns what the kernel
 * returned: a non-negative result, or a negated errno. Nothing here decides
 * anything: validation, names, policy and error messages live in TypeScript
 * above it (dest-host/src/memory/uffd-native.ts and uffd-backend.ts), in the
 * manner of sodium-native.
 *
 * A wrong argument *type* is a programming error and throws a TypeError; a
 * kernel error is a return value.
 *
 * Addresses cross into JavaScript as numbers: x86-64 and arm64 user addresses
 * are below 2^48, well inside the 2^53 a double holds exactly.
 *
 * References: Linux fs/userfaultfd.c (userfaultfd(2), the ioctls, read(2) of
 * struct uffd_msg), mm/userfaultfd.c (mfill_atomic: what UFFDIO_COPY and
 * UFFDIO_ZEROPAGE do page by page), include/uapi/linux/userfaultfd.h, and
 * tools/testing/selftests/mm/uffd-common.c for how the kernel's own tests
 * drive them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <linux/userfaultfd.h>
#include <node_api.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#ifndef POSTCOPY_NO_TLS
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#endif

#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif
#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << MAP_HUGE_SHIFT)
#endif
#ifndef USERFAULTFD_IOC_NEW
/* /dev/userfaultfd (Linux 6.1): include/uapi/linux/userfaultfd.h */
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

/* ------------------------------------------------------------------ helpers */

#define CHECK(call)                                                            \
  do {                                                                         \
    if ((call) != napi_ok) return NULL;                                        \
  } while (0)

static napi_value throw_type(napi_env env, const char *message) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
  return NULL;
}

/* Fetches exactly `n` arguments into argv; throws when fewer were passed. */
static int get_args(napi_env env, napi_callback_info info, size_t n, napi_value *argv) {
  size_t argc = n;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return 0;
  if (argc < n) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS", "uffd.node: too few arguments");
    return 0;
  }
  return 1;
}

/* A number argument as int64 (integers only; the TypeScript layer checks ranges). */
static int get_i64(napi_env env, napi_value value, int64_t *out) {
  napi_valuetype type;
  if (napi_typeof(env, value, &type) != napi_ok) return 0;
  if (type != napi_number) {
    throw_type(env, "uffd.node: expected a number");
    return 0;
  }
  return napi_get_value_int64(env, value, out) == napi_ok;
}

static napi_value make_i64(napi_env env, int64_t value) {
  napi_value result;
  /* napi_create_int64 goes through a double: exact below 2^53. */
  CHECK(napi_create_int64(env, value, &result));
  return result;
}

/* The kernel's way: a result, or -errno. */
static napi_value result_or_errno(napi_env env, int64_t r) {
  return make_i64(env, r < 0 ? -(int64_t)errno : r);
}

/* The bytes of a TypedArray or DataView argument (its byteOffset applied). */
static int get_bytes(napi_env env, napi_value value, void **data, size_t *length) {
  bool is_typed = false;
  if (napi_is_typedarray(env, value, &is_typed) != napi_ok) return 0;
  if (is_typed) {
    napi_typedarray_type type;
    size_t count;
    napi_value ab;
    size_t offset;
    if (napi_get_typedarray_info(env, value, &type, &count, data, &ab, &offset) != napi_ok) return 0;
    size_t unit = 1;
    switch (type) {
      case napi_int16_array: case napi_uint16_array: unit = 2; break;
      case napi_int32_array: case napi_uint32_array: case napi_float32_array: unit = 4; break;
      case napi_float64_array: case napi_bigint64_array: case napi_biguint64_array: unit = 8; break;
      default: unit = 1;
    }
    *length = count * unit;
    return 1;
  }
  bool is_view = false;
  if (napi_is_dataview(env, value, &is_view) != napi_ok) return 0;
  if (is_view) {
    napi_value ab;
    size_t offset;
    return napi_get_dataview_info(env, value, length, data, &ab, &offset) == napi_ok;
  }
  throw_type(env, "uffd.node: expected a TypedArray or DataView");
  return 0;
}

/* A typed array of a given kind with at least `min` elements; `length` (may be NULL) gets its element count. */
static int get_typed(napi_env env, napi_value value, napi_typedarray_type want, size_t min, void **data, size_t *length) {
  bool is_typed = false;
  if (napi_is_typedarray(env, value, &is_typed) != napi_ok) return 0;
  napi_typedarray_type type;
  size_t count;
  napi_value ab;
  size_t offset;
  if (!is_typed || napi_get_typedarray_info(env, value, &type, &count, data, &ab, &offset) != napi_ok ||
      type != want || count < min) {
    throw_type(env, want == napi_float64_array   ? "uffd.node: expected a Float64Array of the right length"
                    : want == napi_int32_array ? "uffd.node: expected an Int32Array"
                    : want == napi_uint32_array ? "uffd.node: expected a Uint32Array"
                                               : "uffd.node: expected a BigUint64Array of the right length");
    return 0;
  }
  if (length != NULL) *length = count;
  return 1;
}

/* ------------------------------------------------------------------ threads */

/* gettid(2): the id the kernel puts in uffd_msg.pagefault.feat.ptid (UFFD_FEATURE_THREAD_ID). */
static napi_value js_gettid(napi_env env, napi_callback_info info) {
  (void)info;
  return make_i64(env, (int64_t)syscall(SYS_gettid));
}

/* ------------------------------------------------------------------ memory */

/* mmap(NULL, length, prot, flags, -1, 0) -> address | -errno */
static napi_value js_mmap(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t length, prot, flags;
  if (!get_args(env, info, 3, argv) || !get_i64(env, argv[0], &length) || !get_i64(env, argv[1], &prot) ||
      !get_i64(env, argv[2], &flags))
    return NULL;
  void *p = mmap(NULL, (size_t)length, (int)prot, (int)flags, -1, 0);
  if (p == MAP_FAILED) return make_i64(env, -(int64_t)errno);
  return make_i64(env, (int64_t)(uintptr_t)p);
}

/* munmap(address, length) -> 0 | -errno */
static napi_value js_munmap(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t addr, length;
  if (!get_args(env, info, 2, argv) || !get_i64(env, argv[0], &addr) || !get_i64(env, argv[1], &length)) return NULL;
  return result_or_errno(env, munmap((void *)(uintptr_t)addr, (size_t)length));
}

/* madvise(address, length, advice) -> 0 | -errno (MADV_DONTNEED: QEMU's ram_discard_range) */
static napi_value js_madvise(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t addr, length, advice;
  if (!get_args(env, info, 3, argv) || !get_i64(env, argv[0], &addr) || !get_i64(env, argv[1], &length) ||
      !get_i64(env, argv[2], &advice))
    return NULL;
  return result_or_errno(env, madvise((void *)(uintptr_t)addr, (size_t)length, (int)advice));
}

/*
 * An ArrayBuffer over [address, address + length), in the calling thread's
 * isolate: every worker calls this for itself, so each has its own
 * ArrayBuffer over the one mapping. No finalizer: the mapping belongs to
 * whoever mapped it, and must outlive every ArrayBuffer over it.
 *
 * Builds of Node with the V8 sandbox refuse external buffers: the call
 * returns napi_no_external_buffers_allowed (Node 20's headers have the
 * status; Electron 21 and later are such builds). Official Node 20 builds
 * have no sandbox and allow them, in the main thread and in every worker:
 * dest-host/src/memory/uffd-backend.test.ts and the conformance suite make
 * one per thread over the same mapping. Either way a failure is thrown with
 * its status, so the TypeScript layer can say what happened.
 */
static napi_value js_external_arraybuffer(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t addr, length;
  if (!get_args(env, info, 2, argv) || !get_i64(env, argv[0], &addr) || !get_i64(env, argv[1], &length)) return NULL;
  napi_value ab;
  napi_status status = napi_create_external_arraybuffer(env, (void *)(uintptr_t)addr, (size_t)length, NULL, NULL, &ab);
  if (status != napi_ok) {
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (pending) return NULL;
    char code[32];
    snprintf(code, sizeof code, "NAPI_STATUS_%d", (int)status);
    napi_throw_error(env, code,
                     status == napi_no_external_buffers_allowed
                         ? "napi_create_external_arraybuffer: napi_no_external_buffers_allowed"
                         : "napi_create_external_arraybuffer failed");
    return NULL;
  }
  return ab;
}

/* ------------------------------------------------------------------ file descriptors */

/* userfaultfd(2) -> fd | -errno. EPERM: no CAP_SYS_PTRACE and vm.unprivileged_userfaultfd=0 (fs/userfaultfd.c). */
static napi_value js_userfaultfd(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t flags;
  if (!get_args(env, info, 1, argv) || !get_i64(env, argv[0], &flags)) return NULL;
#ifdef SYS_userfaultfd
  return result_or_errno(env, syscall(SYS_userfaultfd, (int)flags));
#else
  return make_i64(env, -ENOSYS);
#endif
}

/* ioctl(devfd, USERFAULTFD_IOC_NEW, flags) on an open /dev/userfaultfd -> fd | -errno */
static napi_value js_userfaultfd_ioc_new(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t devfd, flags;
  if (!get_args(env, info, 2, argv) || !get_i64(env, argv[0], &devfd) || !get_i64(env, argv[1], &flags)) return NULL;
  return result_or_errno(env, ioctl((int)devfd, USERFAULTFD_IOC_NEW, (int)flags));
}

/* close(fd) -> 0 | -errno */
static napi_value js_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t fd;
  if (!get_args(env, info, 1, argv) || !get_i64(env, argv[0], &fd)) return NULL;
  return result_or_errno(env, close((int)fd));
}

/* dup2(oldfd, newfd) -> newfd | -errno */
static napi_value js_dup2(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t oldfd, newfd;
  if (!get_args(env, info, 2, argv) || !get_i64(env, argv[0], &oldfd) || !get_i64(env, argv[1], &newfd)) return NULL;
  return result_or_errno(env, dup2((int)oldfd, (int)newfd));
}

/*
 * poll(2) for POLLIN on one fd -> revents (> 0) | 0 on timeout | -errno.
 * timeout_ms < 0 waits for ever. Blocks the calling thread: for workers.
 * userfaultfd_poll() answers EPOLLERR unless the fd is O_NONBLOCK.
 */
static napi_value js_poll_in(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t fd, timeout;
  if (!get_args(env, info, 2, argv) || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &timeout)) return NULL;
  struct pollfd p = {.fd = (int)fd, .events = POLLIN, .revents = 0};
  int r = poll(&p, 1, timeout > INT32_MAX ? INT32_MAX : (int)timeout);
  return make_i64(env, r < 0 ? -(int64_t)errno : r == 0 ? 0 : p.revents);
}

/* Field indices of the Float64Array read_msg fills (mirrored as MSG_FIELD in uffd-native.ts). */
enum { MSG_EVENT = 0, MSG_FLAGS = 1, MSG_ADDRESS = 2, MSG_PTID = 3, MSG_FIELDS = 4 };

/*
 * read(2) of one struct uffd_msg -> bytes read (32) | 0 at end of file | -errno
 * (-EAGAIN: nothing pending on the O_NONBLOCK fd). Fills out[MSG_*].
 * Only UFFD_EVENT_PAGEFAULT carries flags, address and ptid; other events
 * leave them 0 (none are enabled by this backend).
 */
static napi_value js_read_msg(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int64_t fd;
  double *out;
  if (!get_args(env, info, 2, argv) || !get_i64(env, argv[0], &fd) ||
      !get_typed(env, argv[1], napi_float64_array, MSG_FIELDS, (void **)&out, NULL))
    return NULL;
  struct uffd_msg msg;
  memset(&msg, 0, sizeof msg);
  ssize_t n = read((int)fd, &msg, sizeof msg);
  if (n < 0) return make_i64(env, -(int64_t)errno);
  out[MSG_EVENT] = msg.event;
  out[MSG_FLAGS] = 0;
  out[MSG_ADDRESS] = 0;
  out[MSG_PTID] = 0;
  if (n == (ssize_t)sizeof msg && msg.event == UFFD_EVENT_PAGEFAULT) {
    out[MSG_FLAGS] = (double)msg.arg.pagefault.flags;
    out[MSG_ADDRESS] = (double)msg.arg.pagefault.address;
    out[MSG_PTID] = (double)msg.arg.pagefault.feat.ptid;
  }
  return make_i64(env, n);
}

/* ------------------------------------------------------------------ ioctls */

/* UFFDIO_API -> 0 | -errno; out[0] = features granted, out[1] = ioctls (a BigUint64Array of 2). */
static napi_value js_uffdio_api(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t fd, features;
  uint64_t *out;
  if (!get_args(env, info, 3, argv) || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &features) ||
      !get_typed(env, argv[2], napi_biguint64_array, 2, (void **)&out, NULL))
    return NULL;
  struct uffdio_api api = {.api = UFFD_API, .features = (uint64_t)features, .ioctls = 0};
  int r = ioctl((int)fd, UFFDIO_API, &api);
  out[0] = api.features;
  out[1] = api.ioctls;
  return result_or_errno(env, r);
}

/* UFFDIO_REGISTER -> 0 | -errno; out[0] = the ioctls the range supports (a BigUint64Array of 1). */
static napi_value js_uffdio_register(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int64_t fd, start, len, mode;
  uint64_t *out;
  if (!get_args(env, info, 5, argv) || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &start) ||
      !get_i64(env, argv[2], &len) || !get_i64(env, argv[3], &mode) ||
      !get_typed(env, argv[4], napi_biguint64_array, 1, (void **)&out, NULL))
    return NULL;
  struct uffdio_register reg = {.range = {.start = (uint64_t)start, .len = (uint64_t)len}, .mode = (uint64_t)mode};
  int r = ioctl((int)fd, UFFDIO_REGISTER, &reg);
  out[0] = r == 0 ? reg.ioctls : 0;
  return result_or_errno(env, r);
}

/* UFFDIO_UNREGISTER -> 0 | -errno (wakes the range's waiters: userfaultfd_unregister) */
static napi_value js_uffdio_unregister(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t fd, start, len;
  if (!get_args(env, info, 3, argv) || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &start) ||
      !get_i64(env, argv[2], &len))
    return NULL;
  struct uffdio_range range = {.start = (uint64_t)start, .len = (uint64_t)len};
  return result_or_errno(env, ioctl((int)fd, UFFDIO_UNREGISTER, &range));
}

/*
 * What a UFFDIO_COPY or UFFDIO_ZEROPAGE result field says, as one number.
 * userfaultfd_copy() writes the field only once mfill_atomic ran: bytes
 * copied (> 0; with the ioctl failing EAGAIN when short of len), or a
 * negated errno (EEXIST, ENOENT, ...). Validation errors before that
 * (EINVAL for a misaligned range) leave the field as we set it (0) and come
 * back as the ioctl's errno. So: the field when it was written, else -errno.
 */
static int64_t fill_result(int r, int64_t field) {
  if (r == 0) return field;
  int err = errno;
  return field != 0 ? field : -(int64_t)err;
}

/* UFFDIO_COPY -> bytes copied | -errno (the `copy` field); src is a TypedArray/DataView of at least len bytes. */
static napi_value js_uffdio_copy(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int64_t fd, dst, len, mode;
  void *src;
  size_t src_len;
  if (!get_args(env, info, 5, argv) || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &dst) ||
      !get_bytes(env, argv[2], &src, &src_len) || !get_i64(env, argv[3], &len) || !get_i64(env, argv[4], &mode))
    return NULL;
  /* The kernel would read past the view into whatever follows it: refuse, as the emulation does. */
  if (len < 0 || (uint64_t)len > src_len) return make_i64(env, -EFAULT);
  struct uffdio_copy copy = {.dst = (uint64_t)dst, .src = (uint64_t)(uintptr_t)src, .len = (uint64_t)len,
                             .mode = (uint64_t)mode, .copy = 0};
  int r = ioctl((int)fd, UFFDIO_COPY, &copy);
  return make_i64(env, fill_result(r, copy.copy));
}

/* UFFDIO_ZEROPAGE -> bytes zeroed | -errno (the `zeropage` field) */
static napi_value js_uffdio_zeropage(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int64_t fd, dst, len, mode;
  if (!get_args(env, info, 4, argv) || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &dst) ||
      !get_i64(env, argv[2], &len) || !get_i64(env, argv[3], &mode))
    return NULL;
  struct uffdio_zeropage zp = {.range = {.start = (uint64_t)dst, .len = (uint64_t)len}, .mode = (uint64_t)mode,
                               .zeropage = 0};
  int r = ioctl((int)fd, UFFDIO_ZEROPAGE, &zp);
  return make_i64(env, fill_result(r, zp.zeropage));
}

/* UFFDIO_WAKE -> 0 | -errno */
static napi_value js_uffdio_wake(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t fd, start, len;
  if (!get_args(env, info, 3, argv) || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &start) ||
      !get_i64(env, argv[2], &len))
    return NULL;
  struct uffdio_range range = {.start = (uint64_t)start, .len = (uint64_t)len};
  return result_or_errno(env, ioctl((int)fd, UFFDIO_WAKE, &range));
}

/* ------------------------------------------------------------------ pollers */

/*
 * A poller lets a thread with an event loop (a resolver talking WebSocket)
 * wait for a userfaultfd to become readable without blocking that loop.
 * Node-API has no way to watch an fd, so each poller is one native thread
 * of its own that waits in poll(2) when armed and tells the JS thread
 * through a threadsafe function. One notification per arm: the JS side
 * reads what is there, and arms again when it wants more.
 *
 * The poll is cut in slices of `slice_ms`, and a slice that times out just
 * polls again: a poll holds the file it polls, and a close of the context
 * (a dup2 of /dev/null over its number, see uffd-backend.ts) only releases
 * the userfaultfd, and so wakes the threads blocked in its faults, once
 * that poll returns. The next slice polls the /dev/null, which is readable
 * at once: the JS side reads end of file and knows the context is closed.
 *
 * States are guarded by `lock`; the JS thread arms, disarms and stops, the
 * poller thread waits and notifies.
 */
typedef struct poller {
  int fd;
  int stop_fd; /* eventfd: readable once stop is asked */
  int slice_ms;
  int armed;
  int stopping;
  int started;
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  napi_threadsafe_function tsfn;
  napi_env env;
} poller;

static void *poller_main(void *arg) {
  poller *p = arg;
  for (;;) {
    pthread_mutex_lock(&p->lock);
    while (!p->armed && !p->stopping) pthread_cond_wait(&p->cond, &p->lock);
    int stopping = p->stopping;
    pthread_mutex_unlock(&p->lock);
    if (stopping) break;
    struct pollfd fds[2] = {{.fd = p->fd, .events = POLLIN, .revents = 0}, {.fd = p->stop_fd, .events = POLLIN, .revents = 0}};
    int r = poll(fds, 2, p->slice_ms);
    if (r < 0 && errno == EINTR) continue;
    if (fds[1].revents != 0) break;
    if (r == 0) continue; /* a slice ended: poll again (and so let a close through) */
    int revents = r < 0 ? POLLERR : fds[0].revents;
    pthread_mutex_lock(&p->lock);
    p->armed = 0;
    pthread_mutex_unlock(&p->lock);
    /* napi_closing once the env is going away: nobody to tell, stop. */
    if (napi_call_threadsafe_function(p->tsfn, (void *)(intptr_t)revents, napi_tsfn_blocking) != napi_ok) break;
  }
  return NULL;
}

/* Runs on the JS thread: callback(revents). */
static void poller_call_js(napi_env env, napi_value callback, void *context, void *data) {
  (void)context;
  if (env == NULL || callback == NULL) return;
  napi_value undefined, arg;
  if (napi_get_undefined(env, &undefined) != napi_ok) return;
  if (napi_create_int32(env, (int32_t)(intptr_t)data, &arg) != napi_ok) return;
  napi_call_function(env, undefined, callback, 1, &arg, NULL);
}

/* Stops the thread and frees everything but `p` itself. Idempotent. */
static void poller_stop(poller *p) {
  if (!p->started) return;
  p->started = 0;
  pthread_mutex_lock(&p->lock);
  p->stopping = 1;
  pthread_cond_signal(&p->cond);
  pthread_mutex_unlock(&p->lock);
  uint64_t one = 1;
  ssize_t ignored = write(p->stop_fd, &one, sizeof one);
  (void)ignored;
  pthread_join(p->thread, NULL);
  close(p->stop_fd);
  napi_release_threadsafe_function(p->tsfn, napi_tsfn_abort);
  pthread_mutex_destroy(&p->lock);
  pthread_cond_destroy(&p->cond);
}

/* The env is going away (a worker exiting) with the poller still running. */
static void poller_cleanup_hook(void *arg) { poller_stop(arg); }

static void poller_finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  poller *p = data;
  if (p->started) {
    napi_remove_env_cleanup_hook(env, poller_cleanup_hook, p);
    poller_stop(p);
  }
  free(p);
}

static poller *get_poller(napi_env env, napi_value value) {
  void *data = NULL;
  napi_valuetype type;
  if (napi_typeof(env, value, &type) != napi_ok || type != napi_external ||
      napi_get_value_external(env, value, &data) != napi_ok || data == NULL) {
    throw_type(env, "uffd.node: expected a poller");
    return NULL;
  }
  return data;
}

/* pollerCreate(fd, sliceMs, callback) -> poller | -errno. Starts its thread, disarmed and unref'd. */
static napi_value js_poller_create(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t fd, slice;
  if (!get_args(env, info, 3, argv) || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &slice)) return NULL;
  napi_valuetype type;
  CHECK(napi_typeof(env, argv[2], &type));
  if (type != napi_function) return throw_type(env, "uffd.node: expected a callback function");
  poller *p = calloc(1, sizeof *p);
  if (p == NULL) return make_i64(env, -ENOMEM);
  p->fd = (int)fd;
  p->slice_ms = slice > 0 && slice < INT32_MAX ? (int)slice : 100;
  p->env = env;
  p->stop_fd = eventfd(0, EFD_CLOEXEC);
  if (p->stop_fd < 0) {
    int err = errno;
    free(p);
    return make_i64(env, -(int64_t)err);
  }
  napi_value name;
  if (napi_create_string_utf8(env, "uffd-poller", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_threadsafe_function(env, argv[2], NULL, name, 0, 1, NULL, NULL, NULL, poller_call_js, &p->tsfn) != napi_ok) {
    close(p->stop_fd);
    free(p);
    return NULL;
  }
  /* Idle pollers must not keep a thread's event loop alive; arming refs it. */
  napi_unref_threadsafe_function(env, p->tsfn);
  pthread_mutex_init(&p->lock, NULL);
  pthread_cond_init(&p->cond, NULL);
  int err = pthread_create(&p->thread, NULL, poller_main, p);
  if (err != 0) {
    napi_release_threadsafe_function(p->tsfn, napi_tsfn_abort);
    close(p->stop_fd);
    free(p);
    return make_i64(env, -(int64_t)err);
  }
  /* Its name in /proc/self/task/TID/comm, for whoever looks at the threads (the tests count them). */
  pthread_setname_np(p->thread, "uffd-poller");
  p->started = 1;
  napi_add_env_cleanup_hook(env, poller_cleanup_hook, p);
  napi_value handle;
  CHECK(napi_create_external(env, p, poller_finalize, NULL, &handle));
  return handle;
}

/* pollerArm(poller): the next readiness calls back once (and holds the event loop until then). */
static napi_value js_poller_arm(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return NULL;
  poller *p = get_poller(env, argv[0]);
  if (p == NULL) return NULL;
  if (!p->started) return make_i64(env, -EBADF);
  napi_ref_threadsafe_function(env, p->tsfn);
  pthread_mutex_lock(&p->lock);
  p->armed = 1;
  pthread_cond_signal(&p->cond);
  pthread_mutex_unlock(&p->lock);
  return make_i64(env, 0);
}

/* pollerIdle(poller): lets the event loop end while nothing is armed (called from the callback). */
static napi_value js_poller_idle(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return NULL;
  poller *p = get_poller(env, argv[0]);
  if (p == NULL) return NULL;
  if (p->started) napi_unref_threadsafe_function(env, p->tsfn);
  return make_i64(env, 0);
}

/* pollerStop(poller): ends its thread (joins it). Idempotent. */
static napi_value js_poller_stop(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return NULL;
  poller *p = get_poller(env, argv[0]);
  if (p == NULL) return NULL;
  if (p->started) {
    napi_remove_env_cleanup_hook(env, poller_cleanup_hook, p);
    poller_stop(p);
  }
  return make_i64(env, 0);
}

/* ------------------------------------------------------------ blocking TCP */

/*
 * A blocking TCP socket for a thread that has nothing to do but wait for its
 * answer (a kvm-exit vCPU whose run loop exited, a per-thread resolver):
 * dest-host/src/net/blocking-socket.ts. Like the rest of this file, each
 * function is one system call (or the loop the call needs) returning a
 * result or -errno; the WebSocket framing and the protocol live above it.
 */

/*
 * tcpConnect(address, port, family, timeoutMs) -> fd | -errno.
 * `address` is a numeric IPv4 or IPv6 address (resolved above); `family` 4
 * or 6. Non-blocking connect(2) bounded by poll(2), then the fd is made
 * blocking again and TCP_NODELAY set (a request is one small segment; Nagle
 * would hold it behind the previous reply's ACK, as ws sets noDelay too).
 */
static napi_value js_tcp_connect(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int64_t port, family, timeout;
  if (!get_args(env, info, 4, argv) || !get_i64(env, argv[1], &port) || !get_i64(env, argv[2], &family) ||
      !get_i64(env, argv[3], &timeout))
    return NULL;
  char address[INET6_ADDRSTRLEN + 1];
  size_t address_len = 0;
  if (napi_get_value_string_utf8(env, argv[0], address, sizeof address, &address_len) != napi_ok)
    return throw_type(env, "uffd.node: expected an address string");
  struct sockaddr_storage sa;
  socklen_t sa_len;
  memset(&sa, 0, sizeof sa);
  if (family == 6) {
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&sa;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    if (inet_pton(AF_INET6, address, &in6->sin6_addr) != 1) return make_i64(env, -EINVAL);
    sa_len = sizeof *in6;
  } else {
    struct sockaddr_in *in4 = (struct sockaddr_in *)&sa;
    in4->sin_family = AF_INET;
    in4->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, address, &in4->sin_addr) != 1) return make_i64(env, -EINVAL);
    sa_len = sizeof *in4;
  }
  int fd = socket(family == 6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return make_i64(env, -(int64_t)errno);
  int err = 0;
  if (connect(fd, (struct sockaddr *)&sa, sa_len) < 0) {
    if (errno != EINPROGRESS) {
      err = errno;
    } else {
      struct pollfd p = {.fd = fd, .events = POLLOUT, .revents = 0};
      int r = poll(&p, 1, timeout > INT32_MAX ? INT32_MAX : (int)timeout);
      if (r < 0) err = errno;
      else if (r == 0) err = ETIMEDOUT;
      else {
        socklen_t len = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
      }
    }
  }
  if (err == 0) {
    int flags = fcntl(fd, F_GETFL);
    int one = 1;
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
      err = errno;
  }
  if (err != 0) {
    close(fd);
    return make_i64(env, -(int64_t)err);
  }
  return make_i64(env, fd);
}

/* sockSetTimeouts(fd, recvMs, sendMs) -> 0 | -errno: SO_RCVTIMEO and SO_SNDTIMEO (a blocked recv or send gives EAGAIN after that long; 0 = never). */
static napi_value js_sock_set_timeouts(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t fd, recv_ms, send_ms;
  if (!get_args(env, info, 3, argv) || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &recv_ms) ||
      !get_i64(env, argv[2], &send_ms))
    return NULL;
  struct timeval rtv = {.tv_sec = recv_ms / 1000, .tv_usec = (recv_ms % 1000) * 1000};
  struct timeval stv = {.tv_sec = send_ms / 1000, .tv_usec = (send_ms % 1000) * 1000};
  if (setsockopt((int)fd, SOL_SOCKET, SO_RCVTIMEO, &rtv, sizeof rtv) < 0 ||
      setsockopt((int)fd, SOL_SOCKET, SO_SNDTIMEO, &stv, sizeof stv) < 0)
    return make_i64(env, -(int64_t)errno);
  return make_i64(env, 0);
}

/* The bytes [offset, offset + length) of a view argument; *ok = 0 when they lie outside it (the caller gives -EFAULT). */
static int get_range(napi_env env, napi_value view, napi_value off, napi_value len, char **at, size_t *n, int *ok) {
  void *data;
  size_t size;
  int64_t offset, length;
  if (!get_bytes(env, view, &data, &size) || !get_i64(env, off, &offset) || !get_i64(env, len, &length)) return 0;
  *ok = offset >= 0 && length >= 0 && (uint64_t)offset + (uint64_t)length <= size;
  *at = (char *)data + (*ok ? offset : 0);
  *n = *ok ? (size_t)length : 0;
  return 1;
}

/* The arguments of an I/O call (handle, view, offset, length): the handle argument, and the bytes of the view. */
static int io_args(napi_env env, napi_callback_info info, napi_value *argv, char **at, size_t *n, int *ok) {
  return get_args(env, info, 4, argv) && get_range(env, argv[1], argv[2], argv[3], at, n, ok);
}

/*
 * sockSend(fd, view, offset, length) -> bytes sent (all of them) | -errno.
 * A blocking send(2) may send part of a buffer (a signal, SO_SNDTIMEO): it
 * goes on until all is sent or an error. MSG_NOSIGNAL: a peer gone is EPIPE,
 * not a SIGPIPE that kills the process.
 */
static napi_value js_sock_send(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  char *at;
  size_t n;
  int ok;
  int64_t fd;
  if (!io_args(env, info, argv, &at, &n, &ok) || !get_i64(env, argv[0], &fd)) return NULL;
  if (!ok) return make_i64(env, -EFAULT);
  size_t sent = 0;
  while (sent < n) {
    ssize_t r = send((int)fd, at + sent, n - sent, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      return make_i64(env, -(int64_t)errno);
    }
    sent += (size_t)r;
  }
  return make_i64(env, (int64_t)sent);
}

/*
 * sockRecv(fd, view, offset, length) -> bytes read | 0 at end of stream |
 * -EAGAIN when SO_RCVTIMEO passed with nothing read | -errno. One recv(2):
 * whatever has arrived, up to length.
 */
static napi_value js_sock_recv(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  char *at;
  size_t n;
  int ok;
  int64_t fd;
  if (!io_args(env, info, argv, &at, &n, &ok) || !get_i64(env, argv[0], &fd)) return NULL;
  if (!ok) return make_i64(env, -EFAULT);
  for (;;) {
    ssize_t r = recv((int)fd, at, n, 0);
    if (r < 0 && errno == EINTR) continue;
    return make_i64(env, r < 0 ? -(int64_t)errno : r);
  }
}

/* sockShutdown(fd) -> 0 | -errno: shutdown(2) both ways (a cut; close(2) follows). */
static napi_value js_sock_shutdown(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int64_t fd;
  if (!get_args(env, info, 1, argv) || !get_i64(env, argv[0], &fd)) return NULL;
  return result_or_errno(env, shutdown((int)fd, SHUT_RDWR));
}

/* ------------------------------------------------------------ digest lanes */

/*
 * The eight lanes of shared/src/segment-hash.ts, natively: lane i takes
 * every eighth 32-bit word (little-endian) from word i with xxHash32's round,
 * acc = rotl(acc + word * PRIME2, 13) * PRIME1 (XXH32_round). The same
 * function as the TypeScript loop, word for word (segment-hash.test.ts
 * compares them); only faster: one AVX2 register holds all eight lanes where
 * the CPU has AVX2 (__builtin_cpu_supports), else eight scalar chains.
 */
#define LANE_PRIME1 0x9e3779b1u
#define LANE_PRIME2 0x85ebca77u
#define LANE_ROTL13(x) (((x) << 13) | ((x) >> 19))

static void lanes_scalar(uint32_t *lanes, const uint32_t *w, size_t words) {
  uint32_t l[8];
  memcpy(l, lanes, sizeof l);
  for (size_t i = 0; i < words; i += 8) {
    for (int k = 0; k < 8; k++) {
      uint32_t a = l[k] + w[i + k] * LANE_PRIME2;
      l[k] = LANE_ROTL13(a) * LANE_PRIME1;
    }
  }
  memcpy(lanes, l, sizeof l);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
__attribute__((target("avx2"))) static void lanes_avx2(uint32_t *lanes, const uint32_t *w, size_t words) {
  __m256i acc = _mm256_loadu_si256((const __m256i *)lanes);
  const __m256i p1 = _mm256_set1_epi32((int)LANE_PRIME1);
  const __m256i p2 = _mm256_set1_epi32((int)LANE_PRIME2);
  for (size_t i = 0; i < words; i += 8) {
    __m256i x = _mm256_loadu_si256((const __m256i *)(w + i));
    acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(x, p2));
    acc = _mm256_or_si256(_mm256_slli_epi32(acc, 13), _mm256_srli_epi32(acc, 19));
    acc = _mm256_mullo_epi32(acc, p1);
  }
  _mm256_storeu_si256((__m256i *)lanes, acc);
}
static int have_avx2(void) {
  static int cached = -1;
  if (cached < 0) cached = __builtin_cpu_supports("avx2") ? 1 : 0;
  return cached;
}
#define LANES_AVX2 1
#endif

/*
 * hashLanes(lanes, data[, forceScalar]) -> "avx2" | "scalar": feeds data (a TypedArray or
 * DataView, a multiple of 32 bytes, 4-byte aligned) to the eight lanes in
 * `lanes` (an Int32Array of 8), in place. Little-endian hosts only, like
 * the TypeScript loop's Uint32Array over the bytes.
 */
static napi_value js_hash_lanes(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  size_t argc = 3;
  void *lanes;
  size_t count;
  void *data;
  size_t length;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2) {
    throw_type(env, "uffd.node: expected hashLanes(lanes, data[, forceScalar])");
    return NULL;
  }
  if (!get_typed(env, argv[0], napi_int32_array, 8, &lanes, &count) || !get_bytes(env, argv[1], &data, &length)) return NULL;
  /* Testing only: a third argument true runs the scalar chains where AVX2 would. */
  bool force_scalar = false;
  if (argc >= 3) {
    napi_valuetype type;
    CHECK(napi_typeof(env, argv[2], &type));
    if (type == napi_boolean) CHECK(napi_get_value_bool(env, argv[2], &force_scalar));
  }
  if (length % 32 != 0 || ((uintptr_t)data & 3) != 0) {
    napi_throw_range_error(env, NULL, "hashLanes: expected a 4-byte aligned run of a multiple of 32 bytes");
    return NULL;
  }
  napi_value result;
#ifdef LANES_AVX2
  if (!force_scalar && have_avx2()) {
    lanes_avx2((uint32_t *)lanes, (const uint32_t *)data, length / 4);
    CHECK(napi_create_string_utf8(env, "avx2", NAPI_AUTO_LENGTH, &result));
    return result;
  }
#endif
  lanes_scalar((uint32_t *)lanes, (const uint32_t *)data, length / 4);
  CHECK(napi_create_string_utf8(env, "scalar", NAPI_AUTO_LENGTH, &result));
  return result;
}

/* ------------------------------------------------------------ page content */

/*
 * The page content generator of shared/src/content.ts (protocol version
 * 10), natively, for the source's image build: the same mix (splitmix32's
 * avalanche of seed and page), the same zero pages, and four xorshift32
 * (13, 17, 5) lanes, word i lane i mod 4's next, word 0 the page's index.
 * JavaScript's Math.imul and >>> are these uint32_t operations;
 * content.test.ts compares the two over seeds, pages and lengths.
 */
static uint32_t content_mix(uint32_t seed, uint32_t page) {
  uint32_t h = seed ^ ((page + 0x9e3779b9u) * 0x85ebca6bu);
  h = (h ^ (h >> 16)) * 0x7feb352du;
  h = (h ^ (h >> 15)) * 0x846ca68bu;
  return h ^ (h >> 16);
}

static uint32_t content_xorshift32(uint32_t x) {
  x ^= x << 13;
  x ^= x >> 17;
  return x ^ (x << 5);
}

static void content_fill_page(uint32_t seed, double zero_fraction, uint32_t page, uint32_t *out, size_t n) {
  if (zero_fraction > 0 && (double)content_mix(seed ^ 0x5a5a5a5au, page) / 4294967296.0 < zero_fraction) {
    memset(out, 0, n * 4);
    return;
  }
  uint32_t a = content_mix(seed, page) | 1, b = content_mix(seed ^ 0x243f6a88u, page) | 1;
  uint32_t c = content_mix(seed ^ 0x85a308d3u, page) | 1, d = content_mix(seed ^ 0x13198a2eu, page) | 1;
  size_t body = n & ~(size_t)3, i = 0;
  for (; i < body; i += 4) {
    a = content_xorshift32(a);
    b = content_xorshift32(b);
    c = content_xorshift32(c);
    d = content_xorshift32(d);
    out[i] = a;
    out[i + 1] = b;
    out[i + 2] = c;
    out[i + 3] = d;
  }
  if (i < n) out[i] = content_xorshift32(a);
  if (i + 1 < n) out[i + 1] = content_xorshift32(b);
  if (i + 2 < n) out[i + 2] = content_xorshift32(c);
  if (n > 0) out[0] = page;
}

/*
 * fillPages(seed, zeroFraction, firstPage, pageWords, out) -> pages filled:
 * pages firstPage, firstPage + 1, ... into `out` (a Uint32Array of a whole
 * number of pages of pageWords words), as content.ts's fillPage would.
 * `seed` is the spec's seed as a uint32 (JavaScript's ToUint32), pages
 * below 2^32.
 */
static napi_value js_fill_pages(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int64_t seed, first, page_words;
  double zero_fraction;
  void *out;
  size_t words;
  if (!get_args(env, info, 5, argv) || !get_i64(env, argv[0], &seed) || napi_get_value_double(env, argv[1], &zero_fraction) != napi_ok ||
      !get_i64(env, argv[2], &first) || !get_i64(env, argv[3], &page_words) || !get_typed(env, argv[4], napi_uint32_array, 0, &out, &words))
    return NULL;
  if (page_words <= 0 || words % (size_t)page_words != 0 || first < 0 || first + (int64_t)(words / (size_t)page_words) > (int64_t)UINT32_MAX + 1) {
    napi_throw_range_error(env, NULL, "fillPages: expected whole pages of pageWords words, at page indices below 2^32");
    return NULL;
  }
  size_t pages = words / (size_t)page_words;
  for (size_t k = 0; k < pages; k++)
    content_fill_page((uint32_t)seed, zero_fraction, (uint32_t)(first + (int64_t)k), (uint32_t *)out + k * (size_t)page_words, (size_t)page_words);
  return make_i64(env, (int64_t)pages);
}

/* ------------------------------------------------------------ futexes */

/* Word `index` of an Int32Array (on a SharedArrayBuffer), or NULL (a TypeError is pending). */
static int32_t *int32_word(napi_env env, napi_value array, napi_value index) {
  void *data;
  size_t length;
  int64_t i;
  if (!get_typed(env, array, napi_int32_array, 0, &data, &length) || !get_i64(env, index, &i)) return NULL;
  if (i < 0 || (uint64_t)i >= length) {
    napi_throw_range_error(env, NULL, "expected an index inside the array");
    return NULL;
  }
  return (int32_t *)data + i;
}

/*
 * futexWait(int32array, index, expected, timeoutMs) -> 0 woken | -EAGAIN
 * (the word was not `expected`) | -ETIMEDOUT | -EINTR: FUTEX_WAIT_PRIVATE
 * on the word, what Atomics.wait does without V8's process-wide mutex and
 * condition variable (every thread of this process shares the mapping).
 */
static napi_value js_futex_wait(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int64_t expected;
  double ms;
  if (!get_args(env, info, 4, argv) || !get_i64(env, argv[2], &expected) || napi_get_value_double(env, argv[3], &ms) != napi_ok) return NULL;
  int32_t *word = int32_word(env, argv[0], argv[1]);
  if (word == NULL) return NULL;
  if (!(ms >= 0)) ms = 0;
  struct timespec ts = {(time_t)(ms / 1000), (long)((ms - (double)(time_t)(ms / 1000) * 1000) * 1e6)};
  long r = syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, (int32_t)expected, &ts, NULL, 0);
  return make_i64(env, r == 0 ? 0 : -(int64_t)errno);
}

/* futexWake(int32array, index, count) -> threads woken | -errno: FUTEX_WAKE_PRIVATE. */
static napi_value js_futex_wake(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int64_t count;
  if (!get_args(env, info, 3, argv) || !get_i64(env, argv[2], &count)) return NULL;
  int32_t *word = int32_word(env, argv[0], argv[1]);
  if (word == NULL) return NULL;
  long r = syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, count > INT32_MAX ? INT32_MAX : (int32_t)count, NULL, NULL, 0);
  return make_i64(env, r < 0 ? -(int64_t)errno : r);
}

#ifndef POSTCOPY_NO_TLS
/* ------------------------------------------------------------ blocking TLS */

/*
 * TLS on a blocking socket of tcpConnect's, for the blocking fault channel
 * over wss://: OpenSSL as linked into node itself (node exports its
 * OpenSSL's symbols for addons, and its headers ship beside node_api.h), so
 * the same library, version and defaults as Node's tls module. A client
 * only: TLS 1.2 or later, the peer verified against the given CA
 * certificates (SSL_VERIFY_PEER) and the expected name or IP address
 * (X509_VERIFY_PARAM host/IP check, as tls.checkServerIdentity), SNI sent
 * for names, an optional client certificate and key. Errors come back as
 * -errno with a text from tlsError (OpenSSL's error queue or the verify
 * result), which the TypeScript layer puts in its message.
 */
typedef struct {
  SSL_CTX *ctx;
  SSL *ssl;
  char error[256];
} tls_conn;

static void tls_conn_free(tls_conn *t) {
  if (t->ssl != NULL) SSL_free(t->ssl);
  if (t->ctx != NULL) SSL_CTX_free(t->ctx);
  t->ssl = NULL;
  t->ctx = NULL;
}

static void tls_finalize(napi_env env, void *data, void *hint) {
  tls_conn *t = data;
  tls_conn_free(t);
  free(t);
}

/* The first error on OpenSSL's queue (or `fallback`), into t->error; the queue is cleared. */
static void tls_note_error(tls_conn *t, const char *fallback) {
  unsigned long e = ERR_get_error();
  if (e != 0) ERR_error_string_n(e, t->error, sizeof t->error);
  else snprintf(t->error, sizeof t->error, "%s", fallback);
  ERR_clear_error();
}

static int get_string(napi_env env, napi_value value, char **out) {
  napi_valuetype type;
  if (napi_typeof(env, value, &type) != napi_ok) return 0;
  if (type == napi_undefined || type == napi_null) {
    *out = NULL;
    return 1;
  }
  size_t len;
  if (type != napi_string || napi_get_value_string_utf8(env, value, NULL, 0, &len) != napi_ok) {
    throw_type(env, "uffd.node: expected a string");
    return 0;
  }
  *out = malloc(len + 1);
  if (*out == NULL) return 0;
  return napi_get_value_string_utf8(env, value, *out, len + 1, &len) == napi_ok;
}

/* Adds every certificate of a PEM text to the context's trust store: how many, or -1. */
static int tls_add_ca(SSL_CTX *ctx, const char *pem) {
  BIO *bio = BIO_new_mem_buf(pem, -1);
  if (bio == NULL) return -1;
  X509_STORE *store = SSL_CTX_get_cert_store(ctx);
  int n = 0;
  X509 *cert;
  while ((cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
    if (X509_STORE_add_cert(store, cert) != 1) n = -1;
    X509_free(cert);
    if (n < 0) break;
    n++;
  }
  ERR_clear_error(); /* the end of the text is a "no start line" error */
  BIO_free(bio);
  return n;
}

/* The client certificate (the first of the PEM text; the rest as its chain) and its key. */
static int tls_use_cert(SSL_CTX *ctx, const char *cert_pem, const char *key_pem) {
  BIO *bio = BIO_new_mem_buf(cert_pem, -1);
  if (bio == NULL) return 0;
  X509 *cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
  int ok = cert != NULL && SSL_CTX_use_certificate(ctx, cert) == 1;
  if (cert != NULL) X509_free(cert);
  X509 *extra;
  while (ok && (extra = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
    if (SSL_CTX_add0_chain_cert(ctx, extra) != 1) {
      X509_free(extra);
      ok = 0;
    }
  }
  if (ok) ERR_clear_error();
  BIO_free(bio);
  if (!ok) return 0;
  bio = BIO_new_mem_buf(key_pem, -1);
  if (bio == NULL) return 0;
  EVP_PKEY *key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
  BIO_free(bio);
  ok = key != NULL && SSL_CTX_use_PrivateKey(ctx, key) == 1 && SSL_CTX_check_private_key(ctx) == 1;
  if (key != NULL) EVP_PKEY_free(key);
  return ok;
}

/*
 * tlsConnect(fd, caPem, certPem, keyPem, name, isIp) -> a TLS connection (an
 * external) after a complete handshake, or -errno (tlsError(null) says why:
 * the last failure of this thread). caPem is required: this client trusts
 * exactly the CA it is given. certPem and keyPem may be null. `name` is
 * checked against the peer's certificate (an IP address when isIp) and sent
 * as SNI when it is a name. The fd stays the caller's to close.
 */
static __thread char tls_last_error[256];

static napi_value js_tls_connect(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  int64_t fd;
  bool is_ip = false;
  char *ca = NULL, *cert = NULL, *key = NULL, *name = NULL;
  napi_value result = NULL;
  if (!get_args(env, info, 6, argv) || !get_i64(env, argv[0], &fd) || !get_string(env, argv[1], &ca) ||
      !get_string(env, argv[2], &cert) || !get_string(env, argv[3], &key) || !get_string(env, argv[4], &name) ||
      napi_get_value_bool(env, argv[5], &is_ip) != napi_ok)
    goto out;
  tls_conn *t = calloc(1, sizeof *t);
  if (t == NULL) goto out;
  int err = -EPROTO;
  if (ca == NULL || name == NULL) {
    snprintf(t->error, sizeof t->error, "expected CA certificates and a name to verify the peer against");
    err = -EINVAL;
    goto fail;
  }
  t->ctx = SSL_CTX_new(TLS_client_method());
  if (t->ctx == NULL || SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION) != 1) {
    tls_note_error(t, "SSL_CTX_new failed");
    goto fail;
  }
  if (tls_add_ca(t->ctx, ca) <= 0) {
    tls_note_error(t, "no CA certificate in the CA text");
    goto fail;
  }
  if (cert != NULL && key != NULL && !tls_use_cert(t->ctx, cert, key)) {
    tls_note_error(t, "the client certificate or its key was not accepted");
    goto fail;
  }
  SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
  /*
   * Read-ahead: one read(2) takes what the socket holds, not a record's
   * 5-byte header and then its body in two (a kvm-exit fault over TLS cost
   * three reads without it, one over plain TCP). Safe here because nothing
   * polls the socket for readability: tlsRecv's SSL_read_ex hands out what
   * OpenSSL has buffered before it reads again (SSL_CTX_set_read_ahead(3)).
   */
  SSL_CTX_set_read_ahead(t->ctx, 1);
  t->ssl = SSL_new(t->ctx);
  if (t->ssl == NULL || SSL_set_fd(t->ssl, (int)fd) != 1) {
    tls_note_error(t, "SSL_new failed");
    goto fail;
  }
  X509_VERIFY_PARAM *param = SSL_get0_param(t->ssl);
  X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
  if ((is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, name) : X509_VERIFY_PARAM_set1_host(param, name, 0)) != 1 ||
      (!is_ip && SSL_set_tlsext_host_name(t->ssl, name) != 1)) {
    tls_note_error(t, "the name to verify was not accepted");
    goto fail;
  }
  int r = SSL_connect(t->ssl);
  if (r != 1) {
    int code = SSL_get_error(t->ssl, r);
    long verify = SSL_get_verify_result(t->ssl);
    if (verify != X509_V_OK) {
      snprintf(t->error, sizeof t->error, "certificate verify failed: %s", X509_verify_cert_error_string(verify));
      ERR_clear_error();
    } else if (code == SSL_ERROR_SYSCALL && errno != 0) {
      err = -errno;
      snprintf(t->error, sizeof t->error, "%s during the TLS handshake", errno == EAGAIN ? "timed out" : strerror(errno));
      ERR_clear_error();
    } else {
      tls_note_error(t, "the TLS handshake failed (the peer closed the connection)");
    }
    goto fail;
  }
  if (napi_create_external(env, t, tls_finalize, NULL, &result) != napi_ok) {
    tls_conn_free(t);
    free(t);
    result = NULL;
  }
  goto out;
fail:
  snprintf(tls_last_error, sizeof tls_last_error, "%s", t->error);
  tls_conn_free(t);
  free(t);
  result = make_i64(env, err);
out:
  free(ca);
  free(cert);
  free(key);
  free(name);
  return result;
}

static tls_conn *get_tls(napi_env env, napi_value value) {
  void *data = NULL;
  napi_valuetype type;
  if (napi_typeof(env, value, &type) != napi_ok || type != napi_external ||
      napi_get_value_external(env, value, &data) != napi_ok || data == NULL) {
    throw_type(env, "uffd.node: expected a TLS connection");
    return NULL;
  }
  return data;
}

/* The result of a failed SSL_read/SSL_write as -errno (-EAGAIN: SO_RCVTIMEO/SO_SNDTIMEO passed), the text noted. */
static int64_t tls_io_error(tls_conn *t, int r) {
  int code = SSL_get_error(t->ssl, r);
  if (code == SSL_ERROR_ZERO_RETURN) return 0; /* close_notify: the end of the stream */
  if ((code == SSL_ERROR_WANT_READ || code == SSL_ERROR_WANT_WRITE || code == SSL_ERROR_SYSCALL) &&
      (errno == EAGAIN || errno == EWOULDBLOCK)) {
    ERR_clear_error();
    return -EAGAIN;
  }
  if (code == SSL_ERROR_SYSCALL) {
    int e = errno;
    ERR_clear_error();
    if (e == 0) return 0; /* the peer closed without close_notify: an end of stream all the same */
    snprintf(t->error, sizeof t->error, "%s", strerror(e));
    return -(int64_t)e;
  }
  tls_note_error(t, "TLS error");
  return -EPROTO;
}

/* tlsSend(tls, view, offset, length) -> length | -errno (every byte sent, as sockSend). */
static napi_value js_tls_send(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  char *at;
  size_t n;
  int ok;
  tls_conn *t;
  if (!io_args(env, info, argv, &at, &n, &ok) || (t = get_tls(env, argv[0])) == NULL) return NULL;
  if (!ok) return make_i64(env, -EFAULT);
  if (t->ssl == NULL) return make_i64(env, -EBADF);
  size_t sent = 0;
  while (sent < n) {
    size_t written = 0;
    int r = SSL_write_ex(t->ssl, at + sent, n - sent, &written);
    if (r != 1) {
      int64_t e = tls_io_error(t, r);
      return make_i64(env, e == 0 ? -EPIPE : e);
    }
    sent += written;
  }
  return make_i64(env, (int64_t)sent);
}

/* tlsRecv(tls, view, offset, length) -> bytes | 0 at the end | -EAGAIN on timeout | -errno (as sockRecv). */
static napi_value js_tls_recv(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  char *at;
  size_t n;
  int ok;
  tls_conn *t;
  if (!io_args(env, info, argv, &at, &n, &ok) || (t = get_tls(env, argv[0])) == NULL) return NULL;
  if (!ok) return make_i64(env, -EFAULT);
  if (t->ssl == NULL) return make_i64(env, -EBADF);
  size_t got = 0;
  errno = 0;
  int r = SSL_read_ex(t->ssl, at, n, &got);
  if (r == 1) return make_i64(env, (int64_t)got);
  return make_i64(env, tls_io_error(t, r));
}

/* tlsError(tls | null) -> the text of the connection's last failure (or this thread's last failed tlsConnect). */
static napi_value js_tls_error(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return NULL;
  napi_valuetype type;
  if (napi_typeof(env, argv[0], &type) != napi_ok) return NULL;
  const char *text = tls_last_error;
  if (type == napi_external) {
    tls_conn *t = get_tls(env, argv[0]);
    if (t == NULL) return NULL;
    text = t->error;
  }
  napi_value result;
  CHECK(napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &result));
  return result;
}

/* tlsClose(tls): frees the connection (no close_notify: the socket is cut next). Idempotent. */
static napi_value js_tls_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return NULL;
  tls_conn *t = get_tls(env, argv[0]);
  if (t == NULL) return NULL;
  tls_conn_free(t);
  return make_i64(env, 0);
}

#endif /* POSTCOPY_NO_TLS */

/* ------------------------------------------------------------------ module */

static int set_i64(napi_env env, napi_value obj, const char *name, int64_t value) {
  napi_value v = make_i64(env, value);
  return v != NULL && napi_set_named_property(env, obj, name, v) == napi_ok;
}

NAPI_MODULE_INIT() {
  static const struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
      {"gettid", js_gettid},
      {"mmap", js_mmap},
      {"munmap", js_munmap},
      {"madvise", js_madvise},
      {"hashLanes", js_hash_lanes},
      {"fillPages", js_fill_pages},
      {"externalArrayBuffer", js_external_arraybuffer},
      {"userfaultfd", js_userfaultfd},
      {"userfaultfdIocNew", js_userfaultfd_ioc_new},
      {"close", js_close},
      {"dup2", js_dup2},
      {"pollIn", js_poll_in},
      {"readMsg", js_read_msg},
      {"uffdioApi", js_uffdio_api},
      {"uffdioRegister", js_uffdio_register},
      {"uffdioUnregister", js_uffdio_unregister},
      {"uffdioCopy", js_uffdio_copy},
      {"uffdioZeropage", js_uffdio_zeropage},
      {"uffdioWake", js_uffdio_wake},
      {"pollerCreate", js_poller_create},
      {"pollerArm", js_poller_arm},
      {"pollerIdle", js_poller_idle},
      {"pollerStop", js_poller_stop},
      {"tcpConnect", js_tcp_connect},
      {"sockSetTimeouts", js_sock_set_timeouts},
      {"sockSend", js_sock_send},
      {"sockRecv", js_sock_recv},
      {"sockShutdown", js_sock_shutdown},
      {"futexWait", js_futex_wait},
      {"futexWake", js_futex_wake},
#ifndef POSTCOPY_NO_TLS
      {"tlsConnect", js_tls_connect},
      {"tlsSend", js_tls_send},
      {"tlsRecv", js_tls_recv},
      {"tlsError", js_tls_error},
      {"tlsClose", js_tls_close},
#endif
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value fn;
    CHECK(napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &fn));
    CHECK(napi_set_named_property(env, exports, fns[i].name, fn));
  }

  napi_value c;
  CHECK(napi_create_object(env, &c));
  static const struct {
    const char *name;
    int64_t value;
  } constants[] = {
      {"PROT_READ", PROT_READ},
      {"PROT_WRITE", PROT_WRITE},
      {"MAP_PRIVATE", MAP_PRIVATE},
      {"MAP_ANONYMOUS", MAP_ANONYMOUS},
      {"MAP_NORESERVE", MAP_NORESERVE},
      {"MAP_HUGETLB", MAP_HUGETLB},
      {"MAP_HUGE_2MB", MAP_HUGE_2MB},
      {"MADV_DONTNEED", MADV_DONTNEED},
      {"MADV_NOHUGEPAGE", MADV_NOHUGEPAGE},
      {"O_CLOEXEC", O_CLOEXEC},
      {"O_NONBLOCK", O_NONBLOCK},
      {"UFFD_USER_MODE_ONLY", UFFD_USER_MODE_ONLY},
      {"UFFD_FEATURE_MISSING_HUGETLBFS", UFFD_FEATURE_MISSING_HUGETLBFS},
      {"UFFD_FEATURE_THREAD_ID", UFFD_FEATURE_THREAD_ID},
      {"UFFDIO_REGISTER_MODE_MISSING", UFFDIO_REGISTER_MODE_MISSING},
      {"UFFDIO_COPY_MODE_DONTWAKE", UFFDIO_COPY_MODE_DONTWAKE},
      {"UFFDIO_ZEROPAGE_MODE_DONTWAKE", UFFDIO_ZEROPAGE_MODE_DONTWAKE},
      {"UFFD_EVENT_PAGEFAULT", UFFD_EVENT_PAGEFAULT},
      {"UFFD_PAGEFAULT_FLAG_WRITE", UFFD_PAGEFAULT_FLAG_WRITE},
      {"_UFFDIO_ZEROPAGE", _UFFDIO_ZEROPAGE},
      {"POLLIN", POLLIN},
      {"POLLERR", POLLERR},
      {"POLLHUP", POLLHUP},
      {"POLLNVAL", POLLNVAL},
      {"UFFD_MSG_SIZE", (int64_t)sizeof(struct uffd_msg)},
#ifndef POSTCOPY_NO_TLS
      {"HAVE_TLS", 1},
#else
      {"HAVE_TLS", 0},
#endif
  };
  for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++) {
    if (!set_i64(env, c, constants[i].name, constants[i].value)) return NULL;
  }
  CHECK(napi_set_named_property(env, exports, "constants", c));
  return exports;
}
