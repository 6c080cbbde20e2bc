/**
 * The `emulated` memory backend: GuestMemory (SharedArrayBuffers) and the
 * emulated userfaultfd (../uffd/userfaultfd.ts) behind the MemoryBackend
 * interface. An adapter only: every result is the emulation's own; what it
 * adds is the errno-style reads and close of the interface, and a faulting
 * thread whose loads and stores fault the way the emulation's guest loop
 * does (check the pte, handleFault until present, then access).
 */
import { ERRNO } from '../uffd/layout.js';
import { Userfaultfd, type UffdBuffers } from '../uffd/userfaultfd.js';
import type { BackendHandle, BackendMemory, DirectCopy, FaultMessage, GuestMemorySpec, GuestThread, MemoryBackend, OpenOptions } from './backend.js';
import { GuestMemory, type GuestMemoryBuffers } from './guest-memory.js';

export interface EmulatedHandle extends BackendHandle {
  readonly backend: 'emulated';
  readonly memory: GuestMemoryBuffers;
  readonly uffd: UffdBuffers;
}

export const emulatedBackend: MemoryBackend = {
  name: 'emulated',
  create(spec: GuestMemorySpec): EmulatedMemory {
    const memory = GuestMemory.create(spec.layout, spec.memslotBytes);
    return new EmulatedMemory(memory, Userfaultfd.create(memory, spec.maxThreads, spec.maxContexts));
  },
  attach(handle: BackendHandle): EmulatedMemory {
    const h = handle as EmulatedHandle;
    const memory = new GuestMemory(h.memory);
    return new EmulatedMemory(memory, new Userfaultfd(h.uffd, memory));
  },
};

export class EmulatedMemory implements BackendMemory {
  readonly backend = 'emulated' as const;
  readonly handle: EmulatedHandle;
  readonly direct: DirectCopy;

  constructor(
    readonly memory: GuestMemory,
    readonly uffd: Userfaultfd,
  ) {
    this.handle = { backend: 'emulated', memory: memory.toBuffers(), uffd: uffd.toBuffers() };
    this.direct = {
      claim: (first, count) => uffd.copyClaim(first, count),
      view: (first, count) => memory.pagesBytes(first, count),
      publish: (ctx, first, count) => uffd.copyPublish(ctx, first, count),
      release: (first, count) => uffd.copyRelease(first, count),
    };
  }

  get layout(): GuestMemory['layout'] {
    return this.memory.layout;
  }

  get memslots(): GuestMemory['memslots'] {
    return this.memory.memslots;
  }

  memslot(index: number): SharedArrayBuffer {
    const buffer = this.memory.buffers[index];
    if (buffer === undefined) throw new RangeError(`expected a memslot index < ${this.memory.buffers.length}, got ${index}`);
    return buffer;
  }

  bindThread(slot: number): GuestThread {
    const { memory, uffd } = this;
    // The thread's slot is its id in messages; handleFault checks it.
    return {
      tid: slot,
      load(page: number, word: number): number {
        while (!uffd.isPresent(page)) uffd.handleFault(slot, page, false);
        return memory.load(page, word);
      },
      store(page: number, word: number, value: number): void {
        while (!uffd.isPresent(page)) uffd.handleFault(slot, page, true);
        memory.store(page, word, value);
      },
    };
  }

  isBlockedInFault(tid: number): boolean {
    return this.uffd.blockedPage(tid) >= 0;
  }

  open(options: OpenOptions = {}): number {
    return this.uffd.open(options.thread);
  }

  register(ctx: number, start: number, len: number): number {
    return this.uffd.register(ctx, start, len);
  }

  unregister(ctx: number, start: number, len: number): number {
    return this.uffd.unregister(ctx, start, len);
  }

  tryRead(ctx: number, msg: FaultMessage): number {
    if (this.uffd.tryRead(ctx, msg)) return 0;
    return this.uffd.isOpen(ctx) ? -ERRNO.EAGAIN : -ERRNO.EBADF;
  }

  read(ctx: number, msg: FaultMessage, timeoutMs: number): number {
    if (this.uffd.read(ctx, msg, timeoutMs)) return 0;
    return this.uffd.isOpen(ctx) ? -ERRNO.EAGAIN : -ERRNO.EBADF;
  }

  async readAsync(ctx: number, msg: FaultMessage, signal?: AbortSignal): Promise<number> {
    // The emulation's readAsync resolves false at end of file, or once aborted.
    if (await this.uffd.readAsync(ctx, msg, signal)) return 0;
    return signal?.aborted ? -ERRNO.EINTR : -ERRNO.EBADF;
  }

  copy(ctx: number, dst: number, src: ArrayBufferView, len: number, mode = 0): number {
    const bytes = src instanceof Uint8Array ? src : new Uint8Array(src.buffer, src.byteOffset, src.byteLength);
    return this.uffd.copy(ctx, dst, bytes, len, mode);
  }

  zeropage(ctx: number, dst: number, len: number, mode = 0): number {
    return this.uffd.zeropage(ctx, dst, len, mode);
  }

  wake(ctx: number, start: number, len: number): number {
    return this.uffd.wake(ctx, start, len);
  }

  discard(start: number, len: number): number {
    return this.uffd.discard(start, len);
  }

  close(ctx: number): number {
    if (!this.uffd.isOpen(ctx)) return -ERRNO.EBADF;
    this.uffd.close(ctx);
    return 0;
  }

  dispose(): void {
    // SharedArrayBuffers go with their last reference.
  }
}
