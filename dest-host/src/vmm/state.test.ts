/**
 * Waiting for a page another thread installs (VmmState.waitReceived,
 * untilReceived) while markReceived notifies only when a waiter is counted
 * (PAGE_WAITERS), and how resolvers wait for a page that comes another way
 * (PageInstaller's pageWait).
 */
import { once } from 'node:events';
import { afterEach, describe, expect, it } from 'vitest';
import { makeLayout, startWorker, type Reply } from '@postcopy/shared';
import type { BackendMemory } from '../memory/backend.js';
import { BACKEND_BY_NAME } from '../memory/backends.js';
import type { PageClient } from '../net/page-client.js';
import { STRATEGY_BY_NAME } from '../strategies/index.js';
import type { PageMarkerData } from './fixtures/page-marker.js';
import { PageInstaller, Resolution } from './page-installer.js';
import { COUNTER, FAULT_QUEUE, NO_TID, ORIGIN, PAGE, VmmState } from './state.js';

const PAGES = 3000;

function marker(vmm: VmmState, count: number, maxSpin: number): Promise<unknown> {
  const data: PageMarkerData = { vmm: vmm.buffers, count, maxSpin };
  const worker = startWorker(import.meta.url, 'fixtures/page-marker', { workerData: data });
  return once(worker, 'message');
}

describe('waiting for a page another thread installs', () => {
  it('waitReceived wakes for every page, however the mark lands against the wait (no wake-up lost)', { timeout: 30_000 }, async () => {
    const vmm = VmmState.create(PAGES, 1);
    for (let page = 0; page < PAGES; page++) expect(vmm.claim(page)).toBe(true);
    const done = marker(vmm, PAGES, 2000);
    // A lost wake-up would leave this thread blocked for ever (the test's timeout says so).
    for (let page = 0; page < PAGES; page++) vmm.waitReceived(page);
    await done;
    expect(vmm.counter(COUNTER.PAGE_WAITERS)).toBe(0);
    expect(vmm.counter(COUNTER.INSTALLED)).toBe(PAGES);
  });

  it('untilReceived too, from an event loop', { timeout: 30_000 }, async () => {
    const vmm = VmmState.create(PAGES, 1);
    const done = marker(vmm, PAGES, 2000);
    for (let page = 0; page < PAGES; page++) await vmm.untilReceived(page);
    await done;
    expect(vmm.counter(COUNTER.PAGE_WAITERS)).toBe(0);
  });

  it('markReceived notifies nobody while no thread waits; a waiter counts itself only while it waits', () => {
    const vmm = VmmState.create(4, 1);
    vmm.markReceived(0, ORIGIN.PUSH);
    vmm.waitReceived(0); // received already: returns at once, never counted
    expect(vmm.counter(COUNTER.PAGE_WAITERS)).toBe(0);
    expect(Atomics.load(vmm.pageStatus, 0)).toBe(PAGE.RECEIVED);
  });
});

describe('PageInstaller: how a resolver waits for a page that comes another way', () => {
  const layout = makeLayout(8 * 4096, 4096);
  const opened: BackendMemory[] = [];
  afterEach(() => {
    for (const m of opened.splice(0)) m.dispose();
  });
  /** One context over the whole guest (shared-uffd's setup) on the emulated backend. */
  function installer(): { installer: PageInstaller; vmm: VmmState } {
    const memory = BACKEND_BY_NAME.emulated.create({ layout, memslotBytes: layout.guestBytes, maxThreads: 2, maxContexts: 2 });
    opened.push(memory);
    const setup = STRATEGY_BY_NAME['shared-uffd'].setup(memory, { vcpus: 1, ioThreads: 0, readers: 1, vcpuSlot: (v) => v, ioSlot: (i) => 1 + i }, layout.totalPages);
    const vmm = VmmState.create(layout.totalPages, 2);
    return { installer: new PageInstaller(memory, vmm, setup.ranges), vmm };
  }
  /** A client whose every request is answered `type` (the page travels elsewhere). */
  const answering = (type: 'sent-on-main' | 'already-sent'): PageClient =>
    ({ request: (page: number) => Promise.resolve({ type, id: 1, page } as Reply), session: undefined, connectionEpoch: 0 }) as unknown as PageClient;

  it("none: a shared-uffd reader's fault is done at the reply (the installer's COPY wakes the vCPU)", async () => {
    const { installer: inst, vmm } = installer();
    await expect(inst.resolve(answering('sent-on-main'), 3, { ctx: 0, dontWake: false, owesWake: false, pageWait: 'none' })).resolves.toBe(Resolution.ON_MAIN);
    // Still on its way (the main thread installs it), and counted as asked and answered.
    expect(vmm.isReceived(3)).toBe(false);
    expect([vmm.counter(COUNTER.REQUESTS), vmm.counter(COUNTER.REPLIES), vmm.counter(COUNTER.ON_MAIN)]).toEqual([1, 1, 1]);
  });

  it('block: the resolver waits for the page, then pays the WAKE it owes', { timeout: 30_000 }, async () => {
    const { installer: inst, vmm } = installer();
    for (let page = 1; page < layout.totalPages; page++) vmm.markReceived(page, ORIGIN.PUSH); // page 0 stays missing: marked by the worker below
    const wakes = vmm.counter(COUNTER.WAKES);
    // The worker marks page 0 after a spin: the resolver is blocked in its wait by then, most likely.
    const finishing = marker(vmm, 1, 200_000);
    const r = await inst.resolve(answering('already-sent'), 0, { ctx: 0, dontWake: false, owesWake: true, pageWait: 'block' });
    await finishing;
    expect(r).toBe(Resolution.ALREADY_SENT);
    expect(vmm.isReceived(0)).toBe(true);
    expect(vmm.counter(COUNTER.WAKES)).toBe(wakes + 1);
  });

  it('a resolver that owes a WAKE may not skip the wait', async () => {
    const { installer: inst } = installer();
    await expect(inst.resolve(answering('sent-on-main'), 2, { ctx: 0, dontWake: false, owesWake: true, pageWait: 'none' })).rejects.toThrow(/owes a WAKE to wait/);
  });
});

describe('VmmState: thread ids and fault queues', () => {
  it('maps the id a fault message carries to its thread slot, once the thread has said it', () => {
    const vmm = VmmState.create(16, 3);
    expect(vmm.tidOf(0)).toBe(NO_TID);
    expect(vmm.slotOfTid(4242)).toBe(-1);
    // Another thread's view (a resolver) of the same buffers sees the ids the threads stored.
    const resolver = new VmmState(vmm.buffers);
    vmm.setTid(0, 4242);
    vmm.setTid(2, 4250);
    expect(resolver.slotOfTid(4250)).toBe(2);
    expect(resolver.slotOfTid(4242)).toBe(0);
    vmm.setTid(1, 4260);
    expect(resolver.slotOfTid(4260)).toBe(1); // learnt after the first look
    resolver.noteMessage(2);
    resolver.noteMessage(2);
    expect(vmm.messagesOf(2)).toBe(2);
    expect(vmm.messagesOf(0)).toBe(0);
  });

  it('keeps message counts out of the fault queue proper', () => {
    const vmm = VmmState.create(16, 2);
    vmm.pushFault(1, 7, 10);
    vmm.noteMessage(1);
    expect(vmm.outstanding(1)).toEqual([{ page: 7, startMs: 10 }]);
    expect(vmm.outstanding(0)).toEqual([]);
    vmm.popFault(1, 15);
    expect(vmm.outstanding(1)).toEqual([]);
    expect(vmm.faultsOf(1)).toBe(1);
    expect(vmm.messagesOf(1)).toBe(1);
    expect(FAULT_QUEUE.MESSAGES).toBeGreaterThanOrEqual(FAULT_QUEUE.PAGES + FAULT_QUEUE.CAPACITY);
  });
});
