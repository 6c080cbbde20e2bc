/**
 * TLS for the migration link (QEMU's `tls-creds-x509`): the certificate and
 * key files of a host and the CA it trusts, read and checked before anything
 * listens or connects, so that a wrong file is a usage error (exit 2) naming
 * the option and the file rather than a failure halfway through a migration;
 * and the errors a TLS peer can meet, said in the user's terms.
 */
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createSecureContext } from 'node:tls';
import { UsageError } from './errors.js';

/** The files as the options name them (`--tls-cert`, `--tls-key`, `--tls-ca`). */
export interface TlsFiles {
  cert?: string | undefined;
  key?: string | undefined;
  ca?: string | undefined;
}

/** What the files hold (PEM text), ready for `tls` and for a worker's `workerData`. */
export interface TlsMaterial {
  cert?: string;
  key?: string;
  ca?: string;
}

function readPem(option: string, path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new UsageError(`${option}: expected a readable PEM file, got ${JSON.stringify(path)} (${e.code ?? e.message})`);
  }
}

/** The certificates of a PEM text, parsed (throws UsageError naming `option` if there is none or one is broken). */
export function parseCertificates(option: string, path: string, pem: string): X509Certificate[] {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length === 0) throw new UsageError(`${option}: expected a PEM certificate in ${JSON.stringify(path)}, got none`);
  return blocks.map((block, i) => {
    try {
      return new X509Certificate(block);
    } catch (err) {
      throw new UsageError(`${option}: expected PEM certificates in ${JSON.stringify(path)}, but certificate ${i + 1} does not parse (${(err as Error).message})`);
    }
  });
}

/**
 * Reads and checks a host's TLS files: each must be readable and hold what
 * its option says (certificates, a private key), and the key must be the
 * certificate's (OpenSSL's "key values mismatch"). `cert` and `key` go
 * together. Returns the PEM texts and warnings (a certificate outside its
 * validity: the peer will refuse it, and whose clock counts is the peer's).
 */
export function loadTlsFiles(files: TlsFiles, now = new Date()): { material: TlsMaterial; warnings: string[] } {
  const material: TlsMaterial = {};
  const warnings: string[] = [];
  if ((files.cert === undefined) !== (files.key === undefined)) {
    throw new UsageError(
      files.cert === undefined
        ? `--tls-key: expected --tls-cert with it (the certificate the key belongs to), got --tls-key alone`
        : `--tls-cert: expected --tls-key with it (the certificate's private key), got --tls-cert alone`,
    );
  }
  if (files.ca !== undefined) {
    material.ca = readPem('--tls-ca', files.ca);
    parseCertificates('--tls-ca', files.ca, material.ca);
  }
  if (files.cert !== undefined && files.key !== undefined) {
    material.cert = readPem('--tls-cert', files.cert);
    material.key = readPem('--tls-key', files.key);
    const [leaf] = parseCertificates('--tls-cert', files.cert, material.cert);
    try {
      createPrivateKey(material.key);
    } catch (err) {
      throw new UsageError(`--tls-key: expected a PEM private key in ${JSON.stringify(files.key)}, got none that parses (${(err as Error).message})`);
    }
    try {
      createSecureContext({ cert: material.cert, key: material.key });
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      if (e.code === 'ERR_OSSL_X509_KEY_VALUES_MISMATCH') {
        throw new UsageError(`--tls-key: expected the private key of the certificate in ${JSON.stringify(files.cert)}, got a key (${JSON.stringify(files.key)}) that does not match it`);
      }
      throw new UsageError(`--tls-cert/--tls-key: the certificate and key cannot be used together (${e.message})`);
    }
    if (leaf) {
      const from = new Date(leaf.validFrom);
      const to = new Date(leaf.validTo);
      if (now > to) warnings.push(`the certificate in --tls-cert (${files.cert}) expired on ${leaf.validTo}: peers will refuse it`);
      else if (now < from) warnings.push(`the certificate in --tls-cert (${files.cert}) is not valid before ${leaf.validFrom}: peers will refuse it`);
    }
  }
  return { material, warnings };
}

/**
 * A TLS (or TLS-shaped) connection error on the destination, said in the
 * user's terms: which side refused what, and what would fix it. Codes are
 * OpenSSL's verify results (as Node names them) and alerts the source sent.
 */
export function explainTlsError(err: NodeJS.ErrnoException, url: string, serverName: string | undefined): string | undefined {
  const code = err.code ?? '';
  const name = serverName ?? hostOfUrl(url);
  switch (code) {
    case 'UNABLE_TO_VERIFY_LEAF_SIGNATURE':
    case 'UNABLE_TO_GET_ISSUER_CERT':
    case 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY':
    case 'SELF_SIGNED_CERT_IN_CHAIN':
    case 'DEPTH_ZERO_SELF_SIGNED_CERT':
    case 'CERT_SIGNATURE_FAILURE':
      return `the source's certificate is not signed by a CA this destination trusts (${code}): expected one signed by the CA in --tls-ca`;
    case 'CERT_HAS_EXPIRED':
      return `the source's certificate has expired (${code}): expected a certificate valid now`;
    case 'CERT_NOT_YET_VALID':
      return `the source's certificate is not valid yet (${code}): expected a certificate valid now`;
    case 'ERR_TLS_CERT_ALTNAME_INVALID': {
      // Node's own message lists only the names of the host's kind ("IP:
      // 127.0.0.1 is not in the cert's list: " for a certificate of DNS
      // names), so say which names the certificate does hold.
      const cert = (err as { cert?: { subjectaltname?: string; subject?: { CN?: string | string[] } } }).cert;
      const held = cert?.subjectaltname ?? (cert?.subject?.CN !== undefined ? `CN=${String(cert.subject.CN)}` : undefined);
      const got = held ? `got one for ${printableName(held)}` : `got one for other names (${err.message})`;
      return `the source's certificate is not for ${JSON.stringify(name)}: expected a certificate naming ${JSON.stringify(name)} (${serverName !== undefined ? '--tls-server-name' : 'the host in --source'}), ${got}; give --tls-server-name with a name it holds`;
    }
    case 'ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED':
    case 'ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE':
      return `the source requires a client certificate (--tls-verify-peer) and this destination sent none (${code}): give --tls-cert and --tls-key signed by the source's CA`;
    case 'ERR_SSL_TLSV1_ALERT_UNKNOWN_CA':
    case 'ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE':
    case 'ERR_SSL_TLSV1_ALERT_DECRYPT_ERROR':
      return `the source refused this destination's certificate (${code}): expected one signed by the CA the source trusts (its --tls-ca)`;
    case 'ERR_SSL_SSLV3_ALERT_CERTIFICATE_EXPIRED':
      return `the source refused this destination's certificate as expired (${code}): expected a certificate valid now in --tls-cert`;
    case 'ERR_SSL_WRONG_VERSION_NUMBER':
    case 'ERR_SSL_PACKET_LENGTH_TOO_LONG':
    case 'EPROTO':
      return url.startsWith('wss:')
        ? `the source at ${url} does not speak TLS (${code}): expected a source started with --tls-cert and --tls-key, or use ws:// for a plain one`
        : undefined;
    default:
      return undefined;
  }
}

/** Names from a peer's certificate, safe to print: printable ASCII, bounded. */
function printableName(text: string): string {
  const safe = text.replace(/[^\x20-\x7e]/g, '?');
  return safe.length > 200 ? `${safe.slice(0, 199)}…` : safe;
}

function hostOfUrl(url: string): string {
  try {
    return new URL(url).hostname.replace(/^\[|\]$/g, '');
  } catch {
    return url;
  }
}

/**
 * `--host` as the user may write it: a name, an IPv4 address, or an IPv6
 * address with or without brackets (`::1`, `[::]`). Returns the address to
 * bind (no brackets).
 */
export function parseHost(option: string, value: string): string {
  const v = value.trim();
  const bare = v.startsWith('[') && v.endsWith(']') ? v.slice(1, -1) : v;
  if (bare === '' || /[\s/]/.test(bare) || (bare.includes(':') && !/^[0-9a-fA-F:.%\w-]+$/.test(bare))) {
    throw new UsageError(`${option}: expected a host name or address (127.0.0.1, ::1, [::], 0.0.0.0), got ${JSON.stringify(value)}`);
  }
  return bare;
}

/** A host as it goes in a URL: IPv6 addresses in brackets (RFC 3986 §3.2.2). */
export function hostForUrl(host: string): string {
  return host.includes(':') && !host.startsWith('[') ? `[${host}]` : host;
}
