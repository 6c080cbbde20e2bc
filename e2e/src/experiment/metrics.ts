import type { Report } from '@postcopy/shared';

/** One figure taken from a run's report, as a row of summary.csv. */
export interface Metric {
  /** The `metric` column of summary.csv. */
  name: string;
  /** What people read in a table header or an axis title. */
  label: string;
  unit: string;
  value: (report: Report) => number;
}

const mean = (xs: readonly number[]): number => (xs.length === 0 ? 0 : xs.reduce((a, b) => a + b, 0) / xs.length);

/** Every metric of summary.csv, in column order. */
export const METRICS: readonly Metric[] = [
  { name: 'latency_p50_us', label: 'fault latency p50', unit: 'µs', value: (r) => r.latencyUs.p50 },
  { name: 'latency_p90_us', label: 'fault latency p90', unit: 'µs', value: (r) => r.latencyUs.p90 },
  { name: 'latency_p99_us', label: 'fault latency p99', unit: 'µs', value: (r) => r.latencyUs.p99 },
  { name: 'latency_p999_us', label: 'fault latency p99.9', unit: 'µs', value: (r) => r.latencyUs.p999 },
  { name: 'latency_max_us', label: 'fault latency max', unit: 'µs', value: (r) => r.latencyUs.max },
  { name: 'latency_mean_us', label: 'fault latency mean', unit: 'µs', value: (r) => r.latencyUs.mean },
  { name: 'latency_count', label: 'faults timed', unit: 'faults', value: (r) => r.latencyUs.count },
  { name: 'non_vcpu_latency_p50_us', label: 'non-vCPU fault latency p50', unit: 'µs', value: (r) => r.nonVcpuLatencyUs.p50 },
  { name: 'non_vcpu_latency_p99_us', label: 'non-vCPU fault latency p99', unit: 'µs', value: (r) => r.nonVcpuLatencyUs.p99 },
  { name: 'demand_paging_rate', label: 'demand paging rate', unit: 'pages/s', value: (r) => r.demandPagingRate.overall },
  { name: 'blocktime_total_ms', label: 'total blocktime (all vCPUs blocked)', unit: 'ms', value: (r) => r.blocktimeMs.total },
  { name: 'vcpu_blocktime_mean_ms', label: 'blocktime per vCPU (mean)', unit: 'ms', value: (r) => mean(r.perVcpu.map((v) => v.blocktimeMs)) },
  { name: 'postcopy_latency_ns', label: "QEMU's postcopy-latency", unit: 'ns', value: (r) => r.qemu['postcopy-latency'] },
  { name: 'faults', label: 'faults', unit: 'faults', value: (r) => r.counters.faults },
  { name: 'non_vcpu_faults', label: 'non-vCPU faults', unit: 'faults', value: (r) => r.counters.nonVcpuFaults },
  { name: 'requests', label: 'requests', unit: 'requests', value: (r) => r.counters.requests },
  { name: 'duplicate_requests_suppressed', label: 'duplicate requests suppressed', unit: 'requests', value: (r) => r.counters.duplicateRequestsSuppressed },
  { name: 'eexist', label: 'EEXIST results', unit: 'results', value: (r) => r.counters.eexist },
  { name: 'wakes', label: 'WAKEs', unit: 'wakes', value: (r) => r.counters.wakes },
  { name: 'pages_demand', label: 'pages demand-fetched', unit: 'pages', value: (r) => r.counters.pagesDemand },
  { name: 'pages_pushed', label: 'pages pushed', unit: 'pages', value: (r) => r.counters.pagesPushed },
  { name: 'pages_zero', label: 'zero pages', unit: 'pages', value: (r) => r.counters.pagesZero },
  { name: 'elapsed_ms', label: 'elapsed', unit: 'ms', value: (r) => r.elapsedMs },
  { name: 'push_throughput_mibs', label: 'push throughput', unit: 'MiB/s', value: (r) => r.pushThroughputMiBs },
  { name: 'total_time_ms', label: 'total migration time', unit: 'ms', value: (r) => r.totalTimeMs ?? 0 },
  { name: 'downtime_ms', label: 'downtime', unit: 'ms', value: (r) => r.downtimeMs ?? 0 },
  { name: 'expected_downtime_ms', label: 'expected downtime', unit: 'ms', value: (r) => r.expectedDowntimeMs ?? 0 },
  { name: 'precopy_rounds', label: 'precopy rounds', unit: 'rounds', value: (r) => r.precopy?.rounds ?? 0 },
  { name: 'precopy_pages_resent', label: 'pages re-sent in precopy', unit: 'pages', value: (r) => r.precopy?.pagesResent ?? 0 },
  { name: 'discard_pages', label: 'pages discarded at switchover', unit: 'pages', value: (r) => r.discard?.pages ?? 0 },
  // CPU per fault of each process (its own accounting; per-thread groups are in each run's JSON, null where unknown).
  { name: 'cpu_source_us_per_fault', label: 'source CPU per fault', unit: 'µs', value: (r) => r.cpu.perFaultUs.source ?? 0 },
  { name: 'cpu_dest_us_per_fault', label: 'destination CPU per fault', unit: 'µs', value: (r) => r.cpu.perFaultUs.dest ?? 0 },
  { name: 'verified', label: 'verified', unit: '1/0', value: (r) => (r.verified ? 1 : 0) },
];

/** Recorded for every run, with or without a report. */
export const EXIT_CODE_METRIC = 'exit_code';

export function metric(name: string): Metric {
  const m = METRICS.find((x) => x.name === name);
  if (!m) throw new Error(`no metric named ${name}`);
  return m;
}
