import { UsageError } from './errors.js';

const UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1024,
  kb: 1000,
  kib: 1024,
  m: 1024 ** 2,
  mb: 1000 ** 2,
  mib: 1024 ** 2,
  g: 1024 ** 3,
  gb: 1000 ** 3,
  gib: 1024 ** 3,
  t: 1024 ** 4,
  tib: 1024 ** 4,
};

const ACCEPTED_SIZES = 'such as 4096, 4KiB, 64MiB or 1GiB (units B, KiB, MiB, GiB, TiB, KB, MB, GB)';

/** Parses `4096`, `4KiB`, `64MiB`, `2M`, `1GiB` into bytes. */
export function parseSize(option: string, text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = match ? UNITS[match[2]!.toLowerCase()] : undefined;
  if (!match || unit === undefined) {
    throw new UsageError(
      `${option}: expected a size ${ACCEPTED_SIZES}, got ${JSON.stringify(text)}`,
    );
  }
  const bytes = Number(match[1]) * unit;
  if (!Number.isSafeInteger(bytes) || bytes <= 0) {
    throw new UsageError(`${option}: expected a positive whole number of bytes, ${ACCEPTED_SIZES}, got ${JSON.stringify(text)}`);
  }
  return bytes;
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1 && value % 1024 === 0) {
    value /= 1024;
    unit++;
  }
  return `${value}${units[unit]}`;
}

export function parseIntOption(option: string, text: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
  const value = Number(text);
  if (!/^\s*-?\d+\s*$/.test(text) || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new UsageError(`${option}: expected a whole number from ${min} to ${max}, got ${JSON.stringify(text)}`);
  }
  return value;
}

export function parseFraction(option: string, text: string): number {
  const value = Number(text);
  if (text.trim() === '' || !Number.isFinite(value) || value < 0 || value > 1) {
    throw new UsageError(`${option}: expected a number from 0 to 1, got ${JSON.stringify(text)}`);
  }
  return value;
}

export function parseChoice<T extends string>(option: string, text: string, choices: readonly T[]): T {
  if (!(choices as readonly string[]).includes(text)) {
    throw new UsageError(`${option}: expected one of ${choices.join(', ')}, got ${JSON.stringify(text)}`);
  }
  return text as T;
}
