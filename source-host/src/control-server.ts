/**
 * The source's control endpoint (QEMU's QMP, for the two commands a
 * migration needs from its user): `GET /status`, a snapshot shaped like
 * query-migrate (state, round, pages remaining, dirty rate, expected
 * downtime), and `POST /migrate-start-postcopy`, which switches a running
 * hybrid precopy to postcopy at once (409 with the state in any other).
 * Loopback only, like a QMP socket: it steers the migration and has no token.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { hostForUrl, stateName } from '@postcopy/shared';
import type { MigrationController } from './controller.js';
import type { SourceDevice } from './devices/device.js';

/** The status snapshot. */
export function controlStatus(controller: MigrationController): Record<string, unknown> {
  const progress = controller.progress();
  const stats = controller.migration.stats;
  return {
    status: controller.state,
    mode: controller.mode,
    ...(progress
      ? {
          round: progress.round,
          'pages-remaining': progress.pagesRemaining,
          'dirty-pages-rate': progress.dirtyPagesRate,
          'expected-downtime': progress.expectedDowntimeMs,
          'cpu-throttle-percentage': progress.throttlePercent,
        }
      : {}),
    'postcopy-requests': stats.requests,
    'pages-pushed': stats.pagesPushed,
    'pages-sent': controller.migration.sentmap.sent,
    ...(controller.devices ? { devices: controller.devices.devices.map(deviceStatus) } : {}),
  };
}

/**
 * A device as QEMU's `info vfio`-like view would show it: its device_state,
 * and in PRE_COPY the kernel's VFIO_MIG_GET_PRECOPY_INFO (initial and dirty
 * bytes) with VFIO_DEVICE_FEATURE_MIG_DATA_SIZE (what STOP_COPY would carry).
 */
function deviceStatus(d: SourceDevice): Record<string, unknown> {
  const info = d.precopyInfo();
  return {
    name: d.name,
    'device-state': stateName(d.fsm.state),
    ...(typeof info === 'number' ? {} : { 'initial-bytes': info.initialBytes, 'dirty-bytes': info.dirtyBytes }),
    'stop-copy-length': d.stopCopyLength(),
  };
}

function json(res: ServerResponse, code: number, body: unknown): void {
  res.writeHead(code, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body) + '\n');
}

export async function startControlServer(controller: MigrationController, port: number, host = '127.0.0.1'): Promise<Server & { url: string }> {
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    if (req.method === 'GET' && req.url === '/status') {
      json(res, 200, controlStatus(controller));
      return;
    }
    if (req.method === 'POST' && req.url === '/migrate-start-postcopy') {
      const result = controller.startPostcopy();
      if (result.ok) json(res, 200, { status: controller.state, result: 'postcopy requested: the switch follows at once' });
      else json(res, 409, { status: controller.state, mode: controller.mode, error: result.reason });
      return;
    }
    json(res, 404, { error: `expected GET /status or POST /migrate-start-postcopy, got ${req.method} ${req.url}` });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const address = server.address() as AddressInfo;
  return Object.assign(server, { url: `http://${hostForUrl(address.address)}:${address.port}` });
}
