/**
 * A resolver thread: reads one userfaultfd context's messages, maps each
 * message's thread id to that thread's fault queue, fetches the missing page
 * on its own connection, installs it, and pays the WAKE its strategy owes.
 * Handles many faults at once: it keeps reading while earlier requests are
 * on the wire (as QEMU's fault thread does). The same code runs on either
 * memory backend: on uffd its reads are poll(2)s of the real userfaultfd.
 *
 * It ends on the main thread's `stop` (or when its context is closed under
 * it): it stops reading, waits until every request it sent has its reply
 * installed, then reports resolver-done. The main thread closes the
 * contexts only after that, so no install of ours meets a closed context.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { ChannelRole, CpuMeter } from '@postcopy/shared/core';
import { ERRNO, type FaultMessage } from '../memory/backend.js';
import { ResolverLog } from '../trace/thread-logs.js';
import { PageInstaller } from '../vmm/page-installer.js';
import { attach, followSession, report as reportToMain, runWorker, warmUpReport, warmUpThenRun, type Report } from './attach.js';
import type { ResolverData, WorkerCommand } from './protocol.js';

/** How long a blocking resolver waits for a fault message before it lets its event loop run (ms). */
const IDLE_SLICE_MS = 20;

runWorker(async () => {
  const data = workerData as ResolverData;
  // The same code on a scratch context first (warm-up/warm-up.ts).
  await warmUpThenRun(
    (data.warmUp ?? []).map((w) => () => serve({ ...data, state: w.state, source: w.source, ctx: w.ctx, owesWake: w.owesWake }, warmUpReport, true)),
    () => serve(data, reportToMain),
  );
});

/**
 * One run of this resolver: connect, `ready`, resolve its context's faults
 * until `stop`, `resolver-done`. A warm-up's channel and memory are left as
 * they are (see warm-up/warm-up.ts).
 */
async function serve(data: ResolverData, report: Report, warmUp = false): Promise<void> {
  const { memory, vmm, clockOffset } = attach(data.state);
  const stop = new AbortController();
  const onCommand = (c: WorkerCommand): void => {
    if (c.type === 'stop') stop.abort();
  };
  parentPort!.on('message', onCommand);
  const channelOptions = { ...data.source, role: ChannelRole.Fault, channel: data.label, following: followSession(vmm, data.source, report) };
  const installer = new PageInstaller(memory, vmm);
  const options = { ctx: data.ctx, dontWake: false, owesWake: data.owesWake, pageWait: data.pageWait };
  const pageSize = memory.layout.pageSize;
  // --trace: each message, from its read to the end of its resolution. Without it, one branch a message.
  const log = data.trace ? new ResolverLog() : undefined;
  const msg: FaultMessage = { address: 0, flags: 0, tid: 0 };
  /** A message just read: its thread's fault queue (noted as read); throws for a thread that is no guest thread. */
  const accept = (): number => {
    const slot = vmm.slotOfTid(msg.tid);
    if (slot < 0) throw new Error(`expected a fault message from a guest thread, got one from thread id ${msg.tid} (page ${Math.floor(msg.address / pageSize)})`);
    vmm.noteMessage(slot);
    return slot;
  };
  if (data.pageWait === 'block' && data.source.faultChannel === 'blocking') {
    // One vCPU's resolver (per-thread-uffd): that vCPU is blocked on the one
    // fault in hand, so the resolver blocks too, reading and fetching with
    // blocking system calls (as its native floor's handler thread does).
    const { BlockingPageChannel } = await import('../net/blocking-page-channel.js');
    const channel = await BlockingPageChannel.connect(channelOptions);
    report({ type: 'ready' });
    const cpu = new CpuMeter();
    let messages = 0;
    for (;;) {
      if (stop.signal.aborted) break;
      const r = memory.read(data.ctx, msg, IDLE_SLICE_MS);
      if (r === -ERRNO.EAGAIN) {
        // Idle for a slice: let the event loop run (the main thread's stop arrives there).
        await new Promise((resolve) => setImmediate(resolve));
        continue;
      }
      if (r === -ERRNO.EINTR || r === -ERRNO.EBADF) break; // stopped, or the context closed
      if (r !== 0) throw new Error(`expected a fault message from userfaultfd context ${data.ctx}, got errno ${-r}`);
      const slot = accept();
      const page = Math.floor(msg.address / pageSize);
      messages++;
      const t0 = log === undefined ? 0 : performance.now() + clockOffset;
      const resolution = installer.resolveNow(channel, page, options);
      log?.add(t0, performance.now() + clockOffset, page, slot, resolution);
    }
    if (!warmUp) channel.close();
    finish(messages, cpu);
    return;
  }
  // Only resolvers on the event loop load ws (see the blocking branch above).
  const { PageClient } = await import('../net/page-client.js');
  const client = await PageClient.connect(channelOptions);
  report({ type: 'ready' });
  // This thread's CPU from here on: reading faults, fetching, installing, waking.
  const cpu = new CpuMeter();

  let inFlight = 0;
  let failure: Error | undefined;
  let drained: (() => void) | undefined;
  const settle = (): void => {
    inFlight--;
    if (inFlight === 0) drained?.();
  };
  const fail = (err: Error): void => {
    // Report at once: the loop below only sees `failure` after its next read,
    // and the vCPU whose page was rejected stays blocked, so no read may come
    // (the run would end by the watchdog without saying what the source did).
    if (failure === undefined) report({ type: 'error', message: err.message, ...(err.stack ? { stack: err.stack } : {}) });
    failure ??= err;
    settle();
  };
  let messages = 0;
  for (;;) {
    // A message already queued is taken without a promise (the emulation's
    // readAsync allocates an abort listener and a race per call); the queue
    // holds at most one fault a thread, so this never starves the loop.
    let r = stop.signal.aborted ? -ERRNO.EINTR : memory.tryRead(data.ctx, msg);
    if (r === -ERRNO.EAGAIN) r = await memory.readAsync(data.ctx, msg, stop.signal);
    if (r === -ERRNO.EINTR || r === -ERRNO.EBADF || failure !== undefined) break; // stopped, or the context closed
    if (r !== 0) throw new Error(`expected a fault message from userfaultfd context ${data.ctx}, got errno ${-r}`);
    const slot = accept();
    const page = Math.floor(msg.address / pageSize);
    inFlight++;
    messages++;
    if (log === undefined) {
      installer.resolve(client, page, options).then(settle, fail);
    } else {
      const t0 = performance.now() + clockOffset;
      installer.resolve(client, page, options).then((resolution) => {
        log.add(t0, performance.now() + clockOffset, page, slot, resolution);
        settle();
      }, fail);
    }
  }
  if (inFlight > 0) await new Promise<void>((resolve) => (drained = resolve));
  if (!warmUp) client.close();
  if (failure) {
    memory.dispose();
    parentPort!.off('message', onCommand);
    throw failure;
  }
  finish(messages, cpu);

  /** The end both loops share: release guest memory, stop listening, report what was resolved. */
  function finish(messages: number, cpu: CpuMeter): void {
    if (!warmUp) memory.dispose();
    parentPort!.off('message', onCommand);
    const cpuUs = cpu.spent().threadUs;
    const trace = log?.take();
    report({ type: 'resolver-done', messages, cpuUs, ...(trace ? { trace } : {}) }, trace ? [trace.times.buffer as ArrayBuffer, trace.info.buffer as ArrayBuffer] : []);
  }
}
