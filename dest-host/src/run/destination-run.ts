/**
 * One run of the destination, a method per phase (the states of
 * lifecycle.ts, in order): set up (the main channel, guest memory, the
 * strategy's contexts, the worker threads); start; in precopy modes receive
 * rounds until the switchover; run the guest (postcopy: faults fetch what is
 * missing, the push brings the rest); wind down; the accounting with the
 * source; the report once every check has run. A connection lost before the
 * switchover cancels the migration; after it, the migration pauses and
 * recovers (recovery.ts).
 */
import type { Server } from 'node:http';
import { setPriority } from 'node:os';
import { ChannelRole, ConnectionError, CpuMeter, UsageError, DEFAULT_MDEV_CATALOG, MAX_DEVICES, counterWord, stateName, type CpuSpent, type Report, type Welcome } from '@postcopy/shared';
import type { DestinationOptions, DestinationResult } from '../destination.js';
import { DeviceReceiver } from '../devices/receiver.js';
import { DestLifecycle } from '../lifecycle.js';
import type { BackendMemory } from '../memory/backend.js';
import { BACKEND_BY_NAME } from '../memory/backends.js';
import { GuestPages } from '../memory/pages.js';
import { BlockingPageChannel } from '../net/blocking-page-channel.js';
import { PageClient } from '../net/page-client.js';
import { PushClient } from '../net/push-client.js';
import type { PrecopyPushPlacement, PushPlacement } from '../net/push-reader.js';
import { pushPlacement } from '../vmm/push-placement.js';
import { precopyPushPlacement } from '../vmm/precopy-push-placement.js';
import { Session } from '../net/session.js';
import { Recovery } from '../recovery.js';
import { buildReportWithHistogram } from '../report-builder.js';
import { startStatusServer } from '../status-server.js';
import { STRATEGY_BY_NAME, releaseSetup, type FaultStrategy, type StrategySetup, type ThreadPlan } from '../strategies/index.js';
import { MAIN_KIND, MainLog } from '../trace/main-log.js';
import { buildTimeline, type Timeline } from '../trace/timeline.js';
import { PageInstaller } from '../vmm/page-installer.js';
import { PrecopyReceiver } from '../vmm/precopy-receiver.js';
import { COUNTER, PAGE, VmmState } from '../vmm/state.js';
import { Watchdog } from '../watchdog.js';
import type { FaultChannelKind, GuestThreadResult, SharedState, SourceEndpoint } from '../workers/protocol.js';
import { Abort } from './abort.js';
import { DropInjector } from './drops.js';
import { bitmapOf, exchangeSummary, namePagesThatDiffer } from './finish.js';
import { digestReceived } from './digest.js';
import { GuestThreads, type ResolverEnd, type WarmUpDone } from './guest-threads.js';
import { WarmUp } from '../warm-up/warm-up.js';
import { MainChannel } from './main-channel.js';

/** How long the end of a run waits for its workers to exit before it leaves guest memory mapped. */
const WORKER_EXIT_MS = 10_000;

const sleep = (ms: number): Promise<void> =>
  new Promise((resolve) => {
    setTimeout(resolve, ms).unref();
  });

/** What set-up made: guest memory and what works on it. */
interface Guest {
  memory: BackendMemory;
  vmm: VmmState;
  fault: FaultStrategy;
  plan: ThreadPlan;
  threadCount: number;
  installer: PageInstaller;
  receiver: PrecopyReceiver;
}

export class DestinationRun {
  private readonly abort = new Abort();
  private readonly lifecycle = new DestLifecycle();
  private readonly drops: DropInjector;
  private readonly endpoint: SourceEndpoint;
  private main: PageClient | undefined;
  /** The push channel (net/push-client.ts), while one is open. */
  private push: PushClient | undefined;
  /** Push channels opened (1 a session), for the report's diagnostics. */
  private pushChannelsOpened = 0;
  private welcome!: Welcome;
  private guest!: Guest;
  private channel!: MainChannel;
  private recovery!: Recovery;
  private session!: Session;
  private threads: GuestThreads | undefined;
  /** The warm-up's scratch memory and peer: they stay until the end of the run (see warm-up.ts). */
  private warmUp: WarmUp | undefined;
  private warmUpDone: WarmUpDone | undefined;
  private watchdog: Watchdog | undefined;
  /** The watchdog runs while the guest does (a resume restarts it only then). */
  private watching = false;
  private status: Server | undefined;
  private readonly timers: NodeJS.Timeout[] = [];
  private memory: BackendMemory | undefined;
  /** The strategy's contexts, until released. */
  private contexts: StrategySetup | undefined;
  private startedAt: number | undefined;
  /** The guest's devices, in precopy modes (the source says which in device-setup). */
  private devices: DeviceReceiver | undefined;
  private setupStartedAt = 0;
  /** The accounting is done: connections that close now are the run's own wind-down. */
  private finishing = false;
  private keepaliveTimeouts = 0;
  /** --trace: what the main thread records for the timeline (the workers keep their own logs). */
  private readonly trace: MainLog | undefined;

  constructor(private readonly options: DestinationOptions) {
    this.trace = options.trace === true ? new MainLog() : undefined;
    this.drops = new DropInjector(options.injectDrops, options.injectPostcopyDrops);
    this.endpoint = {
      url: options.source,
      token: options.token,
      guestBytes: options.layout.guestBytes,
      pageSize: options.layout.pageSize,
      connectTimeoutMs: options.connectTimeoutMs,
      reconnectTimeoutMs: options.reconnectTimeoutMs,
      faultChannel: faultChannelOf(options),
      // None yet: the main channel asks for a new migration and gets its secret in the welcome.
      secret: '',
      ...(options.tls ? { tls: options.tls } : {}),
    };
  }

  async run(): Promise<DestinationResult> {
    this.setupStartedAt = performance.now();
    try {
      await this.connect();
      this.createGuest();
      await this.serveStatus();
      this.openMainChannel();
      // Before start: precopy's rounds go on it too. The source's SYNC
      // barrier keeps precopy's records from being overtaken by the main
      // channel's discard and switchover, and it pushes postcopy's pages
      // there only once we said `running` (after our switchover).
      await this.openPush();
      await this.startThreads();
      this.lowerPushPriority();
      await this.start();
      const results = await this.runGuest();
      const wound = await this.windDown();
      return await this.account(results, wound);
    } catch (err) {
      this.lifecycle.fail();
      throw err;
    } finally {
      await this.close();
    }
  }

  // ------------------------------------------------------------ setup

  private connectMain(): Promise<PageClient> {
    const keepaliveMs = this.options.keepaliveMs;
    return PageClient.connect({
      ...this.endpoint,
      role: ChannelRole.Main,
      channel: 'main',
      keepaliveMs,
      onKeepaliveTimeout: (silentMs) => {
        this.keepaliveTimeouts++;
        this.options.onEvent?.(`the source said nothing for ${Math.round(silentMs)} ms on the main channel (--keepalive-ms ${keepaliveMs}): treating the connection as lost`);
      },
    });
  }

  /** The main channel: the source's welcome says the mode and gives the migration's secret. */
  private async connect(): Promise<void> {
    this.main = await this.connectMain();
    this.welcome = this.main.welcome;
    // Every later channel (fault channels, a main channel that resumes) shows it.
    this.endpoint.secret = this.welcome.secret;
  }

  /** Guest memory on the chosen backend, the strategy's contexts, and what installs pages. */
  private createGuest(): void {
    const { options } = this;
    const { layout } = options;
    const plan: ThreadPlan = {
      vcpus: options.vcpus,
      ioThreads: options.ioThreads,
      readers: options.readers,
      vcpuSlot: (v) => v,
      ioSlot: (i) => options.vcpus + i,
    };
    // Precopy modes keep slots for the devices' DMA threads: the source names the devices only after start.
    const threadCount = options.vcpus + options.ioThreads + (this.precopyMode ? MAX_DEVICES : 0);
    const memory = BACKEND_BY_NAME[options.memoryBackend].create({ layout, memslotBytes: options.memslotBytes, maxThreads: threadCount, maxContexts: this.contextSlots });
    this.memory = memory;
    const vmm = VmmState.create(layout.totalPages, threadCount, this.trace !== undefined);
    const fault = STRATEGY_BY_NAME[options.strategy];
    const setup = fault.setup(memory, plan, layout.totalPages);
    this.contexts = setup;
    if (options.skipOwedWake) for (const r of setup.resolvers) r.owesWake = false;
    const installer = new PageInstaller(memory, vmm, setup.ranges);
    const receiver = new PrecopyReceiver(memory, vmm, installer, options.skipDiscard === true);
    this.guest = { memory, vmm, fault, plan, threadCount, installer, receiver };
  }

  /** Contexts guest memory may open over its life (one per vCPU at most, and two more), the warm-up's alike. */
  private get contextSlots(): number {
    return this.options.vcpus + 2;
  }

  private get precopyMode(): boolean {
    return this.welcome.mode !== 'postcopy';
  }

  private async serveStatus(): Promise<void> {
    const { options, guest } = this;
    if (options.statusPort === undefined) return;
    this.status = await startStatusServer(
      options.statusPort,
      {
        state: () => this.lifecycle.state,
        vmm: guest.vmm,
        totalPages: options.layout.totalPages,
        pageSize: options.layout.pageSize,
        vcpus: options.vcpus,
        threads: guest.threadCount,
        now: () => performance.now(),
        startedAt: () => this.startedAt,
        round: () => guest.receiver.round,
        devices: () => (this.devices?.devices ?? []).map((d) => ({ name: d.a.name, type: d.a.type, uuid: d.uuid, state: stateName(d.fsm.state) })),
      },
      options.statusHost,
    );
    options.onStatusUrl?.((this.status as Server & { url: string }).url);
  }

  /** What comes on the main channel (run/main-channel.ts), and recovery when it is lost. */
  private openMainChannel(): void {
    const { options, guest } = this;
    const { vmm } = guest;
    if (this.precopyMode) {
      this.devices = new DeviceReceiver({
        catalog: options.mdevCatalog ?? DEFAULT_MDEV_CATALOG,
        imageSeed: this.welcome.imageSeed,
        send: (m) => this.main!.send(m),
        fail: (err) => this.abort.fail(err),
        installed: () => vmm.counter(COUNTER.INSTALLED),
        addDeviceThreads: (devices) => this.threads!.addDevices(devices.map((d) => ({ ...d, slot: options.vcpus + options.ioThreads + d.index })), !options.skipOwedWake),
        onReady: (uuids) => options.onEvent?.(`devices: ${this.devices!.devices.map((d, i) => `${d.a.name} is mdev ${d.a.type} ${uuids[i]}`).join(', ')} (RESUMING)`),
      });
    }
    this.channel = new MainChannel({
      totalPages: options.layout.totalPages,
      pageSize: options.layout.pageSize,
      vmm,
      installer: guest.installer,
      precopy: guest.receiver,
      lifecycle: this.lifecycle,
      fail: (err) => this.abort.fail(err),
      onSwitchover: (postcopy) => {
        options.onEvent?.(`switchover: the guest stopped on the source; ${postcopy ? `postcopy begins (${vmm.counter(COUNTER.DISCARDED)} pages discarded)` : 'every page is here'}`);
        // A push channel that could not be opened before start: another try (the source pushes on the main channel until it is there).
        if (postcopy && this.push === undefined) void this.openPush();
      },
      afterPush: () => this.maybeInjectDrop(),
      ...(this.devices ? { devices: this.devices } : {}),
      ...(this.trace ? { trace: this.trace } : {}),
    });
    this.adoptMain(this.main!);
    this.session = new Session(vmm.counters);
    this.recovery = new Recovery({
      session: this.session,
      connectMain: () => this.connectMain(),
      imageDigest: this.welcome.imageDigest,
      resumeMessage: () => ({
        type: 'resume',
        push: options.push,
        preempt: options.preempt,
        receivedmap: bitmapOf(vmm, options.layout.totalPages, PAGE.RECEIVED).map,
        requestedmap: bitmapOf(vmm, options.layout.totalPages, PAGE.REQUESTED).map,
      }),
      adopt: (client) => this.adoptMain(client),
      onPause: (reason) => {
        this.lifecycle.pause();
        this.main?.terminate();
        // Before the receivedmap snapshot: the pages of a record it was in the middle of go back to missing.
        this.cutPush();
        this.watchdog?.stop();
        this.channel.forgetComplete();
        options.onEvent?.(`connection lost (${reason}): postcopy paused after ${vmm.counter(COUNTER.INSTALLED)} pages installed; reconnecting`);
      },
      onResume: (resumed, pausedMs) => {
        this.lifecycle.resume();
        void this.openPush();
        if (this.watching) this.watchdog?.start();
        options.onEvent?.(
          `resumed after ${Math.round(pausedMs)} ms${resumed.restarted ? ' (source restarted)' : ''}: the source marked ${resumed.pagesMarkedUnsent} pages lost on the way as unsent`,
        );
      },
      fail: (err) => this.abort.fail(err),
      reconnectTimeoutMs: options.reconnectTimeoutMs,
      answerTimeoutMs: options.connectTimeoutMs,
      now: () => performance.now(),
    });
  }

  /**
   * Whether pushed pages, and precopy's pages, come on a push channel: push
   * on or a precopy mode, and no emulated link (the source applies it to
   * WebSockets only), unless --no-push-channel. Over TLS too: the channel
   * then runs over TLS with the other channels' options.
   */
  private get wantsPushChannel(): boolean {
    const { options, welcome } = this;
    return (options.push || this.precopyMode) && options.pushChannel !== false && welcome.linkDelayUs === 0 && welcome.linkBandwidthBps === 0;
  }

  /**
   * Opens the push channel (at the start, and after each resume): from its
   * welcome on the source pushes there. If it cannot be opened, the source
   * keeps pushing on the main channel, which is slower but loses nothing.
   */
  private async openPush(): Promise<void> {
    if (!this.wantsPushChannel || this.finishing) return;
    const { options } = this;
    const epoch = this.session.epoch;
    const placement = this.guardedPlacement();
    try {
      const client = await PushClient.connect({
        url: options.source,
        ...(options.tls ? { tls: options.tls } : {}),
        token: options.token,
        secret: this.endpoint.secret,
        layout: options.layout,
        channel: 'push0',
        connectTimeoutMs: options.connectTimeoutMs,
        placement,
        ...(this.precopyMode ? { precopy: this.precopyPlacement() } : {}),
        onClose: (err) => {
          if (this.push !== client) return;
          this.push = undefined;
          if (this.finishing || epoch !== this.session.epoch) return;
          this.connectionLost('push channel', err);
        },
      });
      if (this.finishing || epoch !== this.session.epoch || this.abort.error) {
        client.cut();
        return;
      }
      this.push = client;
      this.pushChannelsOpened++;
    } catch (err) {
      options.onEvent?.(`push channel: ${(err as Error).message}; pushing on the main channel instead`);
    }
  }

  /**
   * With preempt the main thread carries pushed pages and control messages
   * only: every fault's reply comes on its resolver's (or vCPU's) own
   * channel. On two cores a push that keeps this thread busy leaves a
   * waking resolver waiting for a core, so an urgent fault waits behind
   * the push after all (issue 9: kvm-exit, random, 256 MiB: p50 150-276 µs
   * under push against 34 idle; 56-90 µs with this thread at nice 10, push
   * 5-10% slower). So the main thread steps back to `pushNice`, once the
   * guest threads are started (Linux threads inherit the nice value of
   * the thread that creates them, and setpriority of the calling thread
   * applies to that thread alone). Not in precopy modes (device threads
   * start later) nor without preempt (requested pages come here then).
   */
  private lowerPushPriority(): void {
    const nice = this.options.pushNice ?? 0;
    if (nice <= 0 || !this.options.push || !this.options.preempt || this.precopyMode || process.platform !== 'linux') return;
    try {
      setPriority(0, nice);
    } catch (err) {
      this.options.onEvent?.(`--push-nice ${nice}: could not lower the main thread's priority (${(err as Error).message}); going on without`);
    }
  }

  /**
   * Where precopy's records on the push channel go: only before the
   * switchover (the run fails otherwise), each SYNC acknowledged on the main
   * channel once everything before it is placed (the source's barrier).
   */
  private precopyPlacement(): PrecopyPushPlacement {
    const channel = this.channel;
    return precopyPushPlacement(this.guest.installer, this.guest.receiver, {
      round: (round) => {
        if (!channel.expectPrecopyRecords()) throw new Error(`precopy pages of round ${round} on the push channel after the switchover`);
      },
      synced: (seq) => {
        if (!channel.expectPrecopyRecords()) throw new Error(`a precopy SYNC on the push channel after the switchover`);
        this.main?.send({ type: 'precopy-synced', seq });
      },
      placed: () => this.maybeInjectDrop(),
      fail: (err) => this.abort.fail(err),
    });
  }

  /** The placement for the installer's backend, refusing pushed pages before the switchover. */
  private guardedPlacement(): PushPlacement {
    const channel = this.channel;
    const trace = this.trace;
    const inner = pushPlacement(this.guest.installer, {
      installed: (pages) => channel.pushedInstalled(pages),
      zero: (page) => channel.pushedZero(page),
      fail: (err) => this.abort.fail(err),
    });
    return {
      claim: (first, count) => {
        if (!channel.expectPushed()) throw new Error(`pushed pages from ${first} before the switchover`);
        return inner.claim(first, count);
      },
      commit: trace
        ? (claim, first, pages) => {
            const t0 = performance.now();
            inner.commit(claim, first, pages);
            // A slice from the last bytes' arrival to the install (the read itself is the kernel's).
            trace.install(MAIN_KIND.PUSHED, first, pages, t0, performance.now());
          }
        : (claim, first, pages) => inner.commit(claim, first, pages),
      release: (claim, first, pages) => inner.release(claim, first, pages),
      zero: (first, count) => {
        if (!channel.expectPushed()) throw new Error(`pushed zero pages from ${first} before the switchover`);
        inner.zero(first, count);
      },
    };
  }

  private cutPush(): void {
    const push = this.push;
    this.push = undefined;
    push?.cut();
  }

  private adoptMain(client: PageClient): void {
    this.main = client;
    client.onMessage = (m) => this.channel.onMessage(m);
    client.onClose = (err) => {
      if (this.finishing || client !== this.main) return;
      // A lost connection pauses the migration (or cancels it before the switchover); a source that broke the protocol fails it.
      this.connectionLost('main channel', err ?? new ConnectionError('the main channel to the source closed'));
    };
  }

  /** A lost connection: before the switchover the migration is cancelled (the guest never left); after it, it pauses. */
  private connectionLost(what: string, err: Error): void {
    // The run has failed already (what closes now is its own wind-down).
    if (this.abort.error) return;
    if (!(err instanceof ConnectionError) || this.startedAt === undefined) {
      this.abort.fail(err);
    } else if (!this.lifecycle.switchedOver) {
      this.lifecycle.cancel();
      this.abort.fail(new ConnectionError(`the connection to the source was lost during precopy (${what}: ${err.message}): the migration is cancelled, and the guest stays on the source`));
    } else {
      this.recovery.lost(`${what}: ${err.message}`);
    }
  }

  /** Fault injection: a drop that is due goes off (a cancel before the switchover, a pause after it). */
  private maybeInjectDrop(): void {
    if (this.drops.asked === 0 || this.recovery.paused || this.startedAt === undefined || this.finishing || this.abort.error) return;
    const reason = this.drops.due(this.guest.vmm, this.lifecycle.switchedOver);
    if (reason === undefined) return;
    if (this.lifecycle.switchedOver) this.recovery.lost(reason);
    else {
      this.main?.terminate();
      this.connectionLost('main channel', new ConnectionError(reason));
    }
  }

  /** Polls the drops (pages installed by vCPU and resolver threads are not seen on the main thread). */
  private pollDrops(): NodeJS.Timeout | undefined {
    if (this.drops.asked === 0) return undefined;
    const timer = setInterval(() => this.maybeInjectDrop(), 2);
    timer.unref();
    this.timers.push(timer);
    return timer;
  }

  /** The worker threads: each connects and binds before the migration starts. */
  private async startThreads(): Promise<void> {
    const { options, guest, welcome } = this;
    const shared: SharedState = {
      memory: guest.memory.handle,
      vmm: guest.vmm.buffers,
      image: { seed: welcome.imageSeed, zeroFraction: welcome.zeroFraction },
      // A guest that ran on the source changed each page's counter word: the first-touch check skips it.
      ignoreWord: this.precopyMode ? counterWord(options.layout.pageSize) : -1,
      epochOrigin: performance.timeOrigin,
    };
    const warm = await this.startWarmUp(shared);
    this.threads = new GuestThreads({
      strategy: options.strategy,
      fault: guest.fault,
      plan: this.contexts!,
      threads: guest.plan,
      shared,
      endpoint: this.endpoint,
      workload: {
        name: options.workload,
        totalPages: options.layout.totalPages,
        vcpus: options.vcpus,
        seed: options.seed,
        accesses: options.accesses,
        writeFraction: options.writeFraction,
      },
      ioAccesses: options.ioAccesses,
      abort: this.abort,
      onChannelLost: (label, message, epoch) => {
        // A fault channel's connection dropped in the current session: pause and recover (or cancel, or fail).
        if (epoch !== this.session.epoch || this.finishing) return;
        this.connectionLost(label, new ConnectionError(message));
      },
      trace: this.trace !== undefined,
      ...(warm ? { warmUp: warm.plans } : {}),
    });
    if (warm !== undefined) {
      const started = performance.now();
      this.warmUpDone = await this.threads.warmUp(warm.watchdogs(this.threads.watched(), this.options.watchdogMs, (err) => this.abort.fail(err)));
      // No thread faults on it any more; the peer and the memory go at the end (see warm-up.ts).
      warm.releaseContexts();
      this.trace?.phase('warm-up (the fault path on scratch memory)', started, performance.now());
    }
    await this.threads.ready();
    this.watchdog = new Watchdog(guest.vmm, guest.memory, this.threads.watched(), options.watchdogMs, () => performance.now(), (err) => this.abort.fail(err));
  }

  /** The warm-up's scratch memory and peer (warm-up/warm-up.ts), unless --warm-up-pages 0. */
  private async startWarmUp(shared: SharedState): Promise<WarmUp | undefined> {
    const { options, guest } = this;
    if (options.warmUpPages <= 0) return undefined;
    this.warmUp = await WarmUp.start({
      pagesPerVcpu: options.warmUpPages,
      guestPages: options.layout.totalPages,
      backend: options.memoryBackend,
      pageSize: options.layout.pageSize,
      memslotBytes: options.memslotBytes,
      fault: guest.fault,
      plan: guest.plan,
      threadCount: guest.threadCount,
      maxContexts: this.contextSlots,
      image: shared.image,
      ignoreWord: shared.ignoreWord,
      workload: { name: options.workload, seed: options.seed, writeFraction: options.writeFraction },
      endpoint: this.endpoint,
      trace: this.trace !== undefined,
    });
    return this.warmUp;
  }

  // ------------------------------------------------------------ the migration

  /** `start`: precopy rounds first (until the source's switchover), or postcopy at once. */
  private async start(): Promise<void> {
    const { options, guest } = this;
    this.startedAt = performance.now();
    this.trace?.phase('setup (main channel, guest memory, threads connect)', this.setupStartedAt, this.startedAt);
    this.trace?.startSampling(guest.vmm);
    this.lifecycle.start(this.precopyMode);
    this.main!.send({ type: 'start', push: options.push, preempt: options.preempt });
    if (options.onProgress) {
      const onProgress = options.onProgress;
      const faults = (): number => {
        let n = 0;
        for (let t = 0; t < guest.threadCount; t++) n += guest.vmm.faultsOf(t);
        return n;
      };
      const timer = setInterval(() => onProgress(guest.vmm.counter(COUNTER.INSTALLED), options.layout.totalPages, faults()), 200);
      timer.unref();
      this.timers.push(timer);
    }
    if (!this.precopyMode) return;
    // The guest runs on the source meanwhile; ours starts at the switchover.
    const poll = this.pollDrops();
    try {
      await this.abort.race(this.channel.switchover.promise);
    } finally {
      clearInterval(poll);
    }
    this.trace?.phase('precopy (the guest runs on the source)', this.startedAt, performance.now());
    this.main!.send({ type: 'running' });
  }

  /** The guest runs here until every vCPU and I/O thread is done, and (with push) every page is in. */
  private async runGuest(): Promise<{ vcpuResults: GuestThreadResult[]; ioResults: GuestThreadResult[]; deviceResults: GuestThreadResult[]; elapsedMs: number; cpu: CpuSpent }> {
    const started = performance.now();
    // CPU of postcopy (this thread's and the whole process's): the report's CPU per fault.
    const cpuMeter = new CpuMeter();
    this.watchdog!.start();
    this.watching = true;
    this.pollDrops();
    const results = await this.threads!.run();
    const guestDone = performance.now();
    this.trace?.phase('postcopy: the guest runs', started, guestDone);
    if (this.options.push) {
      // The main thread re-checks on every page it installs and on complete.
      // The last page may instead be a requested page installed by a vCPU or
      // resolver thread after complete arrived: poll for that case.
      const poll = setInterval(() => this.channel.checkInstalled(), 5);
      try {
        await this.abort.race(this.channel.installedAll);
      } finally {
        clearInterval(poll);
      }
      this.trace?.phase('postcopy: the push brings the rest', guestDone, performance.now());
    }
    return { ...results, elapsedMs: performance.now() - started, cpu: cpuMeter.spent() };
  }

  /**
   * Resolvers stop reading and finish their in-flight requests; only then
   * are the contexts unregistered and closed (on the kernel an install on a
   * closed context is EBADF). Returns the threads still blocked (none) and
   * each resolver's CPU over the run.
   */
  private async windDown(): Promise<{ blocked: string[]; resolvers: ResolverEnd[] }> {
    const started = performance.now();
    const resolvers = await this.threads!.stopResolvers();
    this.releaseContexts();
    this.watching = false;
    this.watchdog!.stop();
    // A drop whose threshold was reached goes off before the end (drop@N with N up to every page).
    this.maybeInjectDrop();
    for (const t of this.timers.splice(0)) clearInterval(t);
    this.trace?.stopSampling(this.guest.vmm);
    this.trace?.phase('wind-down (resolvers finish, contexts close)', started, performance.now());
    return { blocked: this.watchdog!.blocked(), resolvers };
  }

  /** The exactly-once accounting with the source, the memory's digest (and, when it differs, which pages), the report. */
  private async account(results: Awaited<ReturnType<DestinationRun['runGuest']>>, { blocked, resolvers }: Awaited<ReturnType<DestinationRun['windDown']>>): Promise<DestinationResult> {
    const { options, guest, welcome } = this;
    const accountStarted = performance.now();
    const { layout } = options;
    const { vmm } = guest;
    const { summary, received } = await exchangeSummary({ main: () => this.main!, channel: this.channel, vmm, totalPages: layout.totalPages, recovery: this.recovery, abort: this.abort });
    // Received pages only: on uffd a missing page would block this thread in the kernel.
    const pages = new GuestPages(guest.memory);
    // On every core (run/digest.ts); not raced with the abort: it ends by
    // itself, and no helper may still read guest memory when close() unmaps it.
    const destDigest = await digestReceived(guest.memory, vmm, layout);
    // The digests differ: which pages, and who sent them last?
    const digestMismatch =
      destDigest !== summary.digestOfReceived ? await namePagesThatDiffer({ main: this.main!, channel: this.channel, pages, vmm, totalPages: layout.totalPages, abort: this.abort }) : undefined;
    this.finishing = true;
    this.cutPush();
    this.lifecycle.finish();
    // The run is over: the mdev instances go (before the report, which says so).
    this.devices?.destroy();
    const recovery = this.recovery;
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
      memslots: guest.memory.memslots.count,
      push: options.push,
      seed: options.seed,
      elapsedMs: results.elapsedMs,
      vcpuResults: results.vcpuResults,
      ioResults: results.ioResults,
      deviceResults: results.deviceResults,
      destDevices: (this.devices?.devices ?? []).map((d) => ({ name: d.a.name, uuid: d.uuid, statePath: [...d.fsm.path], digestMatch: d.digestMatch })),
      deviceRestoreMs: this.devices?.restoreMs ?? 0,
      vmm,
      summary,
      imageDigest: welcome.imageDigest,
      destDigest,
      ...(digestMismatch !== undefined ? { digestMismatch } : {}),
      allReceived: received === layout.totalPages,
      blocked,
      cpu: { dest: { processUs: results.cpu.processUs, mainThreadUs: results.cpu.threadUs }, resolvers: resolvers.map((r) => r.cpuUs) },
      preempt: options.preempt,
      faultChannel: this.endpoint.faultChannel,
      warmUp: {
        faults: this.warmUpDone?.faults ?? 0,
        ms: Math.round(this.warmUpDone?.ms ?? 0),
        rounds: this.warmUpDone?.rounds ?? 0,
        sourceRequests: summary.warmUpRequests,
        sourceMs: summary.warmUpMs,
      },
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
        dropsInjected: this.drops.injected,
        sourceRestarts: recovery.sourceRestarts,
        pausedMs: Math.round(recovery.pausedMs * 1000) / 1000,
        keepaliveMs: options.keepaliveMs,
        keepaliveTimeouts: this.keepaliveTimeouts,
        sourceKeepaliveTimeouts: summary.keepaliveTimeouts,
      },
    });
    const report = built.report as Report;
    this.trace?.phase('accounting (summary, digests)', accountStarted, performance.now());
    const timeline = this.trace ? this.timeline(this.trace, report, results, resolvers) : undefined;
    return { report, hgrm: built.histogram.outputPercentileDistribution(5, 1000), ...(timeline ? { timeline } : {}) };
  }

  /** --trace: the run as a timeline, from every thread's log (trace/timeline.ts). */
  private timeline(main: MainLog, report: Report, results: Awaited<ReturnType<DestinationRun['runGuest']>>, resolvers: ResolverEnd[]): Timeline {
    const { options, guest } = this;
    const threads = [
      ...results.vcpuResults.map((result, v) => ({ name: `vCPU ${v}`, slot: guest.plan.vcpuSlot(v), result })),
      ...results.ioResults.map((result, i) => ({ name: `I/O thread ${i}`, slot: guest.plan.ioSlot(i), result })),
      ...results.deviceResults.map((result, d) => ({ ...this.threads!.deviceThreads[d]!, result })),
    ];
    return buildTimeline({
      pid: process.pid,
      title: `postcopy destination: ${options.strategy} on ${options.memoryBackend}, ${options.vcpus} vCPUs`,
      pageSize: options.layout.pageSize,
      threads,
      resolvers: resolvers.map((r) => {
        if (!r.trace) throw new Error(`expected ${r.label}'s log of fault messages (it ran without --trace)`);
        return { label: r.label, owesWake: r.owesWake, trace: r.trace };
      }),
      origins: guest.vmm.origins!,
      main,
      pauses: this.recovery.spans,
      otherData: {
        tool: 'postcopy destination',
        clock: "ms since the destination process's performance.timeOrigin, shown in µs",
        strategy: options.strategy,
        memoryBackend: options.memoryBackend,
        mode: report.mode,
        workload: options.workload,
        vcpus: options.vcpus,
        ioThreads: options.ioThreads,
        push: options.push,
        preempt: options.preempt,
        pageSize: options.layout.pageSize,
        totalPages: options.layout.totalPages,
        faults: report.counters.faults,
        verified: report.verified,
      },
    });
  }

  // ------------------------------------------------------------ the end, whatever happened

  /**
   * Unregisters and closes the strategy's contexts, once. Every thread still
   * blocked in one of their faults wakes and reads a zero page that was never
   * installed: after this nothing may be verified that a thread read then.
   * The normal end calls it only once every guest thread has finished and
   * every resolver has stopped; the failing ends call it so that those
   * threads can exit.
   */
  private releaseContexts(): void {
    const memory = this.memory;
    const setup = this.contexts;
    if (memory === undefined || setup === undefined) return;
    releaseSetup(memory, setup);
    this.contexts = undefined;
  }

  private async close(): Promise<void> {
    // Whatever happened, no mdev instance outlives the run.
    if (this.devices && !this.devices.destroyed) this.devices.destroy();
    this.status?.close();
    this.watchdog?.stop();
    for (const t of this.timers.splice(0)) clearInterval(t);
    this.cutPush();
    this.main?.close();
    // Threads blocked in a real fault cannot be terminated: closing their
    // contexts wakes them (on zero pages: this run reports nothing).
    this.releaseContexts();
    // The same for the warm-up's scratch memory (a run that failed during it).
    this.warmUp?.releaseContexts();
    const workers = this.threads?.workers ?? [];
    const exited = await Promise.race([Promise.all(workers.map((w) => w.terminate())).then(() => true), sleep(WORKER_EXIT_MS).then(() => false)]);
    await this.warmUp?.closePeer();
    // Unmapping memory a thread still runs on would kill the process: a thread
    // that did not exit keeps it mapped until the process ends.
    if (exited) {
      this.memory?.dispose();
      this.warmUp?.dispose();
    }
  }
}

/**
 * The fault channel threads that block on their fault use: `auto` is
 * blocking where a BlockingPageChannel can serve the source (the uffd addon
 * built; over wss:// given --tls-ca); asking for `blocking` where it cannot is an error.
 */
export function faultChannelOf(options: Pick<DestinationOptions, 'faultChannel' | 'source' | 'tls'>): FaultChannelKind {
  const choice = options.faultChannel ?? 'auto';
  if (choice === 'event-loop') return choice;
  const why = BlockingPageChannel.unavailable({ url: options.source, ...(options.tls ? { tls: options.tls } : {}) });
  if (why === undefined) return 'blocking';
  if (choice === 'blocking') throw new UsageError(`--fault-channel blocking: ${why}; use --fault-channel event-loop or auto`);
  return 'event-loop';
}
