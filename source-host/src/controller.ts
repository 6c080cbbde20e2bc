/**
 * What the source does in each phase of the migration (the transitions of
 * lifecycle.ts, and their actions): start (precopy rounds with the guest
 * running here, or postcopy at once), the switchover (stop the guest, the
 * last pages or the discard set, then postcopy or the destination runs),
 * postcopy's requests and push (migration.ts), a lost main channel (cancel
 * before the switchover, pause after it), resume, and finish.
 *
 * The server (server.ts) owns the connections and who may join; it hands the
 * main channel's commands here.
 */
import { EventEmitter } from 'node:events';
import {
  CpuMeter,
  PostcopyError,
  ProtocolError,
  encode,
  noDevicesSummary,
  pageHashes,
  type DevicesSummary,
  type ErrorMessage,
  type MigrationMode,
  type MigrationSummary,
  type Resume,
  type SourceSummary,
  type Start,
} from '@postcopy/shared';
import { DirtyLog } from './dirty-log.js';
import { DeviceRefusedError } from './devices/options.js';
import { SourceDevices, type SourceDevicesOptions } from './devices/source-devices.js';
import { SourceGuest, type SourceGuestOptions } from './guest/source-guest.js';
import type { GuestImage } from './image.js';
import { SourceLifecycle, type SourceState } from './lifecycle.js';
import { SourceMigration, type Channel, type MigrationOptions, type PushStream } from './migration.js';
import { SOURCE_GUEST_DEFAULTS, PRECOPY_DEFAULTS } from './defaults.js';
import { NotConvergedError, Precopy, PrecopyCancelledError, postcopyOnlySummary, type PrecopyOptions, type PrecopyProgress } from './precopy.js';

export interface ControllerOptions {
  mode: MigrationMode;
  migration?: Partial<MigrationOptions>;
  /** Precopy's decisions (downtime limit, rounds, auto-converge, when hybrid switches). */
  precopy?: Partial<Omit<PrecopyOptions, 'mode'>>;
  /** The guest running on the source during precopy (its vCPUs, how fast and where they write). */
  guest?: Partial<SourceGuestOptions>;
  /** Testing only: the dirty log forgets every Nth dirty bit at a sync (the content check must catch it). */
  loseDirtyBitsEvery?: number;
  /** The guest's assigned devices (precopy modes only): what they are, who tracks their DMA, the untracked-DMA policy. */
  devices?: SourceDevicesOptions;
  /** This process replaces a source that died (`--resume`). */
  restarted: boolean;
  resumeTimeoutMs: number;
}

export { SOURCE_GUEST_DEFAULTS } from './defaults.js';

/**
 * Events:
 * - `paused` (reason), `resumed` (pagesMarkedUnsent, restarted): recovery;
 * - `destination-lost` (reason): the destination is gone for good;
 * - `cancelled` (reason): the connection was lost before the switchover: the guest stays here;
 * - `failed` (error): precopy did not converge (or the guest failed);
 * - `switchover` (postcopy, discardPages), `running` (downtimeMs);
 * - `finished` (summary);
 * - `state` (to, from, reason): every transition.
 */
export class MigrationController extends EventEmitter {
  readonly lifecycle: SourceLifecycle;
  readonly migration: SourceMigration;
  private readonly dirtyLog: DirtyLog | undefined;
  private readonly guest: SourceGuest | undefined;
  private readonly precopy: Precopy | undefined;
  /** The guest's devices (none in postcopy mode). */
  readonly devices: SourceDevices | undefined;
  /** The destination's main channel now (undefined while paused or before a hello). */
  main: Channel | undefined;
  private startedAt: number | undefined;
  private stoppedAt: number | undefined;
  private resumeTimer: NodeJS.Timeout | undefined;
  private pausedByRestart: boolean;
  private closing = false;
  private push = false;
  /** The push channel precopy's rounds may use (opened before start); in hybrid postcopy's push takes it once the destination runs. */
  private precopyStream: PushStream | undefined;
  /** The switchover went to postcopy. */
  private postcopySwitched = false;
  /** The guest's vCPUs on the source, started with the source (the guest runs before the migration does). */
  private guestStarted: Promise<void> | undefined;
  /**
   * The source's CPU spent on postcopy: from start (a hybrid run: from its
   * switchover to postcopy; a restarted source: from its first resume) to
   * finish. A precopy run's covers the whole migration.
   */
  private cpu: CpuMeter | undefined;

  constructor(
    readonly image: GuestImage,
    readonly options: ControllerOptions,
  ) {
    super();
    this.lifecycle = new SourceLifecycle(options.restarted);
    this.lifecycle.on('state', (...args: unknown[]) => this.emit('state', ...args));
    this.migration = new SourceMigration(image, options.migration);
    this.pausedByRestart = options.restarted;
    if (options.mode !== 'postcopy') {
      const { totalPages } = image.layout;
      this.dirtyLog = new DirtyLog(totalPages, undefined, { loseEvery: options.loseDirtyBitsEvery ?? 0 });
      this.guest = new SourceGuest(image, this.dirtyLog, {
        vcpus: options.guest?.vcpus ?? SOURCE_GUEST_DEFAULTS.vcpus,
        dirtyRate: options.guest?.dirtyRate ?? SOURCE_GUEST_DEFAULTS.dirtyRate,
        dirtySetPages: options.guest?.dirtySetPages ?? totalPages,
      });
      if (options.devices && options.devices.specs.length > 0) this.devices = new SourceDevices(image, options.devices);
      this.precopy = new Precopy(image, this.dirtyLog, this.guest, this.migration.phases, { ...options.precopy, mode: options.mode }, this.devices);
      // The devices run with the guest, from the start.
      const onError = (err: Error): void => this.precopyFailed(err);
      this.guestStarted = Promise.all([this.guest.start(onError), this.devices?.start(onError)]).then(() => {});
      this.guestStarted.catch(() => {});
    }
    if (options.restarted) this.startResumeTimer();
  }

  get mode(): MigrationMode {
    return this.options.mode;
  }

  get state(): SourceState {
    return this.lifecycle.state;
  }

  /** Precopy's progress (GET /status), while it runs. */
  progress(): PrecopyProgress | undefined {
    return this.precopy?.progress();
  }

  /** Dirty bits the testing-only fault dropped. */
  get dirtyBitsLost(): number {
    return this.dirtyLog?.lost ?? 0;
  }

  // ------------------------------------------------------------ commands

  /** `start` on the main channel. */
  start(main: Channel, message: Start): void {
    if (this.lifecycle.isPaused) throw new ProtocolError(`expected resume: the migration is paused (${this.pauseCause()})`);
    if (this.state !== 'setup' || this.startedAt !== undefined) throw new ProtocolError(`expected start once, got it again (the migration is ${this.state})`);
    this.startedAt = performance.now();
    this.cpu ??= new CpuMeter();
    this.main = main;
    this.push = message.push;
    this.migration.preempt = message.preempt;
    if (!this.precopy) {
      this.lifecycle.start(false);
      this.migration.mainChannel = main;
      if (message.push) this.migration.startPush(main);
      return;
    }
    if (this.devices) {
      // QEMU's setup state: the destination re-creates the devices before anything moves.
      void this.setUpDevices(main, this.devices).catch((err: Error) => this.precopyFailed(err));
      return;
    }
    this.lifecycle.start(true);
    void this.runPrecopy(main).catch((err: Error) => this.precopyFailed(err));
  }

  private async setUpDevices(main: Channel, devices: SourceDevices): Promise<void> {
    await this.guestStarted;
    const uuids = await devices.announce(main);
    if (this.state !== 'setup' || this.main !== main) return;
    this.emit('devices-ready', uuids);
    this.lifecycle.start(true);
    await this.runPrecopy(main);
  }

  /** devices-ready and switchover-ack from the destination's main channel. */
  deviceAnswer(message: { type: 'devices-ready'; uuids: string[] } | { type: 'switchover-ack' }): void {
    const devices = this.devices;
    if (!devices) throw new ProtocolError(`expected no ${message.type} (this guest has no devices), got one`);
    try {
      if (message.type === 'devices-ready') {
        if (this.state !== 'setup' || !devices.awaitingReady) throw new Error(`expected devices-ready only in answer to device-setup, got it in state ${this.state}`);
        devices.devicesReady(message.uuids);
      } else {
        if (this.state !== 'active') throw new Error(`expected switchover-ack only during precopy, got it in state ${this.state}`);
        devices.switchoverAcked();
      }
    } catch (err) {
      throw new ProtocolError((err as Error).message);
    }
  }

  /**
   * The destination's push channel was admitted. Before the switchover of a
   * precopy mode it is precopy's (its pages, then, in hybrid, postcopy's
   * push once the destination runs: records on it must not overtake the
   * main channel's `switchover`); otherwise postcopy's push goes there.
   */
  attachPushStream(stream: PushStream): void {
    if (this.precopy && !this.postcopySwitched && (this.state === 'setup' || this.lifecycle.beforeSwitchover)) {
      this.precopyStream = stream;
      this.precopy.attachStream(stream);
      return;
    }
    this.migration.attachPushStream(stream);
  }

  /** A push channel closed: before the switchover, if precopy used it, the migration is cancelled (as for the main channel). */
  pushStreamClosed(stream: PushStream): void {
    this.migration.detachPushStream(stream);
    if (stream !== this.precopyStream) return;
    this.precopyStream = undefined;
    if (this.closing || this.lifecycle.ended || !this.lifecycle.beforeSwitchover || !this.precopy?.onPushChannel) return;
    this.cancel(`the destination's push channel closed during precopy`);
  }

  /** `precopy-synced` on the main channel: the destination placed everything up to SYNC `seq`. */
  precopySynced(seq: number): void {
    if (!this.precopy?.onPushChannel || !this.lifecycle.beforeSwitchover) {
      throw new ProtocolError(`expected precopy-synced only during precopy on a push channel, got it in a ${this.mode} migration in state ${this.state}`);
    }
    this.precopy.synced(seq);
  }

  /** An error from the destination: before the devices are set up, a refusal (nothing has moved). */
  peerError(message: ErrorMessage): void {
    const devices = this.devices;
    if (devices?.awaitingReady) {
      devices.refused(new DeviceRefusedError(`the destination refused the migration before any page was sent: ${message.message}`));
      return;
    }
    throw new ProtocolError(`expected request, start or finish, got error (the destination reported: ${message.message})`);
  }

  /** The user's migrate-start-postcopy: only a hybrid migration in precopy can switch. */
  startPostcopy(): { ok: true } | { ok: false; reason: string } {
    if (this.mode !== 'hybrid' || this.state !== 'active') {
      return { ok: false, reason: `expected a hybrid migration in precopy (active), got a ${this.mode} migration in state ${this.state}` };
    }
    this.precopy!.requestPostcopy();
    return { ok: true };
  }

  private async runPrecopy(main: Channel): Promise<void> {
    const precopy = this.precopy!;
    await this.guestStarted;
    const decision = await precopy.run(main, this.startedAt!);
    if (this.state !== 'active') return; // cancelled meanwhile
    this.lifecycle.switchover();
    const result = await precopy.switchover(main, decision);
    this.stoppedAt = result.stoppedAt;
    if ((this.state as SourceState) !== 'device' || this.main !== main) return;
    // Postcopy's exactly-once starts here: sent means sent in precopy and not dirtied since (precopy: every page).
    this.migration.sentmap.reset(result.sentForPostcopy);
    this.lifecycle.switched(decision.postcopy);
    // After the state (the destination's first requests may follow the switchover at once)
    // and before any pushed page (the destination takes none before it).
    main.send(encode({ type: 'switchover', postcopy: decision.postcopy }));
    // After the downtime: the devices' STOP_COPY -> STOP, dirty logging stops.
    this.devices?.cleanup();
    if (decision.postcopy) {
      this.postcopySwitched = true;
      // The CPU per fault is postcopy's: the precopy rounds (and the guest's own vCPUs here) are not the faults'.
      this.cpu = new CpuMeter();
      this.migration.mainChannel = main;
      if (this.push) this.migration.startPush(main);
    }
    this.emit('switchover', decision.postcopy, result.discardPages, decision.reason);
  }

  private precopyFailed(err: Error): void {
    if (this.lifecycle.ended) return;
    if (err instanceof PrecopyCancelledError) return; // mainLost() has cancelled already
    void this.guest?.close();
    this.devices?.abandon();
    void this.devices?.close();
    const reason = err instanceof NotConvergedError || err instanceof DeviceRefusedError ? err.message : `precopy failed: ${err.message}`;
    this.lifecycle.fail(reason);
    const main = this.main;
    if (main?.isOpen) main.send(encode({ type: 'error', code: (err as PostcopyError).code ?? 'ERR_POSTCOPY', message: reason }));
    this.emit('failed', err);
  }

  /** The destination's vCPUs run: the downtime ends. */
  running(): void {
    if (this.stoppedAt === undefined) throw new ProtocolError(`expected running only after a switchover, got it in a ${this.mode} migration in state ${this.state}`);
    if (this.precopy && this.precopy.downtimeMs === 0) {
      this.precopy.downtimeMs = performance.now() - this.stoppedAt;
      // Postcopy's push records may go on precopy's push channel now: the destination has taken the switchover.
      if (this.postcopySwitched && this.precopyStream?.isOpen) this.migration.attachPushStream(this.precopyStream);
      this.emit('running', this.precopy.downtimeMs);
    }
  }

  /** A request from a fault channel (or the main one). */
  request(channel: Channel, id: number, page: number): void {
    if (this.lifecycle.isPaused) throw new ProtocolError(`expected resume: the migration is paused, got a request`);
    if (this.lifecycle.beforeSwitchover) throw new ProtocolError(`expected no page requests before the switchover (the guest still runs on the source), got one for page ${page}`);
    void this.migration.request(channel, id, page);
  }

  /** `resume` on a main channel that presented the secret (server.ts checks). */
  resume(main: Channel, message: Resume): number {
    if (this.state === 'setup') {
      throw new ProtocolError(`expected start: this source has no migration to resume (start it with --resume to continue a migration whose source process died)`);
    }
    if (!this.lifecycle.isPaused) throw new ProtocolError(`expected resume only while the migration is paused, got it while it is ${this.state}`);
    const restarted = this.pausedByRestart;
    // A source restarted with --resume counts from its first resume.
    this.cpu ??= new CpuMeter();
    // Once the sentmap is reset and before the re-sent requested pages (on the
    // same channel): active again, and `resumed` goes out.
    const pagesMarkedUnsent = this.migration.resume(main, message, (n) => {
      this.lifecycle.resume();
      this.pausedByRestart = false;
      clearTimeout(this.resumeTimer);
      this.resumeTimer = undefined;
      this.main = main;
      main.send(encode({ type: 'resumed', pagesMarkedUnsent: n, restarted }));
    });
    this.emit('resumed', pagesMarkedUnsent, restarted);
    return pagesMarkedUnsent;
  }

  /** `finish`: once queued answers have gone out, the summary. */
  finish(main: Channel, receivedmap: Uint8Array, keepaliveTimeouts: () => number, warmUp: { requests: number; ms: number } = { requests: 0, ms: 0 }): void {
    if (this.lifecycle.isPaused) throw new ProtocolError(`expected resume: the migration is paused (${this.pauseCause()}), got finish`);
    if (this.lifecycle.beforeSwitchover || this.state === 'setup') throw new ProtocolError(`expected finish only once the guest runs on the destination, got it in state ${this.state}`);
    // The migration's CPU ends here: what follows (the digest of the received pages) is the check's.
    const cpu = (this.cpu ?? new CpuMeter()).spent();
    this.migration.stopPush();
    void this.migration.onIdle().then(async () => {
      // The connection was lost meanwhile: the destination resumes and finishes again.
      if (main !== this.main || !main.isOpen) return;
      const digestOfReceived = await this.migration.digestOfReceived(receivedmap);
      if (main !== this.main || !main.isOpen) return;
      const summary: SourceSummary = {
        ...this.migration.summarize(receivedmap, digestOfReceived),
        keepaliveTimeouts: keepaliveTimeouts(),
        warmUpRequests: warmUp.requests,
        warmUpMs: Math.round(warmUp.ms),
        migration: this.figures(),
        cpuUs: cpu.processUs,
        cpuMainThreadUs: cpu.threadUs,
        devices: this.deviceFigures(),
      };
      this.lifecycle.finish();
      clearTimeout(this.resumeTimer);
      main.send(encode({ type: 'summary', ...summary }));
      this.emit('finished', summary);
    });
  }

  /** The destination's digests differ from ours: every page's hash, and who sent it last. */
  hashRequest(main: Channel): void {
    main.send(encode({ type: 'page-hashes', hashes: pageHashes(this.image, this.image.layout.totalPages), phases: this.migration.phases }));
  }

  /** The devices' figures, and the downtime's RAM and device parts. */
  private deviceFigures(): DevicesSummary {
    const downtime = { ramMs: this.precopy?.switchoverRamMs ?? 0, deviceMs: this.precopy?.switchoverDeviceMs ?? 0 };
    return this.devices ? this.devices.summary(downtime) : { ...noDevicesSummary(), downtime: { ramMs: Math.round(downtime.ramMs * 1000) / 1000, deviceMs: 0 } };
  }

  private figures(): MigrationSummary {
    const total = this.startedAt === undefined ? 0 : performance.now() - this.startedAt;
    return this.precopy ? this.precopy.summary(total) : postcopyOnlySummary(total, this.options.precopy?.downtimeLimitMs ?? PRECOPY_DEFAULTS.downtimeLimitMs);
  }

  // ------------------------------------------------------------ the main channel

  /**
   * The destination's main channel closed (or the destination came back
   * with a new one: `takeover`). Before start the migration is lost; before
   * the switchover it is cancelled (the guest never left); after it, paused.
   */
  mainLost(reason: string): void {
    if (this.closing) return;
    this.main = undefined;
    if (this.lifecycle.ended) return;
    switch (this.state) {
      case 'setup':
        this.lose(`the destination's main channel closed before the migration started`);
        return;
      case 'active':
      case 'device':
        this.cancel(`the destination's main channel closed during precopy (${reason})`);
        return;
      case 'postcopy-active':
      case 'completed':
        this.lifecycle.pause(reason);
        this.pausedByRestart = false;
        this.migration.pause();
        this.emit('paused', reason);
        this.startResumeTimer();
        return;
      case 'postcopy-paused':
        // A resume attempt that dropped: still paused, the timer keeps running.
        return;
      default:
        return;
    }
  }

  /** QEMU's cancel: the guest runs on here again, nothing more goes out. */
  private cancel(reason: string): void {
    this.lifecycle.cancel(reason);
    this.migration.stop();
    // The guest keeps running on the source (it may have stopped for the switchover); it is ours still.
    void this.guest?.close();
    this.devices?.abandon();
    void this.devices?.close();
    this.emit('cancelled', `${reason}: the migration is cancelled and the guest stays on the source`);
  }

  private startResumeTimer(): void {
    clearTimeout(this.resumeTimer);
    const ms = this.options.resumeTimeoutMs;
    const restarted = this.pausedByRestart;
    this.resumeTimer = setTimeout(() => {
      if (!this.lifecycle.isPaused || this.closing) return;
      this.lose(
        restarted
          ? `this source was restarted with --resume and the destination did not resume the migration within ${ms} ms`
          : `the destination's connection was lost during postcopy and it did not resume within ${ms} ms`,
      );
    }, ms);
    this.resumeTimer.unref();
  }

  /** The destination is gone for good. */
  private lose(reason: string): void {
    clearTimeout(this.resumeTimer);
    this.devices?.refused(new PrecopyCancelledError(reason));
    this.lifecycle.fail(reason);
    this.migration.stop();
    this.emit('destination-lost', reason);
  }

  private pauseCause(): string {
    return this.pausedByRestart ? 'this source was started with --resume' : 'its connection was lost';
  }

  async close(): Promise<void> {
    this.closing = true;
    clearTimeout(this.resumeTimer);
    this.migration.stop();
    await this.guest?.close();
    await this.devices?.close();
  }
}
