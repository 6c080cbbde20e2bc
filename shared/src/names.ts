/** The names a run is made of (strategies, memory backends, workloads): light, for workers too (core.ts). */
export const STRATEGIES = ['shared-uffd', 'per-thread-uffd', 'per-region-uffd', 'kvm-exit'] as const;
export type StrategyName = (typeof STRATEGIES)[number];

/** What guest memory and the userfaultfd are on the destination (DESIGN.md, "Memory backends"). */
export const MEMORY_BACKENDS = ['emulated', 'uffd'] as const;
export type MemoryBackendName = (typeof MEMORY_BACKENDS)[number];

export const WORKLOADS = ['sequential', 'random', 'shared-hot'] as const;
export type WorkloadName = (typeof WORKLOADS)[number];
