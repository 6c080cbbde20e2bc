/**
 * What both hosts must agree on about the phases before postcopy (DESIGN
 * "Precopy"): the migration modes, the word of each page the source's
 * vCPUs change, how a page's last sender is named, and the discard set as
 * coalesced page ranges (QEMU's MIG_CMD_POSTCOPY_RAM_DISCARD).
 */
import { ProtocolError } from './errors.js';

/**
 * `postcopy`: the guest starts on the destination with empty memory (no
 * precopy). `precopy`: rounds until what is still dirty fits the downtime
 * limit, then stop-and-copy. `hybrid`: precopy rounds, then the switch to
 * postcopy (QEMU's usual way to use postcopy).
 */
export const MIGRATION_MODES = ['postcopy', 'precopy', 'hybrid'] as const;
export type MigrationMode = (typeof MIGRATION_MODES)[number];

/** Wire codes of the modes (in `welcome`). */
export const MODE_CODE: Record<MigrationMode, number> = { postcopy: 0, precopy: 1, hybrid: 2 };

/**
 * The word of a page that a source vCPU's write increments (QEMU's migration
 * test guest increments a byte per page): the page's last 32-bit word. Word 0
 * keeps naming the page (see content.ts), so a page installed at the wrong
 * index is still caught. A write that stored the value it read could never
 * reveal a missed dirty page; an increment does.
 */
export function counterWord(pageSize: number): number {
  return (pageSize >>> 2) - 1;
}

/**
 * Which phase last sent a page (the source keeps one byte a page), so that a
 * content mismatch can say who sent the stale copy: 0 never sent, 1..250 the
 * precopy round (capped), then stop-and-copy and postcopy.
 */
export const PHASE = {
  NEVER: 0,
  LAST_ROUND: 250,
  STOP_AND_COPY: 251,
  POSTCOPY: 252,
} as const;

export function phaseName(phase: number): string {
  if (phase === PHASE.NEVER) return 'never sent';
  if (phase === PHASE.STOP_AND_COPY) return 'stop-and-copy';
  if (phase === PHASE.POSTCOPY) return 'postcopy';
  if (phase >= 1 && phase <= PHASE.LAST_ROUND) return phase === PHASE.LAST_ROUND ? `precopy round ${phase} or later` : `precopy round ${phase}`;
  return `phase ${phase}`;
}

/** A run of pages: [first, first + count). */
export interface PageRange {
  first: number;
  count: number;
}

/** Coalesces ascending page indices into ranges of consecutive pages. */
export function coalesce(pages: Iterable<number>): PageRange[] {
  const ranges: PageRange[] = [];
  let last: PageRange | undefined;
  let prev = -1;
  for (const page of pages) {
    if (page <= prev) throw new RangeError(`expected ascending pages, got ${page} after ${prev}`);
    if (last && page === last.first + last.count) last.count++;
    else ranges.push((last = { first: page, count: 1 }));
    prev = page;
  }
  return ranges;
}

/** Ranges on the wire: (first, count) pairs of little-endian 32-bit words. */
export function encodeRanges(ranges: readonly PageRange[]): Uint8Array {
  const out = new Uint8Array(ranges.length * 8);
  const view = new DataView(out.buffer);
  ranges.forEach((r, i) => {
    view.setUint32(i * 8, r.first, true);
    view.setUint32(i * 8 + 4, r.count, true);
  });
  return out;
}

/**
 * Decodes and validates ranges: each inside the guest, none empty, in
 * ascending order and none overlapping the one before. Throws ProtocolError
 * (what `what` names, and what came).
 */
export function decodeRanges(bytes: Uint8Array, totalPages: number, what: string): PageRange[] {
  if (bytes.length % 8 !== 0) throw new ProtocolError(`${what}: expected (first, count) pairs of 8 bytes, got ${bytes.length} bytes`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const ranges: PageRange[] = [];
  let end = 0;
  for (let i = 0; i < bytes.length / 8; i++) {
    const first = view.getUint32(i * 8, true);
    const count = view.getUint32(i * 8 + 4, true);
    if (count === 0) throw new ProtocolError(`${what}: expected ranges of at least 1 page, got an empty one at page ${first}`);
    if (first + count > totalPages) {
      throw new ProtocolError(`${what}: expected ranges inside the guest's ${totalPages} pages, got pages ${first} to ${first + count - 1}`);
    }
    if (i > 0 && first < end) {
      throw new ProtocolError(`${what}: expected sorted ranges that do not overlap, got one from page ${first} after one that ends at page ${end - 1}`);
    }
    ranges.push({ first, count });
    end = first + count;
  }
  return ranges;
}
