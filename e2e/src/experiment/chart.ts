import { formatNumber, formatTick } from './format.js';
import type { Spread } from './summary.js';
import { el, esc, line, linearScale, logScale, polyline, text, title, type Scale } from './svg.js';

/** One x position of a series: the median and spread of its repeats there (undefined: no passed run). */
export interface ChartPoint {
  category: string;
  spread: Spread | undefined;
}

export interface ChartSeries {
  name: string;
  color: string;
  points: ChartPoint[];
}

/** One small multiple: a title (the values of the other swept parameters) and its series. */
export interface ChartPanel {
  title: string;
  series: ChartSeries[];
}

export interface ChartSpec {
  /** The x axis: categories in order (percentiles, vCPU counts, ...). */
  categories: string[];
  panels: ChartPanel[];
  /** `line`: dots joined per series; `bar`: grouped bars. Both with min–max whiskers. */
  mark: 'line' | 'bar';
  x: { title: string };
  /** `log` for figures that span decades; `shared` puts every panel on one y scale. */
  y: { title: string; unit: string; log?: boolean; shared?: boolean };
  columns: number;
  /** Repeats per point, for the legend. */
  repeats: number;
  /** What the whole plot shows, for screen readers. */
  label: string;
}

const LEGEND_H = 34;
const MARGIN = { top: 30, right: 14, bottom: 46, left: 60 };

function panelSize(columns: number): { w: number; h: number } {
  if (columns === 1) return { w: 720, h: 330 };
  if (columns === 2) return { w: 520, h: 290 };
  return { w: Math.floor(1040 / columns), h: 250 };
}

function extent(panels: readonly ChartPanel[], log: boolean): [number, number] {
  let lo = Infinity;
  let hi = -Infinity;
  for (const p of panels) {
    for (const s of p.series) {
      for (const pt of s.points) {
        if (!pt.spread) continue;
        const min = log ? [pt.spread.min, pt.spread.median].filter((v) => v > 0) : [pt.spread.min];
        lo = Math.min(lo, ...min);
        hi = Math.max(hi, pt.spread.max);
      }
    }
  }
  return Number.isFinite(lo) ? [lo, hi] : [log ? 1 : 0, log ? 10 : 1];
}

function yScale(spec: ChartSpec, panels: readonly ChartPanel[], range: [number, number]): Scale {
  const [lo, hi] = extent(panels, spec.y.log === true);
  return spec.y.log ? logScale(lo, hi, range) : linearScale(lo, hi, range);
}

function describePoint(series: string, category: string, s: Spread, unit: string): string {
  const spreadText = s.n > 1 ? `, min ${formatNumber(s.min)}, max ${formatNumber(s.max)}, ${s.n} runs` : ', 1 run';
  return `${series} · ${category}: median ${formatNumber(s.median)} ${unit}${spreadText}`;
}

/** A vertical min–max whisker with caps. */
function whisker(x: number, yMin: number, yMax: number, stroke: string, cap = 3.5): string {
  if (Math.abs(yMin - yMax) < 0.5) return '';
  return (
    line(x, yMin, x, yMax, { stroke, 'stroke-width': 1.4 }) +
    line(x - cap, yMin, x + cap, yMin, { stroke, 'stroke-width': 1.4 }) +
    line(x - cap, yMax, x + cap, yMax, { stroke, 'stroke-width': 1.4 })
  );
}

function legend(spec: ChartSpec, width: number): string {
  const names = new Map<string, string>();
  for (const p of spec.panels) for (const s of p.series) names.set(s.name, s.color);
  let x = MARGIN.left;
  const y = 18;
  const parts: string[] = [];
  for (const [name, color] of names) {
    const swatch =
      spec.mark === 'bar'
        ? el('rect', { x, y: y - 9, width: 12, height: 12, rx: 2, fill: color })
        : line(x, y - 3, x + 18, y - 3, { stroke: color, 'stroke-width': 2.2 }) + el('circle', { cx: x + 9, cy: y - 3, r: 4, fill: color, stroke: '#fff', 'stroke-width': 1.5 });
    const sw = spec.mark === 'bar' ? 12 : 18;
    parts.push(swatch + text(x + sw + 6, y + 1, name, { class: 'legend' }));
    x += sw + 6 + name.length * 7 + 22;
  }
  const note = spec.repeats > 1 ? `${spec.mark === 'bar' ? 'bar' : 'dot'}: median · whisker: min–max of ${spec.repeats} repeats` : `one run per ${spec.mark === 'bar' ? 'bar' : 'point'}`;
  parts.push(text(width - MARGIN.right, y + 1, note, { class: 'legend-note', 'text-anchor': 'end' }));
  return el('g', { class: 'legend-row' }, parts.join(''));
}

function panelSvg(spec: ChartSpec, panel: ChartPanel, w: number, h: number, y: Scale, showYTitle: boolean): string {
  const x0 = MARGIN.left;
  const x1 = w - MARGIN.right;
  const y0 = MARGIN.top;
  const y1 = h - MARGIN.bottom;
  const out: string[] = [];
  if (panel.title) out.push(text(x0, 17, panel.title, { class: 'panel-title' }));
  for (const t of y.ticks) {
    const ty = y(t);
    out.push(line(x0, ty, x1, ty, { class: 'grid' }));
    out.push(text(x0 - 7, ty + 3.5, formatTick(t), { class: 'tick', 'text-anchor': 'end' }));
  }
  out.push(line(x0, y0 - 4, x0, y1, { class: 'axis' }));
  out.push(line(x0, y1, x1, y1, { class: 'axis' }));
  const band = (x1 - x0) / Math.max(1, spec.categories.length);
  const center = (i: number): number => x0 + (i + 0.5) * band;
  spec.categories.forEach((c, i) => {
    out.push(line(center(i), y1, center(i), y1 + 4, { class: 'axis' }));
    out.push(text(center(i), y1 + 16, c, { class: 'tick', 'text-anchor': 'middle' }));
  });
  if (spec.x.title) out.push(text((x0 + x1) / 2, y1 + 36, spec.x.title, { class: 'axis-title', 'text-anchor': 'middle' }));
  if (showYTitle) {
    const cy = (y0 + y1) / 2;
    out.push(text(14, cy, `${spec.y.title} (${spec.y.unit})`, { class: 'axis-title', 'text-anchor': 'middle', transform: `rotate(-90 14 ${cy})` }));
  }
  const n = panel.series.length;
  const hasData = panel.series.some((s) => s.points.some((p) => p.spread));
  if (!hasData) out.push(text((x0 + x1) / 2, (y0 + y1) / 2, 'no passed runs', { class: 'empty', 'text-anchor': 'middle' }));
  if (spec.mark === 'bar') {
    const groupW = band * 0.74;
    const barW = groupW / Math.max(1, n);
    panel.series.forEach((s, si) => {
      for (const p of s.points) {
        const i = spec.categories.indexOf(p.category);
        if (i < 0 || !p.spread) continue;
        const bx = center(i) - groupW / 2 + si * barW;
        const top = y(p.spread.median);
        const inset = Math.min(1.5, barW * 0.1);
        out.push(
          el(
            'g',
            {},
            title(describePoint(s.name, p.category, p.spread, spec.y.unit)) +
              el('rect', { x: bx + inset, y: top, width: barW - 2 * inset, height: Math.max(0.5, y1 - top), fill: s.color, rx: 1.5 }) +
              whisker(bx + barW / 2, y(p.spread.min), y(p.spread.max), '#1f2933', Math.min(3.5, barW / 4)),
          ),
        );
      }
    });
  } else {
    const dodge = n > 1 ? Math.min(8, (band * 0.45) / (n - 1)) : 0;
    panel.series.forEach((s, si) => {
      const dx = (si - (n - 1) / 2) * dodge;
      const pts = s.points
        .map((p) => ({ p, i: spec.categories.indexOf(p.category) }))
        .filter((q): q is { p: ChartPoint & { spread: Spread }; i: number } => q.i >= 0 && q.p.spread !== undefined && (!spec.y.log || q.p.spread.median > 0));
      const xy = pts.map((q) => [center(q.i) + dx, y(q.p.spread.median)] as [number, number]);
      if (xy.length > 1) out.push(polyline(xy, { stroke: s.color, 'stroke-width': 2, 'stroke-linejoin': 'round', opacity: 0.9 }));
      pts.forEach((q, k) => {
        const [px, py] = xy[k]!;
        out.push(
          el(
            'g',
            {},
            title(describePoint(s.name, q.p.category, q.p.spread, spec.y.unit)) +
              whisker(px, y(q.p.spread.min), y(q.p.spread.max), s.color) +
              el('circle', { cx: px, cy: py, r: 4, fill: s.color, stroke: '#fff', 'stroke-width': 1.5 }),
          ),
        );
      });
    });
  }
  return out.join('');
}

/**
 * A figure of small multiples: one panel per combination of the parameters
 * not on the plot, a shared legend on top, each point the median of its
 * repeats with a min–max whisker.
 */
export function chartSvg(spec: ChartSpec): string {
  const columns = Math.max(1, Math.min(spec.columns, spec.panels.length));
  const rows = Math.ceil(spec.panels.length / columns);
  const { w, h } = panelSize(columns);
  const width = columns * w;
  const height = LEGEND_H + rows * h;
  const range: [number, number] = [h - MARGIN.bottom, MARGIN.top + 6];
  const shared = spec.y.shared ? yScale(spec, spec.panels, range) : undefined;
  const panels = spec.panels.map((panel, i) => {
    const col = i % columns;
    const row = Math.floor(i / columns);
    const y = shared ?? yScale(spec, [panel], range);
    return el('g', { transform: `translate(${col * w} ${LEGEND_H + row * h})` }, panelSvg(spec, panel, w, h, y, col === 0 || !spec.y.shared));
  });
  return (
    `<svg class="chart" viewBox="0 0 ${width} ${height}" width="${width}" height="${height}" style="max-width:${width}px" role="img" aria-label="${esc(spec.label)}">` +
    legend(spec, width) +
    panels.join('') +
    '</svg>'
  );
}
