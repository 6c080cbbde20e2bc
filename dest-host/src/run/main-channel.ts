/**
 * What the source sends on the destination's main channel, by state:
 * - during precopy (active): pages in rounds (unless they come on the push
 *   channel: vmm/precopy-push-placement.ts), then the discard set and
 *   `switchover` (see vmm/precopy-receiver.ts);
 * - after it (postcopy-active): pushed pages, requested pages sent on the
 *   main channel (no preempt), `complete`;
 * - at the end: the summary, and the page hashes when the digests differ;
 * - any time: an error, which fails the run.
 * Anything out of its state is a protocol error of the source and fails the
 * run too: nothing it sends may land where it does not belong.
 */
import { PostcopyError, ProtocolError, type Message, type PageHashes, type SourceSummary } from '@postcopy/shared';
import type { DeviceReceiver } from '../devices/receiver.js';
import { ERRNO } from '../memory/backend.js';
import type { DestLifecycle } from '../lifecycle.js';
import type { PageInstaller } from '../vmm/page-installer.js';
import { MAIN_KIND, type MainLog } from '../trace/main-log.js';
import type { PrecopyReceiver } from '../vmm/precopy-receiver.js';
import { COUNTER, ORIGIN, type VmmState } from '../vmm/state.js';
import { deferred, type Deferred } from './abort.js';

export interface MainChannelDeps {
  totalPages: number;
  pageSize: number;
  vmm: VmmState;
  installer: PageInstaller;
  precopy: PrecopyReceiver;
  lifecycle: DestLifecycle;
  fail: (err: Error) => void;
  /** The source's switchover: the destination starts its guest. */
  onSwitchover: (postcopy: boolean) => void;
  /** After each pushed run (fault injection counts installed pages there). */
  afterPush?: () => void;
  /** The guest's devices (precopy modes): their messages, and their resume at the switchover. */
  devices?: DeviceReceiver;
  /** --trace: the main thread's installs go in the timeline. */
  trace?: MainLog;
}

export class MainChannel {
  /** The source said every page has been sent (it says so again after a resume). */
  private complete = false;
  private readonly installed = deferred<void>();
  private readonly summaryArrival: Deferred<SourceSummary> = deferred();
  private readonly hashesArrival: Deferred<PageHashes> = deferred();
  /** Resolves with the source's `postcopy` flag at its switchover. */
  readonly switchover = deferred<boolean>();

  constructor(private readonly d: MainChannelDeps) {}

  /** Every page installed and the source has said complete. */
  get installedAll(): Promise<void> {
    return this.installed.promise;
  }

  get summary(): Promise<SourceSummary> {
    return this.summaryArrival.promise;
  }

  get pageHashes(): Promise<PageHashes> {
    return this.hashesArrival.promise;
  }

  /** The connection was lost: the source sends complete again once it has resent what was lost. */
  forgetComplete(): void {
    this.complete = false;
  }

  /** Checks whether the last page is in (the main thread re-checks on every install; vCPU and resolver installs are polled). */
  checkInstalled(): void {
    if (this.complete && this.d.vmm.counter(COUNTER.INSTALLED) === this.d.totalPages) this.installed.resolve();
  }

  /** Installs one page that came on the main channel (a zero push, or a requested page without preempt). */
  private installOne(page: number, data: Uint8Array | undefined, kind: 'pushed' | 'requested'): void {
    const { vmm, trace } = this.d;
    const t0 = trace !== undefined ? performance.now() : 0;
    const result = this.d.installer.installOwned(page, data);
    if (result === this.d.pageSize) {
      vmm.count(kind === 'pushed' ? COUNTER.PAGES_PUSHED : COUNTER.PAGES_DEMAND);
      if (kind === 'requested') vmm.noteDemanded(page);
      if (!data) {
        vmm.count(COUNTER.PAGES_ZERO);
        if (kind === 'pushed') vmm.count(COUNTER.PUSHED_ZERO);
      }
      vmm.markReceived(page, kind === 'pushed' ? ORIGIN.PUSH : ORIGIN.MAIN);
    } else if (result === -ERRNO.EEXIST) {
      vmm.count(COUNTER.DUPLICATE_DATA);
    } else {
      this.d.fail(new Error(`installing ${kind} page ${page} failed with errno ${-result}`));
    }
    if (trace !== undefined) trace.install(kind === 'requested' ? MAIN_KIND.REQUESTED : MAIN_KIND.PUSHED_ZERO, page, 1, t0, performance.now());
    if (this.complete) this.checkInstalled();
  }

  /** A push channel's zero page (net/push-client.ts): installed as one from the main channel. */
  pushedZero(page: number): void {
    if (!this.expectPostcopy('pushed pages')) return;
    const before = this.d.vmm.counter(COUNTER.PAGES_PUSHED);
    this.installOne(page, undefined, 'pushed');
    this.d.vmm.count(COUNTER.PUSH_CHANNEL_PAGES, this.d.vmm.counter(COUNTER.PAGES_PUSHED) - before);
    this.d.afterPush?.();
  }

  /** A push channel installed `pages` pushed pages. */
  pushedInstalled(pages: number): void {
    this.d.vmm.count(COUNTER.PAGES_PUSHED, pages);
    this.d.vmm.count(COUNTER.PUSH_CHANNEL_PAGES, pages);
    if (this.complete) this.checkInstalled();
    this.d.afterPush?.();
  }

  /** Whether precopy pages may come now (before the switchover); if not, the run fails. */
  expectPrecopyRecords(): boolean {
    return this.expectPrecopy('precopy pages on the push channel');
  }

  /** Whether pushed pages may come now (after the switchover); if not, the run fails. */
  expectPushed(): boolean {
    return this.expectPostcopy('pushed pages');
  }

  private expectPrecopy(type: string): boolean {
    if (this.d.lifecycle.state === 'active') return true;
    this.d.fail(new ProtocolError(`expected ${type} only during precopy (before the switchover), got it in state ${this.d.lifecycle.state}`));
    return false;
  }

  private expectPostcopy(type: string): boolean {
    if (this.d.lifecycle.switchedOver) return true;
    this.d.fail(new ProtocolError(`expected ${type} only after the switchover, got it during precopy`));
    return false;
  }

  onMessage(m: Message): void {
    const { vmm, fail } = this.d;
    switch (m.type) {
      case 'precopy-pages':
      case 'precopy-zero': {
        if (!this.expectPrecopy(m.type)) return;
        const r = this.d.precopy.receive(m.round, m.page, m.type === 'precopy-pages' ? m.data : undefined);
        if (r < 0) fail(new Error(`installing precopy page ${m.page} failed with errno ${-r}`));
        return;
      }
      case 'discard': {
        if (!this.expectPrecopy('discard')) return;
        const r = this.d.precopy.discard(m.ranges);
        if (r < 0) fail(new Error(`discarding pages from ${m.ranges[0]?.first} failed with errno ${-r}`));
        return;
      }
      case 'switchover':
        if (!this.expectPrecopy('switchover')) return;
        if (!m.postcopy && vmm.counter(COUNTER.INSTALLED) !== this.d.totalPages) {
          fail(
            new ProtocolError(
              `expected every page at the end of precopy (stop-and-copy), got ${vmm.counter(COUNTER.INSTALLED)} of ${this.d.totalPages}: the source switched over with pages missing`,
            ),
          );
          return;
        }
        if (this.d.devices) {
          // The devices leave RESUMING (their state checked) and run, before the guest does.
          try {
            this.d.devices.resume();
          } catch (err) {
            fail(err as Error);
            return;
          }
        }
        this.d.lifecycle.switchover(m.postcopy);
        // After a stop-and-copy every page is here: nothing more will come, as a `complete` would say.
        if (!m.postcopy) this.complete = true;
        this.switchover.resolve(m.postcopy);
        this.d.onSwitchover(m.postcopy);
        return;
      case 'pushed': {
        if (!this.expectPostcopy('pushed pages')) return;
        const count = m.data.length / this.d.pageSize;
        const trace = this.d.trace;
        const t0 = trace !== undefined ? performance.now() : 0;
        const installed = this.d.installer.installRun(m.page, m.data, count, ORIGIN.PUSH);
        if (installed < 0) fail(new Error(`installing pushed pages from ${m.page} failed with errno ${-installed}`));
        else vmm.count(COUNTER.PAGES_PUSHED, installed);
        if (trace !== undefined) trace.install(MAIN_KIND.PUSHED, m.page, count, t0, performance.now());
        if (this.complete) this.checkInstalled();
        this.d.afterPush?.();
        return;
      }
      case 'pushed-zero':
        if (!this.expectPostcopy('pushed pages')) return;
        this.installOne(m.page, undefined, 'pushed');
        return;
      case 'page':
      case 'zero-page':
        // A requested page sent on the main channel (no preempt): the
        // requester waits for it in the receivedmap.
        if (!this.expectPostcopy('requested pages')) return;
        this.installOne(m.page, m.type === 'page' ? m.data : undefined, 'requested');
        return;
      case 'complete':
        this.complete = true;
        this.checkInstalled();
        return;
      case 'summary': {
        const { type: _type, ...summary } = m;
        this.summaryArrival.resolve(summary);
        return;
      }
      case 'page-hashes':
        this.hashesArrival.resolve(m);
        return;
      case 'error':
        fail(new PostcopyError(m.code, `the source reported: ${m.message}`));
        return;
      case 'device-setup':
      case 'device-data':
      case 'device-init-data-sent':
      case 'device-end':
        if (!this.d.devices) {
          fail(new ProtocolError(`expected no device messages in a ${this.d.lifecycle.state} migration without devices, got ${m.type}`));
          return;
        }
        if (!this.expectPrecopy(m.type)) return;
        this.d.devices.onMessage(m);
        return;
      default:
        fail(new ProtocolError(`expected pushed, complete, summary or error on the main channel, got ${m.type}`));
    }
  }
}
