import { makeLayout, type GuestLayout, type ImageSpec } from '@postcopy/shared';
import { MIGRATION_DEFAULTS } from '@postcopy/source-host';

/**
 * What the floor server and its client agree on without a handshake.
 *
 * Page contents come from a 16 MiB image built with the tool's own generator
 * (no zero pages, so every reply carries 4 KiB); page indices range over a
 * guest big enough for the bulk stream, so every frame names a page the
 * decoder accepts, exactly as the tool's decoder checks them.
 */
export const FLOOR_PAGE_SIZE = 4096;
export const FLOOR_IMAGE_BYTES = 16 * 1024 ** 2;
export const FLOOR_IMAGE_SPEC: ImageSpec = { seed: 1, zeroFraction: 0 };
/** Bytes the bulk stream may hold in ws before it waits: the tool's push high-water mark. */
export const BULK_HIGH_WATER_BYTES = MIGRATION_DEFAULTS.pushHighWaterBytes;
/** Frames between two send callbacks in the bulk stream: the tool's push batch. */
export const BULK_BATCH_FRAMES = Math.max(1, Math.floor(MIGRATION_DEFAULTS.pushBatchBytes / FLOOR_PAGE_SIZE));

/** The layout both ends validate frames against. */
export function floorLayout(bulkMiB: number): GuestLayout {
  return makeLayout(Math.max(FLOOR_IMAGE_BYTES, bulkMiB * 1024 ** 2), FLOOR_PAGE_SIZE);
}

export function bulkFrames(bulkMiB: number): number {
  return (bulkMiB * 1024 ** 2) / FLOOR_PAGE_SIZE;
}
