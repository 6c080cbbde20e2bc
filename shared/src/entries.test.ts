/**
 * The light entries workers load (core.ts, net.ts): their static import graph
 * must not reach the heavy dependencies, or every vCPU isolate pays for them
 * again (see core.ts). Read from the built files, as workers load them.
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const DIST = fileURLToPath(new URL('../dist/', import.meta.url));
/** The destination's thread entries (built by the same `npm run build`). */
const DEST_WORKERS = fileURLToPath(new URL('../../dest-host/dist/workers/', import.meta.url));
/** The source's image threads. */
const SOURCE_DIST = fileURLToPath(new URL('../../source-host/dist/', import.meta.url));

/** Every module a built file imports statically, transitively: relative files by path, packages by name. */
function graph(entry: string): Set<string> {
  const seen = new Set<string>();
  const visit = (file: string): void => {
    if (seen.has(file)) return;
    seen.add(file);
    const text = readFileSync(file, 'utf8');
    for (const m of text.matchAll(/^(?:import|export)\s[^;]*?from\s+'([^']+)';/gms)) {
      const spec = m[1]!;
      if (/^import\s+type\s/.test(m[0]) || /^export\s+type\s/.test(m[0])) continue;
      if (spec.startsWith('.')) visit(resolve(dirname(file), spec));
      else seen.add(spec);
    }
  };
  visit(entry);
  return seen;
}

describe.runIf(existsSync(join(DIST, 'core.js')))('light entries for workers (built)', () => {
  it('core reaches no package but node built-ins', () => {
    const packages = [...graph(join(DIST, 'core.js'))].filter((s) => !s.startsWith('/') && !s.startsWith('node:'));
    expect(packages).toEqual([]);
  });

  it('net adds the codec (msgpackr) and nothing heavier: no hdr-histogram-js, no report', () => {
    const all = [...graph(join(DIST, 'net.js'))];
    const packages = all.filter((s) => !s.startsWith('/') && !s.startsWith('node:'));
    expect(packages).toEqual(['msgpackr']);
    expect(all.some((s) => s.endsWith('stats.js') || s.endsWith('report.js'))).toBe(false);
  });

  it.runIf(existsSync(DEST_WORKERS))("the destination's guest and resolver threads load the light entries only (and ws)", () => {
    for (const worker of ['guest-thread-worker.js', 'resolver-worker.js']) {
      const packages = [...graph(join(DEST_WORKERS, worker))].filter((s) => !s.startsWith('/') && !s.startsWith('node:'));
      expect(packages.filter((p) => !['@postcopy/shared/core', '@postcopy/shared/net', 'ws'].includes(p)), worker).toEqual([]);
    }
  });

  it('digest reaches no package but node built-ins; core does not reach node:crypto (no vCPU thread hashes)', () => {
    const packages = [...graph(join(DIST, 'digest-entry.js'))].filter((s) => !s.startsWith('/') && !s.startsWith('node:'));
    expect(packages).toEqual([]);
    expect([...graph(join(DIST, 'core.js'))]).not.toContain('node:crypto');
  });

  it.runIf(existsSync(DEST_WORKERS) && existsSync(SOURCE_DIST))('the digest helpers of both hosts load the core and digest entries only', () => {
    for (const worker of [join(DEST_WORKERS, 'digest-worker.js'), join(SOURCE_DIST, 'image-worker.js')]) {
      const packages = [...graph(worker)].filter((s) => !s.startsWith('/') && !s.startsWith('node:'));
      expect(packages.filter((p) => !['@postcopy/shared/core', '@postcopy/shared/digest'].includes(p)), worker).toEqual([]);
    }
  });
});
