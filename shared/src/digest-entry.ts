/**
 * The memory digest for helper threads (`@postcopy/shared/digest`): the
 * digest and its parallel runner, without the rest of the index. Not in
 * core.ts: node:crypto costs a worker isolate about 20 ms of CPU to load,
 * and no vCPU thread hashes.
 */
export * from './digest.js';
export * from './parallel-digest.js';
