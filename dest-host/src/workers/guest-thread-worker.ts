/**
 * A guest thread: a vCPU (kind 'vcpu'), a non-vCPU I/O thread (kind 'io'),
 * or a device's DMA after the switchover (kind 'device', an I/O thread
 * whose pages lie in the device's DMA ranges, and whose accesses write).
 * Binds itself as a faulting thread of guest memory (on uffd its plain loads
 * of missing pages block in the kernel), says which id its fault messages
 * carry, waits for 'go' (all threads start together, like
 * demand_paging_test's barrier), runs its access pattern, and reports its
 * faults and blocked intervals.
 */
import { workerData } from 'node:worker_threads';
import { ChannelRole, CpuMeter, accessPattern, dmaPattern, ioPattern } from '@postcopy/shared/core';
import { GuestPages } from '../memory/pages.js';
import type { PageClient } from '../net/page-client.js';
import { PageInstaller } from '../vmm/page-installer.js';
import { COUNTER } from '../vmm/state.js';
import { attach, followSession, nextCommand, report as reportToMain, runWorker, warmUpReport, warmUpThenRun, type Report } from './attach.js';
import { runGuestLoop } from './guest-loop.js';
import type { GuestThreadData } from './protocol.js';

runWorker(async () => {
  const data = workerData as GuestThreadData;
  // The same code on scratch memory first (warm-up/warm-up.ts).
  await warmUpThenRun(
    (data.warmUp ?? []).map((w) => () => runThread({ ...data, state: w.state, source: w.source, workload: w.workload, copyCtx: w.copyCtx }, warmUpReport, true)),
    () => runThread(data, reportToMain),
  );
});

/**
 * One run of this thread: bind, connect, `ready`, wait for `go`, touch its
 * pages, `done`. A warm-up's channel and memory are left as they are (see
 * warm-up/warm-up.ts).
 */
async function runThread(data: GuestThreadData, report: Report, warmUp = false): Promise<void> {
  const { memory, vmm, clockOffset } = attach(data.state);
  const thread = memory.bindThread(data.slot);
  // Before 'ready': resolvers map the ids in fault messages to fault queues with it.
  vmm.setTid(data.slot, thread.tid);
  let client: { close(): void } | undefined;
  let exitOnMissing: ((page: number) => number | Promise<number>) | undefined;
  if (data.kind === 'vcpu' && data.delivery === 'memory-fault-exit') {
    // kvm-exit: the vCPU thread fetches its own pages on its own connection.
    const source = data.source!;
    const options = { ...source, role: ChannelRole.Fault, channel: `vcpu${data.index}`, following: followSession(vmm, source, report) };
    const installer = new PageInstaller(memory, vmm);
    // Its run loop exited on this page: a page coming another way is waited for blocked, as the vCPU would be.
    const resolve = { ctx: data.copyCtx, dontWake: true, owesWake: false, pageWait: 'block' as const };
    if (source.faultChannel === 'blocking') {
      // As KVM's vCPU thread after KVM_EXIT_MEMORY_FAULT: the fetch blocks this thread, no event loop in between.
      const { BlockingPageChannel } = await import('../net/blocking-page-channel.js');
      const channel = await BlockingPageChannel.connect(options);
      client = channel;
      exitOnMissing = (page) => installer.resolveNow(channel, page, resolve);
    } else {
      // Only kvm-exit's vCPUs connect: the others never load ws and the codec (see shared's core.ts).
      const { PageClient: Client } = await import('../net/page-client.js');
      const vcpuClient: PageClient = await Client.connect(options);
      client = vcpuClient;
      exitOnMissing = (page) => installer.resolve(vcpuClient, page, resolve);
    }
  }
  report({ type: 'ready' });
  await nextCommand();
  // This thread's CPU from the start of the guest's run (setup and connecting before it are not the run's).
  const cpu = new CpuMeter();
  const pattern =
    data.kind === 'vcpu'
      ? accessPattern(data.workload, data.index)
      : data.kind === 'device'
        ? dmaPattern(data.dmaRanges!, data.workload.seed, data.index, data.ioAccesses)
        : ioPattern(data.workload.totalPages, data.workload.seed, data.index, data.ioAccesses);
  const ran = await runGuestLoop({
    slot: data.slot,
    thread,
    pages: new GuestPages(memory),
    pageSize: memory.layout.pageSize,
    totalPages: memory.layout.totalPages,
    vmm,
    image: data.state.image,
    ignoreWord: data.state.ignoreWord,
    pattern,
    // A device's accesses are DMA writes (each stores what it read, so the digests still compare).
    writeFraction: data.kind === 'device' ? 1 : data.workload.writeFraction,
    seed: data.workload.seed,
    clockOffset,
    ...(exitOnMissing ? { exitOnMissing } : {}),
    trace: data.trace,
  });
  const result = { ...ran, cpuUs: cpu.spent().threadUs };
  if (data.kind !== 'vcpu') vmm.count(COUNTER.NON_VCPU_FAULTS, result.faults);
  if (!warmUp) {
    client?.close();
    memory.dispose();
  }
  const transfer = [result.intervals.buffer as ArrayBuffer];
  if (result.trace) transfer.push(result.trace.pages.buffer as ArrayBuffer, result.trace.flags.buffer as ArrayBuffer);
  report({ type: 'done', result }, transfer);
}
