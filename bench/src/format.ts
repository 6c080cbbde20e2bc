import type { BenchResult } from './bench.js';
import { BENCH_STRATEGIES, nativeAvailable, rankByRate, ratesAt, rssBudget } from './figures.js';
import { injectAtPages } from './migrations.js';
import { formatBackends } from './backends.js';
import { formatPhases } from './phases.js';
import { NATIVE_COUNTERPART } from './native-floor.js';
import { formatDevices } from './devices.js';

function table(rows: string[][], indent = '  '): string {
  const widths: number[] = [];
  for (const row of rows) row.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  return rows
    .map((row) => indent + row.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('   ').trimEnd())
    .join('\n');
}

const num = (x: number, digits = 1): string => x.toFixed(digits);

/** The readable report `npm run bench` prints. */
export function formatBench(r: BenchResult): string {
  const lines: string[] = [];
  const o = r.options;
  lines.push(
    `postcopy bench (${r.revision}): Node ${r.machine.node}, ${r.machine.platform}/${r.machine.arch}, ${r.machine.cpus} CPUs (${r.machine.cpuModel}), ` +
      `load average ${r.machine.loadAverage1mAtStart} at start`,
  );
  if (r.machine.freePageReporting === true) {
    lines.push(
      'this VM reports free pages to its host (virtio-balloon free page reporting): memory freed more than about 2 s ago costs a fault in the host at its next first touch, ' +
        'so the figures bound by first touches (push throughput, the large guest) move from run to run with what memory each run gets',
    );
  }
  lines.push(
    `guest ${o.memory}, repeat ${o.repeat} (figures are medians), floor ${o.floorRequests} round trips after ${o.floorWarmup} warm-up, bulk ${o.bulkMiB} MiB`,
  );
  lines.push('');
  lines.push('floor: raw WebSocket between two Node processes on 127.0.0.1 (ws, perMessageDeflate off, binary, msgpackr codec)');
  lines.push(
    table([
      ['request/reply round trip of a 4 KiB page, p50 / p99 (µs)', `${num(r.floor.roundTripUs.p50)} / ${num(r.floor.roundTripUs.p99)}`],
      ['bulk throughput of 4 KiB pushed frames (MiB/s)', num(r.floor.bulkMiBs)],
    ]),
  );
  lines.push('');
  lines.push(
    `net ceiling: Node's own net sockets between two processes, ${r.netCeiling.mib} MiB copied into a SharedArrayBuffer as it arrives, ` +
      "sent from memory of the stream's size (at most 1 GiB) the sender filled first, as a source host holds the guest",
  );
  lines.push(
    table([
      ['onread (one reused read buffer, then the copy): the ceiling (MiB/s)', num(r.netCeiling.onreadMiBs)],
      ["'data' events (a new buffer a read, as ws reads), for comparison (MiB/s)", num(r.netCeiling.dataMiBs)],
      ['onread, sent from a 16 MiB image alone (only the receiver touches fresh memory), for comparison (MiB/s)', num(r.netCeiling.onreadImageMiBs)],
    ]),
  );
  lines.push('');
  lines.push("fault latency: 1 vCPU, sequential, idle link, push off, --preempt (each reply on the fault's own channel, the floor's shape)");
  lines.push(
    table([
      ['strategy', 'p50 µs', 'p99 µs', 'p50 / floor p50'],
      ...BENCH_STRATEGIES.map((s) => [s, num(r.strategies[s].p50), num(r.strategies[s].p99), num(r.strategies[s].p50 / r.floor.roundTripUs.p50, 2)]),
    ]),
  );
  lines.push('');
  const t = r.throughput;
  lines.push(
    `demand paging rate: ${t.mibPerVcpu} MiB per vCPU, sequential, push off, --preempt (each page back on the channel that asked, as in the floor), against the native floor (C, real userfaultfd, loopback TCP); without --preempt beside it` +
      ('unavailable' in t.native ? `; native floor unavailable: ${String(t.native.unavailable)}` : ''),
  );
  const rows: string[][] = [['vCPUs', 'strategy', 'pages/s', 'p50 µs', 'no --preempt: pages/s', 'native mode', 'native pages/s (its runs)', 'native p50 µs', 'rate / native']];
  for (const v of t.vcpus) {
    for (const s of BENCH_STRATEGIES) {
      const tool = t.tool[s][String(v)]!;
      const plain = t.toolDefaults[s][String(v)]!;
      const nat = nativeAvailable(t) ? t.native[s][String(v)] : undefined;
      const range = nat?.pagesPerSecRange;
      rows.push([
        String(v),
        s,
        num(tool.pagesPerSec, 0),
        num(tool.p50Us),
        num(plain.pagesPerSec, 0),
        NATIVE_COUNTERPART[s],
        nat ? `${num(nat.pagesPerSec, 0)}${range ? ` (${num(range[0], 0)}-${num(range[1], 0)})` : ''}` : 'n/a',
        nat ? num(nat.p50Us) : 'n/a',
        nat ? num(tool.pagesPerSec / nat.pagesPerSec, 2) : 'n/a',
      ]);
    }
  }
  lines.push(table(rows));
  for (const v of t.vcpus) {
    const mine = rankByRate(ratesAt(t.tool, v)).join(' > ');
    const plain = rankByRate(ratesAt(t.toolDefaults, v)).join(' > ');
    const theirs = nativeAvailable(t) ? rankByRate(ratesAt(t.native, v)).map((s) => NATIVE_COUNTERPART[s]).join(' > ') : 'n/a';
    lines.push(`  ranking at ${v} vCPUs: tool ${mine} (without --preempt ${plain}); native ${theirs} (a pair whose native runs overlap is a tie)`);
  }
  lines.push('');
  lines.push(
    'CPU per fault (µs; each process and thread group of the destination by its own accounting; "other": GC, compiler, libuv threads). ' +
      'On a host with a core for every thread, the rate could reach n x 1e6 / (µs per fault) for each group of n threads sharing faults:',
  );
  const cpuRows: string[][] = [['run', 'source', '(main thread)', 'destination', 'main thread', 'vCPUs', 'resolvers', 'other']];
  const c1 = (x: number | null | undefined): string => (x === null || x === undefined ? 'n/a' : num(x));
  const cpuRow = (label: string, c: Record<string, number | null> | undefined): string[] => [
    label,
    c1(c?.source),
    c1(c?.sourceMainThread),
    c1(c?.dest),
    c1(c?.destMainThread),
    c1(c?.destVcpus),
    c1(c?.destResolvers),
    c1(c?.destOther),
  ];
  for (const s of BENCH_STRATEGIES) cpuRows.push(cpuRow(`${s}, 1 vCPU, --preempt`, r.strategies[s].cpuPerFaultUs));
  for (const v of t.vcpus) for (const s of BENCH_STRATEGIES) cpuRows.push(cpuRow(`${s}, ${v} vCPUs`, t.tool[s][String(v)]!.cpuPerFaultUs));
  lines.push(table(cpuRows));
  lines.push('');
  lines.push('urgent fault latency: kvm-exit, 1 vCPU, random workload');
  lines.push(
    table([
      ['', 'p50 µs'],
      ['push off (--preempt)', num(r.urgent.pushOff.p50)],
      ['push on (requested pages on the main channel, behind pushes in flight)', num(r.urgent.pushOn.p50)],
      ['push on + --preempt (requested pages on their own channel)', num(r.urgent.pushOnPreempt.p50)],
      ['push capped at 400mbit + --preempt (--max-postcopy-bandwidth, for comparison)', num(r.urgent.pushCappedPreempt.p50)],
    ]),
  );
  lines.push('');
  const mib = (b: number): string => (b / 1048576).toFixed(0);
  lines.push(`push throughput: kvm-exit, 1 vCPU touching 1 page of a ${mib(r.pushGuestBytes)} MiB guest, no zero pages (the idle push)`);
  lines.push(
    table([
      ['idle push throughput (MiB/s)', num(r.pushThroughputMiBs)],
      [`with ${r.large.vcpus} faulting vCPUs (the large guest below) (MiB/s)`, num(r.large.pushThroughputMiBs)],
      [`idle push of a ${mib(r.large.guestBytes)} MiB guest, the large guest's size (MiB/s)`, num(r.large.idlePushThroughputMiBs)],
      ['net ceiling, onread (MiB/s)', num(r.netCeiling.onreadMiBs)],
      ['ws floor bulk throughput (MiB/s)', num(r.floor.bulkMiBs)],
    ]),
  );
  lines.push('');
  lines.push("TLS (--tls: throwaway certificates, the source verifying the destination's too) against plain ws://, same runs otherwise");
  const kvm = r.strategies['kvm-exit'];
  // A row of the same figure in the run without an option and with it: both, and their ratio.
  const against = (what: string, off: number, on: number, digits?: number): string[] => [what, num(off, digits), num(on, digits), num(on / off, 2)];
  lines.push(
    table([
      ['', 'plain', 'TLS', 'TLS / plain'],
      against('kvm-exit fault p50 (µs)', kvm.p50, r.tls.fault.p50),
      against('kvm-exit fault p99 (µs)', kvm.p99, r.tls.fault.p99),
      against('push throughput (MiB/s)', r.pushThroughputMiBs, r.tls.pushThroughputMiBs),
    ]),
  );
  lines.push('');
  lines.push('--trace (the timeline recorded, written after the run) against the same runs without it');
  lines.push(
    table([
      ['', 'off', '--trace', 'trace / off'],
      against('kvm-exit fault p50 (µs)', kvm.p50, r.trace.fault.p50),
      against('kvm-exit fault p99 (µs)', kvm.p99, r.trace.fault.p99),
      against('push throughput (MiB/s)', r.pushThroughputMiBs, r.trace.pushThroughputMiBs),
      against(`shared-uffd demand paging rate, ${r.trace.rate.vcpus} vCPUs (pages/s)`, t.tool['shared-uffd'][String(r.trace.rate.vcpus)]!.pagesPerSec, r.trace.rate.pagesPerSec, 0),
    ]),
  );
  lines.push('');
  lines.push(
    `recovery: kvm-exit, 1 vCPU, random workload, push capped at 400mbit, one fault after ${injectAtPages(o.memoryBytes)} pages (a quarter of the guest); no target, for the record`,
  );
  const rec = (name: string, f: BenchResult['recovery']['drop']): string[] => [name, num(f.pausedMs), String(f.pagesResent), String(f.requestsReplayed), num(f.elapsedMs, 0)];
  lines.push(
    table([
      ['', 'paused ms (per pause)', 'pages resent', 'requests replayed', 'run ms'],
      rec('drop (destination cuts its connections, reconnects)', r.recovery.drop),
      rec('kill-source (source SIGKILLed, restarted with --resume)', r.recovery.killSource),
    ]),
  );
  lines.push('');
  const pushTimeS = r.large.guestBytes / 1048576 / r.pushThroughputMiBs;
  lines.push(
    `large guest: ${mib(r.large.guestBytes)} MiB, ${r.large.vcpus} vCPUs (defaults otherwise): migrated in ${(r.large.elapsedMs / 1000).toFixed(1)} s ` +
      `(its pages take ${pushTimeS.toFixed(1)} s at the idle push rate); the whole npm start (no build) took ${(r.large.wallMs / 1000).toFixed(1)} s`,
  );
  lines.push(
    table([
      ['peak RSS (MiB)', 'destination', 'source', 'budget'],
      ['', mib(r.large.destPeakRssBytes), mib(r.large.sourcePeakRssBytes), mib(rssBudget(r.large.guestBytes))],
    ]),
  );
  lines.push('');
  lines.push(formatBackends(r.backends));
  lines.push('');
  lines.push(formatPhases(r.phases, r.pushThroughputMiBs));
  lines.push('');
  lines.push(formatDevices(r.devices));
  lines.push('');
  lines.push('ratios');
  const rows2: string[][] = [['name', 'value', 'target', '', 'meaning']];
  let met = 0;
  let targets = 0;
  for (const def of r.ratioDefs) {
    const value = r.ratios[def.name];
    const t = r.targets[def.name];
    if (t) {
      targets++;
      if (t.met) met++;
    }
    rows2.push([
      def.name,
      value === undefined ? 'n/a' : num(value, 2),
      def.target ? `${def.target.kind === 'max' ? '<=' : '>='} ${def.target.value}` : 'none',
      t ? (t.met ? 'met' : 'MISSED') : def.target ? 'not measured' : '',
      def.meaning,
    ]);
  }
  // The meaning column reads better left-aligned.
  const widths = rows2[0]!.map((_, i) => Math.max(...rows2.map((row) => row[i]!.length)));
  for (const row of rows2) {
    lines.push(
      '  ' +
        row
          .map((c, i) => (i === 0 || i === 3 || i === 4 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!)))
          .join('   ')
          .trimEnd(),
    );
  }
  lines.push('');
  lines.push(`targets met: ${met} of ${targets}`);
  return lines.join('\n');
}
