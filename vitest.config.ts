import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

const src = (pkg: string): string => fileURLToPath(new URL(`./${pkg}/src/index.ts`, import.meta.url));

export default defineConfig({
  resolve: {
    // The subpath entries first: an alias also matches what starts with its name and a slash.
    alias: [
      { find: '@postcopy/shared/core', replacement: fileURLToPath(new URL('./shared/src/core.ts', import.meta.url)) },
      { find: '@postcopy/shared/net', replacement: fileURLToPath(new URL('./shared/src/net.ts', import.meta.url)) },
      { find: '@postcopy/shared/digest', replacement: fileURLToPath(new URL('./shared/src/digest-entry.ts', import.meta.url)) },
      { find: '@postcopy/source-host/options', replacement: fileURLToPath(new URL('./source-host/src/cli-options.ts', import.meta.url)) },
      { find: '@postcopy/dest-host/options', replacement: fileURLToPath(new URL('./dest-host/src/cli-options.ts', import.meta.url)) },
      { find: '@postcopy/shared', replacement: src('shared') },
      { find: '@postcopy/source-host', replacement: src('source-host') },
      { find: '@postcopy/dest-host', replacement: src('dest-host') },
    ],
  },
  test: {
    include: ['shared/src/**/*.test.ts', 'source-host/src/**/*.test.ts', 'dest-host/src/**/*.test.ts', 'e2e/test/**/*.test.ts', 'bench/test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 30_000,
    // Two cores: end-to-end runs start two processes and several threads each.
    maxWorkers: 2,
  },
});
