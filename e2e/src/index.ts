export * from './launcher.js';
export * from './options.js';
export * from './certs.js';
