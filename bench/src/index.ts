export * from './bench.js';
export * from './figures.js';
export * from './floor.js';
export * from './floor-layout.js';
export * from './format.js';
export * from './migrations.js';
export * from './options.js';
