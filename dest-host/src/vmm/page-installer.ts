import type { PageReply, Reply, ZeroPageReply } from '@postcopy/shared';
import { ERRNO, MODE_DONTWAKE, type BackendMemory } from '../memory/backend.js';
import type { BlockingPageChannel } from '../net/blocking-page-channel.js';
import type { PageClient } from '../net/page-client.js';
import type { Session } from '../net/session.js';
import { rangeOf, type ContextRange } from '../strategies/strategy.js';
import { COUNTER, ORIGIN, type VmmState } from './state.js';

/**
 * How a resolution ended (for the caller's accounting and the timeline; a
 * number, never allocated). Any WAKE owed was issued in every case but
 * INSTALLED, whose own COPY woke the waiters (unless DONTWAKE).
 */
export const Resolution = {
  /** This resolver's request brought the page and it installed it. */
  INSTALLED: 0,
  /** The page was installed already when the resolver looked (a push, another thread's request). */
  ELSEWHERE: 1,
  /** Our request brought the page but our COPY found it present: EEXIST. */
  EEXIST: 2,
  /** Another thread had claimed the page (asked for it) first: no request of ours (a duplicate suppressed). */
  SUPPRESSED: 3,
  /** Our request was answered already-sent: the page came by push. */
  ALREADY_SENT: 4,
  /** Our request was answered on the main channel (no preempt): the main thread installed it. */
  ON_MAIN: 5,
} as const;

export interface ResolveOptions {
  /** Context the COPY is issued on (its waiters are woken, unless dontWake). */
  ctx: number;
  /** UFFDIO_COPY_MODE_DONTWAKE (kvm-exit installs without waking anyone). */
  dontWake: boolean;
  /**
   * Whether this resolver must UFFDIO_WAKE its context when the page was
   * installed by someone else (EEXIST, a duplicate fault, an already-sent
   * page): true whenever that someone may have used another context or
   * DONTWAKE, i.e. per-thread userfaultfd and the I/O-thread resolver. The
   * kernel wakes nobody on EEXIST, so a resolver that owes this WAKE and skips
   * it leaves the faulting thread blocked for ever.
   */
  owesWake: boolean;
  /**
   * How this resolver waits for a page that comes some other way (another
   * thread asked for it first, a push in flight, the main channel without
   * preempt), before it pays any owed WAKE (see {@link PageWait}).
   */
  pageWait: PageWait;
}

/**
 * How a resolver waits for a page installed by someone else:
 * - `block`: the thread has nothing else to do meanwhile (a kvm-exit vCPU
 *   whose run loop exited; a per-thread-uffd resolver, whose one vCPU is
 *   blocked on this very page), so it blocks in Atomics.wait: a sleep the
 *   installer ends with a plain futex wake, where an awaited wait costs a task
 *   posted to this thread's event loop, and its wake-up;
 * - `await`: an event loop with other faults in flight (the I/O threads'
 *   resolver) awaits it (Atomics.waitAsync);
 * - `none`: the installer's COPY wakes the faulting thread itself (one shared
 *   context, nothing owed: shared-uffd's readers), so there is nothing to
 *   wait for; the fault is the installer's from here.
 * A resolver that owes a WAKE must wait (`block` or `await`): the WAKE is
 * owed once the page is in.
 */
export type PageWait = 'block' | 'await' | 'none';

/**
 * Installs pages on the destination: fetches a missing page from the source
 * (once per page destination-wide: the in-flight set), COPYs or ZEROPAGEs it,
 * marks it in the receivedmap, and pays the WAKE the strategy owes. It goes
 * through the memory backend only (memory/backend.ts), so the same code
 * installs into the emulation and with the kernel's ioctls; every EEXIST
 * result and every WAKE it issues is counted in the VMM's counters.
 */
export class PageInstaller {
  private readonly pageSize: number;
  private readonly zeros: Uint8Array;

  constructor(
    readonly memory: BackendMemory,
    readonly vmm: VmmState,
    /** The contexts owning guest memory (StrategySetup.ranges): where pages that are not a resolver's go. */
    readonly ranges: readonly ContextRange[] = [],
  ) {
    this.pageSize = memory.layout.pageSize;
    this.zeros = new Uint8Array(this.pageSize);
  }

  /** The context owning `page`, for installs that are no resolver's (pushed pages, replies on the main channel). */
  ownerOf(page: number): number {
    return rangeOf(this.ranges, page).ctx;
  }

  /** Resolves a fault on `page`: returns a {@link Resolution}. */
  async resolve(client: PageClient, page: number, options: ResolveOptions): Promise<number> {
    const vmm = this.vmm;
    if (options.pageWait === 'none' && options.owesWake) throw new RangeError(`expected a resolver that owes a WAKE to wait for the page (block or await), got pageWait none`);
    if (vmm.isReceived(page)) return this.elsewhere(page, options);
    if (!vmm.claim(page)) {
      // Another thread already asked for this page: do not ask twice.
      vmm.count(COUNTER.SUPPRESSED);
      await this.untilReceived(page, options.pageWait);
      this.elsewhere(page, options);
      return Resolution.SUPPRESSED;
    }
    vmm.count(COUNTER.REQUESTS);
    const session = client.session;
    for (;;) {
      const reply = await client.request(page);
      const other = this.onOtherChannel(reply);
      if (other >= 0) {
        await this.untilReceived(page, options.pageWait);
        this.elsewhere(page, options);
        return other;
      }
      const installed = this.installIfCurrent(reply as PageReply | ZeroPageReply, options, session, client.connectionEpoch);
      if (installed >= 0) return installed;
    }
  }

  /**
   * {@link resolve} for a thread that blocks until its page is in (a kvm-exit
   * vCPU on a {@link BlockingPageChannel}): the same steps, each synchronous.
   */
  resolveNow(channel: BlockingPageChannel, page: number, options: ResolveOptions): number {
    const vmm = this.vmm;
    if (options.pageWait !== 'block') throw new RangeError(`expected a blocking resolver to wait with pageWait block, got ${options.pageWait}`);
    if (vmm.isReceived(page)) return this.elsewhere(page, options);
    if (!vmm.claim(page)) {
      vmm.count(COUNTER.SUPPRESSED);
      vmm.waitReceived(page);
      this.elsewhere(page, options);
      return Resolution.SUPPRESSED;
    }
    vmm.count(COUNTER.REQUESTS);
    const session = channel.session;
    for (;;) {
      const reply = channel.request(page);
      const other = this.onOtherChannel(reply);
      if (other >= 0) {
        vmm.waitReceived(page);
        this.elsewhere(page, options);
        return other;
      }
      const installed = this.installIfCurrent(reply as PageReply | ZeroPageReply, options, session, channel.connectionEpoch);
      if (installed >= 0) return installed;
    }
  }

  /**
   * A reply saying the content travels on another channel: a push in flight,
   * or (without preempt) this very request answered on the main channel.
   * Whoever receives it there installs it; the resolver waits for that (if
   * that channel is lost first, the page is in the requestedmap of the
   * resume, and the source sends it again). Counts it and returns its
   * Resolution; -1 for a reply that carries the page.
   */
  private onOtherChannel(reply: Reply): number {
    if (reply.type !== 'already-sent' && reply.type !== 'sent-on-main') return -1;
    this.vmm.count(COUNTER.REPLIES);
    this.vmm.count(reply.type === 'already-sent' ? COUNTER.ALREADY_SENT : COUNTER.ON_MAIN);
    return reply.type === 'already-sent' ? Resolution.ALREADY_SENT : Resolution.ON_MAIN;
  }

  /**
   * Installs a reply read on a connection of session `epoch`, unless that
   * session has ended since (recovery: it must not be installed once the
   * pause has taken its receivedmap, see Session): then -1, and the caller
   * asks again (the request goes out as a replay after the resume).
   */
  private installIfCurrent(reply: PageReply | ZeroPageReply, options: ResolveOptions, session: Session | undefined, epoch: number): number {
    if (session && !session.enterInstall(epoch)) {
      session.countDropped();
      return -1;
    }
    this.vmm.count(COUNTER.REPLIES);
    try {
      return this.installReply(reply, options);
    } finally {
      session?.leaveInstall();
    }
  }

  private installReply(reply: PageReply | ZeroPageReply, options: ResolveOptions): number {
    const page = reply.page;
    const result = this.install(options.ctx, page, reply.type === 'page' ? reply.data : undefined, options.dontWake ? MODE_DONTWAKE : 0);
    if (result === this.pageSize) {
      this.vmm.count(COUNTER.PAGES_DEMAND);
      if (reply.type === 'zero-page') this.vmm.count(COUNTER.PAGES_ZERO);
      this.vmm.noteDemanded(page);
      this.vmm.markReceived(page, ORIGIN.DEMAND);
      return Resolution.INSTALLED;
    }
    if (result === -ERRNO.EEXIST) {
      // Present already: the source sent this page's content twice.
      this.vmm.count(COUNTER.DUPLICATE_DATA);
      if (options.owesWake) this.wake(options.ctx, page);
      return Resolution.EEXIST;
    }
    throw new Error(`expected UFFDIO_COPY of page ${page} to copy ${this.pageSize} bytes or give EEXIST, got errno ${-result}`);
  }

  /**
   * Installs pushed or replied data with COPY (or ZEROPAGE; a zeroed COPY on
   * huge pages, as QEMU's postcopy_place_page_zero does). Returns the ioctl result.
   */
  install(ctx: number, page: number, data: Uint8Array | undefined, mode: number): number {
    const address = page * this.pageSize;
    let result: number;
    if (data) result = this.memory.copy(ctx, address, data, this.pageSize, mode);
    else if (this.pageSize === 4096) result = this.memory.zeropage(ctx, address, this.pageSize, mode);
    else result = this.memory.copy(ctx, address, this.zeros, this.pageSize, mode);
    if (result === -ERRNO.EEXIST) this.vmm.count(COUNTER.EEXIST);
    return result;
  }

  /**
   * Installs one page that is no resolver's (a zero push, a requested page
   * sent on the main channel) on the context owning it, waking its waiters.
   */
  installOwned(page: number, data: Uint8Array | undefined): number {
    return this.install(this.ownerOf(page), page, data, 0);
  }

  /**
   * Installs `count` consecutive pushed pages from `first`: one COPY per run
   * of them inside one owning context's range (StrategySetup.ranges), on
   * that context, so its waiters wake. A page found present stops a COPY
   * short (the kernel's EAGAIN with the bytes copied so far, or EEXIST at
   * the first page): it is counted as EEXIST and as duplicate data, and the
   * COPY resumes after it. Marks every page installed in the receivedmap
   * (with `origin`, an ORIGIN: push or precopy); returns how many were
   * installed, or -errno.
   */
  installRun(first: number, data: Uint8Array, count: number, origin: number): number {
    const size = this.pageSize;
    let done = 0;
    let installed = 0;
    while (done < count) {
      const range = rangeOf(this.ranges, first + done);
      const inRange = Math.min(count - done, range.endPage - (first + done));
      const view = done === 0 ? data : data.subarray(done * size);
      const result = this.memory.copy(range.ctx, (first + done) * size, view, inRange * size, 0);
      if (result === -ERRNO.EEXIST) {
        this.vmm.count(COUNTER.EEXIST);
        this.vmm.count(COUNTER.DUPLICATE_DATA);
        done++;
        continue;
      }
      if (result < 0) return result;
      const pages = result / size;
      for (let p = first + done; p < first + done + pages; p++) this.vmm.markReceived(p, origin);
      installed += pages;
      done += pages;
    }
    return installed;
  }

  /** Waits (or not) for `page` to be installed by someone else, as {@link PageWait} says. */
  private untilReceived(page: number, how: PageWait): Promise<void> | undefined {
    if (how === 'block') this.vmm.waitReceived(page);
    else if (how === 'await') return this.vmm.untilReceived(page);
    return undefined;
  }

  /** The page got in some other way: pays the WAKE owed (if any). */
  private elsewhere(page: number, options: ResolveOptions): number {
    if (options.owesWake) this.wake(options.ctx, page);
    return Resolution.ELSEWHERE;
  }

  /** UFFDIO_WAKE of one page on `ctx`, counted; a failure (EBADF: a context closed under us) is an error. */
  private wake(ctx: number, page: number): void {
    this.vmm.count(COUNTER.WAKES);
    const r = this.memory.wake(ctx, page * this.pageSize, this.pageSize);
    if (r !== 0) throw new Error(`expected UFFDIO_WAKE of page ${page} to succeed, got errno ${-r}`);
  }
}
