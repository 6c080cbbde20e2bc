/**
 * The source's sentmap: how many times each page's content (or zero notice)
 * went out. Exactly-once means every count ends at 0 or 1; the scheduler
 * consults it before every send, and the summary reports any page above 1.
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
