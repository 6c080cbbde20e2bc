/**
 * The uffd backend's own facts, beyond the conformance suite: a worker's
 * plain load of a missing page blocks in the kernel and the message names
 * that worker's gettid(); such a thread cannot be terminated, only woken
 * (by a close, which lets it read zeros); the errors that say why the
 * backend cannot run. On Linux these run, and fail if no userfaultfd can be
 * opened.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { BackendUnavailableError, makeLayout } from '@postcopy/shared';
import { afterEach, describe, expect, it } from 'vitest';
import { ERRNO } from './backend.js';
import { Harness, PAGE, QUIET_MS, TIMEOUT_MS, firstWord, pageData } from '../conformance/harness.js';
import { loadUffdNative } from './uffd-native.js';
import { uffdBackend } from './uffd-backend.js';

const linux = process.platform === 'linux';
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

let harness: Harness | undefined;
afterEach(async () => {
  // Closes the contexts first: a thread blocked in a real fault cannot be terminated.
  await harness?.dispose();
  harness = undefined;
});

describe.runIf(linux)('uffd memory backend (Linux)', () => {
  it('the addon is built and loads (npm run build builds it on Linux)', () => {
    const load = loadUffdNative();
    expect(load.ok ? 'loaded' : load.reason).toBe('loaded');
  });

  it("a worker's plain load of a missing page blocks in handle_userfault until UFFDIO_COPY; the message carries its gettid()", async () => {
    const h = (harness = Harness.create(uffdBackend));
    const ctx = h.openAll();
    const a = await h.thread('a');
    const native = loadUffdNative();
    if (!native.ok) throw new Error(native.reason);
    expect(a.tid).not.toBe(native.native.gettid()); // a thread of its own, not this one

    h.touch(a, 5);
    const msg = { address: 0, flags: 0, tid: 0 };
    expect(h.memory.read(ctx, msg, TIMEOUT_MS)).toBe(0);
    expect(msg).toEqual({ address: 5 * PAGE, flags: 0, tid: a.tid });
    await h.blocked(a);
    // Where the kernel has it asleep: the userfault wait, not a futex.
    expect(readFileSync(`/proc/self/task/${a.tid}/wchan`, 'utf8')).toBe('handle_userfault');
    expect(await h.stays(a)).toBe('blocked');

    expect(h.memory.copy(ctx, 5 * PAGE, pageData(5), PAGE)).toBe(PAGE);
    expect(await h.resumed(a)).toBe('resumed: data 5');
    // This thread's own ArrayBuffer over the same mapping sees the page too (installed: no fault).
    expect(new Int32Array(h.memory.memslot(0))[5 * (PAGE / 4)]).toBe(firstWord(5));
  });

  it('a thread blocked in a real fault cannot be terminated; closing the userfaultfd wakes it, and then the termination lands', async () => {
    // What the woken thread reads (zeros, never installed, so never to be
    // reported verified) is the conformance case close-wakes-zeros.
    const h = (harness = Harness.create(uffdBackend));
    const ctx = h.openAll();
    const a = await h.thread('a');
    h.touch(a, 7, true);
    expect(h.read(ctx)).toBe('page 7, write, from a');
    await h.blocked(a);

    let terminated = false;
    const termination = a.worker.terminate().then(() => {
      terminated = true;
    });
    await sleep(QUIET_MS);
    expect(terminated).toBe(false); // V8's TerminateExecution cannot reach a thread inside the kernel
    expect(h.memory.isBlockedInFault(a.tid)).toBe(true);

    // The kernel's release unregisters the range and wakes every waiter
    // (fs/userfaultfd.c, userfaultfd_release): the load completes on a zero
    // page the source never sent, and only then does the termination land.
    expect(h.memory.close(ctx)).toBe(0);
    await Promise.race([termination, sleep(TIMEOUT_MS)]);
    expect(terminated).toBe(true);
  });

  it('process.exit() with a worker blocked in a fault exits (the exit guard closes the contexts; Node joins workers on exit)', () => {
    const fixture = fileURLToPath(new URL('./fixtures/exit-while-blocked.ts', import.meta.url));
    const repo = fileURLToPath(new URL('../../../', import.meta.url));
    const child = spawnSync(process.execPath, ['--import', 'tsx', fixture], { cwd: repo, encoding: 'utf8', timeout: 30_000, killSignal: 'SIGKILL' });
    expect(child.signal, `the child hung until killed; stderr: ${child.stderr}`).toBeNull();
    expect(child.stdout).toBe('page 3, read, from a\nexiting with a thread blocked in a fault\n');
    expect(child.status).toBe(3);
  });

  it('a worker waiting in readAsync can be terminated, and its poller thread goes with it', async () => {
    const h = (harness = Harness.create(uffdBackend));
    const ctx = h.openAll();
    const pollers = (): number =>
      readdirSync('/proc/self/task').filter((tid) => {
        try {
          return readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim() === 'uffd-poller';
        } catch {
          return false; // a thread that just ended
        }
      }).length;
    const before = pollers();
    const r = await h.thread('reader');
    h.readFrom(r, ctx, 'async');
    await sleep(50);
    expect(pollers()).toBe(before + 1);
    await Promise.race([r.worker.terminate(), sleep(TIMEOUT_MS)]);
    expect(r.exited).toBe(true);
    // The env cleanup hook stopped and joined the poller thread.
    expect(pollers()).toBe(before);
  });

  it('close keeps the context number taken (by /dev/null) until dispose, so no later file can be read as the context', () => {
    const layout = makeLayout(16 * PAGE, PAGE);
    const memory = uffdBackend.create({ layout, memslotBytes: layout.guestBytes, maxThreads: 1, maxContexts: 1 });
    try {
      const ctx = memory.open();
      expect(readlinkSync(`/proc/self/fd/${ctx}`)).toBe('anon_inode:[userfaultfd]');
      expect(memory.register(ctx, 0, layout.guestBytes)).toBe(0);
      expect(memory.close(ctx)).toBe(0);
      expect(readlinkSync(`/proc/self/fd/${ctx}`)).toBe('/dev/null');
      const other = openSync('/dev/null', 'r');
      expect(other).not.toBe(ctx);
      closeSync(other);
      const msg = { address: 0, flags: 0, tid: 0 };
      expect(memory.tryRead(ctx, msg)).toBe(-ERRNO.EBADF);
      expect(memory.read(ctx, msg, 10)).toBe(-ERRNO.EBADF);
      expect(memory.copy(ctx, 0, pageData(1), PAGE)).toBe(-ERRNO.EBADF);
      expect(memory.wake(ctx, 0, PAGE)).toBe(-ERRNO.EBADF);
      expect(memory.close(ctx)).toBe(-ERRNO.EBADF);
      memory.dispose();
      expect(() => readlinkSync(`/proc/self/fd/${ctx}`)).toThrow(/ENOENT/);
    } finally {
      memory.dispose();
    }
  });

  it('a per-thread context is refused: the kernel has none, per-region-uffd is named', () => {
    const layout = makeLayout(16 * PAGE, PAGE);
    const memory = uffdBackend.create({ layout, memslotBytes: layout.guestBytes, maxThreads: 2, maxContexts: 2 });
    try {
      expect(() => memory.open({ thread: 1 })).toThrow(BackendUnavailableError);
      expect(() => memory.open({ thread: 1 })).toThrow(/no per-thread userfaultfd.*per-region-uffd/);
    } finally {
      memory.dispose();
    }
  });

  it('2 MiB pages need reserved hugetlbfs pages: without them the error says so and names vm.nr_hugepages', () => {
    const layout = makeLayout(4 * 2 * 1024 * 1024, 2 * 1024 * 1024);
    const free = Number(/HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
    const create = (): ReturnType<typeof uffdBackend.create> =>
      uffdBackend.create({ layout, memslotBytes: layout.guestBytes, maxThreads: 1, maxContexts: 1 });
    if (free >= layout.totalPages) {
      // Huge pages are reserved here: the mapping works, and ZEROPAGE is EINVAL on hugetlb.
      const memory = create();
      try {
        const ctx = memory.open();
        expect(memory.register(ctx, 0, layout.guestBytes)).toBe(0);
        expect(memory.zeropage(ctx, 0, layout.pageSize)).toBe(-ERRNO.EINVAL);
      } finally {
        memory.dispose();
      }
      return;
    }
    expect(create).toThrow(BackendUnavailableError);
    expect(create).toThrow(/expected 4 free 2 MiB huge pages, got \d+ \(HugePages_Free\).*sysctl vm\.nr_hugepages=4/);
  });

  it('without permission (an unprivileged user, vm.unprivileged_userfaultfd=0, no access to /dev/userfaultfd) the error names both', (context) => {
    const sysctl = readFileSync('/proc/sys/vm/unprivileged_userfaultfd', 'utf8').trim();
    // Only root can run a child as another user, and only with the sysctl at 0 is that child refused.
    if (process.getuid?.() !== 0) context.skip('needs root, to run the child as nobody');
    if (sysctl !== '0') context.skip(`needs vm.unprivileged_userfaultfd=0, got ${sysctl}`);
    const fixture = fileURLToPath(new URL('./fixtures/open-uffd.ts', import.meta.url));
    const repo = fileURLToPath(new URL('../../../', import.meta.url));
    const child = spawnSync(process.execPath, ['--import', 'tsx', fixture], {
      cwd: repo,
      uid: 65534, // nobody
      gid: 65534,
      encoding: 'utf8',
      timeout: 30_000,
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: '/tmp' },
    });
    expect(child.error).toBeUndefined();
    const line = child.stdout.trim().split('\n').at(-1) ?? '';
    let result: { opened: boolean; code?: string; message?: string };
    try {
      result = JSON.parse(line) as typeof result;
    } catch {
      throw new Error(`expected one JSON line from the child, got stdout ${JSON.stringify(child.stdout)}, stderr ${JSON.stringify(child.stderr)}`);
    }
    expect(result.opened).toBe(false);
    expect(result.code).toBe('ERR_POSTCOPY_BACKEND_UNAVAILABLE');
    expect(result.message).toMatch(/userfaultfd\(2\) gave EPERM/);
    expect(result.message).toMatch(/vm\.unprivileged_userfaultfd is 0/);
    expect(result.message).toMatch(/\/dev\/userfaultfd failed \(EACCES\)/);
  });
});

describe.skipIf(linux)('uffd memory backend (not Linux)', () => {
  it('says why it is unavailable', () => {
    const load = loadUffdNative();
    expect(load.ok).toBe(false);
    if (!load.ok) expect(load.reason).toMatch(/Linux only/);
  });
});
