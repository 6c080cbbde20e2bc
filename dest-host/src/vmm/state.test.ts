import { describe, expect, it } from 'vitest';
import { FAULT_QUEUE, NO_TID, VmmState } from './state.js';

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
