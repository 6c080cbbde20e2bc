import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { DestState } from './lifecycle.js';
import { COUNTER, type VmmState } from './vmm/state.js';

/** QEMU's MigrationStatus names for the destination's phases (lifecycle.ts). */
export type MigrationState = DestState;

export interface StatusSource {
  state(): MigrationState;
  vmm: VmmState;
  totalPages: number;
  pageSize: number;
  vcpus: number;
  /** Faulting threads: vCPUs, then I/O threads (their slots follow the vCPUs'). */
  threads: number;
  /** ms since the run's epoch */
  now(): number;
  startedAt(): number | undefined;
  /** Precopy: the latest round whose pages arrived (0 before any). */
  round?(): number;
  /** Precopy modes with devices: each device's mdev instance and its device_state. */
  devices?(): { name: string; type: string; uuid: string; state: string }[];
}

/** The snapshot `GET /status` returns, shaped like QEMU's query-migrate on the destination. */
export function statusSnapshot(s: StatusSource): Record<string, unknown> {
  const now = s.now();
  const vmm = s.vmm;
  const blocktime = Array.from({ length: s.vcpus }, (_, v) => Math.round(vmm.blockedSoFar(v, now) * 1000) / 1000);
  let faults = 0;
  for (let v = 0; v < s.vcpus; v++) faults += vmm.faultsOf(v);
  let nonVcpuFaults = 0;
  for (let t = s.vcpus; t < s.threads; t++) nonVcpuFaults += vmm.faultsOf(t);
  const received = vmm.counter(COUNTER.INSTALLED);
  const started = s.startedAt();
  const blockedSum = blocktime.reduce((a, b) => a + b, 0);
  const rewrites = vmm.counter(COUNTER.PRECOPY_REWRITES);
  const elapsedS = started === undefined ? 0 : (now - started) / 1000;
  return {
    status: s.state(),
    ...(s.round && s.round() > 0
      ? {
          round: s.round(),
          'pages-remaining': s.totalPages - received,
          // What the destination sees of the guest's dirty rate: pages that arrived again per second.
          'dirty-pages-rate': elapsedS > 0 ? Math.round(rewrites / elapsedS) : 0,
          'precopy-rewrites': rewrites,
        }
      : {}),
    'total-time': started === undefined ? 0 : Math.round(now - started),
    ram: {
      total: s.totalPages * s.pageSize,
      transferred: received * s.pageSize,
      remaining: (s.totalPages - received) * s.pageSize,
      'page-size': s.pageSize,
      'postcopy-requests': vmm.counter(COUNTER.REQUESTS),
    },
    'pages-received': received,
    'pages-total': s.totalPages,
    faults,
    'faults-non-vcpu': nonVcpuFaults,
    'postcopy-vcpu-blocktime': blocktime,
    // Fault messages resolvers have read for each vCPU (mapped from the message's thread id; 0 for kvm-exit's vCPUs, which exit instead).
    'vcpu-fault-messages': Array.from({ length: s.vcpus }, (_, v) => vmm.messagesOf(v)),
    'postcopy-latency': faults > 0 ? Math.round((blockedSum * 1e6) / faults) : 0,
    ...(s.devices ? { devices: s.devices().map((d) => ({ name: d.name, type: d.type, 'mdev-uuid': d.uuid, 'device-state': d.state })) } : {}),
  };
}

/** Serves `GET /status` on `host`:`port` (127.0.0.1 unless told otherwise) while the migration runs. */
export async function startStatusServer(port: number, source: StatusSource, host = '127.0.0.1'): Promise<Server & { url: string }> {
  const server = createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/status') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(statusSnapshot(source)));
      return;
    }
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: `expected GET /status, got ${req.method} ${req.url}` }));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const address = server.address() as AddressInfo;
  const shown = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  return Object.assign(server, { url: `http://${shown}:${address.port}/status` });
}
