import { fillPage } from '@postcopy/shared';
import { FLOOR_IMAGE_BYTES, FLOOR_IMAGE_SPEC, FLOOR_PAGE_SIZE } from './floor-layout.js';

/**
 * What the net ceiling's sender and receiver agree on without a handshake.
 *
 * The stream is the floor's 16 MiB image (the tool's own page generator, no
 * zero pages) over and over: stream byte `o` is image byte `o % 16 MiB`. The
 * receiver copies it into a SharedArrayBuffer of the stream's size, at most
 * 1 GiB (one memslot); a longer stream wraps around it. Both sizes are whole
 * images, so after the stream, SharedArrayBuffer byte `j` must equal image byte
 * `j % 16 MiB` whichever pass wrote it last.
 *
 * What the sender sends from (`NetSenderMemory`):
 * - `stream`: a buffer of the receiver's size, filled with the image before
 *   the sender listens, as a source host holds the guest memory it sends.
 *   The ceiling: a migration on one machine holds the guest twice (the
 *   source's copy and the destination's), and on this VM a first touch costs
 *   more once little recently freed memory is left (measured: 1 GiB touched
 *   alone 2609-2861 MiB/s, while another process holds 1 GiB 468 MiB/s; the
 *   onread ceiling 819-1072 MiB/s from the image, 310-396 from a 1 GiB
 *   buffer, three runs each, interleaved), so the ceiling holds as much;
 * - `image`: slices of the 16 MiB image itself: only the receiver touches
 *   fresh memory. A figure, for comparison.
 */
export const NET_SENDER_MEMORY = ['stream', 'image'] as const;
export type NetSenderMemory = (typeof NET_SENDER_MEMORY)[number];
export const NET_IMAGE_BYTES = FLOOR_IMAGE_BYTES;
/** The largest SharedArrayBuffer the receiver copies into (the tool's largest memslot). */
export const NET_MAX_SAB_BYTES = 1024 ** 3;
/** Bytes the sender hands `socket.write` at a time (slices of the image: no copy). */
export const NET_WRITE_BYTES = 256 * 1024;
/** The receiver's read buffer with `onread` (reused; each read is then copied into the SharedArrayBuffer). */
export const NET_READ_BYTES = 1024 * 1024;

/** The stream's repeating content: the floor image's pages, in order. */
export function netImage(): Buffer {
  const image = Buffer.alloc(NET_IMAGE_BYTES);
  const words = new Uint32Array(image.buffer, image.byteOffset, image.length / 4);
  const pageWords = FLOOR_PAGE_SIZE / 4;
  for (let page = 0; page < NET_IMAGE_BYTES / FLOOR_PAGE_SIZE; page++) {
    fillPage(FLOOR_IMAGE_SPEC, page, words.subarray(page * pageWords, (page + 1) * pageWords));
  }
  return image;
}

/** The SharedArrayBuffer a stream of `bytes` is copied into. */
export function netSabBytes(bytes: number): number {
  return Math.min(bytes, NET_MAX_SAB_BYTES);
}

/** The size of what the sender of a stream of `bytes` sends from (netSenderSource). */
export function netSenderBytes(bytes: number, memory: NetSenderMemory): number {
  return memory === 'stream' ? netSabBytes(bytes) : NET_IMAGE_BYTES;
}

/**
 * What the sender of a stream of `bytes` sends from: stream byte `o` is its
 * byte `o % length`. With `stream`, its length is the receiver's (whole images
 * whenever the stream wraps around it), every page filled here.
 */
export function netSenderSource(bytes: number, memory: NetSenderMemory): Buffer {
  const image = netImage();
  if (memory === 'image') return image;
  const source = Buffer.allocUnsafeSlow(netSenderBytes(bytes, memory));
  for (let at = 0; at < source.length; at += NET_IMAGE_BYTES) image.copy(source, at, 0, Math.min(NET_IMAGE_BYTES, source.length - at));
  return source;
}
