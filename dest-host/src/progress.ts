let lastAt = 0;
let lastFaults = 0;

/** One terminal line of progress: pages received / total and faults per second. */
export function progressLine(installed: number, total: number, faults: number): string {
  const now = performance.now();
  const rate = lastAt > 0 ? ((faults - lastFaults) * 1000) / (now - lastAt) : 0;
  lastAt = now;
  lastFaults = faults;
  const pct = total > 0 ? ((installed / total) * 100).toFixed(1) : '0.0';
  return `\r\x1b[Kpages ${installed}/${total} (${pct}%)  faults ${faults}  ${Math.round(rate)} faults/s`;
}
