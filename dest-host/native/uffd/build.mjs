// Builds dest-host/native/uffd/build/uffd.node with the machine's C compiler
// and Node's own headers: no node-gyp, no download, no install script (npm
// skips dependencies' install scripts; the root `build` runs this).
//
// Where the addon cannot be built (not Linux, no compiler, no Node headers)
// it says why, records the reason in build/status.json for the TypeScript
// loader (dest-host/src/memory/uffd-native.ts), and exits 0, so the rest of
// `npm run build` goes on and the `emulated` backend still works. A compiler
// that rejects the source is a bug in it and fails the build.
//
// Environment: CC (default `cc`), npm_config_nodedir (npm sets it from
// `npm config get nodedir`), POSTCOPY_UFFD_REQUIRED=1 to fail instead of skip.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, 'build');
const source = join(here, 'uffd.c');
const target = join(out, 'uffd.node');
const statusFile = join(out, 'status.json');

mkdirSync(out, { recursive: true });

function record(status) {
  writeFileSync(statusFile, JSON.stringify({ ...status, node: process.version, platform: process.platform }, null, 2) + '\n');
}

function skip(reason) {
  record({ built: false, reason });
  if (process.env.POSTCOPY_UFFD_REQUIRED === '1') {
    process.stderr.write(`uffd addon: ${reason}\n`);
    process.exit(1);
  }
  process.stderr.write(`uffd addon not built (the uffd memory backend is unavailable): ${reason}\n`);
  process.exit(0);
}

if (process.platform !== 'linux') skip(`userfaultfd(2) is Linux only; this is ${process.platform}`);

// Up to date? (the source and this script older than the addon): nothing
// to do, and no compiler needed.
if (existsSync(target)) {
  const built = statSync(target).mtimeMs;
  if (statSync(source).mtimeMs < built && statSync(fileURLToPath(import.meta.url)).mtimeMs < built) {
    record({ built: true, path: target, upToDate: true });
    process.exit(0);
  }
}

// Node's headers: npm's nodedir first (this machine's npm config points it at
// them), then the include/ directory of the running node's own prefix.
const candidates = [
  process.env.npm_config_nodedir && join(process.env.npm_config_nodedir, 'include', 'node'),
  join(dirname(process.execPath), '..', 'include', 'node'),
].filter(Boolean);
const include = candidates.find((dir) => existsSync(join(dir, 'node_api.h')));
if (include === undefined) skip(`Node's headers (node_api.h) not found in ${candidates.join(', ')}`);

const cc = process.env.CC || 'cc';
const probe = spawnSync(cc, ['--version'], { encoding: 'utf8' });
if (probe.error || probe.status !== 0) skip(`no C compiler: \`${cc} --version\` failed (${probe.error?.message ?? `exit ${probe.status}`}); set CC or install one`);

// The blocking fault channel's TLS uses the OpenSSL linked into node, through
// the headers node ships beside node_api.h; without them the addon is built
// without it (HAVE_TLS 0) and TLS fault channels use Node's tls.
const tls = existsSync(join(include, 'openssl', 'ssl.h'));
if (!tls) process.stderr.write(`uffd addon: no OpenSSL headers in ${include}: building without TLS on the blocking fault channel\n`);
const tmp = `${target}.tmp`;
const args = [
  '-std=gnu11', '-O2', '-g', '-Wall', '-Wextra', '-Werror', '-Wno-unused-parameter',
  '-fPIC', '-shared', '-fvisibility=hidden',
  // Node-API 8 is what Node 20 guarantees (node_api.h defaults to it too).
  '-DNAPI_VERSION=8',
  `-I${include}`,
  ...(tls ? [] : ['-DPOSTCOPY_NO_TLS']),
  source, '-o', tmp, '-pthread',
];
const run = spawnSync(cc, args, { stdio: ['ignore', 'inherit', 'inherit'] });
if (run.error || run.status !== 0) {
  record({ built: false, reason: `${cc} failed to compile ${source} (exit ${run.status})` });
  process.stderr.write(`uffd addon: ${cc} ${args.join(' ')} failed\n`);
  process.exit(1);
}
renameSync(tmp, target);
record({ built: true, path: target, include });
process.stderr.write(`uffd addon built: ${target}\n`);
