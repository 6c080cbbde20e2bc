import type { StrategyName } from '@postcopy/shared';
import { kvmExit } from './kvm-exit.js';
import { perRegionUffd } from './per-region-uffd.js';
import { perThreadUffd } from './per-thread-uffd.js';
import { sharedUffd } from './shared-uffd.js';
import type { FaultStrategy } from './strategy.js';

export type { ContextRange, FaultStrategy, ResolverSpec, StrategySetup, ThreadPlan } from './strategy.js';
export { rangeOf, releaseSetup } from './strategy.js';
export { partitions } from './per-region-uffd.js';

export const STRATEGY_BY_NAME: Record<StrategyName, FaultStrategy> = {
  'shared-uffd': sharedUffd,
  'per-thread-uffd': perThreadUffd,
  'per-region-uffd': perRegionUffd,
  'kvm-exit': kvmExit,
};
