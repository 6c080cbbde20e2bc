/**
 * A resolver thread: reads one userfaultfd context's messages, fetches each
 * missing page on its own connection, installs it, and pays the WAKE its
 * strategy owes. Handles many faults at once: it keeps reading while earlier
 * requests are on the wire (as QEMU's fault thread does). Ends when the main
 * thread closes its context, after every request it sent has its reply.
 */
import { workerData } from 'node:worker_threads';
import { ChannelRole, CpuMeter } from '@postcopy/shared/core';
import { PageClient } from '../net/page-client.js';
import { UffdMessage } from '../uffd/userfaultfd.js';
import { PageInstaller } from '../vmm/page-installer.js';
import { attach, followSession, report, runWorker } from './attach.js';
import type { ResolverData } from './protocol.js';

runWorker(async () => {
  const data = workerData as ResolverData;
  const { memory, uffd, vmm } = attach(data.state);
  const client = await PageClient.connect({
    ...data.source,
    role: ChannelRole.Fault,
    channel: data.label,
    following: followSession(vmm, data.source),
  });
  const installer = new PageInstaller(uffd, vmm);
  const options = { ctx: data.ctx, dontWake: false, owesWake: data.owesWake, pageWait: data.pageWait };
  const pageSize = memory.layout.pageSize;
  report({ type: 'ready' });
  // This thread's CPU from here on: reading faults, fetching, installing, waking.
  const cpu = new CpuMeter();

  const msg = new UffdMessage();
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
  while (failure === undefined && (await uffd.readAsync(data.ctx, msg))) {
    const page = Math.floor(msg.address / pageSize);
    inFlight++;
    messages++;
    installer.resolve(client, page, options).then(settle, fail);
  }
  if (inFlight > 0) await new Promise<void>((resolve) => (drained = resolve));
  client.close();
  if (failure) throw failure;
  report({ type: 'resolver-done', messages, cpuUs: cpu.spent().threadUs });
});
