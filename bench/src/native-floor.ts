/**
 * The native floor (issue 9, "Faults per second with many vCPUs"): what each
 * fault path costs on the real kernel, measured by the project's own C program
 * (bench/native/fault-floor.c, built here with the machine's compiler), so the
 * bench can hold each strategy's demand paging rate, and their ranking, to it.
 *
 * Each run is one process (and the page server it forks): N vCPU threads,
 * 16 MiB each by default, 4 KiB pages over loopback TCP; it prints one line of
 * JSON, which is validated here. Content is verified by the C program; a
 * mismatch is a `CheckError('content')`.
 */
import { spawn } from 'node:child_process';
import type { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { CheckError, UsageError, describe } from '@postcopy/shared';
import { exitCode } from './child-exit.js';
import { FloorRunError, FloorTimeoutError, UffdUnavailableError } from './errors.js';
import { median } from './figures.js';
import { buildNative, type BuildOptions, type BuiltProgram } from './native-build.js';

/** The C source, found from src/ and dist/ alike. */
export const NATIVE_FLOOR_SOURCE = fileURLToPath(new URL('../native/fault-floor.c', import.meta.url));

export const NATIVE_FLOOR_MODES = ['shared', 'per-region', 'exit'] as const;
export type NativeFloorMode = (typeof NATIVE_FLOOR_MODES)[number];

/**
 * Each strategy of the tool and its counterpart in the native floor (issue 9):
 * one shared userfaultfd with a handler per vCPU; one userfaultfd per region
 * (the kernel has no per-thread one); the memory-fault-exit path.
 */
export const NATIVE_COUNTERPART = {
  'shared-uffd': 'shared',
  'per-thread-uffd': 'per-region',
  'per-region-uffd': 'per-region',
  'kvm-exit': 'exit',
} as const satisfies Record<string, NativeFloorMode>;

/** Option defaults in one literal. */
export const NATIVE_FLOOR_DEFAULTS = {
  mibPerVcpu: 16,
  seed: 1,
  timeoutMs: 120_000,
} as const;

/** The C program's exit codes (see the header of fault-floor.c). */
const EXIT = { ok: 0, error: 1, usage: 2, mismatch: 3, timeout: 4, noUffd: 5 } as const;
/** How long after its own timeout the C program gets before it is SIGKILLed. */
const KILL_GRACE_MS = 2_000;
const STDERR_TAIL_CHARS = 2_000;
/** How long a dead run's pipes may stay open (its server dying too). */
const PIPE_CLOSE_MS = 2_000;

export interface NativeFloorRunOptions {
  mode: NativeFloorMode;
  vcpus: number;
  /** Each vCPU's partition, in MiB (default 16, as issue 9). */
  mibPerVcpu?: number;
  /** Seed of the server's page content. */
  seed?: number;
  /** The whole run, build excluded; then its processes are killed (default 120 s). */
  timeoutMs?: number;
  /** Testing only: the server corrupts this page (the run must fail its content check). */
  corruptPage?: number;
  /** Testing only: the C program's own timeout, when it must differ from `timeoutMs`. */
  programTimeoutMs?: number;
  /** Testing only: the server never answers (every fault hangs until a timeout). */
  stallServer?: boolean;
  /** Called with the process id once it is started. */
  onSpawn?: (pid: number) => void;
  signal?: AbortSignal;
}

/** One run's figures, exactly as the C program printed them (validated). */
export interface NativeFloorResult {
  floor: 'native';
  mode: NativeFloorMode;
  vcpus: number;
  pageSize: number;
  pagesPerVcpu: number;
  pages: number;
  /** From releasing the vCPUs to the last one joined (demand_paging_test's timing). */
  elapsedMs: number;
  /** pages / elapsed: the demand paging rate. */
  pagesPerSec: number;
  /** Per access of a missing page, fault to resume. */
  latencyUs: { p50: number; p90: number; p99: number; max: number };
  /** UFFDIO_COPY results of EEXIST, and the WAKEs they were owed. */
  eexist: number;
  wakes: number;
  verified: boolean;
}

function field(obj: Record<string, unknown>, key: string, where: string): number {
  const v = obj[key];
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new FloorRunError(`expected ${where}${key} to be a finite number >= 0, got ${describe(v)}`);
  return v;
}

/** Validates the C program's JSON line (every field, its type and range). */
export function parseNativeFloorLine(line: string): NativeFloorResult {
  let raw: unknown;
  try {
    raw = JSON.parse(line);
  } catch {
    throw new FloorRunError(`expected one line of JSON from the native floor, got ${describe(line)}`);
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new FloorRunError(`expected a JSON object from the native floor, got ${describe(raw)}`);
  const o = raw as Record<string, unknown>;
  if (o.floor !== 'native') throw new FloorRunError(`expected floor "native", got ${describe(o.floor)}`);
  const mode = o.mode;
  if (typeof mode !== 'string' || !(NATIVE_FLOOR_MODES as readonly string[]).includes(mode)) {
    throw new FloorRunError(`expected mode ${NATIVE_FLOOR_MODES.join(', ')}, got ${describe(mode)}`);
  }
  const lat = o.latencyUs;
  if (lat === null || typeof lat !== 'object') throw new FloorRunError(`expected latencyUs to be an object, got ${describe(lat)}`);
  const l = lat as Record<string, unknown>;
  if (typeof o.verified !== 'boolean') throw new FloorRunError(`expected verified to be a boolean, got ${describe(o.verified)}`);
  const result: NativeFloorResult = {
    floor: 'native',
    mode: mode as NativeFloorMode,
    vcpus: field(o, 'vcpus', ''),
    pageSize: field(o, 'pageSize', ''),
    pagesPerVcpu: field(o, 'pagesPerVcpu', ''),
    pages: field(o, 'pages', ''),
    elapsedMs: field(o, 'elapsedMs', ''),
    pagesPerSec: field(o, 'pagesPerSec', ''),
    latencyUs: { p50: field(l, 'p50', 'latencyUs.'), p90: field(l, 'p90', 'latencyUs.'), p99: field(l, 'p99', 'latencyUs.'), max: field(l, 'max', 'latencyUs.') },
    eexist: field(o, 'eexist', ''),
    wakes: field(o, 'wakes', ''),
    verified: o.verified,
  };
  if (result.pages !== result.vcpus * result.pagesPerVcpu) {
    throw new FloorRunError(`expected pages = vcpus x pagesPerVcpu = ${result.vcpus * result.pagesPerVcpu}, got ${result.pages}`);
  }
  return result;
}

/** Builds (or reuses) the native floor's binary. */
export function buildNativeFloor(options: BuildOptions = {}): Promise<BuiltProgram> {
  return buildNative(NATIVE_FLOOR_SOURCE, options);
}

function checkRunOptions(o: NativeFloorRunOptions): void {
  if (!(NATIVE_FLOOR_MODES as readonly string[]).includes(o.mode)) throw new UsageError(`expected mode ${NATIVE_FLOOR_MODES.join(', ')}, got ${describe(o.mode)}`);
  if (!Number.isInteger(o.vcpus) || o.vcpus < 1 || o.vcpus > 1024) throw new UsageError(`expected vcpus from 1 to 1024, got ${describe(o.vcpus)}`);
  const mib = o.mibPerVcpu ?? NATIVE_FLOOR_DEFAULTS.mibPerVcpu;
  if (!Number.isInteger(mib) || mib < 1 || mib > 65536) throw new UsageError(`expected mibPerVcpu from 1 to 65536, got ${describe(mib)}`);
}

/**
 * One run of the native floor with an already built binary. Resolves with its
 * figures; rejects with CheckError('content') on a page mismatch,
 * FloorTimeoutError after `timeoutMs` (the process is killed with SIGKILL and
 * its server dies with it: PR_SET_PDEATHSIG), UffdUnavailableError, or
 * FloorRunError for anything else.
 */
export async function runNativeFloorBinary(binary: string, options: NativeFloorRunOptions): Promise<NativeFloorResult> {
  checkRunOptions(options);
  const timeoutMs = options.timeoutMs ?? NATIVE_FLOOR_DEFAULTS.timeoutMs;
  const args = [
    '--mode',
    options.mode,
    '--vcpus',
    String(options.vcpus),
    '--mib-per-vcpu',
    String(options.mibPerVcpu ?? NATIVE_FLOOR_DEFAULTS.mibPerVcpu),
    '--seed',
    String(options.seed ?? NATIVE_FLOOR_DEFAULTS.seed),
    '--timeout-ms',
    String(options.programTimeoutMs ?? timeoutMs),
  ];
  if (options.corruptPage !== undefined) args.push('--corrupt-page', String(options.corruptPage));
  if (options.stallServer) args.push('--stall-server', '1');
  const what = `the native floor (${options.mode}, ${options.vcpus} vCPUs)`;
  options.signal?.throwIfAborted();

  const child = spawn(binary, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-STDERR_TAIL_CHARS)));
  const spawned = new Promise<void>((resolve, reject) => {
    child.once('spawn', resolve);
    child.once('error', (err) => reject(new FloorRunError(`expected to start ${binary}, got ${err.message}`)));
  });
  const exit = exitCode(child);
  let killedFor: 'timeout' | 'abort' | undefined;
  const kill = (why: 'timeout' | 'abort'): void => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    killedFor ??= why;
    child.kill('SIGKILL');
  };
  const timer = setTimeout(() => kill('timeout'), timeoutMs + KILL_GRACE_MS);
  const onAbort = (): void => kill('abort');
  options.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    await spawned;
    if (child.pid !== undefined) options.onSpawn?.(child.pid);
    const code = await exit;
    await drained(child.stdout, child.stderr);
    const said = stderr.trim();
    if (killedFor === 'abort') throw new FloorRunError(`${what} was aborted`);
    if (killedFor === 'timeout' || code === EXIT.timeout) {
      throw new FloorTimeoutError(`expected ${what} to finish within ${timeoutMs} ms, got no result${said ? `: ${said}` : ''}`);
    }
    if (code === EXIT.noUffd) throw new UffdUnavailableError(`${what} cannot open a userfaultfd: ${said}`);
    const line = stdout.trim().split('\n').at(-1) ?? '';
    if (code === EXIT.mismatch) {
      throw new CheckError('content', `${what}: expected every page to match the server's content, got ${describeMismatch(line)}`);
    }
    if (code !== EXIT.ok) throw new FloorRunError(`expected ${what} to exit 0, got ${code}${said ? `: ${said}` : ''}`);
    const result = parseNativeFloorLine(line);
    if (!result.verified) throw new CheckError('content', `${what} exited 0 but reports verified: false`);
    if (result.mode !== options.mode || result.vcpus !== options.vcpus) {
      throw new FloorRunError(`expected ${what}'s result, got one for ${result.mode} with ${result.vcpus} vCPUs`);
    }
    return result;
  } finally {
    clearTimeout(timer);
    options.signal?.removeEventListener('abort', onAbort);
    // Whatever was thrown above, the process does not outlive this call.
    kill('abort');
    await exit;
  }
}

/**
 * Waits for a child's pipes to deliver their last bytes after it exited. They
 * normally close at once; the page server it forked shares them until it dies
 * too (PR_SET_PDEATHSIG), so give them a moment, then let go.
 */
async function drained(...streams: Readable[]): Promise<void> {
  const open = streams.filter((s) => !s.closed);
  if (open.length === 0) return;
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    Promise.all(open.map((s) => new Promise((resolve) => s.once('close', resolve)))),
    new Promise((resolve) => (timer = setTimeout(resolve, PIPE_CLOSE_MS))),
  ]);
  clearTimeout(timer);
  for (const s of open) s.destroy();
}

function describeMismatch(line: string): string {
  try {
    const o = JSON.parse(line) as { mismatchedPages?: unknown; firstMismatch?: { page?: unknown; offset?: unknown } };
    return `${String(o.mismatchedPages)} mismatched (first: page ${String(o.firstMismatch?.page)}, byte ${String(o.firstMismatch?.offset)})`;
  } catch {
    return `a mismatch (and no readable result: ${describe(line)})`;
  }
}

/** Builds the native floor (cached) and runs it once. */
export async function runNativeFloor(options: NativeFloorRunOptions & BuildOptions): Promise<NativeFloorResult> {
  const { path } = await buildNativeFloor(options);
  return runNativeFloorBinary(path, options);
}

export interface NativeFloorSweepOptions extends BuildOptions {
  vcpus: readonly number[];
  modes: readonly NativeFloorMode[];
  /** Runs of each (mode, vCPUs); interleaved: every combination once, then again. */
  repeat: number;
  mibPerVcpu?: number;
  /** Per run. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Called after each run. */
  onResult?: (result: NativeFloorResult, index: number, total: number) => void;
}

/** Every combination of `vcpus` × `modes`, `repeat` times (interleaved), one after another. */
export async function measureNativeFloor(options: NativeFloorSweepOptions): Promise<NativeFloorResult[]> {
  if (!Number.isInteger(options.repeat) || options.repeat < 1) throw new UsageError(`expected repeat >= 1, got ${describe(options.repeat)}`);
  const { path } = await buildNativeFloor(options);
  const total = options.repeat * options.vcpus.length * options.modes.length;
  const results: NativeFloorResult[] = [];
  for (let r = 0; r < options.repeat; r++) {
    for (const vcpus of options.vcpus) {
      for (const mode of options.modes) {
        const result = await runNativeFloorBinary(path, {
          mode,
          vcpus,
          ...(options.mibPerVcpu !== undefined && { mibPerVcpu: options.mibPerVcpu }),
          ...(options.timeoutMs !== undefined && { timeoutMs: options.timeoutMs }),
          ...(options.signal !== undefined && { signal: options.signal }),
        });
        results.push(result);
        options.onResult?.(result, results.length, total);
      }
    }
  }
  return results;
}

/** Median, min and max over the repeats of one (mode, vCPUs). */
export interface NativeFloorSummary {
  mode: NativeFloorMode;
  vcpus: number;
  runs: number;
  pagesPerSec: { median: number; min: number; max: number };
  p50Us: { median: number; min: number; max: number };
}

/** Groups results by (mode, vCPUs), in the order they first appear. */
export function summarizeNativeFloor(results: readonly NativeFloorResult[]): NativeFloorSummary[] {
  const groups = new Map<string, NativeFloorResult[]>();
  for (const r of results) {
    const key = `${r.mode}/${r.vcpus}`;
    const g = groups.get(key);
    if (g) g.push(r);
    else groups.set(key, [r]);
  }
  const stats = (xs: number[]): { median: number; min: number; max: number } => ({ median: median(xs), min: Math.min(...xs), max: Math.max(...xs) });
  return [...groups.values()].map((g) => ({
    mode: g[0]!.mode,
    vcpus: g[0]!.vcpus,
    runs: g.length,
    pagesPerSec: stats(g.map((r) => r.pagesPerSec)),
    p50Us: stats(g.map((r) => r.latencyUs.p50)),
  }));
}
