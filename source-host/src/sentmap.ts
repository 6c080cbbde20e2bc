import { bitmapBytes, bitmapHas } from '@postcopy/shared';

/**
 * The source's sentmap: how many times each page's content (or zero notice)
 * went out. Exactly-once means every count ends at 0 or 1; the scheduler
 * consults it before every send, and the summary reports any page above 1.
 * After a reconnect the destination's receivedmap is the truth ({@link reset}).
 */
export class Sentmap {
  private readonly counts: Uint8Array;
  private sentPages = 0;
  private twice = 0;

  constructor(readonly totalPages: number) {
    this.counts = new Uint8Array(totalPages);
  }

  isSent(page: number): boolean {
    return this.counts[page] !== 0;
  }

  /** Records a send of `page`. */
  mark(page: number): void {
    const count = this.counts[page]!;
    if (count === 0) this.sentPages++;
    else if (count === 1) this.twice++;
    if (count < 255) this.counts[page] = count + 1;
  }

  /**
   * Recovery (QEMU's ram_dirty_bitmap_reload): makes the sentmap equal to the
   * destination's receivedmap (one bit a page). A page in it counts as sent
   * once, any other page as unsent, so sending it again is its first send of
   * this map, not a second one; {@link pagesSentTwice} keeps its history.
   * Returns the pages that were sent but are not in the receivedmap (lost on
   * the way), now unsent again.
   */
  reset(receivedmap: Uint8Array): number {
    const total = this.totalPages;
    if (receivedmap.length < bitmapBytes(total)) {
      throw new RangeError(`expected a receivedmap of ${bitmapBytes(total)} bytes (${total} pages), got ${receivedmap.length} bytes`);
    }
    let lost = 0;
    let sent = 0;
    for (let page = 0; page < total; page++) {
      if (bitmapHas(receivedmap, page)) {
        this.counts[page] = 1;
        sent++;
      } else {
        if (this.counts[page] !== 0) lost++;
        this.counts[page] = 0;
      }
    }
    this.sentPages = sent;
    return lost;
  }

  get sent(): number {
    return this.sentPages;
  }

  get pagesSentTwice(): number {
    return this.twice;
  }

  get complete(): boolean {
    return this.sentPages === this.totalPages;
  }
}
