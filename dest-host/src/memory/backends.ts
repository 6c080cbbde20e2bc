import { UsageError } from '@postcopy/shared/core';
import type { MemoryBackend, MemoryBackendName } from './backend.js';
import { MEMORY_BACKENDS } from './backend.js';
import { emulatedBackend } from './emulated-backend.js';
import { uffdBackend } from './uffd-backend.js';

/** Both backends by name. Importing uffd loads no addon: that happens on create/attach. */
export const BACKEND_BY_NAME: Record<MemoryBackendName, MemoryBackend> = {
  emulated: emulatedBackend,
  uffd: uffdBackend,
};

export function isMemoryBackendName(name: unknown): name is MemoryBackendName {
  return typeof name === 'string' && (MEMORY_BACKENDS as readonly string[]).includes(name);
}

/** The backend called `name`; a UsageError listing the accepted names otherwise. */
export function memoryBackend(name: string, option = '--memory-backend'): MemoryBackend {
  if (!isMemoryBackendName(name)) throw new UsageError(`${option}: expected one of ${MEMORY_BACKENDS.join(', ')}, got ${JSON.stringify(name)}`);
  return BACKEND_BY_NAME[name];
}
