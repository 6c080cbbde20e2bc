import { UsageError } from '@postcopy/shared';
import { describe, expect, it } from 'vitest';
import { SOURCE_DEFAULTS, parseSourceOptions, sourceCommand } from './options.js';

function parse(args: string[]): ReturnType<typeof parseSourceOptions> {
  const cmd = sourceCommand().exitOverride();
  cmd.parse(args, { from: 'user' });
  return parseSourceOptions(cmd.opts());
}

describe('source options: recovery and connection limit', () => {
  it('defaults: no --resume, a 10 s resume wait, 1024 connections', () => {
    const options = parse([]);
    expect(options).toMatchObject({ resume: false, resumeTimeoutMs: 10_000, maxConnections: 1024 });
    expect(SOURCE_DEFAULTS).toMatchObject({ resume: false, resumeTimeoutMs: '10000', maxConnections: '1024' });
  });

  it('takes --host with IPv6 addresses, bracketed or not', () => {
    expect(parse(['--host', '::1'])).toMatchObject({ host: '::1' });
    expect(parse(['--host', '[::]'])).toMatchObject({ host: '::' });
    expect(parse(['--host', '0.0.0.0'])).toMatchObject({ host: '0.0.0.0', tls: undefined, keepaliveMs: 10_000 });
  });

  it('takes --resume, --resume-timeout-ms and --max-connections', () => {
    expect(parse(['--resume', '--secret-file', '/run/s', '--resume-timeout-ms', '2500', '--max-connections', '8'])).toMatchObject({ resume: true, resumeTimeoutMs: 2500, maxConnections: 8, secretFile: '/run/s' });
    expect(parse(['--resume-timeout-ms', '10', '--max-connections', '65536'])).toMatchObject({ resumeTimeoutMs: 10, maxConnections: 65_536 });
  });

  it.each([
    [['--resume-timeout-ms', '9'], '--resume-timeout-ms: expected a whole number from 10 to 3600000, got "9"'],
    [['--resume-timeout-ms', '3600001'], '--resume-timeout-ms: expected a whole number from 10 to 3600000, got "3600001"'],
    [['--resume-timeout-ms', '1.5s'], '--resume-timeout-ms: expected a whole number from 10 to 3600000, got "1.5s"'],
    [['--max-connections', '0'], '--max-connections: expected a whole number from 1 to 65536, got "0"'],
    [['--max-connections', '65537'], '--max-connections: expected a whole number from 1 to 65536, got "65537"'],
    [['--max-connections', 'lots'], '--max-connections: expected a whole number from 1 to 65536, got "lots"'],
    [['--resume'], "--resume: expected --secret-file with it (the file the source that died wrote its migration's secret to): without the secret, a resumed migration could be taken over by anyone with the token"],
    [['--keepalive-ms', '-1'], '--keepalive-ms: expected a whole number from 0 to 3600000, got "-1"'],
    [['--host', ''], '--host: expected a host name or address (127.0.0.1, ::1, [::], 0.0.0.0), got ""'],
    [['--tls-verify-peer'], "--tls-verify-peer: expected --tls-cert and --tls-key with it (TLS needs the source's own certificate), got neither"],
    [['--tls-cert', '/nonexistent/cert.pem'], '--tls-cert: expected --tls-key with it (the certificate\'s private key), got --tls-cert alone'],
    [['--tls-cert', '/nonexistent/cert.pem', '--tls-key', '/nonexistent/key.pem'], '--tls-cert: expected a readable PEM file, got "/nonexistent/cert.pem" (ENOENT)'],
  ])('refuses %j with a usage error', (args, message) => {
    let caught: unknown;
    try {
      parse(args);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(UsageError);
    expect((caught as Error).message).toBe(message);
  });
});
