/**
 * A device's internal state, as both hosts see it: seeded content in chunks
 * of 4 KiB (like guest pages, from the same generator with a seed of the
 * device's own), whose last 32-bit word is a counter the running device
 * increments (the change a dirty chunk carries). The destination checks
 * every chunk that arrives against the generator (counter word aside) and,
 * at the end of the stream, the digest of the whole state against the one
 * the source computed when its device stopped.
 */
import { createHash } from 'node:crypto';
import { fillPage, verifyPage } from '../content.js';

/** The unit the device tracks changes of its state in, and reads it out in. */
export const STATE_CHUNK_BYTES = 4096;

export function chunkCount(stateBytes: number): number {
  return Math.ceil(stateBytes / STATE_CHUNK_BYTES);
}

/** Bytes of chunk `chunk` (the last one may be short). */
export function chunkBytes(stateBytes: number, chunk: number): number {
  return Math.min(STATE_CHUNK_BYTES, stateBytes - chunk * STATE_CHUNK_BYTES);
}

/** The word of a chunk a running device increments: its last (chunks are whole words). */
export function stateCounterWord(chunkWords: number): number {
  return chunkWords - 1;
}

/** The seed of a device's state: the image's seed mixed with its name (FNV-1a), so devices differ. */
export function stateSeed(imageSeed: number, deviceName: string): number {
  let h = 0x811c9dc5 ^ imageSeed;
  for (let i = 0; i < deviceName.length; i++) h = Math.imul(h ^ deviceName.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/** Fills `out` (a chunk's words) with chunk `chunk`'s initial content. */
export function fillStateChunk(seed: number, chunk: number, out: Uint32Array): void {
  fillPage({ seed, zeroFraction: 0 }, chunk, out);
}

/** -1 when `data` is chunk `chunk` of the seeded state (its counter word aside), else the first word that differs. */
export function verifyStateChunk(seed: number, chunk: number, data: Uint32Array): number {
  return verifyPage({ seed, zeroFraction: 0 }, chunk, data, stateCounterWord(data.length));
}

/** The state's initial content, for a device of `stateBytes` (a multiple of 4). */
export function initialState(seed: number, stateBytes: number, into: Uint8Array): void {
  for (let c = 0; c < chunkCount(stateBytes); c++) {
    const bytes = chunkBytes(stateBytes, c);
    fillStateChunk(seed, c, new Uint32Array(into.buffer, into.byteOffset + c * STATE_CHUNK_BYTES, bytes >>> 2));
  }
}

export function stateDigest(state: Uint8Array): string {
  return createHash('sha256').update(state).digest('hex');
}

