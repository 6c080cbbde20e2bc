import { describe, expect, it } from 'vitest';
import { commandLine, runArgs, strategyRun } from '../src/migrations.js';
import { parseWarmUpOptions } from '../src/options.js';

describe("the bench's runs and their warm-ups", () => {
  const spec = strategyRun('kvm-exit');

  it('ask for the tool\'s default warm-ups unless told, and for the given ones when told', () => {
    expect(runArgs(spec, 4 << 20)).not.toContain('--warm-up-pages');
    expect(runArgs(spec, 4 << 20)).not.toContain('--warm-up-requests');
    const told = runArgs(spec, 4 << 20, { pages: 64, requests: 0 });
    expect(told.join(' ')).toContain('--warm-up-pages 64 --warm-up-requests 0');
    // The command line that reproduces a run says them too.
    expect(commandLine(spec, 4 << 20, { pages: 64 })).toMatch(/^npm start -- .*--memory 4MiB --warm-up-pages 64$/);
  });

  it('take --warm-up-pages and --warm-up-requests as whole numbers, and say which one is wrong', () => {
    expect(parseWarmUpOptions({})).toEqual({});
    expect(parseWarmUpOptions({ warmUpPages: '64', warmUpRequests: '0' })).toEqual({ pages: 64, requests: 0 });
    expect(() => parseWarmUpOptions({ warmUpRequests: 'lots' })).toThrow(/--warm-up-requests/);
    expect(() => parseWarmUpOptions({ warmUpPages: '-1' })).toThrow(/--warm-up-pages/);
  });
});
