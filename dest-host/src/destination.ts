import type { Server } from 'node:http';
import {
  ChannelRole,
  CheckError,
  ConnectionError,
  counterWord,
  digestPages,
  type GuestLayout,
  type MemoryBackendName,
  type Report,
  type StrategyName,
  type WorkloadName,
} from '@postcopy/shared';
import { DestLifecycle } from './lifecycle.js';
import type { BackendMemory } from './memory/backend.js';
import { BACKEND_BY_NAME } from './memory/backends.js';
import { GuestPages } from './memory/pages.js';
import { PageClient, type ClientTls } from './net/page-client.js';
import { Session } from './net/session.js';
import { Recovery } from './recovery.js';
import { buildReportWithHistogram } from './report-builder.js';
import { Abort } from './run/abort.js';
import { bitmapOf, exchangeSummary, namePagesThatDiffer } from './run/finish.js';
import { GuestThreads } from './run/guest-threads.js';
import { MainChannel } from './run/main-channel.js';
import { startStatusServer } from './status-server.js';
import { STRATEGY_BY_NAME, type StrategySetup, type ThreadPlan } from './strategies/index.js';
import { PageInstaller } from './vmm/page-installer.js';
import { PrecopyReceiver } from './vmm/precopy-receiver.js';
import { COUNTER, PAGE, VmmState } from './vmm/state.js';
import { Watchdog } from './watchdog.js';
import type { SharedState, SourceEndpoint } from './workers/protocol.js';

export interface DestinationOptions {
  source: string;
  token: string;
  /** wss:// sources: the CA to verify them with, a client certificate, the name to expect. */
  tls?: ClientTls | undefined;
  /** Ping the source on the main channel; a silence this long counts as a lost connection (0 = never). */
  keepaliveMs: number;
  layout: GuestLayout;
  memslotBytes: number;
  /** What guest memory and the userfaultfd are: `emulated`, or `uffd` (the kernel's). */
  memoryBackend: MemoryBackendName;
  strategy: StrategyName;
  vcpus: number;
  readers: number;
  ioThreads: number;
  ioAccesses: number;
  workload: WorkloadName;
  /** Accesses per vCPU; 0 = the workload's default. */
  accesses: number;
  writeFraction: number;
  seed: number;
  push: boolean;
  /** QEMU's postcopy-preempt: requested pages come back on their own channels, apart from pushed pages. */
  preempt: boolean;
  watchdogMs: number;
  connectTimeoutMs: number;
  /** After a lost connection, give up when the migration cannot be resumed within this time. */
  reconnectTimeoutMs: number;
  /** Fault injection: cut every connection once after this many pages are installed, for each entry. */
  injectDrops: number[];
  /** The same, counted in pages installed after the switchover (demand or push). */
  injectPostcopyDrops?: number[];
  /** Recovery events (pause, resume), as lines for the log. */
  onEvent?: (line: string) => void;
  /** For tests only: resolvers skip the WAKE they owe (proves wake scope is per context). */
  skipOwedWake: boolean;
  /** For tests only: keep the pages the switch to postcopy discards (the content check must fail). */
  skipDiscard?: boolean;
  /** Called about every 200 ms with pages installed so far. */
  onProgress?: (installed: number, total: number, faults: number) => void;
  /** Serve GET /status on this port (0 = any free port), or undefined for none. */
  statusPort?: number | undefined;
  /** Address the status server binds (default 127.0.0.1). */
  statusHost?: string;
  /** Called with the status URL once it listens. */
  onStatusUrl?: (url: string) => void;
}

export interface DestinationResult {
  report: Report;
  /** The vCPU fault-latency distribution in HdrHistogram's .hgrm text (values in µs). */
  hgrm: string;
}

/**
 * Runs the destination side of one migration, phase by phase (the states of
 * lifecycle.ts): connect and set up (memory, the strategy's contexts, the
 * worker threads); start; in precopy modes receive rounds until the
 * switchover; run the guest (postcopy: faults fetch what is missing, the
 * push brings the rest); wind down; the accounting with the source; the
 * report once every check has run. A connection lost before the switchover
 * cancels the migration; after it, the migration pauses and recovers.
 */
export async function runDestination(options: DestinationOptions): Promise<DestinationResult> {
  const { layout } = options;
  const abort = new Abort();
  const lifecycle = new DestLifecycle();
  let main: PageClient | undefined;
  let threads: GuestThreads | undefined;
  let watchdog: Watchdog | undefined;
  let progressTimer: NodeJS.Timeout | undefined;
  let dropTimer: NodeJS.Timeout | undefined;
  /** The watchdog runs while the guest does (a resume restarts it only then). */
  let watching = false;
  let status: Server | undefined;
  // Guest memory and the strategy's contexts: released in `finally` whatever happens.
  let memory: BackendMemory | undefined;
  let setup: StrategySetup | undefined;
  /**
   * Unregisters and closes the strategy's contexts, once. Every thread still
   * blocked in one of their faults wakes and reads a zero page that was never
   * installed: after this nothing may be verified that a thread read then.
   * The normal end calls it only once every guest thread has finished and
   * every resolver has stopped (an install on a closed context is EBADF on
   * the kernel); the failing ends call it so that those threads can exit.
   */
  const releaseContexts = (): void => {
    if (memory === undefined || setup === undefined) return;
    const size = layout.pageSize;
    for (const r of setup.ranges) memory.unregister(r.ctx, r.firstPage * size, (r.endPage - r.firstPage) * size);
    for (const ctx of setup.contexts) memory.close(ctx);
    setup = undefined;
  };
  try {
    // ---- setup: the main channel, guest memory, the strategy
    const endpoint: SourceEndpoint = {
      url: options.source,
      token: options.token,
      guestBytes: layout.guestBytes,
      pageSize: layout.pageSize,
      connectTimeoutMs: options.connectTimeoutMs,
      reconnectTimeoutMs: options.reconnectTimeoutMs,
      // None yet: the main channel asks for a new migration and gets its secret in the welcome.
      secret: '',
      ...(options.tls ? { tls: options.tls } : {}),
    };
    let keepaliveTimeouts = 0;
    const connectMain = (): Promise<PageClient> =>
      PageClient.connect({
        ...endpoint,
        role: ChannelRole.Main,
        channel: 'main',
        keepaliveMs: options.keepaliveMs,
        onKeepaliveTimeout: (silentMs) => {
          keepaliveTimeouts++;
          options.onEvent?.(`the source said nothing for ${Math.round(silentMs)} ms on the main channel (--keepalive-ms ${options.keepaliveMs}): treating the connection as lost`);
        },
      });
    main = await connectMain();
    const welcome = main.welcome;
    const precopyMode = welcome.mode !== 'postcopy';
    // Every later channel (fault channels, a main channel that resumes) shows it.
    endpoint.secret = welcome.secret;

    const plan: ThreadPlan = {
      vcpus: options.vcpus,
      ioThreads: options.ioThreads,
      readers: options.readers,
      vcpuSlot: (v) => v,
      ioSlot: (i) => options.vcpus + i,
    };
    const threadCount = options.vcpus + options.ioThreads;
    const guest = BACKEND_BY_NAME[options.memoryBackend].create({
      layout,
      memslotBytes: options.memslotBytes,
      maxThreads: threadCount,
      maxContexts: options.vcpus + 2,
    });
    memory = guest;
    const vmm = VmmState.create(layout.totalPages, threadCount);
    const strategy = STRATEGY_BY_NAME[options.strategy];
    const strategySetup = strategy.setup(guest, plan, layout.totalPages);
    setup = strategySetup;
    if (options.skipOwedWake) for (const r of strategySetup.resolvers) r.owesWake = false;
    const installer = new PageInstaller(guest, vmm, strategySetup.ranges);
    const receiver = new PrecopyReceiver(guest, vmm, installer, options.skipDiscard === true);
    /** Faults so far, all threads (the destination's own count, the same on both backends). */
    const faultsSoFar = (): number => {
      let n = 0;
      for (let t = 0; t < threadCount; t++) n += vmm.faultsOf(t);
      return n;
    };
    const epochOrigin = performance.timeOrigin;
    const epochNow = (): number => performance.now();
    let startedAt: number | undefined;
    if (options.statusPort !== undefined) {
      const server = await startStatusServer(
        options.statusPort,
        {
          state: () => lifecycle.state,
          vmm,
          totalPages: layout.totalPages,
          pageSize: layout.pageSize,
          vcpus: options.vcpus,
          threads: threadCount,
          now: epochNow,
          startedAt: () => startedAt,
          round: () => receiver.round,
        },
        options.statusHost,
      );
      status = server;
      options.onStatusUrl?.(server.url);
    }
    const shared: SharedState = {
      memory: guest.handle,
      vmm: vmm.buffers,
      image: { seed: welcome.imageSeed, zeroFraction: welcome.zeroFraction },
      // A guest that ran on the source changed each page's counter word: the first-touch check skips it.
      ignoreWord: precopyMode ? counterWord(layout.pageSize) : -1,
      epochOrigin,
    };

    // ---- the main channel and recovery
    let finishing = false;
    const channel = new MainChannel({
      totalPages: layout.totalPages,
      pageSize: layout.pageSize,
      vmm,
      installer,
      precopy: receiver,
      lifecycle,
      fail: (err) => abort.fail(err),
      onSwitchover: (postcopy) => options.onEvent?.(`switchover: the guest stopped on the source; ${postcopy ? `postcopy begins (${vmm.counter(COUNTER.DISCARDED)} pages discarded)` : 'every page is here'}`),
      afterPush: () => {
        if (drops.length > 0) maybeInjectDrop();
      },
    });
    /** A lost connection: before the switchover the migration is cancelled (the guest never left); after it, it pauses. */
    const connectionLost = (what: string, err: Error): void => {
      // The run has failed already (what closes now is its own wind-down).
      if (abort.error) return;
      if (!(err instanceof ConnectionError) || startedAt === undefined) {
        abort.fail(err);
      } else if (!lifecycle.switchedOver) {
        lifecycle.cancel();
        abort.fail(new ConnectionError(`the connection to the source was lost during precopy (${what}: ${err.message}): the migration is cancelled, and the guest stays on the source`));
      } else {
        recovery.lost(`${what}: ${err.message}`);
      }
    };
    const adoptMain = (client: PageClient): void => {
      main = client;
      client.onMessage = (m) => channel.onMessage(m);
      client.onClose = (err) => {
        if (finishing || client !== main) return;
        // A lost connection pauses the migration (or cancels it before the switchover); a source that broke the protocol fails it.
        connectionLost('main channel', err ?? new ConnectionError('the main channel to the source closed'));
      };
    };
    adoptMain(main);
    const session = new Session(vmm.counters);
    const recovery = new Recovery({
      session,
      connectMain,
      imageDigest: welcome.imageDigest,
      resumeMessage: () => ({
        type: 'resume',
        push: options.push,
        preempt: options.preempt,
        receivedmap: bitmapOf(vmm, layout.totalPages, PAGE.RECEIVED).map,
        requestedmap: bitmapOf(vmm, layout.totalPages, PAGE.REQUESTED).map,
      }),
      adopt: adoptMain,
      onPause: (reason) => {
        lifecycle.pause();
        main?.terminate();
        watchdog?.stop();
        channel.forgetComplete();
        options.onEvent?.(`connection lost (${reason}): postcopy paused after ${vmm.counter(COUNTER.INSTALLED)} pages installed; reconnecting`);
      },
      onResume: (resumed, pausedMs) => {
        lifecycle.resume();
        if (watching) watchdog?.start();
        options.onEvent?.(
          `resumed after ${Math.round(pausedMs)} ms${resumed.restarted ? ' (source restarted)' : ''}: the source marked ${resumed.pagesMarkedUnsent} pages lost on the way as unsent`,
        );
      },
      fail: (err) => abort.fail(err),
      reconnectTimeoutMs: options.reconnectTimeoutMs,
      answerTimeoutMs: options.connectTimeoutMs,
      now: epochNow,
    });
    // Fault injection: cut every connection once per threshold, of pages installed
    // (drop@), or of pages installed after the switchover (drop-postcopy@).
    const drops = [
      ...options.injectDrops.map((at) => ({ at, postcopy: false })),
      ...(options.injectPostcopyDrops ?? []).map((at) => ({ at, postcopy: true })),
    ];
    const fired = new Set<number>();
    let dropsInjected = 0;
    const maybeInjectDrop = (): void => {
      if (fired.size >= drops.length || recovery.paused || startedAt === undefined || finishing || abort.error) return;
      const installed = vmm.counter(COUNTER.INSTALLED);
      const afterSwitchover = vmm.counter(COUNTER.PAGES_DEMAND) + vmm.counter(COUNTER.PAGES_PUSHED);
      // The lowest threshold not fired yet that is reached.
      let which = -1;
      for (let i = 0; i < drops.length; i++) {
        const d = drops[i]!;
        if (fired.has(i) || (d.postcopy && !lifecycle.switchedOver)) continue;
        if ((d.postcopy ? afterSwitchover : installed) >= d.at && (which < 0 || d.at < drops[which]!.at)) which = i;
      }
      if (which < 0) return;
      fired.add(which);
      dropsInjected++;
      const d = drops[which]!;
      const reason = `injected ${d.postcopy ? 'drop-postcopy' : 'drop'}@${d.at} at ${d.postcopy ? `${afterSwitchover} pages installed after the switchover` : `${installed} pages installed`}`;
      // During precopy a lost connection cancels the migration (the guest never left); after the switchover it pauses and recovers.
      if (lifecycle.switchedOver) recovery.lost(reason);
      else {
        main?.terminate();
        connectionLost('main channel', new ConnectionError(reason));
      }
    };

    // ---- the worker threads: they connect and bind before the migration starts
    threads = new GuestThreads({
      strategy: options.strategy,
      fault: strategy,
      plan: strategySetup,
      threads: plan,
      shared,
      endpoint,
      workload: {
        name: options.workload,
        totalPages: layout.totalPages,
        vcpus: options.vcpus,
        seed: options.seed,
        accesses: options.accesses,
        writeFraction: options.writeFraction,
      },
      ioAccesses: options.ioAccesses,
      abort,
      onChannelLost: (label, message, epoch) => {
        // A fault channel's connection dropped in the current session: pause and recover (or cancel, or fail).
        if (epoch !== session.epoch || finishing) return;
        connectionLost(label, new ConnectionError(message));
      },
    });
    await threads.ready();
    watchdog = new Watchdog(vmm, guest, threads.watched(), options.watchdogMs, epochNow, (err) => abort.fail(err));

    // ---- start: precopy rounds first, or postcopy at once
    startedAt = epochNow();
    lifecycle.start(precopyMode);
    main.send({ type: 'start', push: options.push, preempt: options.preempt });
    if (options.onProgress) {
      const onProgress = options.onProgress;
      progressTimer = setInterval(() => onProgress(vmm.counter(COUNTER.INSTALLED), layout.totalPages, faultsSoFar()), 200);
      progressTimer.unref();
    }
    if (precopyMode) {
      // The guest runs on the source meanwhile; ours starts at the switchover.
      const precopyDrops = drops.length > 0 ? setInterval(maybeInjectDrop, 2) : undefined;
      try {
        await abort.race(channel.switchover.promise);
      } finally {
        clearInterval(precopyDrops);
      }
      main.send({ type: 'running' });
    }

    // ---- the guest runs here (postcopy-active, or completed after a stop-and-copy)
    const started = epochNow();
    watchdog.start();
    watching = true;
    if (drops.length > 0) {
      // Most pages are installed by the main thread (checked there); demand
      // pages by vCPU and resolver threads are caught by this poll.
      dropTimer = setInterval(maybeInjectDrop, 2);
      dropTimer.unref();
    }
    const { vcpuResults, ioResults } = await threads.run();
    if (options.push) {
      // The main thread re-checks on every page it installs and on complete.
      // The last page may instead be a requested page installed by a vCPU or
      // resolver thread after complete arrived: poll for that case.
      const poll = setInterval(() => channel.checkInstalled(), 5);
      try {
        await abort.race(channel.installedAll);
      } finally {
        clearInterval(poll);
      }
    }
    const elapsedMs = epochNow() - started;

    // ---- wind down: resolvers stop reading and finish their in-flight
    // requests; only then are the contexts unregistered and closed (on the
    // kernel an install on a closed context is EBADF).
    await threads.stopResolvers();
    releaseContexts();
    watching = false;
    watchdog.stop();
    const blocked = watchdog.blocked();

    // ---- exactly-once accounting with the source
    // A drop whose threshold was reached goes off before the end (drop@N with N up to every page).
    maybeInjectDrop();
    clearInterval(dropTimer);
    const { summary, received } = await exchangeSummary({ main: () => main!, channel, vmm, totalPages: layout.totalPages, recovery, abort });
    // Received pages only: on uffd a missing page would block this thread in the kernel.
    const pages = new GuestPages(guest);
    const destDigest = digestPages(pages, layout.totalPages, (page) => Atomics.load(vmm.pageStatus, page) === PAGE.RECEIVED);
    // The digests differ: which pages, and who sent them last?
    const digestMismatch =
      destDigest !== summary.digestOfReceived ? await namePagesThatDiffer({ main, channel, pages, vmm, totalPages: layout.totalPages, abort }) : undefined;
    finishing = true;
    lifecycle.finish();

    const built = buildReportWithHistogram({
      strategy: options.strategy,
      memoryBackend: options.memoryBackend,
      workload: options.workload,
      vcpus: options.vcpus,
      readers: options.strategy === 'shared-uffd' ? options.readers : 0,
      ioThreads: options.ioThreads,
      pageSize: layout.pageSize,
      guestBytes: layout.guestBytes,
      totalPages: layout.totalPages,
      memslots: guest.memslots.count,
      push: options.push,
      seed: options.seed,
      elapsedMs,
      vcpuResults,
      ioResults,
      vmm,
      summary,
      imageDigest: welcome.imageDigest,
      destDigest,
      ...(digestMismatch !== undefined ? { digestMismatch } : {}),
      allReceived: received === layout.totalPages,
      blocked,
      preempt: options.preempt,
      mode: welcome.mode,
      tls: options.source.startsWith('wss:'),
      linkDelayUs: welcome.linkDelayUs,
      linkBandwidthBps: welcome.linkBandwidthBps,
      recovery: {
        pauses: recovery.pauses,
        resumes: recovery.resumes,
        pagesResent: recovery.pagesResent,
        requestsReplayed: vmm.counter(COUNTER.REPLAYED),
        repliesDropped: vmm.counter(COUNTER.REPLIES_DROPPED),
        dropsInjected,
        sourceRestarts: recovery.sourceRestarts,
        pausedMs: Math.round(recovery.pausedMs * 1000) / 1000,
        keepaliveMs: options.keepaliveMs,
        keepaliveTimeouts,
        sourceKeepaliveTimeouts: summary.keepaliveTimeouts,
      },
    });
    return { report: built.report, hgrm: built.histogram.outputPercentileDistribution(5, 1000) };
  } catch (err) {
    lifecycle.fail();
    throw err;
  } finally {
    status?.close();
    watchdog?.stop();
    clearInterval(progressTimer);
    clearInterval(dropTimer);
    main?.close();
    // Threads blocked in a real fault cannot be terminated: closing their
    // contexts wakes them (on zero pages: this run reports nothing).
    releaseContexts();
    const workers = threads?.workers ?? [];
    const exited = await Promise.race([Promise.all(workers.map((w) => w.terminate())).then(() => true), sleep(WORKER_EXIT_MS).then(() => false)]);
    // Unmapping memory a thread still runs on would kill the process: a thread
    // that did not exit keeps it mapped until the process ends.
    if (exited) memory?.dispose();
  }
}

/** How long the end of a run waits for its workers to exit before it leaves guest memory mapped. */
const WORKER_EXIT_MS = 10_000;

const sleep = (ms: number): Promise<void> =>
  new Promise((resolve) => {
    setTimeout(resolve, ms).unref();
  });

/** Throws a {@link CheckError} naming the first failed check of a report. */
export function assertVerified(report: Report): void {
  const failed = report.checks.find((c) => !c.ok);
  if (failed) throw new CheckError(failed.name, failed.detail);
}
