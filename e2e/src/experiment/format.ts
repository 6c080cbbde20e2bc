/** A number as tables and tick labels show it: about three significant digits, no exponent. */
export function formatNumber(x: number): string {
  if (!Number.isFinite(x)) return '–';
  const a = Math.abs(x);
  if (a === 0) return '0';
  if (a >= 100) return String(Math.round(x));
  if (a >= 10) return trim(x.toFixed(1));
  if (a >= 1) return trim(x.toFixed(2));
  return trim(x.toPrecision(2));
}

/** Compact tick labels: 1.5k, 20k, 1.2M. */
export function formatTick(x: number): string {
  const a = Math.abs(x);
  if (a >= 1e6) return trim((x / 1e6).toPrecision(3)) + 'M';
  if (a >= 1e3) return trim((x / 1e3).toPrecision(3)) + 'k';
  return formatNumber(x);
}

function trim(s: string): string {
  return s.includes('.') ? s.replace(/0+$/, '').replace(/\.$/, '') : s;
}
