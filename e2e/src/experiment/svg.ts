/** Escapes text for XML/HTML content and attribute values. */
export function esc(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&#39;');
}

type Attrs = Record<string, string | number | undefined>;

/** Rounds coordinates to 0.1 px so the markup stays short. */
const num = (x: number): string => String(Math.round(x * 10) / 10);

function attrs(a: Attrs): string {
  return Object.entries(a)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => ` ${k}="${typeof v === 'number' ? num(v) : esc(v!)}"`)
    .join('');
}

/** An SVG element; `children` is markup already escaped. */
export function el(tag: string, a: Attrs, children = ''): string {
  return children === '' ? `<${tag}${attrs(a)}/>` : `<${tag}${attrs(a)}>${children}</${tag}>`;
}

export function text(x: number, y: number, content: string, a: Attrs = {}): string {
  return el('text', { x, y, ...a }, esc(content));
}

export function line(x1: number, y1: number, x2: number, y2: number, a: Attrs = {}): string {
  return el('line', { x1, y1, x2, y2, ...a });
}

/** A tooltip for the enclosing element (shown on hover, no script needed). */
export function title(content: string): string {
  return `<title>${esc(content)}</title>`;
}

export function polyline(points: readonly [number, number][], a: Attrs = {}): string {
  return el('polyline', { points: points.map(([x, y]) => `${num(x)},${num(y)}`).join(' '), fill: 'none', ...a });
}

/** Colour-blind-safe series colours (Okabe–Ito), in the order series appear. */
export const PALETTE = ['#0072B2', '#E69F00', '#009E73', '#CC79A7', '#56B4E9', '#D55E00', '#8C6D1F', '#555555'] as const;

export function seriesColor(index: number): string {
  return PALETTE[index % PALETTE.length]!;
}

/** A map from data values to pixels, with the tick values to label. */
export interface Scale {
  (value: number): number;
  ticks: number[];
  domain: [number, number];
}

/** A step of 1, 2 or 5 × 10^k near `span / count`. */
function niceStep(span: number, count: number): number {
  const raw = span / Math.max(1, count);
  const power = 10 ** Math.floor(Math.log10(raw));
  const f = raw / power;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * power;
}

/** A linear scale from 0 (or below, for negative data) to a round maximum above `max`. */
export function linearScale(min: number, max: number, range: [number, number], count = 5): Scale {
  let lo = Math.min(0, min);
  let hi = Math.max(max, lo > 0 ? lo : 0);
  if (!(hi > lo)) hi = lo + 1;
  const step = niceStep(hi - lo, count);
  lo = Math.floor(lo / step) * step;
  hi = Math.ceil(hi / step - 1e-9) * step;
  const ticks: number[] = [];
  for (let t = lo; t <= hi + step / 2; t += step) ticks.push(Math.round(t / step) * step);
  const [r0, r1] = range;
  const scale = ((v: number) => r0 + ((v - lo) / (hi - lo)) * (r1 - r0)) as Scale;
  scale.ticks = ticks;
  scale.domain = [lo, hi];
  return scale;
}

/** 1, 2, 5, 10, 20, 50, ... in [lo, hi]. */
function oneTwoFive(lo: number, hi: number, mantissas: readonly number[]): number[] {
  const out: number[] = [];
  for (let p = Math.floor(Math.log10(lo)) - 1; p <= Math.ceil(Math.log10(hi)) + 1; p++) {
    for (const m of mantissas) {
      const v = m * 10 ** p;
      if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) out.push(Number(v.toPrecision(6)));
    }
  }
  return out;
}

/** A log scale whose ends are round (1, 2 or 5 × 10^k) around [min, max] (both > 0). */
export function logScale(min: number, max: number, range: [number, number]): Scale {
  const floorNice = (v: number): number => {
    const p = 10 ** Math.floor(Math.log10(v));
    const m = v / p;
    return (m >= 5 ? 5 : m >= 2 ? 2 : 1) * p;
  };
  const ceilNice = (v: number): number => {
    const p = 10 ** Math.floor(Math.log10(v));
    const m = v / p;
    return (m <= 1 + 1e-9 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  };
  const safeMin = min > 0 ? min : 1;
  let lo = floorNice(safeMin);
  let hi = ceilNice(Math.max(max, safeMin));
  if (hi <= lo) hi = ceilNice(lo * 1.5);
  if (hi / lo < 3) lo = floorNice(lo / 2);
  const decades = Math.log10(hi / lo);
  let ticks = oneTwoFive(lo, hi, decades > 4 ? [1] : decades > 2 ? [1, 3] : [1, 2, 5]);
  if (ticks.length < 3) ticks = oneTwoFive(lo, hi, [1, 1.5, 2, 3, 5, 7]);
  const [r0, r1] = range;
  const scale = ((v: number) => r0 + (Math.log10(Math.max(v, lo) / lo) / Math.log10(hi / lo)) * (r1 - r0)) as Scale;
  scale.ticks = ticks;
  scale.domain = [lo, hi];
  return scale;
}
