import { UsageError, parseChoice, parseIntOption } from '@postcopy/shared';

function items(option: string, text: string): string[] {
  const parts = text.split(',').map((s) => s.trim());
  if (parts.length === 0 || parts.some((p) => p === '')) throw new UsageError(`${option}: expected a comma-separated list, got ${JSON.stringify(text)}`);
  return parts;
}

/** `1,8,16` → [1, 8, 16]; each a whole number in [min, max]. */
export function parseIntList(option: string, text: string, min: number, max: number): number[] {
  return items(option, text).map((item) => parseIntOption(option, item, min, max));
}

/** `shared,exit` → ['shared', 'exit']; each one of `choices`. */
export function parseChoiceList<T extends string>(option: string, text: string, choices: readonly T[]): T[] {
  return items(option, text).map((item) => parseChoice(option, item, choices));
}
