/*
 * fault-floor.c: the native floor of postcopy's bench (issue 9, "Faults per
 * second with many vCPUs").
 *
 * What the tool's three fault strategies cost on the real kernel, with nothing
 * of the tool in the way. N vCPU threads each read one word of every 4 KiB page
 * of their own partition, in order: the access pattern of the kernel's
 * tools/testing/selftests/kvm/demand_paging_test.c with partitioned memory
 * (its default). The memory is anonymous and registered with a userfaultfd in
 * MISSING mode, so every first touch is a fault. A server process, forked at
 * start, owns the pages and serves them over loopback TCP, one thread per
 * connection: a request is a page index (8 bytes, little-endian), the reply the
 * page's 4096 bytes. The fault paths (--mode):
 *
 *   shared      one userfaultfd over all memory and N handler threads reading
 *               from it; each waits in its own epoll on the userfaultfd with
 *               EPOLLEXCLUSIVE (so one fault wakes one handler, as the kernel's
 *               kvm/lib/userfaultfd_util.c readers do), fetches the page on its
 *               own connection and installs it with UFFDIO_COPY, which wakes the
 *               faulting thread (the baseline: demand_paging_test -a -r N);
 *   per-region  one userfaultfd per vCPU partition, each with its own handler
 *               thread and connection (demand_paging_test without -a);
 *   exit        the memory-fault-exit path: the vCPU thread checks a bitmap of
 *               installed pages before each access; on a miss it fetches the page
 *               on its own connection and installs it with
 *               UFFDIO_COPY_MODE_DONTWAKE (nobody waits), going on after EEXIST.
 *               The memory stays registered with one userfaultfd, as KVM's would;
 *               since no other thread touches guest memory here, any message on
 *               it is a bug and fails the run instead of hanging it.
 *
 * Kernel behaviour relied on (fs/userfaultfd.c, Linux 6.x):
 *   - handle_userfault() queues a message on the context of the VMA that
 *     faulted and wakes its poll waiters (wake_up_poll(&ctx->fd_wqh, EPOLLIN));
 *     the faulting thread sleeps until a COPY or WAKE covers its address;
 *   - userfaultfd_copy() wakes waiters of the copied range only when the copy
 *     succeeded and DONTWAKE is not set; on EEXIST (page already present) it
 *     wakes nobody, so a handler that gets EEXIST must UFFDIO_WAKE;
 *   - userfaultfd(2) needs CAP_SYS_PTRACE when vm.unprivileged_userfaultfd=0;
 *     /dev/userfaultfd (USERFAULTFD_IOC_NEW, 6.1+) is the other way in, as
 *     tools/testing/selftests/mm/uffd-common.c's uffd_open_dev() does.
 *
 * The timed section is demand_paging_test's: from releasing the vCPUs to the
 * last one joined; pages/s = all pages / that time. Each access is also timed
 * (CLOCK_MONOTONIC, vDSO) for a latency p50/p90/p99. After the timed section,
 * every page is compared with the content the server generates (a seeded pool
 * of pages, each stamped with its index); a mismatch prints verified:false and
 * exits 3. --corrupt-page P (testing only) makes the server flip a byte of page
 * P, to prove that check fails; --stall-server 1 (testing only) makes it never
 * answer, to prove the timeout ends a run whose vCPUs are blocked in faults.
 *
 * Output: one line of JSON on stdout. Exit codes: 0 verified, 1 error, 2 usage,
 * 3 content mismatch, 4 timeout, 5 userfaultfd unavailable.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define PAGE_WORDS (PAGE_SIZE / 8)
/* Pages of the content pool; prime, so neighbouring pages differ. */
#define POOL_PAGES 251u
#define MAX_VCPUS 1024

enum exit_code { EXIT_OK = 0, EXIT_ERROR = 1, EXIT_USAGE = 2, EXIT_MISMATCH = 3, EXIT_TIMEOUT = 4, EXIT_NO_UFFD = 5 };
enum mode { MODE_SHARED, MODE_PER_REGION, MODE_EXIT };
static const char *const mode_names[] = { "shared", "per-region", "exit" };

/* Options (set once in main, read-only afterwards). */
static enum mode mode = MODE_SHARED;
static unsigned nr_vcpus = 1;
static uint64_t pages_per_vcpu = 4096; /* 16 MiB */
static uint64_t seed = 1;
static long timeout_ms = 60000;
static int64_t corrupt_page = -1;
static int stall_server;            /* testing only: the server never answers */

static uint64_t total_pages;
static char *guest;                 /* nr_vcpus partitions of pages_per_vcpu pages */
static uint64_t *pool;              /* POOL_PAGES pages of seeded content */
static uint8_t *installed;          /* exit mode: one byte per page, 1 once installed */
static uint32_t *latency_ns;        /* one entry per page, by page index */
static int quit_fd = -1;            /* eventfd: readable once the handlers must go */

/* Counters, updated with atomics by whichever thread resolves a fault. */
static uint64_t eexist_count, wake_count;

/* ---- errors ---------------------------------------------------------------- */

/* Prints "fault-floor: MESSAGE" and ends the process (and so every thread). */
static void __attribute__((noreturn, format(printf, 2, 3))) die(int code, const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n = snprintf(buf, sizeof(buf), "fault-floor: ");

	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	if (write(2, buf, n) < 0) { /* nothing left to tell */ }
	_exit(code);
}

#define die_errno(what) die(EXIT_ERROR, "%s: %s", what, strerror(errno))

/* SIGALRM: the run took longer than --timeout-ms. _exit ends every thread, even
 * one sleeping in handle_userfault (its sleep is interruptible by fatal signals). */
static void on_timeout(int sig)
{
	static const char msg[] = "fault-floor: timed out (--timeout-ms)\n";

	(void)sig;
	if (write(2, msg, sizeof(msg) - 1) < 0) { /* nothing left to tell */ }
	_exit(EXIT_TIMEOUT);
}

static void arm_timeout(long ms)
{
	struct itimerval it = { .it_value = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 } };

	signal(SIGALRM, on_timeout);
	if (setitimer(ITIMER_REAL, &it, NULL))
		die_errno("setitimer");
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

/* ---- page content (shared by the server and the verifier) ------------------- */

static uint64_t splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9E3779B97F4A7C15ull);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static void make_pool(void)
{
	uint64_t state = seed;

	pool = malloc((size_t)POOL_PAGES * PAGE_SIZE);
	if (!pool)
		die(EXIT_ERROR, "expected %u bytes for the content pool, got none", POOL_PAGES * PAGE_SIZE);
	for (uint64_t i = 0; i < (uint64_t)POOL_PAGES * PAGE_WORDS; i++)
		pool[i] = splitmix64(&state);
}

/* Page `page`'s content: a pool page with its index stamped into both ends, so a
 * page installed at the wrong address or served twice over differs. */
static void page_content(uint64_t page, uint64_t *out)
{
	memcpy(out, pool + (page % POOL_PAGES) * PAGE_WORDS, PAGE_SIZE);
	out[0] ^= (page + 1) * 0x9E3779B97F4A7C15ull;
	out[PAGE_WORDS - 1] ^= page;
}

/* ---- sockets ---------------------------------------------------------------- */

static void send_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die_errno("send");
		p += n;
		len -= n;
	}
}

/* Reads exactly len bytes; returns 0 at a clean end of stream before any byte. */
static int recv_all(int fd, void *buf, size_t len)
{
	char *p = buf;
	size_t got = 0;

	while (got < len) {
		ssize_t n = recv(fd, p + got, len - got, MSG_WAITALL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die_errno("recv");
		if (n == 0) {
			if (got == 0)
				return 0;
			die(EXIT_ERROR, "expected %zu bytes, got %zu before the end of the stream", len, got);
		}
		got += n;
	}
	return 1;
}

static void set_nodelay(int fd)
{
	int one = 1;

	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)))
		die_errno("setsockopt(TCP_NODELAY)");
}

/* The request/reply round trip: page index out, the page's 4096 bytes back. */
static void fetch_page(int fd, uint64_t page, void *buf)
{
	uint64_t req = htole64(page);

	send_all(fd, &req, sizeof(req));
	if (!recv_all(fd, buf, PAGE_SIZE))
		die(EXIT_ERROR, "expected page %llu from the server, got the end of the stream",
		    (unsigned long long)page);
}

/* ---- the server process ----------------------------------------------------- */

static void *serve_connection(void *arg)
{
	int fd = (int)(intptr_t)arg;
	uint64_t *page_buf = aligned_alloc(PAGE_SIZE, PAGE_SIZE);
	uint64_t req;

	if (!page_buf)
		die(EXIT_ERROR, "server: expected a page buffer, got none");
	while (recv_all(fd, &req, sizeof(req))) {
		uint64_t page = le64toh(req);

		if (page >= total_pages)
			die(EXIT_ERROR, "server: expected a page index < %llu, got %llu",
			    (unsigned long long)total_pages, (unsigned long long)page);
		while (stall_server)
			pause(); /* --stall-server: until a timeout ends us */
		page_content(page, page_buf);
		if ((int64_t)page == corrupt_page)
			((uint8_t *)page_buf)[100] ^= 0xff; /* --corrupt-page: testing only */
		send_all(fd, page_buf, PAGE_SIZE);
	}
	close(fd);
	free(page_buf);
	return NULL;
}

/* The child: accepts `conns` connections, one thread each, until all have closed. */
static void __attribute__((noreturn)) run_server(int listen_fd, unsigned conns, pid_t parent)
{
	pthread_t threads[MAX_VCPUS];

	/* Die with the bench process whatever kills it (SIGKILL included). */
	if (prctl(PR_SET_PDEATHSIG, SIGKILL) || getppid() != parent)
		_exit(EXIT_ERROR);
	/* itimers are not inherited over fork: the server has its own, a little later. */
	arm_timeout(timeout_ms + 1000);
	for (unsigned i = 0; i < conns; i++) {
		int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);

		if (fd < 0)
			die_errno("server: accept");
		set_nodelay(fd);
		if (pthread_create(&threads[i], NULL, serve_connection, (void *)(intptr_t)fd))
			die(EXIT_ERROR, "server: expected a thread, got none");
	}
	close(listen_fd);
	for (unsigned i = 0; i < conns; i++)
		pthread_join(threads[i], NULL);
	_exit(EXIT_OK);
}

/* ---- userfaultfd ------------------------------------------------------------ */

static int uffd_open(void)
{
	struct uffdio_api api = { .api = UFFD_API, .features = 0 };
	int fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);

	if (fd < 0 && errno == EPERM) {
		/* vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE: try the device. */
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);

		if (dev >= 0) {
			fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
			close(dev);
		}
	}
	if (fd < 0)
		die(EXIT_NO_UFFD, "expected a userfaultfd (userfaultfd(2) or /dev/userfaultfd), got %s; "
		    "run as root (CAP_SYS_PTRACE), set vm.unprivileged_userfaultfd=1, or grant access to /dev/userfaultfd",
		    strerror(errno));
	if (ioctl(fd, UFFDIO_API, &api))
		die(EXIT_NO_UFFD, "UFFDIO_API: %s", strerror(errno));
	return fd;
}

static void uffd_register(int fd, void *start, uint64_t len)
{
	struct uffdio_register reg = {
		.range = { .start = (uintptr_t)start, .len = len },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};

	if (ioctl(fd, UFFDIO_REGISTER, &reg))
		die_errno("UFFDIO_REGISTER");
	if (!(reg.ioctls & (1ull << _UFFDIO_COPY)))
		die(EXIT_ERROR, "expected UFFDIO_COPY among the range's ioctls, got %#llx", (unsigned long long)reg.ioctls);
}

/* UFFDIO_COPY of one page; returns 1 if installed, 0 on EEXIST (already there). */
static int uffd_copy(int fd, uint64_t page, const void *src, uint64_t copy_mode)
{
	struct uffdio_copy copy = {
		.dst = (uintptr_t)(guest + page * PAGE_SIZE),
		.src = (uintptr_t)src,
		.len = PAGE_SIZE,
		.mode = copy_mode,
	};

	if (ioctl(fd, UFFDIO_COPY, &copy) == 0 && copy.copy == PAGE_SIZE)
		return 1;
	if (copy.copy == -EEXIST) {
		__atomic_fetch_add(&eexist_count, 1, __ATOMIC_RELAXED);
		return 0;
	}
	die(EXIT_ERROR, "expected UFFDIO_COPY of page %llu to copy %u bytes, got %lld (%s)",
	    (unsigned long long)page, PAGE_SIZE, (long long)copy.copy, strerror(errno));
}

static void uffd_wake(int fd, uint64_t page)
{
	struct uffdio_range range = { .start = (uintptr_t)(guest + page * PAGE_SIZE), .len = PAGE_SIZE };

	if (ioctl(fd, UFFDIO_WAKE, &range))
		die_errno("UFFDIO_WAKE");
	__atomic_fetch_add(&wake_count, 1, __ATOMIC_RELAXED);
}

/* ---- handler threads (shared, per-region; and exit mode's watcher) ----------- */

struct handler {
	pthread_t thread;
	int uffd;
	int conn;        /* -1: exit mode's watcher, which must never see a fault */
};

static void *handler_main(void *arg)
{
	struct handler *h = arg;
	uint64_t *page_buf = aligned_alloc(PAGE_SIZE, PAGE_SIZE);
	struct epoll_event ev = { .events = EPOLLIN | EPOLLEXCLUSIVE, .data.u32 = 0 };
	int ep = epoll_create1(EPOLL_CLOEXEC);

	if (!page_buf || ep < 0)
		die(EXIT_ERROR, "expected a handler's page buffer and epoll, got none");
	/* One fault wakes one handler (EPOLLEXCLUSIVE); the quit eventfd wakes all. */
	if (epoll_ctl(ep, EPOLL_CTL_ADD, h->uffd, &ev))
		die_errno("epoll_ctl(uffd)");
	ev.events = EPOLLIN;
	ev.data.u32 = 1;
	if (epoll_ctl(ep, EPOLL_CTL_ADD, quit_fd, &ev))
		die_errno("epoll_ctl(quit)");
	for (;;) {
		struct uffd_msg msg;
		ssize_t n = read(h->uffd, &msg, sizeof(msg));

		if (n < 0 && errno == EAGAIN) {
			/* Nothing queued (or another handler took it): wait. */
			struct epoll_event got[2];
			int k = epoll_wait(ep, got, 2, -1);

			if (k < 0 && errno != EINTR)
				die_errno("epoll_wait");
			for (int i = 0; i < k; i++)
				if (got[i].data.u32 == 1)
					goto out;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n != sizeof(msg))
			die(EXIT_ERROR, "expected a %zu-byte uffd_msg, got %zd (%s)", sizeof(msg), n, strerror(errno));
		if (msg.event != UFFD_EVENT_PAGEFAULT)
			die(EXIT_ERROR, "expected a page fault message, got event %u", msg.event);

		uint64_t page = (msg.arg.pagefault.address - (uintptr_t)guest) / PAGE_SIZE;

		if (page >= total_pages)
			die(EXIT_ERROR, "expected a fault inside guest memory, got address %#llx",
			    (unsigned long long)msg.arg.pagefault.address);
		if (h->conn < 0)
			die(EXIT_ERROR, "exit mode: expected no fault through the userfaultfd, got one on page %llu",
			    (unsigned long long)page);
		fetch_page(h->conn, page, page_buf);
		/* A COPY that installs wakes the faulting thread; EEXIST wakes nobody,
		 * so the handler owes the WAKE (userfaultfd_copy() in fs/userfaultfd.c). */
		if (!uffd_copy(h->uffd, page, page_buf, 0))
			uffd_wake(h->uffd, page);
	}
out:
	close(ep);
	free(page_buf);
	return NULL;
}

/* ---- vCPU threads ----------------------------------------------------------- */

struct vcpu {
	pthread_t thread;
	unsigned idx;
	int uffd;        /* exit mode: where it installs */
	int conn;        /* exit mode: its own connection */
	uint64_t sum;    /* what it read, so the reads are not optimised away */
};

static pthread_barrier_t start_barrier;

static void *vcpu_main(void *arg)
{
	struct vcpu *v = arg;
	uint64_t first = (uint64_t)v->idx * pages_per_vcpu;
	uint64_t *page_buf = NULL;
	uint64_t sum = 0;

	if (mode == MODE_EXIT && !(page_buf = aligned_alloc(PAGE_SIZE, PAGE_SIZE)))
		die(EXIT_ERROR, "expected a vCPU's page buffer, got none");
	pthread_barrier_wait(&start_barrier);
	for (uint64_t page = first; page < first + pages_per_vcpu; page++) {
		volatile uint64_t *word = (volatile uint64_t *)(guest + page * PAGE_SIZE);
		uint64_t t0 = now_ns();

		if (mode == MODE_EXIT && !__atomic_load_n(&installed[page], __ATOMIC_ACQUIRE)) {
			/* The memory-fault exit: fetch it ourselves, install without a
			 * wake (nobody sleeps on it), go on whether we or someone else
			 * installed it (EEXIST). */
			fetch_page(v->conn, page, page_buf);
			uffd_copy(v->uffd, page, page_buf, UFFDIO_COPY_MODE_DONTWAKE);
			__atomic_store_n(&installed[page], 1, __ATOMIC_RELEASE);
		}
		sum += *word; /* shared, per-region: a fault on a missing page */
		uint64_t dt = now_ns() - t0;

		latency_ns[page] = dt > UINT32_MAX ? UINT32_MAX : (uint32_t)dt;
	}
	v->sum = sum;
	free(page_buf);
	return NULL;
}

/* ---- main ------------------------------------------------------------------- */

static void usage(const char *fmt, const char *got)
{
	fprintf(stderr, "fault-floor: ");
	fprintf(stderr, fmt, got);
	fprintf(stderr, "\nusage: fault-floor --mode shared|per-region|exit [--vcpus N] [--mib-per-vcpu M]"
			" [--seed S] [--timeout-ms MS]\n       testing only: [--corrupt-page P] [--stall-server 1]\n");
	exit(EXIT_USAGE);
}

static long long parse_int(const char *opt, const char *text, long long min, long long max)
{
	char *end;
	long long v;

	errno = 0;
	v = strtoll(text, &end, 10);
	if (errno || *end || end == text || v < min || v > max) {
		char msg[160];

		snprintf(msg, sizeof(msg), "expected %s to be an integer from %lld to %lld, got %%s", opt, min, max);
		usage(msg, text);
	}
	return v;
}

static void parse_args(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		const char *opt = argv[i];
		const char *val = i + 1 < argc ? argv[i + 1] : NULL;

		if (!val)
			usage("expected a value after %s, got none", opt);
		i++;
		if (!strcmp(opt, "--mode")) {
			unsigned m;

			for (m = 0; m < 3 && strcmp(val, mode_names[m]); m++)
				;
			if (m == 3)
				usage("expected --mode shared, per-region or exit, got %s", val);
			mode = m;
		} else if (!strcmp(opt, "--vcpus")) {
			nr_vcpus = parse_int(opt, val, 1, MAX_VCPUS);
		} else if (!strcmp(opt, "--mib-per-vcpu")) {
			pages_per_vcpu = parse_int(opt, val, 1, 65536) * (1024 * 1024 / PAGE_SIZE);
		} else if (!strcmp(opt, "--seed")) {
			seed = parse_int(opt, val, 0, INT64_MAX);
		} else if (!strcmp(opt, "--timeout-ms")) {
			timeout_ms = parse_int(opt, val, 1, 24LL * 3600 * 1000);
		} else if (!strcmp(opt, "--corrupt-page")) {
			corrupt_page = parse_int(opt, val, 0, INT64_MAX);
		} else if (!strcmp(opt, "--stall-server")) {
			stall_server = parse_int(opt, val, 0, 1);
		} else {
			usage("expected an option (--mode, --vcpus, --mib-per-vcpu, --seed, --timeout-ms, --corrupt-page, --stall-server), got %s", opt);
		}
	}
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/* The p-th percentile (nearest rank) of sorted values, in µs. */
static double percentile_us(const uint32_t *sorted, uint64_t n, double p)
{
	uint64_t rank = (uint64_t)(p / 100.0 * n + 0.999999);

	if (rank < 1)
		rank = 1;
	return sorted[rank - 1] / 1000.0;
}

static int connect_loopback(uint16_t port)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = port, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)))
		die_errno("connect to the server");
	set_nodelay(fd);
	return fd;
}

int main(int argc, char **argv)
{
	static struct vcpu vcpus[MAX_VCPUS];
	static struct handler handlers[MAX_VCPUS];
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t addr_len = sizeof(addr);
	unsigned nr_handlers, nr_uffds;
	int uffds[MAX_VCPUS];
	int listen_fd, status;
	pid_t server;

	parse_args(argc, argv);
	if (sysconf(_SC_PAGESIZE) != PAGE_SIZE)
		die(EXIT_ERROR, "expected a %u-byte base page, got %ld", PAGE_SIZE, sysconf(_SC_PAGESIZE));
	signal(SIGPIPE, SIG_IGN);
	arm_timeout(timeout_ms);
	total_pages = pages_per_vcpu * nr_vcpus;
	if (corrupt_page >= (int64_t)total_pages)
		die(EXIT_USAGE, "expected --corrupt-page < %llu, got %lld", (unsigned long long)total_pages, (long long)corrupt_page);
	make_pool();

	/* Listen before forking, so our connects queue even before the server accepts. */
	listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&addr, sizeof(addr)) ||
	    listen(listen_fd, nr_vcpus + 16) || getsockname(listen_fd, (struct sockaddr *)&addr, &addr_len))
		die_errno("listen on 127.0.0.1");
	/* Fork while single-threaded: the child starts its own threads. */
	pid_t self = getpid();

	server = fork();
	if (server < 0)
		die_errno("fork");
	if (server == 0)
		run_server(listen_fd, nr_vcpus, self);
	close(listen_fd);

	guest = mmap(NULL, total_pages * PAGE_SIZE, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (guest == MAP_FAILED)
		die_errno("mmap guest memory");
	/* 4 KiB faults only: no transparent huge page may cover a partition. */
	if (madvise(guest, total_pages * PAGE_SIZE, MADV_NOHUGEPAGE))
		die_errno("madvise(MADV_NOHUGEPAGE)");
	latency_ns = calloc(total_pages, sizeof(*latency_ns));
	installed = calloc(total_pages, 1);
	quit_fd = eventfd(0, EFD_CLOEXEC);
	if (!latency_ns || !installed || quit_fd < 0)
		die(EXIT_ERROR, "expected memory for %llu pages' accounting, got none", (unsigned long long)total_pages);

	/* The userfaultfds and who reads them. */
	nr_uffds = mode == MODE_PER_REGION ? nr_vcpus : 1;
	for (unsigned i = 0; i < nr_uffds; i++) {
		uffds[i] = uffd_open();
		if (mode == MODE_PER_REGION)
			uffd_register(uffds[i], guest + (uint64_t)i * pages_per_vcpu * PAGE_SIZE, pages_per_vcpu * PAGE_SIZE);
		else
			uffd_register(uffds[i], guest, total_pages * PAGE_SIZE);
	}
	nr_handlers = mode == MODE_EXIT ? 1 : nr_vcpus;
	for (unsigned i = 0; i < nr_vcpus; i++) {
		int conn = connect_loopback(addr.sin_port);

		vcpus[i] = (struct vcpu){ .idx = i, .uffd = uffds[0], .conn = -1 };
		if (mode == MODE_EXIT)
			vcpus[i].conn = conn;
		else
			handlers[i] = (struct handler){ .uffd = uffds[mode == MODE_PER_REGION ? i : 0], .conn = conn };
	}
	if (mode == MODE_EXIT)
		handlers[0] = (struct handler){ .uffd = uffds[0], .conn = -1 };
	for (unsigned i = 0; i < nr_handlers; i++)
		if (pthread_create(&handlers[i].thread, NULL, handler_main, &handlers[i]))
			die(EXIT_ERROR, "expected a handler thread, got none");

	/* The timed section: release the vCPUs, join them. */
	pthread_barrier_init(&start_barrier, NULL, nr_vcpus + 1);
	for (unsigned i = 0; i < nr_vcpus; i++)
		if (pthread_create(&vcpus[i].thread, NULL, vcpu_main, &vcpus[i]))
			die(EXIT_ERROR, "expected a vCPU thread, got none");
	pthread_barrier_wait(&start_barrier);
	uint64_t t0 = now_ns();

	for (unsigned i = 0; i < nr_vcpus; i++)
		pthread_join(vcpus[i].thread, NULL);
	uint64_t elapsed_ns = now_ns() - t0;

	/* Tear down: handlers, connections (the server's threads see the end of
	 * their streams and it exits), userfaultfds. */
	uint64_t one = 1;

	if (write(quit_fd, &one, sizeof(one)) != sizeof(one))
		die_errno("write(quit eventfd)");
	for (unsigned i = 0; i < nr_handlers; i++)
		pthread_join(handlers[i].thread, NULL);
	for (unsigned i = 0; i < nr_vcpus; i++)
		close(mode == MODE_EXIT ? vcpus[i].conn : handlers[i].conn);
	if (waitpid(server, &status, 0) != server)
		die_errno("waitpid(server)");
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		die(EXIT_ERROR, "expected the server to exit 0, got %s %d",
		    WIFEXITED(status) ? "exit code" : "signal", WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
	for (unsigned i = 0; i < nr_uffds; i++)
		close(uffds[i]);
	close(quit_fd);

	/* Every page, against what the server should have sent. */
	uint64_t *expected = aligned_alloc(PAGE_SIZE, PAGE_SIZE);
	uint64_t mismatched = 0, first_bad_page = 0, first_bad_offset = 0;

	if (!expected)
		die(EXIT_ERROR, "expected a page buffer, got none");
	for (uint64_t page = 0; page < total_pages; page++) {
		const uint8_t *got = (const uint8_t *)guest + page * PAGE_SIZE;

		page_content(page, expected);
		if (memcmp(got, expected, PAGE_SIZE)) {
			if (!mismatched++) {
				first_bad_page = page;
				while (got[first_bad_offset] == ((uint8_t *)expected)[first_bad_offset])
					first_bad_offset++;
			}
		}
	}

	qsort(latency_ns, total_pages, sizeof(*latency_ns), cmp_u32);
	double elapsed_ms = elapsed_ns / 1e6;

	printf("{\"floor\":\"native\",\"mode\":\"%s\",\"vcpus\":%u,\"pageSize\":%u,\"pagesPerVcpu\":%llu,\"pages\":%llu,"
	       "\"elapsedMs\":%.3f,\"pagesPerSec\":%.1f,"
	       "\"latencyUs\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f},"
	       "\"eexist\":%llu,\"wakes\":%llu,\"verified\":%s",
	       mode_names[mode], nr_vcpus, PAGE_SIZE, (unsigned long long)pages_per_vcpu, (unsigned long long)total_pages,
	       elapsed_ms, total_pages / (elapsed_ns / 1e9),
	       percentile_us(latency_ns, total_pages, 50), percentile_us(latency_ns, total_pages, 90),
	       percentile_us(latency_ns, total_pages, 99), latency_ns[total_pages - 1] / 1000.0,
	       (unsigned long long)eexist_count, (unsigned long long)wake_count, mismatched ? "false" : "true");
	if (mismatched)
		printf(",\"mismatchedPages\":%llu,\"firstMismatch\":{\"page\":%llu,\"offset\":%llu}",
		       (unsigned long long)mismatched, (unsigned long long)first_bad_page, (unsigned long long)first_bad_offset);
	printf("}\n");
	fflush(stdout);
	free(expected);
	free(latency_ns);
	free(installed);
	free(pool);
	munmap(guest, total_pages * PAGE_SIZE);
	if (mismatched) {
		fprintf(stderr, "fault-floor: expected every page to match the server's content, got %llu mismatched "
			"(first: page %llu, byte %llu)\n", (unsigned long long)mismatched,
			(unsigned long long)first_bad_page, (unsigned long long)first_bad_offset);
		return EXIT_MISMATCH;
	}
	return EXIT_OK;
}
