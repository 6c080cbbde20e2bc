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

  it('takes --resume, --resume-timeout-ms and --max-connections', () => {
    expect(parse(['--resume', '--resume-timeout-ms', '2500', '--max-connections', '8'])).toMatchObject({ resume: true, resumeTimeoutMs: 2500, maxConnections: 8 });
    expect(parse(['--resume-timeout-ms', '10', '--max-connections', '65536'])).toMatchObject({ resumeTimeoutMs: 10, maxConnections: 65_536 });
  });

  it.each([
    [['--resume-timeout-ms', '9'], '--resume-timeout-ms: expected a whole number from 10 to 3600000, got "9"'],
    [['--resume-timeout-ms', '3600001'], '--resume-timeout-ms: expected a whole number from 10 to 3600000, got "3600001"'],
    [['--resume-timeout-ms', '1.5s'], '--resume-timeout-ms: expected a whole number from 10 to 3600000, got "1.5s"'],
    [['--max-connections', '0'], '--max-connections: expected a whole number from 1 to 65536, got "0"'],
    [['--max-connections', '65537'], '--max-connections: expected a whole number from 1 to 65536, got "65537"'],
    [['--max-connections', 'lots'], '--max-connections: expected a whole number from 1 to 65536, got "lots"'],
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
