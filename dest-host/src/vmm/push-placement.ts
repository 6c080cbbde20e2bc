/**
 * Where a push channel's pages go (net/push-reader.ts):
 * - {@link DirectPlacement}, on a backend with {@link BackendMemory.direct}
 *   (the emulation): the socket reads each run straight into guest memory,
 *   its pages taken off missing first (the first half of a COPY) and
 *   installed as their bytes complete (the second half, with the wake);
 * - {@link StagedPlacement}, on any backend (uffd): the socket reads into
 *   one reused buffer, and each run is COPYed from there (installRun).
 * Both install on the context owning the page (its waiters wake), mark the
 * receivedmap and count pushed pages; a page already present is read into a
 * scratch page and counted as EEXIST and duplicate data, as installRun does.
 */
import type { DirectCopy } from '../memory/backend.js';
import type { PushClaim, PushPlacement } from '../net/push-reader.js';
import { rangeOf } from '../strategies/strategy.js';
import type { PageInstaller } from './page-installer.js';
import { COUNTER, ORIGIN } from './state.js';

/** What the placements tell the run: pages installed (counted, the drops and `complete` checked), a zero page. */
export interface PushSink {
  /** `pages` pushed pages were installed. */
  installed(pages: number): void;
  /** A pushed zero page (installed with ZEROPAGE and counted by the main channel's code). */
  zero(page: number): void;
  fail(err: Error): void;
}

/** Bytes a staged read takes at most (one run of the largest record). */
const STAGING_BYTES = 1024 * 1024;

/**
 * The one reused buffer a staged placement reads runs into (as many whole
 * pages as fit in STAGING_BYTES, at least one), COPYed from once complete.
 * Pushed and precopy records alike.
 */
export class StagingBuffer {
  private readonly bytes: Uint8Array;

  constructor(private readonly pageSize: number) {
    this.bytes = new Uint8Array(Math.max(pageSize, STAGING_BYTES - (STAGING_BYTES % pageSize)));
  }

  /** A claim of up to `span` pages from `first`, as many as the buffer holds. */
  claim(first: number, span: number): PushClaim {
    const pages = Math.min(span, this.bytes.length / this.pageSize);
    return { first, pages, view: this.bytes.subarray(0, pages * this.pageSize), present: false };
  }
}

abstract class Placement implements PushPlacement {
  protected readonly pageSize: number;
  protected readonly scratch: Uint8Array;

  constructor(
    protected readonly installer: PageInstaller,
    protected readonly sink: PushSink,
  ) {
    this.pageSize = installer.memory.layout.pageSize;
    this.scratch = new Uint8Array(this.pageSize);
  }

  abstract claim(first: number, count: number): PushClaim;
  abstract commit(claim: PushClaim, first: number, pages: number): void;
  abstract release(claim: PushClaim, first: number, pages: number): void;

  zero(first: number, count: number): void {
    for (let page = first; page < first + count; page++) this.sink.zero(page);
  }

  /** A page found present: its bytes are dropped, EEXIST and duplicate data counted. */
  protected present(first: number): PushClaim {
    return { first, pages: 1, view: this.scratch, present: true };
  }

  protected duplicate(): void {
    const vmm = this.installer.vmm;
    vmm.count(COUNTER.EEXIST);
    vmm.count(COUNTER.DUPLICATE_DATA);
  }

  protected span(first: number, count: number): number {
    return installSpan(this.installer, first, count);
  }
}

/**
 * How many pages from `first` (at most `count`, at least one) one install
 * may take: they must lie in one context's range (one COPY is on one
 * context) and in one memslot (one buffer). Pushed and precopy records alike.
 */
export function installSpan(installer: PageInstaller, first: number, count: number): number {
  const memslots = installer.memory.memslots;
  const slotEnd = (Math.floor(first / memslots.pagesPerMemslot) + 1) * memslots.pagesPerMemslot;
  const ranged = installer.ranges.length === 0 ? count : Math.min(count, rangeOf(installer.ranges, first).endPage - first);
  return Math.max(1, Math.min(ranged, slotEnd - first));
}

export class DirectPlacement extends Placement {
  constructor(
    installer: PageInstaller,
    sink: PushSink,
    private readonly direct: DirectCopy,
  ) {
    super(installer, sink);
  }

  claim(first: number, count: number): PushClaim {
    const taken = this.direct.claim(first, this.span(first, count));
    if (taken < 0) throw new Error(`taking pushed pages from ${first} failed with errno ${-taken}`);
    if (taken === 0) return this.present(first);
    return { first, pages: taken, view: this.direct.view(first, taken), present: false };
  }

  commit(claim: PushClaim, first: number, pages: number): void {
    if (claim.present) {
      this.duplicate();
      return;
    }
    const vmm = this.installer.vmm;
    this.direct.publish(this.installer.ownerOf(first), first, pages);
    for (let p = first; p < first + pages; p++) vmm.markReceived(p, ORIGIN.PUSH);
    this.sink.installed(pages);
  }

  release(claim: PushClaim, first: number, pages: number): void {
    if (!claim.present) this.direct.release(first, pages);
  }
}

export class StagedPlacement extends Placement {
  private readonly staging: StagingBuffer;

  constructor(installer: PageInstaller, sink: PushSink) {
    super(installer, sink);
    this.staging = new StagingBuffer(this.pageSize);
  }

  claim(first: number, count: number): PushClaim {
    return this.staging.claim(first, this.span(first, count));
  }

  commit(claim: PushClaim, first: number, pages: number): void {
    const from = (first - claim.first) * this.pageSize;
    const installed = this.installer.installRun(first, claim.view.subarray(from, from + pages * this.pageSize), pages, ORIGIN.PUSH);
    if (installed < 0) {
      this.sink.fail(new Error(`installing pushed pages from ${first} failed with errno ${-installed}`));
      return;
    }
    if (installed > 0) this.sink.installed(installed);
  }

  release(): void {
    // Nothing was taken: the staging buffer is simply read over.
  }
}

/** The placement for the installer's backend: direct where the backend allows it. */
export function pushPlacement(installer: PageInstaller, sink: PushSink): PushPlacement {
  const direct = installer.memory.direct;
  return direct !== undefined ? new DirectPlacement(installer, sink, direct) : new StagedPlacement(installer, sink);
}
