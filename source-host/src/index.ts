export * from './image.js';
export * from './sentmap.js';
export * from './scheduler.js';
export * from './migration.js';
export * from './server.js';
export * from './options.js';
export * from './link.js';
