import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

const src = (pkg: string): string => fileURLToPath(new URL(`./${pkg}/src/index.ts`, import.meta.url));

export default defineConfig({
  resolve: {
    alias: {
      '@postcopy/shared': src('shared'),
      '@postcopy/source-host': src('source-host'),
      '@postcopy/dest-host': src('dest-host'),
    },
  },
  test: {
    include: ['shared/src/**/*.test.ts', 'source-host/src/**/*.test.ts', 'dest-host/src/**/*.test.ts', 'e2e/test/**/*.test.ts', 'bench/test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 30_000,
    // Two cores: end-to-end runs start two processes and several threads each.
    maxWorkers: 2,
  },
});
