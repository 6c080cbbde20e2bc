/**
 * The guest's workloads: which pages a vCPU or I/O thread touches, in which
 * order. Both hosts run guests (the destination after switchover, the
 * source during precopy), so these live here rather than in either host.
 */
import { rng } from '../random.js';
import type { WorkloadName } from '../names.js';

/** What a vCPU (or I/O thread) does: which pages it touches, in which order. */
export interface WorkloadSpec {
  name: WorkloadName;
  totalPages: number;
  vcpus: number;
  seed: number;
  /** Accesses per thread; 0 = the workload's default. */
  accesses: number;
  writeFraction: number;
}

/** A page sequence; `next()` never allocates. */
export interface AccessPattern {
  readonly length: number;
  next(): number;
}

/** Pages in shared-hot's hot set: small, but enough for every vCPU to keep colliding. */
export function hotSetSize(totalPages: number, vcpus: number): number {
  return Math.min(totalPages, Math.max(64, vcpus * 16, Math.floor(totalPages / 16)));
}

export function defaultAccesses(spec: WorkloadSpec): number {
  switch (spec.name) {
    case 'sequential':
      return Math.max(1, Math.floor(spec.totalPages / spec.vcpus));
    case 'random':
      return Math.max(1, Math.floor(spec.totalPages / spec.vcpus));
    case 'shared-hot':
      return hotSetSize(spec.totalPages, spec.vcpus);
  }
}

/**
 * The access pattern of vCPU `vcpu`:
 * - sequential: walks its own partition of the guest once, page after page
 *   (the kernel's demand_paging_test); with more accesses it walks it again;
 * - random: uniform over the whole guest;
 * - shared-hot: every vCPU walks the same seeded order over one small hot
 *   set, so they hit the same pages at the same moments.
 */
export function accessPattern(spec: WorkloadSpec, vcpu: number): AccessPattern {
  const length = spec.accesses > 0 ? spec.accesses : defaultAccesses(spec);
  switch (spec.name) {
    case 'sequential': {
      const per = Math.floor(spec.totalPages / spec.vcpus);
      const first = vcpu * per;
      const size = vcpu === spec.vcpus - 1 ? spec.totalPages - first : per;
      let i = 0;
      return { length, next: () => first + (i++ % size) };
    }
    case 'random': {
      const r = rng(spec.seed * 7919 + vcpu + 1);
      return { length, next: () => Math.floor(r() * spec.totalPages) };
    }
    case 'shared-hot': {
      const hot = hotSetSize(spec.totalPages, spec.vcpus);
      // The hot set: `hot` distinct pages spread over the guest, same for every vCPU.
      const pick = rng(spec.seed ^ 0x0badc0de);
      const pages = new Int32Array(hot);
      const stride = spec.totalPages / hot;
      for (let k = 0; k < hot; k++) pages[k] = Math.min(spec.totalPages - 1, Math.floor(k * stride + pick() * stride));
      // Same seeded order for all vCPUs (not vCPU-dependent): they collide.
      for (let k = hot - 1; k > 0; k--) {
        const j = Math.floor(pick() * (k + 1));
        const t = pages[k]!;
        pages[k] = pages[j]!;
        pages[j] = t;
      }
      let i = 0;
      return { length, next: () => pages[i++ % hot]! };
    }
  }
}

/** I/O threads: random reads over the guest with their own seed. */
export function ioPattern(totalPages: number, seed: number, index: number, accesses: number): AccessPattern {
  const r = rng(seed * 104729 + 0x10 + index);
  return { length: accesses, next: () => Math.floor(r() * totalPages) };
}
