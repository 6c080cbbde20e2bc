/**
 * Builds the bench's C programs with the machine's own compiler, at run time,
 * into a git-ignored directory, and caches each binary by a hash of what made
 * it (source text, compiler, flags): a changed source or compiler builds anew,
 * an unchanged one is reused.
 */
import { execFile, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync } from 'node:fs';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { NativeBuildError, NoCompilerError } from './errors.js';

/** Where built binaries go unless told otherwise: bench/build/native (git-ignored). */
export const DEFAULT_BUILD_DIR = fileURLToPath(new URL('../build/native/', import.meta.url));

/** Flags of every native floor: optimised, warnings on, threads. */
export const NATIVE_CFLAGS = ['-O2', '-g', '-std=gnu11', '-Wall', '-Wextra', '-pthread'] as const;

const COMPILE_TIMEOUT_MS = 120_000;

export interface Compiler {
  /** The command and any arguments it came with (`$CC` may carry some). */
  command: string;
  args: string[];
  /** The first line of `--version`: part of the cache key. */
  version: string;
}

/**
 * The C compiler to use: `$CC` if set (it may carry arguments: `gcc -m64`),
 * else the first of `cc`, `gcc`, `clang` that answers `--version`.
 */
export function findCompiler(env: NodeJS.ProcessEnv = process.env): Compiler {
  const fromEnv = env.CC?.trim();
  const candidates = fromEnv ? [fromEnv] : ['cc', 'gcc', 'clang'];
  for (const candidate of candidates) {
    const [command, ...args] = candidate.split(/\s+/);
    if (!command) continue;
    const probe = spawnSync(command, [...args, '--version'], { env, encoding: 'utf8', timeout: 10_000 });
    if (probe.status === 0) return { command, args, version: probe.stdout.split('\n')[0]!.trim() };
  }
  throw new NoCompilerError(
    `expected a C compiler to build the native floor (${fromEnv ? `$CC=${JSON.stringify(fromEnv)}` : 'cc, gcc or clang on PATH, or $CC'}), got none that runs; ` +
      'install one (e.g. apt-get install gcc) or set CC',
  );
}

/** The cache key of a build: what it was built from, with what, and how. */
export function buildKey(source: string, compiler: Compiler, flags: readonly string[]): string {
  return createHash('sha256')
    .update(source)
    .update('\0')
    .update([compiler.command, ...compiler.args].join(' '))
    .update('\0')
    .update(compiler.version)
    .update('\0')
    .update(flags.join(' '))
    .digest('hex')
    .slice(0, 16);
}

export interface BuildOptions {
  /** Where binaries go (created if missing); default {@link DEFAULT_BUILD_DIR}. */
  buildDir?: string;
  /** Environment of the compiler lookup and the build (its `CC`, `PATH`). */
  env?: NodeJS.ProcessEnv;
}

export interface BuiltProgram {
  /** Absolute path of the binary. */
  path: string;
  /** The hash in its name. */
  key: string;
  /** True when an earlier build with the same key was reused. */
  cached: boolean;
}

/**
 * Builds `sourcePath` (a C file) into `<buildDir>/<name>-<key>`, or reuses that
 * binary if it exists. The compiler writes a temporary name that is renamed
 * into place, so concurrent builds of one key never see half a binary. A fresh
 * build removes the program's earlier binaries (other keys) from the directory.
 */
export async function buildNative(sourcePath: string, options: BuildOptions = {}): Promise<BuiltProgram> {
  const env = options.env ?? process.env;
  const buildDir = options.buildDir ?? DEFAULT_BUILD_DIR;
  const source = readFileSync(sourcePath, 'utf8');
  const compiler = findCompiler(env);
  const key = buildKey(source, compiler, NATIVE_CFLAGS);
  const path = join(buildDir, `${basename(sourcePath).replace(/\.c$/, '')}-${key}`);
  if (existsSync(path)) return { path, key, cached: true };
  mkdirSync(buildDir, { recursive: true });
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await new Promise<void>((resolve, reject) => {
      execFile(
        compiler.command,
        [...compiler.args, ...NATIVE_CFLAGS, '-o', tmp, sourcePath],
        { env, timeout: COMPILE_TIMEOUT_MS, maxBuffer: 4 * 1024 * 1024 },
        (err, _stdout, stderr) => {
          if (!err) resolve();
          else
            reject(
              new NativeBuildError(
                `expected ${compiler.command} to build ${sourcePath}, got ${err.killed ? `no result within ${COMPILE_TIMEOUT_MS} ms` : `exit code ${String(err.code)}`}` +
                  (stderr.trim() ? `:\n${stderr.trim()}` : ''),
              ),
            );
        },
      );
    });
    renameSync(tmp, path);
  } finally {
    rmSync(tmp, { force: true });
  }
  pruneStale(buildDir, basename(path), key);
  return { path, key, cached: false };
}

/** Removes `<name>-<other key>` binaries older builds left (not temporaries of builds under way). */
function pruneStale(buildDir: string, fileName: string, key: string): void {
  const stem = fileName.slice(0, -key.length);
  for (const entry of readdirSync(buildDir)) {
    if (entry !== fileName && entry.startsWith(stem) && /^[0-9a-f]{16}$/.test(entry.slice(stem.length))) {
      rmSync(join(buildDir, entry), { force: true });
    }
  }
}
