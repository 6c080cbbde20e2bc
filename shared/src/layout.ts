import { UsageError } from './errors.js';
import { formatBytes } from './sizes.js';

/** Page sizes we accept: base pages and x86 2 MiB huge pages. */
export const PAGE_SIZES = [4096, 2 * 1024 * 1024] as const;

/** A memslot is one SharedArrayBuffer; V8 caps a buffer well above this, 1 GiB keeps it portable. */
export const MAX_MEMSLOT_BYTES = 1024 ** 3;

/** The guest's memory layout both hosts must agree on. */
export interface GuestLayout {
  readonly guestBytes: number;
  readonly pageSize: number;
  readonly totalPages: number;
}

export function makeLayout(guestBytes: number, pageSize: number): GuestLayout {
  if (!(PAGE_SIZES as readonly number[]).includes(pageSize)) {
    throw new UsageError(`--page-size: expected one of 4KiB, 2MiB, got ${formatBytes(pageSize)}`);
  }
  if (guestBytes % pageSize !== 0 || guestBytes < pageSize) {
    throw new UsageError(
      `--memory: expected a whole number of ${formatBytes(pageSize)} pages, got ${formatBytes(guestBytes)} (${guestBytes} bytes)`,
    );
  }
  const totalPages = guestBytes / pageSize;
  if (totalPages > 2 ** 31 - 1) throw new UsageError(`--memory: at most ${2 ** 31 - 1} pages, got ${totalPages}`);
  return { guestBytes, pageSize, totalPages };
}

/** How guest memory is cut into memslots on the destination. */
export interface MemslotLayout {
  readonly memslotBytes: number;
  readonly pagesPerMemslot: number;
  readonly count: number;
}

export function makeMemslotLayout(layout: GuestLayout, requestedBytes: number): MemslotLayout {
  const memslotBytes = Math.min(requestedBytes, layout.guestBytes);
  if (memslotBytes > MAX_MEMSLOT_BYTES) {
    throw new UsageError(`--memslot-size: expected at most 1GiB, got ${formatBytes(requestedBytes)}`);
  }
  if (memslotBytes % layout.pageSize !== 0) {
    throw new UsageError(
      `--memslot-size: expected a multiple of the page size ${formatBytes(layout.pageSize)}, got ${formatBytes(requestedBytes)}`,
    );
  }
  const pagesPerMemslot = memslotBytes / layout.pageSize;
  return { memslotBytes, pagesPerMemslot, count: Math.ceil(layout.totalPages / pagesPerMemslot) };
}

export function pageAddress(layout: GuestLayout, page: number): number {
  return page * layout.pageSize;
}

export function isValidPage(layout: GuestLayout, page: unknown): page is number {
  return typeof page === 'number' && Number.isInteger(page) && page >= 0 && page < layout.totalPages;
}
