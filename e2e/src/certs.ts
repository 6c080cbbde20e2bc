/**
 * Throwaway X.509 certificates, made with the machine's `openssl` command:
 * a CA, and leaf certificates it signs for a source (server) or a
 * destination (client). `npm start -- --tls` makes a set for one run in a
 * temporary folder and removes it afterwards; the tests make theirs the same
 * way, at run time (no private key is ever committed). EC P-256 keys: fast to
 * make, and what a modern deployment would use.
 */
import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { UsageError } from '@postcopy/shared';

const run = promisify(execFile);

export interface KeyPair {
  cert: string;
  key: string;
}

/** A CA: its certificate (what peers are told to trust) and key (what signs leaves). */
export type CertificateAuthority = KeyPair;

async function openssl(args: string[], cwd: string): Promise<void> {
  try {
    await run('openssl', args, { cwd, timeout: 30_000 });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === 'ENOENT') {
      throw new UsageError(
        '--tls: expected the openssl command on PATH to make throwaway certificates, found none: install OpenSSL, or run the hosts yourself with --tls-cert, --tls-key and --tls-ca',
      );
    }
    throw new Error(`openssl ${args[0]} failed: ${(e.stderr ?? e.message).trim()}`);
  }
}

const KEY_ARGS = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];

/** A self-signed CA in `dir` (files `NAME.pem` and `NAME.key`). */
export async function makeCa(dir: string, name = 'postcopy-test-ca', days = 2): Promise<CertificateAuthority> {
  const cert = join(dir, `${name}.pem`);
  const key = join(dir, `${name}.key`);
  await openssl(
    ['req', '-x509', ...KEY_ARGS, '-keyout', key, '-out', cert, '-days', String(days), '-subj', `/CN=${name}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'],
    dir,
  );
  return { cert, key };
}

export interface LeafOptions {
  /** Host names and IP addresses the certificate is for (subjectAltName). */
  names: string[];
  /** `server` (a source) or `client` (a destination under --tls-verify-peer). */
  usage: 'server' | 'client';
  /** Validity in days from now; 0 or less makes a certificate that has already expired. */
  days?: number;
}

/** A leaf certificate signed by `ca`, in `dir` (files `NAME.pem` and `NAME.key`). */
export async function makeLeaf(dir: string, ca: CertificateAuthority, name: string, options: LeafOptions): Promise<KeyPair> {
  const cert = join(dir, `${name}.pem`);
  const key = join(dir, `${name}.key`);
  const csr = join(dir, `${name}.csr`);
  const ext = join(dir, `${name}.ext`);
  const san = options.names.map((n) => (isIP(n) ? `IP:${n}` : `DNS:${n}`)).join(',');
  writeFileSync(
    ext,
    [
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature',
      `extendedKeyUsage=${options.usage === 'server' ? 'serverAuth' : 'clientAuth'}`,
      ...(san ? [`subjectAltName=${san}`] : []),
    ].join('\n') + '\n',
  );
  await openssl(['req', ...KEY_ARGS, '-keyout', key, '-out', csr, '-subj', `/CN=${options.names[0] ?? name}`], dir);
  // `-days 0` or less gives a notAfter in the past: an expired certificate, for the refusal tests.
  const days = options.days ?? 2;
  await openssl(['x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial', '-out', cert, '-days', String(days <= 0 ? -1 : days), '-extfile', ext], dir);
  return { cert, key };
}

/** What one run over TLS needs: a CA, the source's certificate, and the destination's (for --tls-verify-peer). */
export interface RunCertificates {
  ca: string;
  source: KeyPair;
  dest: KeyPair;
}

/** A CA and the two hosts' certificates; the source's is for `hosts` (addresses and names it is reached by). */
export async function makeRunCertificates(dir: string, hosts: string[] = ['127.0.0.1', '::1', 'localhost']): Promise<RunCertificates> {
  const ca = await makeCa(dir);
  // One after the other: both update the CA's serial file.
  const source = await makeLeaf(dir, ca, 'source', { names: hosts, usage: 'server' });
  const dest = await makeLeaf(dir, ca, 'dest', { names: ['postcopy-destination'], usage: 'client' });
  return { ca: ca.cert, source, dest };
}
