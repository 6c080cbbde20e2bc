import type { PageSource } from '@postcopy/shared';
import type { BackendMemory } from './backend.js';

/**
 * Views of whole guest pages through this thread's buffers of a backend's
 * memslots: for verifying a page and for the digest. On uffd a view of a
 * missing page is a fault for whoever reads it (the thread blocks in the
 * kernel): read pages known to be installed only (in the receivedmap, or
 * just touched by this thread's own GuestThread).
 */
export class GuestPages implements PageSource {
  private readonly buffers: ArrayBufferLike[];
  private readonly bytes: Uint8Array[];
  private readonly pagesPerMemslot: number;
  private readonly pageSize: number;

  constructor(memory: BackendMemory) {
    this.pagesPerMemslot = memory.memslots.pagesPerMemslot;
    this.pageSize = memory.layout.pageSize;
    this.buffers = Array.from({ length: memory.memslots.count }, (_, i) => memory.memslot(i));
    this.bytes = this.buffers.map((b) => new Uint8Array(b));
  }

  /** A view of page `page` (allocates a view: not for the per-access path). */
  pageBytes(page: number): Uint8Array {
    const slot = Math.floor(page / this.pagesPerMemslot);
    const offset = (page - slot * this.pagesPerMemslot) * this.pageSize;
    return this.bytes[slot]!.subarray(offset, offset + this.pageSize);
  }

  pageWords(page: number): Uint32Array {
    const slot = Math.floor(page / this.pagesPerMemslot);
    const offset = (page - slot * this.pagesPerMemslot) * this.pageSize;
    return new Uint32Array(this.buffers[slot]!, offset, this.pageSize >>> 2);
  }
}
