/**
 * The blocking fault channel over wss:// (kvm-exit vCPUs and per-thread-uffd
 * resolvers under --tls: dest-host/src/net/blocking-ws.ts, TLS with node's
 * own OpenSSL in the uffd addon) against a real `ws` server on an
 * https.Server with certificates made at run time: it fetches pages with the
 * right CA and client certificate, and it refuses what Node's tls client
 * refuses (another CA, another name, an expired certificate), as does the
 * source a client without a certificate, or with one of another CA.
 */
import { readFileSync } from 'node:fs';
import { createServer, type ServerOptions } from 'node:https';
import type { Worker } from 'node:worker_threads';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startWorker } from '@postcopy/shared';
import type { KeyPair } from '../src/certs.js';
import { loadUffdNative } from '../../dest-host/src/memory/uffd-native.js';
import type { BlockingThreadData } from '../../dest-host/src/net/fixtures/blocking-channel-thread.js';
import { FakeSource, SECRET, layout } from '../../dest-host/src/net/fixtures/fake-source.js';
import { VmmState } from '../../dest-host/src/vmm/state.js';
import { makeTestCertificates, removeCertificates, type TestCertificates } from './tls-fixtures.js';

type Posted = { type: 'connected' | 'done' } | { type: 'reply'; reply: { type: string; page: number; first?: number } } | { type: 'error'; message: string };

const CHANNEL_DIR = new URL('../../dest-host/src/net/blocking-page-channel.ts', import.meta.url).href;
let certs: TestCertificates | undefined;
const workers: Worker[] = [];
let source: FakeSource | undefined;

beforeAll(async () => {
  certs = await makeTestCertificates();
}, 60_000);
afterAll(() => removeCertificates(certs));
afterEach(async () => {
  await Promise.all(workers.splice(0).map((w) => w.terminate()));
  await source?.close();
  source = undefined;
});

const pem = (path: string): string => readFileSync(path, 'utf8');

/** A wss:// source with this certificate; with `verifyPeer`, a client certificate of the test CA is required. */
async function wssSource(pair: KeyPair, verifyPeer: boolean): Promise<FakeSource> {
  const options: ServerOptions = { cert: pem(pair.cert), key: pem(pair.key), ...(verifyPeer ? { ca: pem(certs!.ca), requestCert: true, rejectUnauthorized: true } : {}) };
  source = await FakeSource.start(createServer(options));
  return source;
}

function channelThread(url: string, tls: BlockingThreadData['tls'], pages: number[]): Posted[] {
  const posted: Posted[] = [];
  const data: BlockingThreadData = { url, secret: SECRET, guestBytes: layout.guestBytes, pageSize: layout.pageSize, counters: VmmState.create(layout.totalPages, 1).counters, pages, ...(tls ? { tls } : {}) };
  const worker = startWorker(CHANNEL_DIR, 'fixtures/blocking-channel-thread', { workerData: data });
  worker.on('message', (m: Posted) => posted.push(m));
  worker.on('error', (err) => posted.push({ type: 'error', message: `worker: ${err.message}` }));
  workers.push(worker);
  return posted;
}

const ended = (posted: Posted[]) => posted.some((m) => m.type === 'done' || m.type === 'error');
const errorOf = (posted: Posted[]) => posted.find((m): m is Extract<Posted, { type: 'error' }> => m.type === 'error');

describe.runIf(loadUffdNative().ok)('the blocking fault channel over TLS', () => {
  it('with the CA and a client certificate: fetches pages, the source saw a fault channel with the secret', { timeout: 20_000 }, async () => {
    const src = await wssSource(certs!.source, true);
    const posted = channelThread(src.url, { ca: pem(certs!.ca), cert: pem(certs!.dest.cert), key: pem(certs!.dest.key) }, [3, 4]);
    await FakeSource.until(() => src.requests.length === 1 || ended(posted));
    expect(errorOf(posted)).toBeUndefined();
    expect(src.hellos[0]).toMatchObject({ role: 1, secret: SECRET });
    src.reply(0, { type: 'page', id: src.requests[0]!.id, page: 3, data: new Uint8Array(layout.pageSize).fill(7) });
    await FakeSource.until(() => src.requests.length === 2);
    src.reply(0, { type: 'zero-page', id: src.requests[1]!.id, page: 4 });
    await FakeSource.until(() => ended(posted));
    expect(posted.filter((m) => m.type === 'reply').map((m) => (m as Extract<Posted, { type: 'reply' }>).reply)).toEqual([
      { type: 'page', id: src.requests[0]!.id, page: 3, first: 7, bytes: layout.pageSize },
      { type: 'zero-page', id: src.requests[1]!.id, page: 4 },
    ]);
  });

  it('a --tls-server-name the certificate holds: connects; the URL host it does not hold: refused', { timeout: 20_000 }, async () => {
    const src = await wssSource(certs!.sourceOtherName, false);
    const refused = channelThread(src.url, { ca: pem(certs!.ca) }, [1]);
    await FakeSource.until(() => ended(refused));
    expect(errorOf(refused)?.message).toMatch(/TLS with the source at wss:\/\/127\.0\.0\.1:\d+\/ failed: certificate verify failed: [Hh]ostname mismatch|IP address mismatch/);
    expect(src.requests).toHaveLength(0);
    const named = channelThread(src.url, { ca: pem(certs!.ca), serverName: 'source.example' }, [1]);
    await FakeSource.until(() => src.requests.length === 1 || ended(named));
    expect(errorOf(named)).toBeUndefined();
  });

  for (const [what, pair, ca, client, expected] of [
    ['a source certificate of another CA', 'source', 'otherCa', null, /certificate verify failed: (unable to get local issuer certificate|self-signed certificate in certificate chain)/],
    ['an expired source certificate', 'sourceExpired', 'ca', null, /certificate verify failed: certificate has expired/],
    ['no client certificate where the source requires one', 'source', 'ca', 'none', /TLS with the source at .* failed: .*(alert|certificate)|the source closed the connection \(does it require a client certificate/],
    ['a client certificate of another CA', 'source', 'ca', 'destOtherCa', /TLS with the source at .* failed: .*(alert|certificate)|the source closed the connection \(does it require a client certificate/],
  ] as const) {
    it(`refuses ${what}, and sends nothing`, { timeout: 20_000 }, async () => {
      const src = await wssSource(certs![pair], client !== null);
      const clientPair = client === 'destOtherCa' ? certs!.destOtherCa : undefined;
      const posted = channelThread(src.url, { ca: pem(certs![ca]), ...(clientPair ? { cert: pem(clientPair.cert), key: pem(clientPair.key) } : {}) }, [1]);
      await FakeSource.until(() => ended(posted));
      expect(errorOf(posted)?.message).toMatch(expected);
      expect(src.hellos).toHaveLength(0);
      expect(src.requests).toHaveLength(0);
    });
  }
});
