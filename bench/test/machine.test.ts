import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { VIRTIO_BALLOON_F_REPORTING, freePageReporting } from '../src/machine.js';

describe('free page reporting of a virtio-balloon', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'balloon-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  const device = (name: string, features: string): void => {
    mkdirSync(join(dir, name));
    writeFileSync(join(dir, name, 'features'), `${features}\n`);
  };
  const bits = (...set: number[]): string => Array.from({ length: 64 }, (_, i) => (set.includes(i) ? '1' : '0')).join('');

  it('reads bit 5 of the features, bit 0 first', () => {
    // The development VM's balloon: STATS_VQ, DEFLATE_ON_OOM, REPORTING and bit 7.
    device('virtio0', '01100101' + '0'.repeat(56));
    expect(VIRTIO_BALLOON_F_REPORTING).toBe(5);
    expect(freePageReporting(dir)).toBe(true);
  });

  it('is false for a balloon without it, even with its neighbours set', () => {
    device('virtio3', bits(1, 2, 4, 6));
    expect(freePageReporting(dir)).toBe(false);
  });

  it('is true when any of several balloons reports', () => {
    device('virtio1', bits(1));
    device('virtio2', bits(5));
    expect(freePageReporting(dir)).toBe(true);
  });

  it('is false on Linux without a balloon driver, and looks only at devices', () => {
    writeFileSync(join(dir, 'bind'), '');
    expect(freePageReporting(dir)).toBe(false);
    expect(freePageReporting(join(dir, 'absent'))).toBe(process.platform === 'linux' ? false : null);
  });
});
