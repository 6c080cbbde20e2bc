/**
 * What a connection needs on top of core.ts (`@postcopy/shared/net`): the
 * codec, keepalive, TLS diagnostics and write batching, without the index's
 * report and statistics (see core.ts for why workers avoid the index).
 */
export * from './core.js';
export * from './codec.js';
export * from './keepalive.js';
export * from './tls.js';
export * from './turn-cork.js';
export * from './push-stream.js';
