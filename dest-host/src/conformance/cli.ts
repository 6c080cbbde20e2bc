/**
 * `npm run conformance -- --backend emulated|uffd [--json]`: runs the
 * userfaultfd conformance suite on one memory backend and prints each case
 * with what it observed. With --json, the report alone goes to stdout; the
 * two backends' JSON is byte-identical when they agree:
 *
 *   npm run conformance -- --backend emulated --json > emulated.json
 *   npm run conformance -- --backend uffd --json > uffd.json
 *   diff emulated.json uffd.json
 *
 * Exits 0 when every case matched the kernel's behaviour, 1 when some did
 * not, 2 for a bad option or a backend that cannot run here (saying why).
 */
import { release } from 'node:os';
import { parseArgs } from 'node:util';
import { runCli, UsageError } from '@postcopy/shared';
import { MEMORY_BACKENDS } from '../memory/backend.js';
import { memoryBackend } from '../memory/backends.js';
import { checkAvailable, formatCase, runConformance } from './run.js';

const USAGE = `usage: npm run conformance -- --backend ${MEMORY_BACKENDS.join('|')} [--json]`;

runCli('conformance', async () => {
  let values: { backend?: string; json?: boolean; help?: boolean };
  try {
    ({ values } = parseArgs({
      options: { backend: { type: 'string' }, json: { type: 'boolean', default: false }, help: { type: 'boolean', short: 'h' } },
      strict: true,
    }));
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n${USAGE}`);
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (values.backend === undefined) throw new UsageError(`--backend: expected one of ${MEMORY_BACKENDS.join(', ')}, got nothing\n${USAGE}`);
  const backend = memoryBackend(values.backend, '--backend');
  const json = values.json === true;
  await checkAvailable(backend);
  if (!json) process.stdout.write(`userfaultfd conformance on the ${backend.name} backend (Linux ${release()}, Node ${process.version})\n\n`);
  const report = await runConformance(backend, undefined, (r) => {
    if (!json) process.stdout.write(`${formatCase(r)}\n\n`);
  });
  if (json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  else process.stdout.write(`${report.passed} passed, ${report.failed} failed\n`);
  return report.failed === 0 ? 0 : 1;
});
