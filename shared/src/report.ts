import type { MigrationMode } from './precopy.js';
import type { MigrationSummary } from './protocol.js';
import type { CpuFigures, CpuGroup } from './cpu.js';
import type { LatencySummary } from './stats.js';
import { formatBytes } from './sizes.js';
import { formatDevices, type DeviceReport, type DirtyTrackingReport, type DowntimeSplit, type PolicyReport } from './devices/report.js';

import type { MemoryBackendName, StrategyName, WorkloadName } from './names.js';

export { MEMORY_BACKENDS, STRATEGIES, WORKLOADS, type MemoryBackendName, type StrategyName, type WorkloadName } from './names.js';

export interface CheckResult {
  name: string;
  ok: boolean;
  detail: string;
}

export interface Counters {
  faults: number;
  requests: number;
  replies: number;
  duplicateRequestsSuppressed: number;
  pagesDemand: number;
  pagesPushed: number;
  /** Of pagesPushed, pages that came on a push channel (the rest came on the main channel). */
  pagesPushedOnPushChannel: number;
  pagesZero: number;
  pagesSentBySource: number;
  totalPages: number;
  eexist: number;
  wakes: number;
  /** Replies telling that the page had already gone out (on another channel). */
  alreadySent: number;
  /** Replies telling that the requested page went out on the main channel (no preempt). */
  repliesOnMain: number;
  /** Faults taken by non-vCPU (I/O) threads. */
  nonVcpuFaults: number;
  /** Pages installed by this run (received + zero). */
  pagesInstalled: number;
  /** Precopy: pages installed by it (first arrivals), pages that arrived again and were overwritten, pages the switch to postcopy discarded. */
  pagesPrecopy: number;
  precopyRewrites: number;
  /** Of the precopy pages that arrived (pagesPrecopy + precopyRewrites), those that came on a push channel (the rest in main-channel messages). */
  pagesPrecopyOnPushChannel: number;
  pagesDiscarded: number;
  /** Discarded pages a fault then fetched again (the discard set at work: the guest touched pages it had dirtied). */
  discardedDemanded: number;
}

export interface PerVcpu {
  vcpu: number;
  faults: number;
  blocktimeMs: number;
  accesses: number;
  runtimeMs: number;
  latencyUs: LatencySummary;
}

/** Figures under QEMU's own names and units (query-migrate on the destination). */
export interface QemuFigures {
  'postcopy-blocktime': number;
  'postcopy-vcpu-blocktime': number[];
  'postcopy-latency': number;
  'postcopy-vcpu-latency': number[];
  'postcopy-non-vcpu-latency': number;
  'postcopy-latency-dist': number[];
}

export interface Report {
  strategy: StrategyName;
  /** `emulated` (SharedArrayBuffers and the emulated userfaultfd) or `uffd` (the kernel's userfaultfd). */
  memoryBackend: MemoryBackendName;
  workload: WorkloadName;
  vcpus: number;
  readers: number;
  ioThreads: number;
  pageSize: number;
  guestBytes: number;
  memslots: number;
  push: boolean;
  preempt: boolean;
  /**
   * How threads that block on their fault (kvm-exit vCPUs, per-thread-uffd
   * resolvers) fetched their pages: `blocking` (a socket of their own read
   * with blocking system calls) or `event-loop` (a WebSocket client on the
   * thread's event loop). See --fault-channel.
   */
  faultChannel: 'blocking' | 'event-loop';
  /**
   * The warm-up before the guest ran (--warm-up-pages): the vCPUs' faults
   * on scratch memory, and how long they took from every thread started
   * and connected to the warm-up's peer until its resolvers stopped (the
   * threads' start is the run's, with or without one). Not in any other
   * figure. `rounds`: each with objects of its own (dest-host's
   * warm-up/warm-up.ts says why); 0 without a warm-up. `sourceRequests`,
   * `sourceMs`: the source's own warm-up before it listened (source-host's
   * warm-up.ts), the requests it answered for a scratch image and its time.
   */
  warmUp: { faults: number; ms: number; rounds: number; sourceRequests: number; sourceMs: number };
  /** The link ran over TLS (wss://). */
  tls: boolean;
  /** The emulated link: one-way delay (µs) and bandwidth (bits/s, 0 = unlimited). */
  linkDelayUs: number;
  linkBandwidthBps: number;
  seed: number;
  elapsedMs: number;
  /** Content of pushed pages (zero-page notices excluded) per second of the run, in MiB/s. */
  pushThroughputMiBs: number;
  verified: boolean;
  checks: CheckResult[];
  digest: { source: string; dest: string; scope: 'all-pages' | 'received-pages' };
  counters: Counters;
  perVcpu: PerVcpu[];
  latencyUs: LatencySummary;
  nonVcpuLatencyUs: LatencySummary;
  demandPagingRate: { overall: number; perVcpu: number[] };
  blocktimeMs: { total: number; perVcpu: number[] };
  qemu: QemuFigures;
  /** CPU microseconds per fault of each process and thread group (see cpu.ts). */
  cpu: CpuFigures;
  /** Peak resident set size of each host process (bytes). */
  memory: { destPeakRssBytes: number; sourcePeakRssBytes: number };
  recovery: RecoveryFigures;
  /** How the migration ran: `postcopy` (the guest started on the destination), `precopy` or `hybrid`. */
  mode: MigrationMode;
  /** QEMU's query-migrate figures, from the source: setup-time, total-time, downtime, expected-downtime (ms). */
  setupTimeMs: number;
  totalTimeMs: number;
  /** From the source's vCPUs stopping to the destination's running (ms; includes one trip of the link). 0 in postcopy mode. */
  downtimeMs: number;
  expectedDowntimeMs: number;
  downtimeLimitMs: number;
  switchover: { reason: string };
  precopy: PrecopyFigures;
  /** Pages the destination dropped at the switch to postcopy (sent in precopy, dirtied since), in how many ranges. */
  discard: { pages: number; ranges: number };
  /** The guest's assigned devices (devices/report.ts): empty without them. */
  devices: DeviceReport[];
  dirtyTracking: DirtyTrackingReport;
  /** The untracked-DMA policy: which, on which devices, why. */
  policy: PolicyReport;
  /** The downtime's RAM and device parts. */
  downtimeSplit: DowntimeSplit;
  /** QEMU's switchover-ack: whether a device needed it, and how long the switchover waited for it (ms). */
  switchoverAck: { needed: boolean; waitedMs: number };
}

/** The precopy rounds (QEMU's names where it has them): the source's figures, as its summary gives them. */
export type PrecopyFigures = Pick<MigrationSummary, 'rounds' | 'dirtySyncCount' | 'pagesSent' | 'pagesResent' | 'bytes' | 'dirtyPagesRate' | 'throttlePercent' | 'perRound'>;

/** Postcopy recovery (QEMU's postcopy-paused / postcopy-recover) during the run. */
export interface RecoveryFigures {
  /** Times the migration paused: a lost connection, or an injected drop. */
  pauses: number;
  /** Times the source resumed it (equals pauses in a run that ended verified). */
  resumes: number;
  /** Pages the source had sent that never arrived (lost in flight), marked unsent on resume and sent again. A restarted source cannot know what its predecessor sent: those count 0 here. */
  pagesResent: number;
  /** Pending requests the fault channels sent again after a resume. */
  requestsReplayed: number;
  /** Replies that arrived on a connection whose session had ended: dropped, their requests replayed. */
  repliesDropped: number;
  /** Drops the destination injected (`--inject drop@PAGES`). */
  dropsInjected: number;
  /** Resumes against a restarted source process (`--resume`). */
  sourceRestarts: number;
  /** Time spent paused, ms (vCPUs that touched missing pages stayed blocked meanwhile). */
  pausedMs: number;
  /** The keepalive: a main channel silent this long counts as lost (0 = no keepalive). */
  keepaliveMs: number;
  /** Times the destination's keepalive found the source silent and cut the connection (a dead link sends no reset). */
  keepaliveTimeouts: number;
  /** Times the source's keepalive found the destination silent. */
  sourceKeepaliveTimeouts: number;
}

/** CPU groups in words. */
export const CPU_GROUP_NAMES: Record<CpuGroup, string> = {
  source: 'the source process',
  sourceMainThread: "the source's main thread",
  dest: 'the destination process',
  destMainThread: "the destination's main thread",
  destVcpus: 'the vCPU threads',
  destResolvers: 'the resolver threads',
  destIoThreads: 'the I/O threads',
  destOther: "the destination's other threads",
};

function pad(cells: string[][]): string {
  const widths: number[] = [];
  for (const row of cells) row.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  return cells.map((row) => row.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ')).join('\n');
}

function formatRate(bps: number): string {
  for (const [unit, scale] of [['tbit', 1e12], ['gbit', 1e9], ['mbit', 1e6], ['kbit', 1e3]] as const) {
    if (bps >= scale) return `${Number((bps / scale).toFixed(2))}${unit}`;
  }
  return `${bps}bit`;
}

const fmt = (x: number, digits = 1): string => (Number.isInteger(x) ? String(x) : x.toFixed(digits));

/** The report's CPU lines: µs per fault of each process and thread group, and the bound they set. */
export function formatCpu(r: Report): string[] {
  const c = r.cpu;
  const f = (x: number | null): string => (x === null ? 'n/a' : x.toFixed(1));
  const p = c.perFaultUs;
  const lines = [
    `CPU per fault (µs, over ${c.faults} faults${c.threadAccounting === 'none' ? '; no per-thread accounting here' : ''}): ` +
      `source ${f(p.source)} (main thread ${f(p.sourceMainThread)}); destination ${f(p.dest)}: main thread ${f(p.destMainThread)}, ` +
      `vCPUs ${f(p.destVcpus)}, resolvers ${f(p.destResolvers)}, I/O threads ${f(p.destIoThreads)}, other ${f(p.destOther)}`,
  ];
  if (c.cpuBound) {
    lines.push(`CPU bound with a core for every thread: ${c.cpuBound.pagesPerSec} faults/s at most, set by ${CPU_GROUP_NAMES[c.cpuBound.limitedBy]}`);
  }
  return lines;
}

/** The readable report `npm start` prints. */
export function formatReport(r: Report): string {
  const lines: string[] = [];
  lines.push(
    `postcopy migration: ${r.strategy} on ${r.memoryBackend === 'uffd' ? "the kernel's userfaultfd (--memory-backend uffd)" : 'the emulated userfaultfd'}, ${r.vcpus} vCPU${r.vcpus > 1 ? 's' : ''}, workload ${r.workload}, ` +
      `${formatBytes(r.guestBytes)} guest in ${r.memslots} memslot${r.memslots > 1 ? 's' : ''}, ${formatBytes(r.pageSize)} pages, ` +
      `push ${r.push ? 'on' : 'off'}${r.preempt ? ', preempt' : ''}${r.tls ? ', TLS' : ''}` +
      `${r.linkDelayUs ? `, link delay ${r.linkDelayUs} µs` : ''}${r.linkBandwidthBps ? `, link ${formatRate(r.linkBandwidthBps)}` : ''}${r.strategy === 'shared-uffd' ? `, ${r.readers} reader${r.readers > 1 ? 's' : ''}` : ''}` +
      `${r.ioThreads ? `, ${r.ioThreads} I/O thread${r.ioThreads > 1 ? 's' : ''}` : ''}`,
  );
  lines.push('');
  if (r.mode !== 'postcopy') {
    const p = r.precopy;
    lines.push(
      `${r.mode}: ${p.rounds} round${p.rounds === 1 ? '' : 's'} (${p.dirtySyncCount} dirty syncs), ${p.pagesSent} pages sent (${p.pagesResent} again), ` +
        `guest dirtying ${fmt(p.dirtyPagesRate, 0)} pages/s${p.throttlePercent ? `, throttled to ${p.throttlePercent} %` : ''}; switchover: ${r.switchover.reason}; ` +
        `downtime ${fmt(r.downtimeMs)} ms (limit ${r.downtimeLimitMs} ms, expected ${fmt(r.expectedDowntimeMs)} ms); total ${fmt(r.totalTimeMs)} ms, setup ${fmt(r.setupTimeMs)} ms` +
        `${r.mode === 'hybrid' ? `; ${r.discard.pages} pages discarded in ${r.discard.ranges} range${r.discard.ranges === 1 ? '' : 's'}, ${r.counters.discardedDemanded} of them faulted in again` : ''}`,
    );
    lines.push('');
  }
  const deviceLines = formatDevices(r);
  if (deviceLines.length > 0) lines.push(...deviceLines, '');
  const c = r.counters;
  lines.push(
    pad([
      ['elapsed', `${fmt(r.elapsedMs)} ms`],
      ['warm-up before it (vCPU faults on scratch memory, ms)', r.warmUp?.faults ? `${r.warmUp.faults} in ${r.warmUp.rounds} rounds, ${fmt(r.warmUp.ms)} ms` : 'none'],
      ['source warm-up before it listened (requests, ms)', r.warmUp?.sourceRequests ? `${r.warmUp.sourceRequests}, ${fmt(r.warmUp.sourceMs)} ms` : 'none'],
      ['faults (vCPU / non-vCPU)', `${c.faults - c.nonVcpuFaults} / ${c.nonVcpuFaults}`],
      ['requests / replies', `${c.requests} / ${c.replies}`],
      ['duplicate requests suppressed', String(c.duplicateRequestsSuppressed)],
      ['already-sent / sent-on-main replies', `${c.alreadySent} / ${c.repliesOnMain}`],
      ['pages demand / pushed / zero', `${c.pagesDemand} / ${c.pagesPushed} / ${c.pagesZero}`],
      ['pushed on a push channel / on main', `${c.pagesPushedOnPushChannel} / ${c.pagesPushed - c.pagesPushedOnPushChannel}`],
      ...(r.mode !== 'postcopy'
        ? [
            ['pages precopy / re-sent / discarded', `${c.pagesPrecopy} / ${c.precopyRewrites} / ${c.pagesDiscarded}`],
            ['precopy on a push channel / on main', `${c.pagesPrecopyOnPushChannel} / ${c.pagesPrecopy + c.precopyRewrites - c.pagesPrecopyOnPushChannel}`],
          ]
        : []),
      ['pages sent by source / total', `${c.pagesSentBySource} / ${c.totalPages}`],
      ['EEXIST / WAKE', `${c.eexist} / ${c.wakes}`],
      ['fault latency p50 / p90 / p99 / p99.9 / max (µs)', [r.latencyUs.p50, r.latencyUs.p90, r.latencyUs.p99, r.latencyUs.p999, r.latencyUs.max].map((x) => fmt(x)).join(' / ')],
      ['fault latency mean (µs)', fmt(r.latencyUs.mean)],
      ['demand paging rate (pages/s)', fmt(r.demandPagingRate.overall, 0)],
      ['push throughput (MiB/s)', fmt(r.pushThroughputMiBs)],
      ['total blocktime, all vCPUs blocked (ms)', fmt(r.blocktimeMs.total, 3)],
    ]),
  );
  lines.push('');
  lines.push(
    pad([
      ['vCPU', 'faults', 'blocktime ms', 'p50 µs', 'p99 µs', 'pages/s'],
      ...r.perVcpu.map((v, i) => [
        String(v.vcpu),
        String(v.faults),
        fmt(v.blocktimeMs, 3),
        fmt(v.latencyUs.p50),
        fmt(v.latencyUs.p99),
        fmt(r.demandPagingRate.perVcpu[i] ?? 0, 0),
      ]),
    ]),
  );
  lines.push('');
  const rec = r.recovery;
  if (rec.pauses > 0) {
    lines.push(
      `recovery: ${rec.pauses} pause${rec.pauses > 1 ? 's' : ''}, ${rec.resumes} resume${rec.resumes === 1 ? '' : 's'}` +
        `${rec.dropsInjected ? ` (${rec.dropsInjected} injected drop${rec.dropsInjected > 1 ? 's' : ''})` : ''}` +
        `${rec.sourceRestarts ? `, ${rec.sourceRestarts} source restart${rec.sourceRestarts > 1 ? 's' : ''}` : ''}, ` +
        `paused ${fmt(rec.pausedMs)} ms; ${rec.pagesResent} pages resent, ${rec.requestsReplayed} requests replayed, ${rec.repliesDropped} stale replies dropped` +
        `${rec.keepaliveTimeouts + rec.sourceKeepaliveTimeouts > 0 ? `; keepalive found a silent peer ${rec.keepaliveTimeouts} time(s) here, ${rec.sourceKeepaliveTimeouts} at the source` : ''}`,
    );
  }
  lines.push(...formatCpu(r));
  lines.push(`peak RSS: destination ${(r.memory.destPeakRssBytes / 1024 / 1024).toFixed(0)} MiB, source ${(r.memory.sourcePeakRssBytes / 1024 / 1024).toFixed(0)} MiB`);
  lines.push(`digest (${r.digest.scope}): source ${r.digest.source.slice(0, 16)}…  dest ${r.digest.dest.slice(0, 16)}…`);
  for (const check of r.checks) lines.push(`${check.ok ? 'ok  ' : 'FAIL'} ${check.name}: ${check.detail}`);
  lines.push(r.verified ? 'verified: true' : 'verified: false');
  return lines.join('\n');
}
