import type { SweptParam } from './matrix.js';
import { EXIT_CODE_METRIC, METRICS } from './metrics.js';
import type { RunResult } from './run.js';

/** One CSV field (RFC 4180): quoted when it holds a comma, a quote, a line break or edge spaces; quotes doubled. */
export function csvField(value: string | number): string {
  const text = typeof value === 'number' ? (Number.isFinite(value) ? String(value) : '') : value;
  return /[",\r\n]|^\s|\s$/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

/** Rows to CSV text, one line per row ending in CRLF (RFC 4180). */
export function toCsv(rows: readonly (readonly (string | number)[])[]): string {
  return rows.map((row) => row.map(csvField).join(',') + '\r\n').join('');
}

/** Parses CSV text (RFC 4180: quoted fields, doubled quotes, CRLF or LF) into rows of strings. */
export function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let quoted = false;
  let i = 0;
  while (i < text.length) {
    const c = text[i]!;
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') {
        field += '"';
        i += 2;
        continue;
      }
      if (c === '"') quoted = false;
      else field += c;
      i++;
      continue;
    }
    if (c === '"') quoted = true;
    else if (c === ',') {
      row.push(field);
      field = '';
    } else if (c === '\n' || c === '\r') {
      row.push(field);
      rows.push(row);
      row = [];
      field = '';
      if (c === '\r' && text[i + 1] === '\n') i++;
    } else field += c;
    i++;
  }
  if (field !== '' || row.length > 0) {
    row.push(field);
    rows.push(row);
  }
  return rows;
}

/** summary.csv's header: the swept parameters, then `repeat`, `metric`, `value`. */
export function summaryHeader(params: readonly SweptParam[]): string[] {
  return [...params.map((p) => p.column), 'repeat', 'metric', 'value'];
}

/**
 * summary.csv in long format: one row per run and metric. A run that left a
 * report gets every metric (with `verified` 0 when its checks failed); one
 * that left none gets `verified` 0; every run gets its `exit_code`.
 */
export function summaryCsv(params: readonly SweptParam[], results: readonly RunResult[]): string {
  const rows: (string | number)[][] = [summaryHeader(params)];
  const ordered = [...results].sort((a, b) => a.spec.combination.index - b.spec.combination.index || a.spec.repeat - b.spec.repeat);
  for (const r of ordered) {
    const key = [...params.map((p) => r.spec.combination.values[p.key] ?? ''), r.spec.repeat];
    if (r.report) for (const m of METRICS) rows.push([...key, m.name, m.name === 'verified' ? (r.ok ? 1 : 0) : m.value(r.report)]);
    else rows.push([...key, 'verified', 0]);
    rows.push([...key, EXIT_CODE_METRIC, r.exitCode]);
  }
  return toCsv(rows);
}
