/**
 * The destination during precopy (its guest does not run yet): pages arrive
 * in rounds, and a page may arrive again when the guest dirtied it on the
 * source since it was sent. A first arrival is installed with COPY (or
 * ZEROPAGE) like any page, so that memory the userfaultfd registers is
 * never touched while missing (on the kernel that touch would be a fault of
 * this very thread); a later one overwrites the page in place, as QEMU's
 * ram_load writes into guest memory. At the switch to postcopy the discard
 * set is dropped (QEMU's ram_discard_range: MADV_DONTNEED on the kernel, the
 * page table entry cleared and the page zeroed on the emulation): out of the
 * receivedmap and missing again, so that the guest's next touch faults.
 */
import type { PageRange } from '@postcopy/shared';
import type { BackendMemory } from '../memory/backend.js';
import { GuestPages } from '../memory/pages.js';
import { copyIntoShared } from '../memory/guest-memory.js';
import type { PageInstaller } from './page-installer.js';
import { COUNTER, ORIGIN, type VmmState } from './state.js';

export class PrecopyReceiver {
  private readonly pages: GuestPages;
  private readonly pageSize: number;
  /** The highest round seen (for GET /status). */
  round = 0;

  constructor(
    private readonly memory: BackendMemory,
    private readonly vmm: VmmState,
    private readonly installer: PageInstaller,
    /** Testing only: keep discarded pages (the content check must then fail). */
    private readonly skipDiscard = false,
  ) {
    this.pages = new GuestPages(memory);
    this.pageSize = memory.layout.pageSize;
  }

  /** A run of `data.length / pageSize` pages from `first` (round `round`). Returns 0 or -errno. */
  receive(round: number, first: number, data: Uint8Array | undefined): number {
    if (round > this.round) this.round = round;
    const size = this.pageSize;
    const count = data ? data.length / size : 1;
    let p = first;
    while (p < first + count) {
      if (this.vmm.isReceived(p)) {
        // Here already: the guest dirtied it on the source since; overwrite it.
        const target = this.pages.pageBytes(p);
        if (data) copyIntoShared(target, 0, data.subarray((p - first) * size, (p - first + 1) * size));
        else target.fill(0);
        this.vmm.count(COUNTER.PRECOPY_REWRITES);
        p++;
        continue;
      }
      // A run of first arrivals: one COPY (one ZEROPAGE for a zero notice).
      let end = p + 1;
      while (end < first + count && !this.vmm.isReceived(end)) end++;
      if (data) {
        const installed = this.installer.installRun(p, data.subarray((p - first) * size, (end - first) * size), end - p, ORIGIN.PRECOPY);
        if (installed < 0) return installed;
        this.vmm.count(COUNTER.PAGES_PRECOPY, installed);
      } else {
        const r = this.installer.installOwned(p, undefined);
        if (r !== size) return r < 0 ? r : -1;
        this.vmm.markReceived(p, ORIGIN.PRECOPY);
        this.vmm.count(COUNTER.PAGES_PRECOPY);
        this.vmm.count(COUNTER.PAGES_ZERO);
      }
      p = end;
    }
    return 0;
  }

  /** The discard set: each page dropped and missing again. Returns 0 or -errno. */
  discard(ranges: readonly PageRange[]): number {
    if (this.skipDiscard) return 0;
    const size = this.pageSize;
    for (const r of ranges) {
      const result = this.memory.discard(r.first * size, r.count * size);
      if (result !== 0) return result;
      for (let p = r.first; p < r.first + r.count; p++) this.vmm.markDiscarded(p);
    }
    return 0;
  }
}
