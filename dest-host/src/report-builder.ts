import {
  LATENCY_DIST_BUCKETS,
  cpuFigures,
  threadAccounting,
  allBlockedMs,
  blockedMs,
  createLatencyHistogram,
  latencyBucket,
  recordNs,
  summarize,
  type CheckResult,
  type DeviceReport,
  type Histogram,
  type Counters,
  type Report,
  type SourceSummary,
} from '@postcopy/shared';
import type { GuestThreadResult } from './workers/protocol.js';
import { COUNTER, type VmmState } from './vmm/state.js';

/** The run's settings, as the report states them. */
type RunSettings = Pick<
  Report,
  | 'strategy'
  | 'memoryBackend'
  | 'workload'
  | 'vcpus'
  | 'readers'
  | 'ioThreads'
  | 'pageSize'
  | 'guestBytes'
  | 'memslots'
  | 'push'
  | 'preempt'
  | 'faultChannel'
  | 'warmUp'
  | 'tls'
  | 'linkDelayUs'
  | 'linkBandwidthBps'
  | 'seed'
  | 'elapsedMs'
  | 'recovery'
  | 'mode'
>;

/** A device as the destination saw it: its instance, the states it went through, whether its state verified. */
export interface DestDeviceResult {
  name: string;
  uuid: string;
  statePath: string[];
  digestMatch: boolean;
}

export interface ReportInputs extends RunSettings {
  totalPages: number;
  vcpuResults: GuestThreadResult[];
  ioResults: GuestThreadResult[];
  /** The devices' DMA threads, in device order (none without devices). */
  deviceResults?: GuestThreadResult[];
  /** The devices on the destination, and the ms they took at the switchover (leaving RESUMING, RUNNING). */
  destDevices?: DestDeviceResult[];
  deviceRestoreMs?: number;
  vmm: VmmState;
  summary: SourceSummary;
  imageDigest: string;
  destDigest: string;
  allReceived: boolean;
  /** Threads still blocked at the end (must be none). */
  blocked: string[];
  /** The digests differed: which pages, and who sent them last (run/finish.ts). */
  digestMismatch?: string;
  /** CPU over the run: the destination process and main thread's, and each resolver's own (vCPUs' come in their results). */
  cpu: { dest: { processUs: number; mainThreadUs: number | null }; resolvers: (number | null)[] };
}

const round = (x: number, digits = 3): number => Math.round(x * 10 ** digits) / 10 ** digits;

/** The report and the overall vCPU fault-latency histogram (for .hgrm output). */
export function buildReport(inp: ReportInputs): Report {
  return buildReportWithHistogram(inp).report;
}

export function buildReportWithHistogram(inp: ReportInputs): { report: Report; histogram: Histogram } {
  const vmm = inp.vmm;
  const c = (k: number): number => vmm.counter(k);
  const all = createLatencyHistogram();
  const nonVcpu = createLatencyHistogram();
  const dist = new Array<number>(LATENCY_DIST_BUCKETS).fill(0);
  const perVcpu = inp.vcpuResults.map((r, vcpu) => {
    const own = createLatencyHistogram();
    for (let i = 0; i + 1 < r.intervals.length; i += 2) {
      const ns = (r.intervals[i + 1]! - r.intervals[i]!) * 1e6;
      recordNs(own, ns);
      recordNs(all, ns);
      dist[latencyBucket(ns)]!++;
    }
    return {
      vcpu,
      faults: r.faults,
      blocktimeMs: round(blockedMs(r.intervals)),
      accesses: r.accesses,
      runtimeMs: round(r.endMs - r.startMs),
      latencyUs: summarize(own),
    };
  });
  let nonVcpuBlocked = 0;
  let nonVcpuFaults = 0;
  for (const r of [...inp.ioResults, ...(inp.deviceResults ?? [])]) {
    for (let i = 0; i + 1 < r.intervals.length; i += 2) recordNs(nonVcpu, (r.intervals[i + 1]! - r.intervals[i]!) * 1e6);
    nonVcpuBlocked += blockedMs(r.intervals);
    nonVcpuFaults += r.faults;
  }
  const vcpuFaults = perVcpu.reduce((s, v) => s + v.faults, 0);
  const totalBlocked = allBlockedMs(inp.vcpuResults.map((r) => r.intervals));
  const vcpuBlockedSum = perVcpu.reduce((s, v) => s + v.blocktimeMs, 0);
  // demand_paging_test: pages faulted / wall time from the start of all vCPUs to the end of the last.
  const firstStart = Math.min(...inp.vcpuResults.map((r) => r.startMs));
  const lastEnd = Math.max(...inp.vcpuResults.map((r) => r.endMs));
  const wallS = Math.max(1e-9, (lastEnd - firstStart) / 1000);
  const counters: Counters = {
    faults: vcpuFaults + nonVcpuFaults,
    requests: c(COUNTER.REQUESTS),
    replies: c(COUNTER.REPLIES),
    duplicateRequestsSuppressed: c(COUNTER.SUPPRESSED),
    pagesDemand: c(COUNTER.PAGES_DEMAND),
    pagesPushed: c(COUNTER.PAGES_PUSHED),
    pagesPushedOnPushChannel: c(COUNTER.PUSH_CHANNEL_PAGES),
    pagesZero: c(COUNTER.PAGES_ZERO),
    pagesSentBySource: inp.summary.pagesSent,
    totalPages: inp.totalPages,
    eexist: c(COUNTER.EEXIST),
    wakes: c(COUNTER.WAKES),
    alreadySent: c(COUNTER.ALREADY_SENT),
    repliesOnMain: c(COUNTER.ON_MAIN),
    nonVcpuFaults,
    pagesInstalled: c(COUNTER.INSTALLED),
    pagesPrecopy: c(COUNTER.PAGES_PRECOPY),
    precopyRewrites: c(COUNTER.PRECOPY_REWRITES),
    pagesPrecopyOnPushChannel: c(COUNTER.PRECOPY_PUSH_CHANNEL_PAGES),
    pagesDiscarded: c(COUNTER.DISCARDED),
    discardedDemanded: c(COUNTER.DISCARDED_DEMANDED),
  };
  const checks = runChecks(inp, counters);
  const nsPerFault = (ms: number, faults: number): number => (faults > 0 ? Math.round((ms * 1e6) / faults) : 0);
  const report: Report = {
    strategy: inp.strategy,
    memoryBackend: inp.memoryBackend,
    workload: inp.workload,
    vcpus: inp.vcpus,
    readers: inp.readers,
    ioThreads: inp.ioThreads,
    pageSize: inp.pageSize,
    guestBytes: inp.guestBytes,
    memslots: inp.memslots,
    push: inp.push,
    preempt: inp.preempt,
    faultChannel: inp.faultChannel,
    warmUp: inp.warmUp,
    tls: inp.tls,
    linkDelayUs: inp.linkDelayUs,
    linkBandwidthBps: inp.linkBandwidthBps,
    seed: inp.seed,
    elapsedMs: round(inp.elapsedMs),
    // Page contents pushed (zero-page notices carry no data) per second of the run.
    pushThroughputMiBs: round(((counters.pagesPushed - c(COUNTER.PUSHED_ZERO)) * inp.pageSize) / 1024 / 1024 / Math.max(1e-9, inp.elapsedMs / 1000), 1),
    verified: checks.every((x) => x.ok),
    checks,
    digest: { source: inp.summary.digestOfReceived, dest: inp.destDigest, scope: inp.allReceived ? 'all-pages' : 'received-pages' },
    counters,
    perVcpu,
    latencyUs: summarize(all),
    nonVcpuLatencyUs: summarize(nonVcpu),
    demandPagingRate: {
      overall: round(vcpuFaults / wallS, 1),
      perVcpu: inp.vcpuResults.map((r) => round(r.faults / Math.max(1e-9, (r.endMs - r.startMs) / 1000), 1)),
    },
    blocktimeMs: { total: round(totalBlocked), perVcpu: perVcpu.map((v) => v.blocktimeMs) },
    qemu: {
      'postcopy-blocktime': Math.round(totalBlocked),
      'postcopy-vcpu-blocktime': perVcpu.map((v) => Math.round(v.blocktimeMs)),
      'postcopy-latency': nsPerFault(vcpuBlockedSum, vcpuFaults),
      'postcopy-vcpu-latency': perVcpu.map((v) => nsPerFault(v.blocktimeMs, v.faults)),
      'postcopy-non-vcpu-latency': nsPerFault(nonVcpuBlocked, nonVcpuFaults),
      'postcopy-latency-dist': dist,
    },
    cpu: cpuFigures({
      threadAccounting: threadAccounting(),
      faults: counters.faults,
      source: { processUs: inp.summary.cpuUs, mainThreadUs: inp.summary.cpuMainThreadUs },
      dest: inp.cpu.dest,
      vcpus: inp.vcpuResults.map((r) => r.cpuUs),
      resolvers: inp.cpu.resolvers,
      ioThreads: inp.ioResults.map((r) => r.cpuUs),
    }),
    memory: { destPeakRssBytes: process.resourceUsage().maxRSS * 1024, sourcePeakRssBytes: inp.summary.peakRssBytes },
    recovery: inp.recovery,
    ...migrationFigures(inp),
    ...deviceFigures(inp),
  };
  return { report, histogram: all };
}

/** The devices (issue 11): the source's figures with the destination's instance, states, verification and DMA. */
function deviceFigures(inp: ReportInputs): Pick<Report, 'devices' | 'dirtyTracking' | 'policy' | 'downtimeSplit' | 'switchoverAck'> {
  const s = inp.summary.devices;
  const dest = inp.destDevices ?? [];
  const devices: DeviceReport[] = s.devices.map((d, i) => {
    const here = dest[i];
    const dma = inp.deviceResults?.[i];
    return {
      name: d.name,
      type: d.type,
      mdevUuid: here?.uuid ?? '',
      capabilities: d.capabilities,
      tracking: d.tracking,
      statePath: { source: d.statePath, destination: here?.statePath ?? [] },
      precopy: d.precopy,
      stopCopyBytes: d.stopCopyBytes,
      stateDigestMatch: here?.digestMatch ?? false,
      destDma: { accesses: dma?.accesses ?? 0, faults: dma?.faults ?? 0 },
    };
  });
  const perProvider = {} as Report['dirtyTracking']['perProvider'];
  for (const p of ['device', 'iommu', 'none'] as const) {
    const f = s.providers[p];
    perProvider[p] = { syncs: f.syncs, bitmapBytes: f.bitmapBytes, pagesDirty: f.pagesDirty, msPerSync: f.syncs > 0 ? round(f.ms / f.syncs, 4) : 0 };
  }
  const ramMs = s.downtime.ramMs;
  const deviceMs = round(s.downtime.deviceMs + (inp.deviceRestoreMs ?? 0));
  const downtimeMs = inp.summary.migration.downtimeMs;
  return {
    devices,
    dirtyTracking: { provider: Object.fromEntries(s.devices.map((d) => [d.name, d.tracking])), perProvider },
    policy: { ...s.policy },
    downtimeSplit: { ramMs, deviceMs, otherMs: round(Math.max(0, downtimeMs - ramMs - deviceMs)) },
    switchoverAck: { ...s.switchoverAck },
  };
}

/** The phases before postcopy, from the source's summary (QEMU's query-migrate names). */
function migrationFigures(inp: ReportInputs): Pick<Report, 'mode' | 'setupTimeMs' | 'totalTimeMs' | 'downtimeMs' | 'expectedDowntimeMs' | 'downtimeLimitMs' | 'switchover' | 'precopy' | 'discard'> {
  const m = inp.summary.migration;
  return {
    mode: inp.mode,
    setupTimeMs: m.setupTimeMs,
    totalTimeMs: m.totalTimeMs,
    downtimeMs: m.downtimeMs,
    expectedDowntimeMs: m.expectedDowntimeMs,
    downtimeLimitMs: m.downtimeLimitMs,
    switchover: { reason: m.switchoverReason },
    precopy: {
      rounds: m.rounds,
      dirtySyncCount: m.dirtySyncCount,
      pagesSent: m.pagesSent,
      pagesResent: m.pagesResent,
      bytes: m.bytes,
      dirtyPagesRate: m.dirtyPagesRate,
      throttlePercent: m.throttlePercent,
      perRound: m.perRound,
    },
    discard: { pages: m.discardPages, ranges: m.discardRanges },
  };
}

function runChecks(inp: ReportInputs, counters: Counters): CheckResult[] {
  const vmm = inp.vmm;
  const s = inp.summary;
  const checks: CheckResult[] = [];
  const add = (name: string, ok: boolean, detail: string): void => void checks.push({ name, ok, detail });

  const bad = vmm.counter(COUNTER.VERIFY_FAILURES);
  add(
    'content',
    bad === 0,
    bad === 0
      ? 'every page matched the generator at first touch'
      : `${bad} page(s) differed from the generator at first touch, first page ${vmm.counter(COUNTER.FIRST_BAD_PAGE) - 1}`,
  );
  // In postcopy mode the source's memory is the image as built, so all of it must equal that too;
  // a guest that ran on the source first changed it, and the source's memory as it stopped is the truth.
  const imageOk = inp.mode !== 'postcopy' || !inp.allReceived || inp.destDigest === inp.imageDigest;
  const digestOk = inp.destDigest === s.digestOfReceived && imageOk;
  add(
    'digest',
    digestOk,
    digestOk
      ? `destination memory equals the source's${inp.mode !== 'postcopy' ? ' as its vCPUs stopped' : ''} over ${inp.allReceived ? 'all pages' : 'the received pages'}`
      : `destination ${inp.destDigest.slice(0, 16)}… differs from source ${s.digestOfReceived.slice(0, 16)}…${inp.allReceived && inp.mode === 'postcopy' ? ` (image ${inp.imageDigest.slice(0, 16)}…)` : ''}${inp.digestMismatch ? `: ${inp.digestMismatch}` : ''}`,
  );
  const rec = inp.recovery;
  if (rec.pauses === 0) {
    const repliesOk = counters.requests === counters.replies && s.requests === counters.requests && s.replies === s.requests;
    add(
      'replies-equal-requests',
      repliesOk,
      `destination sent ${counters.requests} requests and got ${counters.replies} replies; source got ${s.requests} and answered ${s.replies}`,
    );
  } else {
    // After a lost connection the two sides count different things: requests
    // lost on the way never reached the source, replays reached it twice, and
    // a restarted source saw only its own share. Each side must still be
    // exact: every request the destination made got one reply, and every
    // request the source read was answered or its connection was gone.
    const repliesOk = counters.requests === counters.replies && s.replies + s.repliesUndeliverable === s.requests;
    add(
      'replies-equal-requests',
      repliesOk,
      `destination sent ${counters.requests} requests (${rec.requestsReplayed} replayed after a resume) and got ${counters.replies} replies; ` +
        `source got ${s.requests}, answered ${s.replies}, ${s.repliesUndeliverable} undeliverable (connection lost)`,
    );
    add(
      'recovered',
      rec.resumes === rec.pauses,
      `paused ${rec.pauses} time(s), resumed ${rec.resumes}; ${rec.pagesResent} pages resent, ${rec.repliesDropped} stale replies dropped`,
    );
  }
  const devices = inp.destDevices ?? [];
  if (devices.length > 0) {
    const bad = devices.filter((d) => !d.digestMatch).map((d) => d.name);
    add(
      'device-state',
      bad.length === 0 && devices.length === s.devices.devices.length,
      bad.length === 0 ? `${devices.length} device state(s) verified on arrival: seeded content, SHA-256 equal on both sides` : `the state of ${bad.join(', ')} differs from the source's`,
    );
  }
  const duplicateData = vmm.counter(COUNTER.DUPLICATE_DATA);
  const onceOk = s.pagesSentTwice === 0 && duplicateData === 0 && s.sentNotReceived === 0 && s.receivedNotSent === 0;
  add(
    'no-page-sent-twice',
    onceOk,
    onceOk
      ? `${s.pagesSent} pages sent once each; sentmap equals receivedmap`
      : `source sent ${s.pagesSentTwice} page(s) twice, ${duplicateData} arrived already installed; ${s.sentNotReceived} sent but not received, ${s.receivedNotSent} received but not sent`,
  );
  add(
    'no-vcpu-blocked',
    inp.blocked.length === 0,
    inp.blocked.length === 0 ? `every vCPU and I/O thread${(inp.deviceResults?.length ?? 0) > 0 ? ' and device' : ''} finished its accesses` : `still blocked: ${inp.blocked.join('; ')}`,
  );
  if (inp.push) {
    add(
      'all-pages-received',
      counters.pagesInstalled === inp.totalPages,
      `${counters.pagesInstalled} of ${inp.totalPages} pages installed`,
    );
  }
  // Precopy's pages count as installed once each: those that arrived and were not discarded.
  const precopyResident = counters.pagesPrecopy - counters.pagesDiscarded;
  const installedOk = counters.pagesInstalled === counters.pagesDemand + counters.pagesPushed + precopyResident && counters.pagesInstalled === s.pagesSent;
  add(
    'installed-equals-sent',
    installedOk,
    `${counters.pagesInstalled} installed (${counters.pagesDemand} demand + ${counters.pagesPushed} pushed${inp.mode !== 'postcopy' ? ` + ${precopyResident} from precopy` : ''}), source sent ${s.pagesSent}`,
  );
  return checks;
}
