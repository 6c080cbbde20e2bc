/**
 * The hash of one digest segment (digest.ts, protocol version 9): eight
 * lanes of 32 bits, each taking every eighth 32-bit word of the segment's
 * bytes with xxHash32's round (`acc = rotl(acc + word * PRIME2, 13) *
 * PRIME1`, Yann Collet's xxHash, XXH32_round), each lane finished with
 * xxHash32's avalanche over it and the number of rounds; the 8 lanes, little-endian, are the
 * segment's 32-byte hash. The digest is SHA-256 over those (digest.ts).
 *
 * Why not SHA-256 for the segments (protocol version 8): with SHA-NI, Node's
 * SHA-256 hashes about 1 GiB/s a core on the development VM, so a 4 GiB
 * guest spent about 2 s of its source's start and as much of the
 * destination's final accounting hashing (issue 9, `largeWallOverElapsed`);
 * these lanes go at 1.6-1.7 GiB/s in JavaScript. Where the project's addon
 * loads (addon.ts), the same lanes run natively (hashLanes in
 * dest-host/native/uffd/uffd.c, one AVX2 register for all eight): a C
 * probe of the same two loops hashed 1 GiB at 9.7 GiB/s with AVX2 and 4.5
 * with eight scalar chains on the development VM.
 * Both give the same hash, word for word (segment-hash.test.ts), so a host
 * with the addon and one without still agree.
 *
 * What it catches: the digest checks that two hosts' memories are equal
 * (a page lost, misplaced, stale or torn by a bug), not that nobody forged
 * one. Each round is a bijection of its lane for a given word and of the
 * word for a given lane (PRIME1 and PRIME2 are odd), so memories that
 * differ in one 32-bit word always hash apart, and so do memories that
 * differ in one word in each of several lanes. Differences in several words of one
 * lane cancel with odds of about 2^-32 a lane.
 */

import { addonWith } from './addon.js';

const PRIME1 = 0x9e3779b1 | 0;
const PRIME2 = 0x85ebca77 | 0;
const PRIME3 = 0xc2b2ae3d | 0;
const PRIME5 = 0x165667b1 | 0;

/** Lanes of the hash; the bytes hashed come in multiples of LANES × 4. */
export const SEGMENT_HASH_LANES = 8;
/** Bytes one round of all lanes takes. */
export const SEGMENT_HASH_STRIPE = SEGMENT_HASH_LANES * 4;
/** Bytes of a segment hash. */
export const SEGMENT_HASH_BYTES = SEGMENT_HASH_LANES * 4;

/** The lanes' start values: lane i starts at (i + 1) × PRIME5. */
function seedLane(i: number): number {
  return Math.imul(i + 1, PRIME5);
}

/** xxHash32's avalanche (XXH32_avalanche). */
function avalanche(h: number): number {
  h ^= h >>> 15;
  h = Math.imul(h, PRIME2);
  h ^= h >>> 13;
  h = Math.imul(h, PRIME3);
  return (h ^ (h >>> 16)) >>> 0;
}

/** What the hasher takes from the addon: the lanes fed in place; which code ran ("avx2" or "scalar"). */
interface LanesNative {
  hashLanes(lanes: Int32Array, data: Uint8Array): string;
}

/** How a hasher runs its lanes: the addon's where it loads (`auto`), or this file's loop. */
export type SegmentHashCode = 'auto' | 'js';

/**
 * One segment's hash, fed in runs (views of memory, 4-byte aligned, each a
 * multiple of {@link SEGMENT_HASH_STRIPE} bytes: whole pages always are).
 * Feeding the same bytes in any split gives the same hash. Reusable: {@link
 * reset} starts the next segment.
 */
export class SegmentHasher {
  private readonly lanes = new Int32Array(SEGMENT_HASH_LANES);
  /** Rounds so far, modulo 2^32. */
  private rounds = 0;
  private readonly native: LanesNative | undefined;

  constructor(code: SegmentHashCode = 'auto') {
    this.native = code === 'auto' ? addonWith<LanesNative>('hashLanes') : undefined;
    this.reset();
  }

  /** Whether the addon's lanes run (else this file's loop). */
  get isNative(): boolean {
    return this.native !== undefined;
  }

  reset(): void {
    for (let i = 0; i < SEGMENT_HASH_LANES; i++) this.lanes[i] = seedLane(i);
    this.rounds = 0;
  }

  update(data: Uint8Array): void {
    if (data.length % SEGMENT_HASH_STRIPE !== 0) throw new RangeError(`expected a run of a multiple of ${SEGMENT_HASH_STRIPE} bytes, got ${data.length}`);
    if (data.byteOffset % 4 !== 0) throw new RangeError(`expected a run at a 4-byte aligned offset, got ${data.byteOffset}`);
    this.rounds = (this.rounds + data.length / SEGMENT_HASH_STRIPE) >>> 0;
    if (this.native !== undefined) {
      this.native.hashLanes(this.lanes, data);
      return;
    }
    const w = new Uint32Array(data.buffer, data.byteOffset, data.length >>> 2);
    const lanes = this.lanes;
    let a = lanes[0]!, b = lanes[1]!, c = lanes[2]!, d = lanes[3]!, e = lanes[4]!, f = lanes[5]!, g = lanes[6]!, h = lanes[7]!;
    const n = w.length;
    // Eight independent chains, so the core overlaps their multiplies;
    // written out by hand (xxHash32's round each pair of lines): the same
    // loop calling a round() helper hashed 1.34-1.97 GiB/s against
    // 1.62-1.96 (six interleaved runs over 1 GiB each).
    for (let i = 0; i < n; i += 8) {
      a = (a + Math.imul(w[i]!, PRIME2)) | 0;
      a = Math.imul((a << 13) | (a >>> 19), PRIME1);
      b = (b + Math.imul(w[i + 1]!, PRIME2)) | 0;
      b = Math.imul((b << 13) | (b >>> 19), PRIME1);
      c = (c + Math.imul(w[i + 2]!, PRIME2)) | 0;
      c = Math.imul((c << 13) | (c >>> 19), PRIME1);
      d = (d + Math.imul(w[i + 3]!, PRIME2)) | 0;
      d = Math.imul((d << 13) | (d >>> 19), PRIME1);
      e = (e + Math.imul(w[i + 4]!, PRIME2)) | 0;
      e = Math.imul((e << 13) | (e >>> 19), PRIME1);
      f = (f + Math.imul(w[i + 5]!, PRIME2)) | 0;
      f = Math.imul((f << 13) | (f >>> 19), PRIME1);
      g = (g + Math.imul(w[i + 6]!, PRIME2)) | 0;
      g = Math.imul((g << 13) | (g >>> 19), PRIME1);
      h = (h + Math.imul(w[i + 7]!, PRIME2)) | 0;
      h = Math.imul((h << 13) | (h >>> 19), PRIME1);
    }
    lanes[0] = a; lanes[1] = b; lanes[2] = c; lanes[3] = d; lanes[4] = e; lanes[5] = f; lanes[6] = g; lanes[7] = h;
  }

  /** Writes the hash of what was fed since the last reset into `out` at `offset` ({@link SEGMENT_HASH_BYTES} bytes). */
  digestInto(out: Uint8Array, offset: number): void {
    const view = new DataView(out.buffer, out.byteOffset + offset, SEGMENT_HASH_BYTES);
    for (let i = 0; i < SEGMENT_HASH_LANES; i++) view.setUint32(i * 4, avalanche(this.lanes[i]! ^ Math.imul(this.rounds, PRIME1)), true);
  }
}
