import type { Figure } from './figures.js';
import { formatNumber } from './format.js';
import type { SweptParam } from './matrix.js';
import type { FixedSetting } from './options.js';
import type { RunResult } from './run.js';
import type { CombinationSummary, Spread } from './summary.js';
import { esc, seriesColor } from './svg.js';

export interface HtmlInput {
  params: readonly SweptParam[];
  fixed: readonly FixedSetting[];
  repeat: number;
  results: readonly RunResult[];
  summaries: readonly CombinationSummary[];
  figures: readonly Figure[];
  /** The command line of the sweep, as typed. */
  command: string;
  generatedAt: Date;
}

const CSS = `
:root { color-scheme: light; --ink: #1f2933; --muted: #5f6b7a; --line: #e3e7ec; --bg: #f5f6f8; --ok: #1b7f4b; --bad: #b42318; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1112px; margin: 0 auto; padding: 28px 20px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 17px; margin: 32px 0 10px; }
.meta { color: var(--muted); margin: 0 0 14px; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12.5px; font-weight: 600; margin-left: 6px; vertical-align: 1px; }
.badge.ok { background: #e3f4ea; color: var(--ok); }
.badge.bad { background: #fde7e5; color: var(--bad); }
.settings { display: flex; flex-wrap: wrap; gap: 6px; margin: 0 0 8px; padding: 0; list-style: none; }
.settings li { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 1px 8px; font: 12.5px/1.6 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; color: var(--muted); }
.settings li.swept { border-color: #9cc3e6; background: #eef6fd; color: #0b4a7d; }
.settings li.changed { color: var(--ink); font-weight: 600; }
.label { color: var(--muted); font-size: 12.5px; margin: 10px 0 4px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.command { font: 12.5px/1.5 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; white-space: pre-wrap; overflow-wrap: anywhere; }
figure { margin: 0 0 22px; background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px 10px; }
figcaption { margin: 0 0 6px; color: var(--muted); font-size: 13px; max-width: 880px; }
figcaption strong { display: block; color: var(--ink); font-size: 15.5px; margin-bottom: 2px; }
svg.chart { display: block; width: 100%; height: auto; margin: 0 auto; }
svg.chart text { font-family: inherit; }
svg.chart .tick { font-size: 11px; fill: #52606d; }
svg.chart .axis-title { font-size: 11.5px; fill: #323f4b; }
svg.chart .panel-title { font-size: 12px; font-weight: 600; fill: var(--ink); }
svg.chart .legend { font-size: 12.5px; fill: var(--ink); }
svg.chart .legend-note { font-size: 11.5px; fill: #6b7785; }
svg.chart .empty { font-size: 12px; fill: #9aa5b1; }
svg.chart .grid { stroke: #edf0f3; stroke-width: 1; }
svg.chart .axis { stroke: #9aa5b1; stroke-width: 1; }
.table-wrap { background: #fff; border: 1px solid var(--line); border-radius: 10px; overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 8px; text-align: right; border-bottom: 1px solid var(--line); white-space: nowrap; vertical-align: top; }
th { background: #fafbfc; font-weight: 600; color: #3e4c59; font-size: 12px; }
th.param, td.param { text-align: left; }
tr:last-child td { border-bottom: 0; }
tr.failed td { background: #fff6f5; }
td .spread { display: block; color: #8a95a3; font-size: 11px; }
td a { color: #0b62a4; text-decoration: none; }
td a:hover { text-decoration: underline; }
td a.bad { color: var(--bad); }
.swatch { display: inline-block; width: 9px; height: 9px; border-radius: 2px; margin-right: 6px; vertical-align: 0; }
.failure { background: #fff; border: 1px solid #f3c3bd; border-left: 4px solid var(--bad); border-radius: 8px; padding: 10px 14px; margin: 0 0 12px; }
.failure h3 { margin: 0 0 2px; font-size: 13.5px; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.failure p { margin: 0 0 6px; color: var(--bad); }
.failure pre { margin: 0; background: #1f2933; color: #e4e7eb; padding: 8px 10px; border-radius: 6px; overflow-x: auto; max-height: 260px; }
.none { color: var(--ok); }
footer { margin-top: 32px; color: var(--muted); font-size: 12.5px; }
footer a { color: #0b62a4; }
`;

function cell(s: Spread | undefined): string {
  if (!s) return '<td>–</td>';
  const spreadText = s.n > 1 ? `<span class="spread">${esc(formatNumber(s.min))}–${esc(formatNumber(s.max))}</span>` : '';
  return `<td>${esc(formatNumber(s.median))}${spreadText}</td>`;
}

const TABLE_COLUMNS = [
  { metric: 'latency_p50_us', header: 'p50<br>µs' },
  { metric: 'latency_p90_us', header: 'p90<br>µs' },
  { metric: 'latency_p99_us', header: 'p99<br>µs' },
  { metric: 'latency_p999_us', header: 'p99.9<br>µs' },
  { metric: 'demand_paging_rate', header: 'demand paging<br>pages/s' },
  { metric: 'blocktime_total_ms', header: 'blocktime<br>total ms' },
  { metric: 'vcpu_blocktime_mean_ms', header: 'blocktime<br>per vCPU ms' },
  { metric: 'elapsed_ms', header: 'elapsed<br>ms' },
] as const;

function matrixTable(input: HtmlInput): string {
  const strategies = input.params.find((p) => p.key === 'strategy')?.values ?? [];
  const head =
    input.params.map((p) => `<th class="param">${esc(p.flag.replace(/^--/, ''))}</th>`).join('') +
    '<th>passed<br>reports</th>' +
    TABLE_COLUMNS.map((c) => `<th>${c.header}</th>`).join('');
  const rows = input.summaries.map((s) => {
    const params = input.params
      .map((p) => {
        const v = s.combination.values[p.key] ?? '';
        const i = p.key === 'strategy' ? strategies.indexOf(v) : -1;
        const swatch = i >= 0 ? `<span class="swatch" style="background:${seriesColor(i)}"></span>` : '';
        return `<td class="param">${swatch}${esc(v)}</td>`;
      })
      .join('');
    const links = [...s.runs]
      .sort((a, b) => a.spec.repeat - b.spec.repeat)
      .map((r) => `<a href="${esc(r.files.json)}" title="${esc(r.spec.name)}${r.ok ? '' : ' (failed)'}"${r.ok ? '' : ' class="bad"'}>${r.ok ? '' : '✗ '}r${r.spec.repeat}</a>`)
      .join(' ');
    const failed = s.passed < s.runs.length;
    return `<tr${failed ? ' class="failed"' : ''}>${params}<td>${s.passed}/${s.runs.length}<span class="spread">${links}</span></td>${TABLE_COLUMNS.map((c) => cell(s.metrics.get(c.metric))).join('')}</tr>`;
  });
  return `<div class="table-wrap"><table><thead><tr>${head}</tr></thead><tbody>${rows.join('')}</tbody></table></div>`;
}

function failures(results: readonly RunResult[]): string {
  const failed = results.filter((r) => !r.ok);
  if (failed.length === 0) return `<p class="none">None: all ${results.length} runs exited 0 and passed every check.</p>`;
  return failed
    .map(
      (r) =>
        `<div class="failure"><h3>${esc(r.spec.name)}</h3><p>${esc(r.error ?? 'failed')}</p>` +
        (r.stderrTail ? `<pre>${esc(r.stderrTail)}</pre>` : '<pre>(nothing on stderr)</pre>') +
        '</div>',
    )
    .join('');
}

/** report.html: one self-contained page (inline CSS and SVG, no script, nothing fetched). */
export function reportHtml(input: HtmlInput): string {
  const total = input.results.length;
  const passed = input.results.filter((r) => r.ok).length;
  const badge = passed === total ? `<span class="badge ok">all ${total} runs verified</span>` : `<span class="badge bad">${total - passed} of ${total} runs failed</span>`;
  const combos = input.summaries.length;
  const swept = input.params.map((p) => `<li class="swept">${esc(p.flag)} ${esc(p.values.join(', '))}</li>`).join('');
  const fixed = input.fixed.map((s) => `<li${s.changed ? ' class="changed"' : ''}>${esc(s.text)}</li>`).join('');
  const figures = input.figures
    .map((f, i) => `<figure id="${esc(f.id)}"><figcaption><strong>Figure ${i + 1}. ${esc(f.title)}</strong>${esc(f.caption)}</figcaption>${f.svg}</figure>`)
    .join('\n');
  const when = input.generatedAt.toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>postcopy experiment: ${esc(input.params.map((p) => p.flag.replace(/^--/, '')).join(' × ') || 'one configuration')}</title>
<style>${CSS}</style>
</head>
<body>
<main>
<h1>Postcopy latency experiment ${badge}</h1>
<p class="meta">${combos} combination${combos === 1 ? '' : 's'} × ${input.repeat} repeat${input.repeat === 1 ? '' : 's'} = ${total} two-process migrations, run one at a time · ${esc(when)}</p>
${swept ? `<div class="label">Swept</div><ul class="settings">${swept}</ul>` : ''}
<div class="label">Every run (changed from the defaults in bold)</div><ul class="settings">${fixed}</ul>
<div class="label">Command</div><div class="command">${esc(input.command)}</div>
<h2>Plots</h2>
${figures}
<h2>Run matrix</h2>
<p class="meta">Median over the passed repeats of each combination, with min–max beneath when there is more than one.</p>
${matrixTable(input)}
<h2>Failures</h2>
${failures(input.results)}
<footer>Data beside this page: <a href="summary.csv">summary.csv</a> (one row per run and metric), <code>runs/*.json</code> (each run’s report) and <code>runs/*.hgrm</code> (each run’s fault-latency distribution in µs, for HdrHistogram’s plotter).</footer>
</main>
</body>
</html>
`;
}
