/**
 * A helper thread of the image's digest (shared/parallel-digest.ts): takes
 * segments from the shared counter until none is left and hashes each, over
 * the image's shared chunks. When the image is being built (`fill`), it first
 * fills the segment with the generator's content and marks its zero pages;
 * otherwise it hashes the pages `include` selects (the summary's digest of
 * the received pages). Exits when there is nothing left to take.
 */
import { workerData } from 'node:worker_threads';
import type { GuestLayout, ImageSpec } from '@postcopy/shared/core';
import { bitmapHas, digestSegmentPages, hashSegmentsFrom, type DigestWork } from '@postcopy/shared/digest';
import { ChunkPages, fillImagePages } from './image-fill.js';

export interface ImageWorkerData {
  work: DigestWork;
  layout: GuestLayout;
  chunks: SharedArrayBuffer[];
  pagesPerChunk: number;
  /** Building the image: fill each segment before hashing it. */
  fill?: { spec: ImageSpec; zero: SharedArrayBuffer };
  /** The pages to hash, one bit a page (none: all). */
  include?: Uint8Array;
}

const data = workerData as ImageWorkerData;
const chunks = data.chunks.map((sab) => new Uint8Array(sab));
const pages = new ChunkPages(data.layout.pageSize, chunks, data.pagesPerChunk);
const include = data.include;
const fill = data.fill;
const zero = fill ? new Uint8Array(fill.zero) : undefined;
const per = digestSegmentPages(data.layout.pageSize, data.work.segmentBytes);
hashSegmentsFrom(
  data.work,
  pages,
  include ? (page) => bitmapHas(include, page) : undefined,
  fill ? (segment) => void fillImagePages(data.layout, fill.spec, chunks, zero!, data.pagesPerChunk, segment * per, Math.min(data.layout.totalPages, (segment + 1) * per)) : undefined,
);
