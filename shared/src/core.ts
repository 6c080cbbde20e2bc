/**
 * The light part of @postcopy/shared, for worker threads (`@postcopy/shared/core`).
 *
 * Every vCPU and resolver thread is an isolate of its own that loads and
 * compiles its modules anew: the whole index (msgpackr, hdr-histogram-js and
 * pako, the report, TLS files) costs a worker about 60 ms of CPU before it
 * does anything, times 32 vCPUs. The guest's own path needs none of it: page
 * content, layout, protocol constants, errors, CPU accounting. Connections
 * take `@postcopy/shared/net` (net.ts) on top.
 */
export * from './errors.js';
export * from './sizes.js';
export * from './layout.js';
export * from './content.js';
export * from './protocol.js';
export * from './random.js';
export * from './cpu.js';
export * from './names.js';
export * from './precopy.js';
export * from './guest/workloads.js';
export * from './devices/dma-pattern.js';
export * from './addon.js';
