/**
 * One thread of GuestImage.build: fills every `stride`-th segment of the
 * image, from `firstSegment` on, with the generator's content (in the shared
 * chunks), marks its zero pages, and posts each segment as it is done so the
 * main thread can hash it; then 'done'.
 */
import { parentPort, workerData } from 'node:worker_threads';
import type { GuestLayout, ImageSpec } from '@postcopy/shared';
import { fillImagePages } from './image.js';

export interface ImageWorkerData {
  layout: GuestLayout;
  spec: ImageSpec;
  chunks: SharedArrayBuffer[];
  zero: SharedArrayBuffer;
  pagesPerChunk: number;
  pagesPerSegment: number;
  firstSegment: number;
  stride: number;
}

export type ImageWorkerMessage = { type: 'segment'; segment: number; zeroPages: number } | { type: 'done' };

const data = workerData as ImageWorkerData;
const chunks = data.chunks.map((sab) => new Uint8Array(sab));
const zero = new Uint8Array(data.zero);
const segments = Math.ceil(data.layout.totalPages / data.pagesPerSegment);
for (let segment = data.firstSegment; segment < segments; segment += data.stride) {
  const first = segment * data.pagesPerSegment;
  const end = Math.min(data.layout.totalPages, first + data.pagesPerSegment);
  const zeroPages = fillImagePages(data.layout, data.spec, chunks, zero, data.pagesPerChunk, first, end);
  parentPort!.postMessage({ type: 'segment', segment, zeroPages } satisfies ImageWorkerMessage);
}
parentPort!.postMessage({ type: 'done' } satisfies ImageWorkerMessage);
