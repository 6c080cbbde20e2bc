/**
 * Two network namespaces joined by a veth pair: two "hosts" on one machine,
 * with a real network boundary (and a real link to take down) between them.
 * Needs root and `ip netns` (iproute2); without them `makeHostPair` throws a
 * clear error, so a test that needs it fails instead of being skipped.
 *
 * Everything made here is removed on every exit path: `removeHostPair` (from
 * a test's afterEach), a synchronous fallback on process exit and on
 * SIGINT/SIGTERM/SIGHUP, and a sweep at the next run of namespaces whose
 * owning process (its pid is in the name) is gone, for a runner that was
 * SIGKILLed. Removing a pair first kills every process inside it (`ip netns
 * pids`): a namespace that still holds processes outlives `ip netns del`.
 */
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** Every name made here starts with this, then the owner's pid: `pc2h-PID-RAND-s`. */
const PREFIX = 'pc2h-';
/** Any single `ip` command that takes longer than this has hung: fail. */
const IP_TIMEOUT_MS = 5_000;

export interface HostPair {
  /** Namespace of the source host, and its end of the veth (with `sourceAddr`). */
  sourceNs: string;
  sourceIf: string;
  sourceAddr: string;
  /** Namespace of the destination host, and its end of the veth (with `destAddr`). */
  destNs: string;
  destIf: string;
  destAddr: string;
}

/** Runs `ip ARGS`; rejects with its stderr (or a timeout). */
export async function ip(args: string[], timeoutMs = IP_TIMEOUT_MS): Promise<string> {
  try {
    const { stdout } = await run('ip', args, { timeout: timeoutMs, killSignal: 'SIGKILL' });
    return stdout;
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string; killed?: boolean };
    if (e.killed) throw new Error(`ip ${args.join(' ')}: no answer within ${timeoutMs} ms`);
    throw new Error(`ip ${args.join(' ')} failed: ${(e.stderr ?? e.message).trim()}`);
  }
}

/**
 * Throws, saying what is missing, unless this process can make network
 * namespaces: root, and an `ip` that knows `netns`.
 */
export function requireNetns(): void {
  const uid = process.getuid?.();
  if (uid !== 0) {
    throw new Error(
      `the two-hosts test needs root to make network namespaces and a veth pair (ip netns, ip link), got uid ${uid ?? 'unknown'}: run it as root (CI does)`,
    );
  }
  try {
    execFileSync('ip', ['netns', 'list'], { stdio: ['ignore', 'ignore', 'pipe'], timeout: IP_TIMEOUT_MS });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: Buffer };
    const why = e.code === 'ENOENT' ? 'the ip command (iproute2) is not on PATH' : (e.stderr?.toString().trim() || e.message);
    throw new Error(`the two-hosts test needs \`ip netns\` (iproute2) to make network namespaces: ${why}`);
  }
}

/** Pairs made by this process and not removed yet (for the exit fallback). */
const live = new Set<HostPair>();

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Kills every process in `ns` and deletes it, synchronously; errors are ignored (it may be gone already). */
function removeNsSync(ns: string): void {
  try {
    const pids = execFileSync('ip', ['netns', 'pids', ns], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: IP_TIMEOUT_MS });
    for (const pid of pids.split(/\s+/).filter(Boolean)) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        // Gone meanwhile.
      }
    }
  } catch {
    // No such namespace.
  }
  try {
    execFileSync('ip', ['netns', 'del', ns], { stdio: 'ignore', timeout: IP_TIMEOUT_MS });
  } catch {
    // Already deleted.
  }
}

function removeAllSync(): void {
  for (const pair of live) {
    removeNsSync(pair.sourceNs);
    removeNsSync(pair.destNs);
  }
  live.clear();
}

let hooked = false;
/** The fallback: whatever way this process ends, its namespaces (and what runs in them) go with it. */
function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.on('exit', removeAllSync);
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    const onSignal = (): void => {
      removeAllSync();
      // Then die of the signal as if nobody had caught it.
      process.off(signal, onSignal);
      process.kill(process.pid, signal);
    };
    process.on(signal, onSignal);
  }
}

/** Removes namespaces of earlier runs whose owning process is gone (a runner killed with SIGKILL cleans nothing). */
function sweepStale(): void {
  let list = '';
  try {
    list = execFileSync('ip', ['netns', 'list'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: IP_TIMEOUT_MS });
  } catch {
    return;
  }
  for (const line of list.split('\n')) {
    const name = line.split(/\s+/)[0] ?? '';
    const m = new RegExp(`^${PREFIX}(\\d+)-`).exec(name);
    if (m && Number(m[1]) !== process.pid && !alive(Number(m[1]))) removeNsSync(name);
  }
}

/**
 * Makes the source's and the destination's namespaces, a veth pair between
 * them, and a random /30 of 10.0.0.0/8 on it (`.1` the source, `.2` the
 * destination; the addresses exist only on that veth, inside the
 * namespaces); `lo` is up in both. Names are unique per run (interface
 * names within the kernel's 15 characters).
 */
export async function makeHostPair(): Promise<HostPair> {
  requireNetns();
  hookExit();
  sweepStale();
  const tag = randomBytes(3).toString('hex');
  const base = `10.${randomInt(200, 255)}.${randomInt(0, 256)}.${randomInt(0, 64) * 4}`;
  const [a, b, c, d] = base.split('.').map(Number) as [number, number, number, number];
  const pair: HostPair = {
    sourceNs: `${PREFIX}${process.pid}-${tag}-s`,
    destNs: `${PREFIX}${process.pid}-${tag}-d`,
    sourceIf: `pc2h${tag}s`,
    destIf: `pc2h${tag}d`,
    sourceAddr: `${a}.${b}.${c}.${d + 1}`,
    destAddr: `${a}.${b}.${c}.${d + 2}`,
  };
  live.add(pair);
  try {
    await ip(['netns', 'add', pair.sourceNs]);
    await ip(['netns', 'add', pair.destNs]);
    // Made inside the source's namespace, the far end moved straight into the
    // destination's: no interface ever appears in the machine's own namespace.
    await ip(['-n', pair.sourceNs, 'link', 'add', pair.sourceIf, 'type', 'veth', 'peer', 'name', pair.destIf, 'netns', pair.destNs]);
    for (const [ns, dev, addr] of [
      [pair.sourceNs, pair.sourceIf, pair.sourceAddr],
      [pair.destNs, pair.destIf, pair.destAddr],
    ] as const) {
      await ip(['-n', ns, 'addr', 'add', `${addr}/30`, 'dev', dev]);
      await ip(['-n', ns, 'link', 'set', 'lo', 'up']);
      await ip(['-n', ns, 'link', 'set', dev, 'up']);
    }
  } catch (err) {
    await removeHostPair(pair);
    throw err;
  }
  return pair;
}

/** Kills every process in both namespaces and deletes them (and with them the veth). */
export async function removeHostPair(pair: HostPair): Promise<void> {
  for (const ns of [pair.sourceNs, pair.destNs]) {
    const pids = await ip(['netns', 'pids', ns]).catch(() => '');
    for (const pid of pids.split(/\s+/).filter(Boolean)) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        // Gone meanwhile.
      }
    }
    await ip(['netns', 'del', ns]).catch(() => {});
  }
  live.delete(pair);
}

/** Whether a namespace of this name exists (for the tests' own check of the cleanup). */
export async function netnsExists(ns: string): Promise<boolean> {
  const list = await ip(['netns', 'list']);
  return list.split('\n').some((line) => line.split(/\s+/)[0] === ns);
}

/** Takes the veth end `dev` in `ns` down or up (a link failure: no reset, no FIN reaches the peer). */
export async function setLink(ns: string, dev: string, state: 'up' | 'down'): Promise<void> {
  await ip(['-n', ns, 'link', 'set', dev, state]);
}

/**
 * Starts `node ARGS` inside `ns` (`ip netns exec` execs it, so the child's
 * pid is node's own). stdin is a pipe that only this process holds: a child
 * that watches it can tell when this process is gone.
 */
export function spawnNodeIn(ns: string, args: string[], env: NodeJS.ProcessEnv): ChildProcess {
  return spawn('ip', ['netns', 'exec', ns, process.execPath, ...args], { env, stdio: ['pipe', 'pipe', 'pipe'] });
}
