/**
 * The conformance suite: DESIGN.md's kernel-semantics table ("Emulated
 * userfaultfd: the semantics to match"), plus discard, unregister, close and
 * the cross-context rules, as cases that run unchanged on either memory
 * backend. The expected results are what Linux 6.18 does (observed through
 * the uffd backend); a backend that observes anything else is wrong, and if
 * that backend is the emulation, the emulation gets fixed.
 *
 * Each case returns its observations in backend-independent words (see
 * harness.ts), so two backends that agree produce identical JSON.
 *
 * Kernel sources behind the expectations: fs/userfaultfd.c
 * (handle_userfault, userfaultfd_must_wait, userfaultfd_wake_function,
 * userfaultfd_register, userfaultfd_unregister, userfaultfd_copy,
 * userfaultfd_release, userfaultfd_ctx_read) and mm/userfaultfd.c
 * (mfill_atomic, find_dst_vma, mfill_atomic_install_pte).
 */
import { GUEST_PAGES, Harness, PAGE, pageData, result } from './harness.js';
import { MODE_DONTWAKE, MODE_WP } from '../memory/backend.js';

export type Observed = Record<string, string | number>;

export interface ConformanceCase {
  id: string;
  title: string;
  expected: Observed;
  run(h: Harness): Promise<Observed>;
}

export const CASES: readonly ConformanceCase[] = [
  {
    id: 'copy-missing',
    title: 'COPY into a missing page copies len bytes and wakes the waiters on that range in this context',
    expected: {
      messages: 'page 5, read, from a; page 6, read, from b',
      copy: 4096,
      waiterOnThePage: 'resumed: data 5',
      waiterOnTheNextPage: 'blocked',
      copyOfThreePages: 12288,
      threePagesRead: 'resumed: data 10, resumed: data 11, resumed: data 12',
    },
    async run(h) {
      const ctx = h.openAll();
      const [a, b] = [await h.thread('a'), await h.thread('b')];
      h.touch(a, 5);
      h.touch(b, 6);
      const messages = h.readSorted(ctx, 2);
      await h.blocked(a, b);
      const copy = h.copy(ctx, 5, [5]);
      const waiterOnThePage = await h.resumed(a);
      const waiterOnTheNextPage = await h.stays(b);
      const copyOfThreePages = h.copy(ctx, 10, [10, 11, 12]);
      const reads: string[] = [];
      for (const page of [10, 11, 12]) {
        h.touch(a, page);
        reads.push(await h.resumed(a));
      }
      return { messages, copy, waiterOnThePage, waiterOnTheNextPage, copyOfThreePages, threePagesRead: reads.join(', ') };
    },
  },
  {
    id: 'copy-installed-eexist',
    title: 'COPY into an installed page fails with EEXIST and wakes nobody',
    expected: {
      dontwakeCopy: 4096,
      copyAgain: 'EEXIST',
      copyAgainDontwake: 'EEXIST',
      waiterAfterEexist: 'blocked',
      wake: 'ok',
      waiterAfterWake: 'resumed: data 4',
    },
    async run(h) {
      const ctx = h.openAll();
      const a = await h.thread('a');
      h.touch(a, 4, true);
      h.read(ctx);
      await h.blocked(a);
      // Installed without waking, so a waiter sits on an installed page.
      const dontwakeCopy = h.copy(ctx, 4, [4], MODE_DONTWAKE);
      const copyAgain = h.copy(ctx, 4, [40]);
      const copyAgainDontwake = h.copy(ctx, 4, [41], MODE_DONTWAKE);
      const waiterAfterEexist = await h.stays(a);
      const wake = h.memory.wake(ctx, 4 * PAGE, PAGE);
      return { dontwakeCopy, copyAgain, copyAgainDontwake, waiterAfterEexist, wake: result(wake), waiterAfterWake: await h.resumed(a) };
    },
  },
  {
    id: 'zeropage-then-copy',
    title: 'ZEROPAGE, then COPY on the same page: the COPY fails with EEXIST (and ZEROPAGE wakes like COPY)',
    expected: {
      zeropage: 4096,
      copyAfterZeropage: 'EEXIST',
      pageReads: 'resumed: zeros',
      copy: 4096,
      zeropageAfterCopy: 'EEXIST',
      writeToTheZeroPage: 'resumed: zeros',
      messagesOfThatWrite: 'none (EAGAIN)',
      waiterWokenByZeropage: 'resumed: zeros',
    },
    async run(h) {
      const ctx = h.openAll();
      const a = await h.thread('a');
      const zeropage = result(h.memory.zeropage(ctx, 2 * PAGE, PAGE));
      const copyAfterZeropage = h.copy(ctx, 2, [2]);
      h.touch(a, 2);
      const pageReads = await h.resumed(a);
      const copy = h.copy(ctx, 3, [3]);
      const zeropageAfterCopy = h.memory.zeropage(ctx, 3 * PAGE, PAGE);
      // A write to the zero page is a copy-on-write, not a missing fault: no message.
      h.touch(a, 2, true);
      const writeToTheZeroPage = await h.resumed(a);
      const messagesOfThatWrite = h.tryRead(ctx);
      h.touch(a, 7);
      h.read(ctx);
      await h.blocked(a);
      h.memory.zeropage(ctx, 7 * PAGE, PAGE);
      return {
        zeropage,
        copyAfterZeropage,
        pageReads,
        copy,
        zeropageAfterCopy: result(zeropageAfterCopy),
        writeToTheZeroPage,
        messagesOfThatWrite,
        waiterWokenByZeropage: await h.resumed(a),
      };
    },
  },
  {
    id: 'partial-copy-eagain',
    title: 'COPY of 2 pages where the 2nd is installed copies the 1st (copy = 4096), fails with EAGAIN, wakes the 1st',
    expected: {
      copySecondPage: 4096,
      copyBoth: 4096,
      ioctlResult: 'EAGAIN',
      waiterOnFirstPage: 'resumed: data 6',
      secondPageKeepsItsData: 'resumed: data 7',
      copyWhenFirstIsInstalled: 'EEXIST',
      pageAfterItStillMissing: 'page 8, read, from b',
    },
    async run(h) {
      const ctx = h.openAll();
      const [a, b] = [await h.thread('a'), await h.thread('b')];
      h.touch(a, 6, true);
      h.read(ctx);
      await h.blocked(a);
      const copySecondPage = h.copy(ctx, 7, [7]);
      const copied = h.memory.copy(ctx, 6 * PAGE, pageData(6, 70), 2 * PAGE);
      const waiterOnFirstPage = await h.resumed(a);
      h.touch(a, 7);
      const secondPageKeepsItsData = await h.resumed(a);
      const copyWhenFirstIsInstalled = h.copy(ctx, 7, [71, 8]);
      h.touch(b, 8);
      const pageAfterItStillMissing = h.read(ctx);
      return {
        copySecondPage,
        copyBoth: result(copied),
        ioctlResult: Harness.ioctlOfCopy(copied, 2 * PAGE),
        waiterOnFirstPage,
        secondPageKeepsItsData,
        copyWhenFirstIsInstalled,
        pageAfterItStillMissing,
      };
    },
  },
  {
    id: 'copy-unregistered-enoent',
    title: 'COPY into an unregistered range fails with ENOENT',
    expected: {
      pastTheRegisteredRange: 'ENOENT',
      straddlingItsEnd: 'ENOENT',
      pastTheGuest: 'ENOENT',
      zeropagePastTheRange: 'ENOENT',
      insideTheRange: 4096,
    },
    async run(h) {
      const ctx = h.open();
      h.memory.register(ctx, 0, 8 * PAGE);
      return {
        pastTheRegisteredRange: h.copy(ctx, 8, [8]),
        straddlingItsEnd: h.copy(ctx, 7, [7, 8]),
        pastTheGuest: h.copy(ctx, GUEST_PAGES, [16]),
        zeropagePastTheRange: result(h.memory.zeropage(ctx, 9 * PAGE, PAGE)),
        insideTheRange: h.copy(ctx, 7, [7]),
      };
    },
  },
  {
    id: 'misaligned-einval',
    title: 'COPY at a misaligned address fails with EINVAL (so do length, ZEROPAGE, WAKE, REGISTER)',
    expected: {
      copyAtPagePlusOne: 'EINVAL',
      copyAtPagePlus512: 'EINVAL',
      copyOf100Bytes: 'EINVAL',
      copyOfZeroBytes: 'EINVAL',
      zeropageMisaligned: 'EINVAL',
      wakeMisaligned: 'EINVAL',
      wakeOfZeroBytes: 'EINVAL',
      registerMisaligned: 'EINVAL',
      pageStillMissing: 'page 1, read, from a',
    },
    async run(h) {
      const ctx = h.openAll();
      const src = pageData(1, 2);
      const m = h.memory;
      const r = result;
      const observed: Observed = {
        copyAtPagePlusOne: r(m.copy(ctx, PAGE + 1, src, PAGE)),
        copyAtPagePlus512: r(m.copy(ctx, PAGE + 512, src, PAGE)),
        copyOf100Bytes: r(m.copy(ctx, PAGE, src, 100)),
        copyOfZeroBytes: r(m.copy(ctx, PAGE, src, 0)),
        zeropageMisaligned: r(m.zeropage(ctx, PAGE + 8, PAGE)),
        wakeMisaligned: r(m.wake(ctx, 8, PAGE)),
        wakeOfZeroBytes: r(m.wake(ctx, 0, 0)),
        registerMisaligned: r(m.register(h.open(), 1, PAGE)),
      };
      const a = await h.thread('a');
      h.touch(a, 1);
      observed.pageStillMissing = h.read(ctx);
      return observed;
    },
  },
  {
    id: 'wake-no-waiters',
    title: 'WAKE on a range with no waiters succeeds and does nothing',
    expected: {
      wakeWholeGuestNobodyWaiting: 'ok',
      wakesAroundTheWaiter: 'ok, ok, ok',
      waiter: 'blocked',
      newMessages: 'none (EAGAIN)',
      afterCopy: 'resumed: data 9',
    },
    async run(h) {
      const ctx = h.openAll();
      const m = h.memory;
      const wakeWholeGuestNobodyWaiting = m.wake(ctx, 0, GUEST_PAGES * PAGE);
      const a = await h.thread('a');
      h.touch(a, 9);
      h.read(ctx);
      await h.blocked(a);
      const around = [m.wake(ctx, 8 * PAGE, PAGE), m.wake(ctx, 10 * PAGE, 6 * PAGE), m.wake(ctx, 0, 9 * PAGE)];
      const waiter = await h.stays(a);
      const newMessages = h.tryRead(ctx);
      h.copy(ctx, 9, [9]);
      return {
        wakeWholeGuestNobodyWaiting: result(wakeWholeGuestNobodyWaiting),
        wakesAroundTheWaiter: around.map(result).join(', '),
        waiter,
        newMessages,
        afterCopy: await h.resumed(a),
      };
    },
  },
  {
    id: 'two-faulters-two-messages',
    title: 'two threads fault the same page: two fault messages are delivered, one per thread',
    expected: {
      messages: 'page 5, read, from b; page 5, write, from a',
      thirdMessage: 'none (EAGAIN)',
      a: 'blocked',
      b: 'blocked',
    },
    async run(h) {
      const ctx = h.openAll();
      const [a, b] = [await h.thread('a'), await h.thread('b')];
      h.touch(a, 5, true);
      h.touch(b, 5);
      const messages = h.readSorted(ctx, 2);
      await h.blocked(a, b);
      return { messages, thirdMessage: h.tryRead(ctx), a: await h.stays(a), b: await h.stays(b) };
    },
  },
  {
    id: 'one-copy-wakes-both',
    title: 'one COPY while two threads wait on that page (one context): both wake',
    expected: { copy: 4096, a: 'resumed: data 12', b: 'resumed: data 12' },
    async run(h) {
      const ctx = h.openAll();
      const [a, b] = [await h.thread('a'), await h.thread('b')];
      h.touch(a, 12, true);
      h.touch(b, 12);
      h.readSorted(ctx, 2);
      await h.blocked(a, b);
      const copy = h.copy(ctx, 12, [12]);
      return { copy, a: await h.resumed(a), b: await h.resumed(b) };
    },
  },
  {
    id: 'dontwake-until-wake',
    title: 'COPY with DONTWAKE: the waiter stays blocked until a WAKE on its range',
    expected: { dontwakeCopy: 4096, waiter: 'blocked', wakeOfAnotherPage: 'ok', stillWaiting: 'blocked', wake: 'ok', afterWake: 'resumed: data 3' },
    async run(h) {
      const ctx = h.openAll();
      const a = await h.thread('a');
      h.touch(a, 3, true);
      h.read(ctx);
      await h.blocked(a);
      const dontwakeCopy = h.copy(ctx, 3, [3], MODE_DONTWAKE);
      const waiter = await h.stays(a);
      const other = h.memory.wake(ctx, 4 * PAGE, PAGE);
      const stillWaiting = await h.stays(a);
      const wake = h.memory.wake(ctx, 3 * PAGE, PAGE);
      return { dontwakeCopy, waiter, wakeOfAnotherPage: result(other), stillWaiting, wake: result(wake), afterWake: await h.resumed(a) };
    },
  },
  {
    id: 'wake-missing-refaults',
    title: 'WAKE while the page is still missing: the thread wakes, faults again, and a new message is delivered',
    expected: {
      first: 'page 11, read, from a',
      wake: 'ok',
      second: 'page 11, read, from a',
      waiter: 'blocked',
      third: 'none (EAGAIN)',
      afterCopy: 'resumed: data 11',
    },
    async run(h) {
      const ctx = h.openAll();
      const a = await h.thread('a');
      h.touch(a, 11);
      const first = h.read(ctx);
      await h.blocked(a);
      const wake = h.memory.wake(ctx, 11 * PAGE, PAGE);
      const second = h.read(ctx); // the retry's fault
      await h.blocked(a);
      const waiter = await h.stays(a);
      const third = h.tryRead(ctx);
      h.copy(ctx, 11, [11]);
      return { first, wake: result(wake), second, waiter, third, afterCopy: await h.resumed(a) };
    },
  },
  {
    id: 'wake-before-read-withdraws',
    title: 'a WAKE before the message is read withdraws it: only the retry\'s message is delivered',
    expected: { delivered: 'page 13, write, from a', more: 'none (EAGAIN)', afterCopy: 'resumed: data 13' },
    async run(h) {
      const ctx = h.openAll();
      const a = await h.thread('a');
      h.touch(a, 13, true);
      await h.blocked(a);
      h.memory.wake(ctx, 13 * PAGE, PAGE);
      // The woken thread faults again at once and queues a new message.
      await h.blocked(a);
      await new Promise((resolve) => setTimeout(resolve, 50));
      const delivered = h.read(ctx);
      const more = h.tryRead(ctx);
      h.copy(ctx, 13, [13]);
      return { delivered, more, afterCopy: await h.resumed(a) };
    },
  },
  {
    id: 'message-contents',
    title: 'a message carries the page-aligned address, the write flag (or none for a read) and the faulting thread\'s id',
    expected: { messages: 'page 2, read, from b; page 7, write, from a' },
    async run(h) {
      const ctx = h.openAll();
      const [a, b] = [await h.thread('a'), await h.thread('b')];
      // a's write lands in the page's last word: the address still comes page-aligned.
      h.touch(a, 7, true);
      h.touch(b, 2);
      return { messages: h.readSorted(ctx, 2) };
    },
  },
  {
    id: 'copy-other-context',
    title: 'COPY on one context into pages another context registers installs them, but wakes only its own context\'s waiters',
    expected: {
      registerOverlapping: 'EBUSY',
      message: 'page 9, read, from a',
      copyOnTheOtherContext: 4096,
      waiter: 'blocked',
      wakeOnTheOtherContext: 'ok',
      waiterAfterThatWake: 'blocked',
      copyOnItsOwnContext: 'EEXIST',
      wakeOnItsOwnContext: 'resumed: data 9',
      copyAcrossBoth: 'ENOENT',
    },
    async run(h) {
      const low = h.open();
      const high = h.open();
      h.memory.register(low, 0, 8 * PAGE);
      const registerOverlapping = h.memory.register(high, 4 * PAGE, 8 * PAGE);
      h.memory.register(high, 8 * PAGE, 8 * PAGE);
      const a = await h.thread('a');
      h.touch(a, 9);
      const message = h.read(high);
      await h.blocked(a);
      const copyOnTheOtherContext = h.copy(low, 9, [9]);
      const waiter = await h.stays(a);
      const wakeOnTheOtherContext = result(h.memory.wake(low, 9 * PAGE, PAGE));
      const waiterAfterThatWake = await h.stays(a);
      const copyOnItsOwnContext = h.copy(high, 9, [90]);
      h.memory.wake(high, 9 * PAGE, PAGE);
      return {
        registerOverlapping: result(registerOverlapping),
        message,
        copyOnTheOtherContext,
        waiter,
        wakeOnTheOtherContext,
        waiterAfterThatWake,
        copyOnItsOwnContext,
        wakeOnItsOwnContext: await h.resumed(a),
        copyAcrossBoth: h.copy(low, 7, [7, 8]),
      };
    },
  },
  {
    id: 'discard-refaults',
    title: 'discard (MADV_DONTNEED) of installed pages: the next touch faults again, and a COPY installs anew',
    expected: {
      firstRead: 'resumed: data 4',
      discard: 'ok',
      touchAfterDiscard: 'page 4, read, from a',
      copyAfterDiscard: 4096,
      secondRead: 'resumed: data 44',
      discardOfAMissingPage: 'ok',
      discardMisaligned: 'EINVAL',
      discardPastTheGuest: 'EINVAL',
    },
    async run(h) {
      const ctx = h.openAll();
      const a = await h.thread('a');
      h.copy(ctx, 4, [4]);
      h.touch(a, 4);
      const firstRead = await h.resumed(a);
      const discard = h.memory.discard(4 * PAGE, PAGE);
      h.touch(a, 4);
      const touchAfterDiscard = h.read(ctx);
      await h.blocked(a);
      const copyAfterDiscard = h.copy(ctx, 4, [44]);
      const secondRead = await h.resumed(a);
      return {
        firstRead,
        discard: result(discard),
        touchAfterDiscard,
        copyAfterDiscard,
        secondRead,
        discardOfAMissingPage: result(h.memory.discard(14 * PAGE, PAGE)),
        discardMisaligned: result(h.memory.discard(PAGE + 8, PAGE)),
        discardPastTheGuest: result(h.memory.discard(15 * PAGE, 2 * PAGE)),
      };
    },
  },
  {
    id: 'unregister-wakes-zeros',
    title: 'UNREGISTER wakes the range\'s waiters, which read zero-filled memory; COPY there is then ENOENT',
    expected: {
      unregister: 'ok',
      waiterInTheRange: 'resumed: zeros',
      waiterOutsideIt: 'blocked',
      copyInTheRange: 'ENOENT',
      copyOutsideIt: 4096,
      thatWaiter: 'resumed: data 12',
    },
    async run(h) {
      const ctx = h.openAll();
      const [a, b] = [await h.thread('a'), await h.thread('b')];
      h.touch(a, 6, true);
      h.touch(b, 12);
      h.readSorted(ctx, 2);
      await h.blocked(a, b);
      const unregister = h.memory.unregister(ctx, 4 * PAGE, 4 * PAGE);
      const waiterInTheRange = await h.resumed(a);
      const waiterOutsideIt = await h.stays(b);
      const copyInTheRange = h.copy(ctx, 5, [5]);
      const copyOutsideIt = h.copy(ctx, 12, [12]);
      return { unregister: result(unregister), waiterInTheRange, waiterOutsideIt, copyInTheRange, copyOutsideIt, thatWaiter: await h.resumed(b) };
    },
  },
  {
    id: 'close-wakes-zeros',
    title: 'closing the userfaultfd wakes its blocked threads, which read zero-filled memory (never installed: a run that does this is not verified)',
    expected: {
      close: 'ok',
      waiter: 'resumed: zeros',
      touchAfterClose: 'resumed: zeros',
      readAfterClose: 'none (EBADF)',
      closeAgain: 'EBADF',
    },
    async run(h) {
      const ctx = h.openAll();
      const a = await h.thread('a');
      h.touch(a, 5, true);
      h.read(ctx);
      await h.blocked(a);
      const close = h.memory.close(ctx);
      const waiter = await h.resumed(a);
      h.touch(a, 6);
      const touchAfterClose = await h.resumed(a);
      const readAfterClose = h.tryRead(ctx);
      const again = h.memory.close(ctx);
      return { close: result(close), waiter, touchAfterClose, readAfterClose, closeAgain: result(again) };
    },
  },
  {
    id: 'close-ends-readers',
    title: 'closing a context while another thread reads it: that reader sees the close (EBADF), and the faulting thread wakes on zeros',
    expected: {
      readerGetsTheFault: 'page 8, read, from a',
      readerAfterClose: 'none (EBADF)',
      waiter: 'resumed: zeros',
    },
    async run(h) {
      const ctx = h.openAll();
      const [a, r] = [await h.thread('a'), await h.thread('reader')];
      h.readFrom(r, ctx);
      h.touch(a, 8);
      const readerGetsTheFault = await h.readResult(r);
      await h.blocked(a);
      // The reader is back in read(2), with no timeout of its own, when the context closes.
      h.readFrom(r, ctx);
      await new Promise((resolve) => setTimeout(resolve, 50));
      h.memory.close(ctx);
      return { readerGetsTheFault, readerAfterClose: await h.readResult(r), waiter: await h.resumed(a) };
    },
  },
  {
    id: 'copy-before-read-withdraws',
    title: 'a COPY before the message is read wakes the thread and withdraws its message',
    expected: { waiter: 'resumed: data 10', messages: 'none (EAGAIN)' },
    async run(h) {
      const ctx = h.openAll();
      const a = await h.thread('a');
      h.touch(a, 10);
      await h.blocked(a);
      h.copy(ctx, 10, [10]);
      const waiter = await h.resumed(a);
      return { waiter, messages: h.tryRead(ctx) };
    },
  },
  {
    id: 'bad-mode-einval',
    title: 'COPY and ZEROPAGE take no mode but DONTWAKE here: unknown bits, and WP on a range not registered for it, are EINVAL',
    expected: {
      copyWithAnUnknownBit: 'EINVAL',
      copyWithWp: 'EINVAL',
      copyWithDontwakeAndWp: 'EINVAL',
      copyWithWpOutsideAnyRange: 'ENOENT',
      zeropageWithWp: 'EINVAL',
      pageStillMissing: 'page 1, read, from a',
    },
    async run(h) {
      const ctx = h.open();
      h.memory.register(ctx, 0, 8 * PAGE);
      const observed: Observed = {
        copyWithAnUnknownBit: h.copy(ctx, 1, [1], 1 << 2),
        copyWithWp: h.copy(ctx, 1, [1], MODE_WP),
        copyWithDontwakeAndWp: h.copy(ctx, 1, [1], MODE_DONTWAKE | MODE_WP),
        copyWithWpOutsideAnyRange: h.copy(ctx, 9, [9], MODE_WP),
        zeropageWithWp: result(h.memory.zeropage(ctx, PAGE, PAGE, MODE_WP)),
      };
      const a = await h.thread('a');
      h.touch(a, 1);
      observed.pageStillMissing = h.read(ctx);
      return observed;
    },
  },
  {
    id: 'unregister-other-context',
    title: 'UNREGISTER through a context of pages another context registers fails with EINVAL and changes nothing',
    expected: {
      unregisterThroughTheOther: 'EINVAL',
      message: 'page 2, read, from a',
      waiter: 'blocked',
      unregisterOfPagesNobodyRegisters: 'ok',
      copyStillWorks: 4096,
      afterCopy: 'resumed: data 2',
    },
    async run(h) {
      const owner = h.open();
      const other = h.open();
      h.memory.register(owner, 0, 8 * PAGE);
      const a = await h.thread('a');
      h.touch(a, 2);
      const message = h.read(owner);
      await h.blocked(a);
      const unregisterThroughTheOther = result(h.memory.unregister(other, 0, 8 * PAGE));
      const waiter = await h.stays(a);
      const unregisterOfPagesNobodyRegisters = result(h.memory.unregister(other, 8 * PAGE, 8 * PAGE));
      const copyStillWorks = h.copy(owner, 2, [2]);
      return { unregisterThroughTheOther, message, waiter, unregisterOfPagesNobodyRegisters, copyStillWorks, afterCopy: await h.resumed(a) };
    },
  },
  {
    id: 'touched-before-register',
    title: 'a page touched before its range is registered is plain memory (zeros) and stays installed: COPY there is EEXIST',
    expected: { touchWithNoContext: 'resumed: zeros', copyAfterRegister: 'EEXIST', untouchedPageFaults: 'page 4, read, from a' },
    async run(h) {
      const a = await h.thread('a');
      h.touch(a, 3);
      const touchWithNoContext = await h.resumed(a);
      const ctx = h.openAll();
      const copyAfterRegister = h.copy(ctx, 3, [3]);
      h.touch(a, 4);
      return { touchWithNoContext, copyAfterRegister, untouchedPageFaults: h.read(ctx) };
    },
  },
  {
    id: 'read-async',
    title: 'readAsync delivers faults without blocking the reader\'s event loop, and resolves EBADF once the context is closed',
    expected: {
      onThisThread: 'page 6, read, from a',
      onAReaderThread: 'page 7, write, from b',
      readerAfterClose: 'none (EBADF)',
      waiters: 'resumed: zeros, resumed: zeros',
    },
    async run(h) {
      const ctx = h.openAll();
      const [a, b, r] = [await h.thread('a'), await h.thread('b'), await h.thread('reader')];
      const pending = h.readAsync(ctx);
      h.touch(a, 6);
      const onThisThread = await pending;
      h.readFrom(r, ctx, 'async');
      h.touch(b, 7, true);
      const onAReaderThread = await h.readResult(r);
      await h.blocked(a, b);
      h.readFrom(r, ctx, 'async');
      await new Promise((resolve) => setTimeout(resolve, 50));
      h.memory.close(ctx);
      const readerAfterClose = await h.readResult(r);
      return { onThisThread, onAReaderThread, readerAfterClose, waiters: `${await h.resumed(a)}, ${await h.resumed(b)}` };
    },
  },
];
