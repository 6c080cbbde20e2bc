/**
 * Whether the run's memory backend can run the run's strategy on this
 * machine, checked before anything listens or connects, so that a refusal
 * exits 2 at once with the reason (shared/src/cli.ts: BackendUnavailableError
 * is a usage-level error) instead of after a source was started.
 *
 * On `emulated` there is nothing to check. On `uffd` it does what the run
 * will do, on the same layout: loads the addon, maps the guest (with
 * MAP_HUGETLB for 2 MiB pages, so missing hugetlbfs pages show here), and
 * lets the strategy open and register its contexts (which is where the
 * kernel refuses a userfaultfd for lack of permission, and where
 * per-thread-uffd meets the kernel's lack of a per-thread userfaultfd); then
 * closes and unmaps everything.
 */
import { BackendUnavailableError, type GuestLayout, type MemoryBackendName, type StrategyName } from '@postcopy/shared';
import type { BackendMemory } from './memory/backend.js';
import { BACKEND_BY_NAME } from './memory/backends.js';
import { STRATEGY_BY_NAME } from './strategies/index.js';

export interface PreflightSpec {
  memoryBackend: MemoryBackendName;
  strategy: StrategyName;
  layout: GuestLayout;
  memslotBytes: number;
  vcpus: number;
  ioThreads: number;
  readers: number;
}

/** Throws BackendUnavailableError, naming the options and saying what would allow the run, where it cannot run here. */
export function preflightMemoryBackend(spec: PreflightSpec): void {
  if (spec.memoryBackend === 'emulated') return;
  const where = `--memory-backend ${spec.memoryBackend}`;
  let memory: BackendMemory | undefined;
  try {
    memory = BACKEND_BY_NAME[spec.memoryBackend].create({
      layout: spec.layout,
      memslotBytes: spec.memslotBytes,
      maxThreads: spec.vcpus + spec.ioThreads,
      maxContexts: spec.vcpus + 2,
    });
    // The kernel's own refusals (permission, features) name the backend only...
    memory.close(memory.open());
  } catch (err) {
    memory?.dispose();
    throw prefixed(err, where);
  }
  try {
    // ...and what the strategy asks of it names the strategy too.
    const setup = STRATEGY_BY_NAME[spec.strategy].setup(
      memory,
      { vcpus: spec.vcpus, ioThreads: spec.ioThreads, readers: spec.readers, vcpuSlot: (v) => v, ioSlot: (i) => spec.vcpus + i },
      spec.layout.totalPages,
    );
    for (const ctx of setup.contexts) memory.close(ctx);
  } catch (err) {
    throw prefixed(err, `--strategy ${spec.strategy} on ${where}`);
  } finally {
    memory.dispose();
  }
}

function prefixed(err: unknown, where: string): unknown {
  if (!(err instanceof BackendUnavailableError)) return err;
  const e = new BackendUnavailableError(err.backend, `${where}: ${err.message}`);
  e.stack = err.stack;
  return e;
}
