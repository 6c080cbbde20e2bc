import type { Server } from 'node:http';
import type { Worker } from 'node:worker_threads';
import {
  ChannelRole,
  CheckError,
  ConnectionError,
  CpuMeter,
  PostcopyError,
  ProtocolError,
  bitmapBytes,
  bitmapSet,
  digestPages,
  startWorker,
  type GuestLayout,
  type Message,
  type Report,
  type SourceSummary,
  type StrategyName,
  type WorkloadName,
} from '@postcopy/shared';
import { GuestMemory } from './memory/guest-memory.js';
import { PageClient, type ClientTls } from './net/page-client.js';
import { Session } from './net/session.js';
import { Recovery } from './recovery.js';
import { buildReportWithHistogram } from './report-builder.js';
import { startStatusServer, type MigrationState } from './status-server.js';
import { STRATEGY_BY_NAME, type ThreadPlan } from './strategies/index.js';
import { ERRNO, Userfaultfd } from './uffd/userfaultfd.js';
import { PageInstaller } from './vmm/page-installer.js';
import { COUNTER, PAGE, VmmState } from './vmm/state.js';
import { Watchdog, type WatchedThread } from './watchdog.js';
import type { GuestThreadData, GuestThreadResult, ResolverData, SharedState, SourceEndpoint, WorkerReport } from './workers/protocol.js';

export interface DestinationOptions {
  source: string;
  token: string;
  /** wss:// sources: the CA to verify them with, a client certificate, the name to expect. */
  tls?: ClientTls | undefined;
  /** Ping the source on the main channel; a silence this long counts as a lost connection (0 = never). */
  keepaliveMs: number;
  layout: GuestLayout;
  memslotBytes: number;
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
  /** Recovery events (pause, resume), as lines for the log. */
  onEvent?: (line: string) => void;
  /** For tests only: resolvers skip the WAKE they owe (proves wake scope is per context). */
  skipOwedWake: boolean;
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

/** A failure that stops the run: the first one wins. */
class Abort {
  error: Error | undefined;
  readonly promise: Promise<never>;
  private rejectFn!: (err: Error) => void;
  constructor() {
    this.promise = new Promise<never>((_, reject) => (this.rejectFn = reject));
    this.promise.catch(() => {});
  }
  fail(err: Error): void {
    if (this.error) return;
    this.error = err;
    this.rejectFn(err);
  }
  /** Waits for `p` unless the run fails first. */
  race<T>(p: Promise<T>): Promise<T> {
    return Promise.race([p, this.promise]);
  }
}

/** Waits for one report of a given type from a worker (fails the run if the worker exits first). */
function expectReport<T extends WorkerReport['type']>(worker: Worker, type: T, label: string, abort: Abort): Promise<Extract<WorkerReport, { type: T }>> {
  return abort.race(
    new Promise((resolve) => {
      const onMessage = (m: WorkerReport): void => {
        if (m.type !== type) return;
        worker.off('message', onMessage);
        worker.off('exit', onExit);
        resolve(m as Extract<WorkerReport, { type: T }>);
      };
      const onExit = (code: number): void => abort.fail(new Error(`${label} exited (code ${code}) before reporting ${type}`));
      worker.on('message', onMessage);
      worker.on('exit', onExit);
    }),
  );
}

/**
 * Runs the destination side of one postcopy migration: connects to the
 * source, maps empty guest memory, starts the strategy's resolvers and the
 * vCPU threads, installs pushed pages, and returns the report once every
 * check has run.
 */
export async function runDestination(options: DestinationOptions): Promise<DestinationResult> {
  const { layout } = options;
  const abort = new Abort();
  const workers: Worker[] = [];
  let main: PageClient | undefined;
  let watchdog: Watchdog | undefined;
  let progressTimer: NodeJS.Timeout | undefined;
  let dropTimer: NodeJS.Timeout | undefined;
  /** The watchdog runs while the guest does (a resume restarts it only then). */
  let watching = false;
  let status: Server | undefined;
  let state: MigrationState = 'setup';
  try {
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
    // Every later channel (fault channels, a main channel that resumes) shows it.
    endpoint.secret = welcome.secret;

    const memory = GuestMemory.create(layout, options.memslotBytes);
    const threads: ThreadPlan = {
      vcpus: options.vcpus,
      ioThreads: options.ioThreads,
      readers: options.readers,
      vcpuTid: (v) => v,
      ioTid: (i) => options.vcpus + i,
    };
    const threadCount = options.vcpus + options.ioThreads;
    const uffd = Userfaultfd.create(memory, threadCount, options.vcpus + 2);
    const vmm = VmmState.create(layout.totalPages, threadCount);
    const strategy = STRATEGY_BY_NAME[options.strategy];
    const setup = strategy.setup(uffd, threads, layout.guestBytes);
    if (options.skipOwedWake) for (const r of setup.resolvers) r.owesWake = false;
    const installer = new PageInstaller(uffd, vmm);
    const epochOrigin = performance.timeOrigin;
    const epochNow = (): number => performance.now();
    let startedAt: number | undefined;
    if (options.statusPort !== undefined) {
      const server = await startStatusServer(options.statusPort, {
        state: () => state,
        vmm,
        uffd,
        totalPages: layout.totalPages,
        pageSize: layout.pageSize,
        vcpus: options.vcpus,
        now: epochNow,
        startedAt: () => startedAt,
      }, options.statusHost);
      status = server;
      options.onStatusUrl?.(server.url);
    }
    const shared: SharedState = {
      memory: memory.toBuffers(),
      uffd: uffd.toBuffers(),
      vmm: vmm.buffers,
      image: { seed: welcome.imageSeed, zeroFraction: welcome.zeroFraction },
      epochOrigin,
    };

    // ---- the main channel: pushed pages, completion, summary
    let complete = false;
    let allInstalled!: () => void;
    const installedAll = new Promise<void>((resolve) => (allInstalled = resolve));
    let gotSummary!: (s: SourceSummary) => void;
    const summaryArrived = new Promise<SourceSummary>((resolve) => (gotSummary = resolve));
    let finishing = false;
    const checkInstalled = (): void => {
      if (complete && vmm.counter(COUNTER.INSTALLED) === layout.totalPages) allInstalled();
    };
    /** Installs one page that came on the main channel (a zero push, or a requested page without preempt). */
    const installOne = (page: number, data: Uint8Array | undefined, kind: 'pushed' | 'requested'): void => {
      const result = installer.install(setup.pushCtx, page, data, 0);
      if (result === layout.pageSize) {
        vmm.count(kind === 'pushed' ? COUNTER.PAGES_PUSHED : COUNTER.PAGES_DEMAND);
        if (!data) {
          vmm.count(COUNTER.PAGES_ZERO);
          if (kind === 'pushed') vmm.count(COUNTER.PUSHED_ZERO);
        }
        vmm.markReceived(page);
      } else if (result === -ERRNO.EEXIST) {
        vmm.count(COUNTER.DUPLICATE_DATA);
      } else {
        abort.fail(new Error(`installing ${kind} page ${page} failed with errno ${-result}`));
      }
      if (complete) checkInstalled();
    };
    const onMainMessage = (m: Message): void => {
      switch (m.type) {
        case 'pushed': {
          const count = m.data.length / layout.pageSize;
          const installed = installer.installRun(setup.pushCtx, m.page, m.data, count);
          if (installed < 0) abort.fail(new Error(`installing pushed pages from ${m.page} failed with errno ${-installed}`));
          else vmm.count(COUNTER.PAGES_PUSHED, installed);
          if (complete) checkInstalled();
          if (drops.length > 0) maybeInjectDrop();
          return;
        }
        case 'pushed-zero':
          installOne(m.page, undefined, 'pushed');
          return;
        case 'page':
        case 'zero-page':
          // A requested page sent on the main channel (no preempt): the
          // requester waits for it in the receivedmap.
          installOne(m.page, m.type === 'page' ? m.data : undefined, 'requested');
          return;
        case 'complete':
          complete = true;
          checkInstalled();
          return;
        case 'summary': {
          const { type: _type, ...summary } = m;
          gotSummary(summary);
          return;
        }
        case 'error':
          abort.fail(new PostcopyError(m.code, `the source reported: ${m.message}`));
          return;
        default:
          abort.fail(new ProtocolError(`expected pushed, complete, summary or error on the main channel, got ${m.type}`));
      }
    };
    /** The main channel closed: before start the run fails; during postcopy the migration pauses and recovers. */
    const adoptMain = (client: PageClient): void => {
      main = client;
      client.onMessage = onMainMessage;
      client.onClose = (err) => {
        if (finishing || client !== main) return;
        const lostErr = err ?? new ConnectionError('the main channel to the source closed');
        // A lost connection pauses the migration; a source that broke the protocol fails it.
        if (startedAt === undefined || !(lostErr instanceof ConnectionError)) abort.fail(lostErr);
        else recovery.lost(`main channel: ${lostErr.message}`);
      };
    };
    adoptMain(main);
    const session = new Session(vmm.counters);
    /** The pages in `status`, one bit a page, and how many there are. */
    const bitmapOf = (status: number): { map: Uint8Array; count: number } => {
      const map = new Uint8Array(bitmapBytes(layout.totalPages));
      let count = 0;
      for (let page = 0; page < layout.totalPages; page++) {
        if (Atomics.load(vmm.pageStatus, page) === status) {
          bitmapSet(map, page);
          count++;
        }
      }
      return { map, count };
    };
    const recovery = new Recovery({
      session,
      connectMain,
      imageDigest: welcome.imageDigest,
      resumeMessage: () => ({
        type: 'resume',
        push: options.push,
        preempt: options.preempt,
        receivedmap: bitmapOf(PAGE.RECEIVED).map,
        requestedmap: bitmapOf(PAGE.REQUESTED).map,
      }),
      adopt: adoptMain,
      onPause: (reason) => {
        state = 'postcopy-paused';
        main?.terminate();
        watchdog?.stop();
        // The source sends complete again once it has resent what was lost.
        complete = false;
        options.onEvent?.(`connection lost (${reason}): postcopy paused after ${vmm.counter(COUNTER.INSTALLED)} pages installed; reconnecting`);
      },
      onResume: (resumed, pausedMs) => {
        state = 'postcopy-active';
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
    // Fault injection: cut every connection once per threshold of installed pages.
    const drops = [...options.injectDrops].sort((a, b) => a - b);
    let dropsInjected = 0;
    const maybeInjectDrop = (): void => {
      if (dropsInjected >= drops.length || recovery.paused || startedAt === undefined || finishing) return;
      const installed = vmm.counter(COUNTER.INSTALLED);
      if (installed < drops[dropsInjected]!) return;
      dropsInjected++;
      recovery.lost(`injected drop@${drops[dropsInjected - 1]} at ${installed} pages installed`);
    };

    // ---- threads
    const watch = (worker: Worker, label: string): Worker => {
      workers.push(worker);
      worker.on('message', (m: WorkerReport) => {
        if (m.type === 'error') abort.fail(new Error(`${label}: ${m.message}`));
        // A fault channel's connection dropped in the current session: pause and recover.
        else if (m.type === 'channel-lost' && m.epoch === session.epoch && !finishing) {
          if (startedAt === undefined) abort.fail(new ConnectionError(`${label}: ${m.message}`));
          else recovery.lost(`${label}: ${m.message}`);
        }
      });
      worker.on('error', (err) => abort.fail(new Error(`${label}: ${err.message}`)));
      return worker;
    };
    const resolverWorkers = setup.resolvers.map((spec) => {
      const data: ResolverData = { label: spec.label, ctx: spec.ctx, owesWake: spec.owesWake, pageWait: spec.pageWait, state: shared, source: endpoint };
      return { spec, worker: watch(startWorker(import.meta.url, 'workers/resolver-worker', { workerData: data }), spec.label) };
    });
    const guestThread = (kind: 'vcpu' | 'io', index: number): { worker: Worker; label: string } => {
      const label = kind === 'vcpu' ? `vCPU ${index}` : `I/O thread ${index}`;
      const data: GuestThreadData = {
        kind,
        index,
        tid: kind === 'vcpu' ? threads.vcpuTid(index) : threads.ioTid(index),
        strategy: options.strategy,
        delivery: kind === 'vcpu' ? strategy.vcpuFaultDelivery : 'userfaultfd',
        state: shared,
        workload: {
          name: options.workload,
          totalPages: layout.totalPages,
          vcpus: options.vcpus,
          seed: options.seed,
          accesses: options.accesses,
          writeFraction: options.writeFraction,
        },
        ioAccesses: options.ioAccesses,
        source: endpoint,
        copyCtx: setup.vcpuCopyCtx,
      };
      return { worker: watch(startWorker(import.meta.url, 'workers/guest-thread-worker', { workerData: data }), label), label };
    };
    const vcpus = Array.from({ length: options.vcpus }, (_, v) => guestThread('vcpu', v));
    const ios = Array.from({ length: options.ioThreads }, (_, i) => guestThread('io', i));
    const everyone = [...resolverWorkers.map((r) => ({ worker: r.worker, label: r.spec.label })), ...vcpus, ...ios];
    await Promise.all(everyone.map((t) => expectReport(t.worker, 'ready', t.label, abort)));

    const watched: WatchedThread[] = [
      ...vcpus.map((_, v) => ({ tid: threads.vcpuTid(v), name: `vCPU ${v}` })),
      ...ios.map((_, i) => ({ tid: threads.ioTid(i), name: `I/O thread ${i}` })),
    ];
    watchdog = new Watchdog(vmm, uffd, watched, options.watchdogMs, epochNow, (err) => abort.fail(err));

    // ---- postcopy starts: the guest runs on the destination from here
    const started = epochNow();
    startedAt = started;
    // CPU of the run (this thread's and the whole process's): the report's CPU per fault.
    const cpuMeter = new CpuMeter();
    state = 'postcopy-active';
    main.send({ type: 'start', push: options.push, preempt: options.preempt });
    watchdog.start();
    watching = true;
    if (drops.length > 0) {
      // Most pages are installed by the main thread (checked there); demand
      // pages by vCPU and resolver threads are caught by this poll.
      dropTimer = setInterval(maybeInjectDrop, 2);
      dropTimer.unref();
    }
    if (options.onProgress) {
      const onProgress = options.onProgress;
      progressTimer = setInterval(() => onProgress(vmm.counter(COUNTER.INSTALLED), layout.totalPages, uffd.counters().faults), 200);
      progressTimer.unref();
    }
    const guestDone = [...vcpus, ...ios].map((t) => expectReport(t.worker, 'done', t.label, abort));
    for (const t of [...vcpus, ...ios]) t.worker.postMessage({ type: 'go' });
    const results = (await Promise.all(guestDone)).map((r) => r.result);
    const vcpuResults: GuestThreadResult[] = results.slice(0, vcpus.length);
    const ioResults: GuestThreadResult[] = results.slice(vcpus.length);
    if (options.push) {
      // The main thread re-checks on every page it installs and on complete.
      // The last page may instead be a requested page installed by a vCPU or
      // resolver thread after complete arrived: poll for that case.
      const poll = setInterval(checkInstalled, 5);
      try {
        await abort.race(installedAll);
      } finally {
        clearInterval(poll);
      }
    }
    const elapsedMs = epochNow() - started;
    const runCpu = cpuMeter.spent();

    // ---- wind down: resolvers finish their in-flight requests, then exit
    const resolverDone = resolverWorkers.map((r) => expectReport(r.worker, 'resolver-done', r.spec.label, abort));
    for (const ctx of new Set(setup.resolvers.map((r) => r.ctx))) uffd.close(ctx);
    const resolverCpuUs = (await Promise.all(resolverDone)).map((d) => d.cpuUs);
    watching = false;
    watchdog.stop();
    const blocked = watchdog.blocked();

    // ---- exactly-once accounting with the source
    // A drop whose threshold was reached goes off before the end (drop@N with N up to every page).
    maybeInjectDrop();
    clearInterval(dropTimer);
    let summary: SourceSummary | undefined;
    let received = 0;
    while (summary === undefined) {
      // A connection lost here: finish again once the migration has resumed.
      await abort.race(recovery.whenActive());
      const receivedmap = bitmapOf(PAGE.RECEIVED);
      received = receivedmap.count;
      main.send({ type: 'finish', receivedmap: receivedmap.map });
      let timer: NodeJS.Timeout | undefined;
      const summaryTimeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new ConnectionError('the source did not answer finish within 30 s')), 30_000);
      });
      try {
        summary = await abort.race(Promise.race([summaryArrived, summaryTimeout, recovery.nextPause().then(() => undefined)]));
      } finally {
        clearTimeout(timer);
      }
    }
    finishing = true;
    const destDigest = digestPages(memory, layout.totalPages, (page) => Atomics.load(vmm.pageStatus, page) === PAGE.RECEIVED);

    state = 'completed';
    const built = buildReportWithHistogram({
      strategy: options.strategy,
      workload: options.workload,
      vcpus: options.vcpus,
      readers: options.strategy === 'shared-uffd' ? options.readers : 0,
      ioThreads: options.ioThreads,
      pageSize: layout.pageSize,
      guestBytes: layout.guestBytes,
      totalPages: layout.totalPages,
      memslots: memory.memslots.count,
      push: options.push,
      seed: options.seed,
      elapsedMs,
      vcpuResults,
      ioResults,
      vmm,
      kernel: uffd.counters(),
      summary,
      imageDigest: welcome.imageDigest,
      destDigest,
      allReceived: received === layout.totalPages,
      blocked,
      cpu: { dest: { processUs: runCpu.processUs, mainThreadUs: runCpu.threadUs }, resolvers: resolverCpuUs },
      preempt: options.preempt,
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
    state = 'failed';
    throw err;
  } finally {
    status?.close();
    watchdog?.stop();
    clearInterval(progressTimer);
    clearInterval(dropTimer);
    main?.close();
    await Promise.all(workers.map((w) => w.terminate()));
  }
}

/** Throws a {@link CheckError} naming the first failed check of a report. */
export function assertVerified(report: Report): void {
  const failed = report.checks.find((c) => !c.ok);
  if (failed) throw new CheckError(failed.name, failed.detail);
}
