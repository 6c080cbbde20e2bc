export * from './launcher.js';
export * from './options.js';
