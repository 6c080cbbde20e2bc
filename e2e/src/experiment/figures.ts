import { chartSvg, type ChartPanel, type ChartSpec } from './chart.js';
import { describeCombination, type SweptParam } from './matrix.js';
import type { CombinationSummary } from './summary.js';
import { seriesColor } from './svg.js';

/** What the figures need to know about the sweep. */
export interface FigureInput {
  params: readonly SweptParam[];
  /** The single values of options that were not swept (to name the strategy or vCPUs of a sweep over neither). */
  fixed: Readonly<Record<string, unknown>>;
  summaries: readonly CombinationSummary[];
  repeats: number;
}

export interface Figure {
  id: string;
  title: string;
  caption: string;
  svg: string;
}

function valueOf(input: FigureInput, s: CombinationSummary, key: string): string {
  return s.combination.values[key] ?? String(input.fixed[key] ?? '');
}

/** The values of `key` in the sweep, in the order given (or the one fixed value). */
function valuesOf(input: FigureInput, key: string): string[] {
  return input.params.find((p) => p.key === key)?.values ?? [String(input.fixed[key] ?? '')];
}

/** Groups combinations by the swept parameters other than `onPlot`: one panel each, in matrix order. */
function panelGroups(input: FigureInput, onPlot: readonly string[]): { title: string; summaries: CombinationSummary[]; columns: number }[] {
  const others = input.params.filter((p) => !onPlot.includes(p.key));
  const groups = new Map<string, CombinationSummary[]>();
  for (const s of input.summaries) {
    const key = describeCombination(others, s.combination.values, ' · ');
    groups.set(key, [...(groups.get(key) ?? []), s]);
  }
  // Two or more other parameters: one row per value of all but the last, a column per value of the last.
  const last = others[others.length - 1];
  const columns = others.length >= 2 ? Math.min(4, last!.values.length) : Math.min(4, groups.size === 3 ? 3 : groups.size);
  return [...groups].map(([title, summaries]) => ({ title, summaries, columns }));
}

function strategySeries(input: FigureInput): { name: string; color: string }[] {
  return valuesOf(input, 'strategy').map((name, i) => ({ name, color: seriesColor(i) }));
}

const PERCENTILES = [
  { label: 'p50', metric: 'latency_p50_us' },
  { label: 'p90', metric: 'latency_p90_us' },
  { label: 'p99', metric: 'latency_p99_us' },
  { label: 'p99.9', metric: 'latency_p999_us' },
] as const;

function panelNote(input: FigureInput, onPlot: readonly string[]): string {
  const others = input.params.filter((p) => !onPlot.includes(p.key)).map((p) => p.flag.replace(/^--/, ''));
  return others.length > 0 ? ` One panel per ${others.join(' × ')}.` : '';
}

/**
 * One panel per group, one series per strategy, one point per metric: the
 * shape of the latency and blocktime figures.
 */
function metricPanels(
  input: FigureInput,
  groups: ReturnType<typeof panelGroups>,
  categories: readonly { label: string; metric: string }[],
): ChartPanel[] {
  return groups.map((g) => ({
    title: g.title,
    series: strategySeries(input).map(({ name, color }) => {
      const s = g.summaries.find((x) => valueOf(input, x, 'strategy') === name);
      return { name, color, points: categories.map((c) => ({ category: c.label, spread: s?.metrics.get(c.metric) })) };
    }),
  }));
}

export function latencyFigure(input: FigureInput): Figure {
  const groups = panelGroups(input, ['strategy']);
  const panels = metricPanels(input, groups, PERCENTILES);
  const spec: ChartSpec = {
    categories: PERCENTILES.map((p) => p.label),
    panels,
    mark: 'line',
    x: { title: 'percentile of fault latency' },
    y: { title: 'fault latency', unit: 'µs', log: true, shared: true },
    columns: groups[0]?.columns ?? 1,
    repeats: input.repeats,
    label: 'Fault latency percentiles per strategy',
  };
  return {
    id: 'latency',
    title: 'Fault latency percentiles per strategy',
    caption:
      'Time from a vCPU’s fault to its page being installed and the vCPU running again (HdrHistogram of every vCPU fault), at p50, p90, p99 and p99.9; ' +
      `log scale${groups.length > 1 ? ', the same on every panel' : ''}.${panelNote(input, ['strategy'])}`,
    svg: chartSvg(spec),
  };
}

export function demandPagingRateFigure(input: FigureInput): Figure {
  const groups = panelGroups(input, ['strategy', 'vcpus']);
  const vcpus = [...valuesOf(input, 'vcpus')].sort((a, b) => Number(a) - Number(b));
  const panels: ChartPanel[] = groups.map((g) => ({
    title: g.title,
    series: strategySeries(input).map(({ name, color }) => ({
      name,
      color,
      points: vcpus.map((v) => ({
        category: v,
        spread: g.summaries.find((x) => valueOf(input, x, 'strategy') === name && valueOf(input, x, 'vcpus') === v)?.metrics.get('demand_paging_rate'),
      })),
    })),
  }));
  const spec: ChartSpec = {
    categories: vcpus,
    panels,
    mark: 'line',
    x: { title: 'vCPUs' },
    y: { title: 'demand paging rate', unit: 'pages/s', shared: false },
    columns: groups[0]?.columns ?? 1,
    repeats: input.repeats,
    label: 'Demand paging rate against vCPUs per strategy',
  };
  return {
    id: 'rate',
    title: 'Demand paging rate against vCPUs',
    caption:
      'Pages faulted in per second of wall time from the start of all vCPUs to the end of the last, as the kernel’s demand_paging_test reports it; higher is better.' +
      `${input.params.some((p) => p.key === 'vcpus') ? '' : ' vCPUs were not swept (give --vcpus a list such as 1,2,4,8), so each strategy has one point.'}` +
      `${panelNote(input, ['strategy', 'vcpus'])}${groups.length > 1 ? ' Each panel has its own y scale.' : ''}`,
    svg: chartSvg(spec),
  };
}

export function blocktimeFigure(input: FigureInput): Figure {
  const groups = panelGroups(input, ['strategy']);
  const categories = [
    { label: 'total (all vCPUs blocked)', metric: 'blocktime_total_ms' },
    { label: 'per vCPU (mean)', metric: 'vcpu_blocktime_mean_ms' },
  ];
  const panels = metricPanels(input, groups, categories);
  const spec: ChartSpec = {
    categories: categories.map((c) => c.label),
    panels,
    mark: 'bar',
    x: { title: '' },
    y: { title: 'blocktime', unit: 'ms', shared: false },
    columns: groups[0]?.columns ?? 1,
    repeats: input.repeats,
    label: 'Blocktime per strategy, total and per-vCPU mean',
  };
  return {
    id: 'blocktime',
    title: 'Blocktime per strategy',
    caption:
      'Total blocktime is the time during which every vCPU was blocked on a fault at once (QEMU’s postcopy-blocktime); ' +
      'per vCPU is the mean over vCPUs of the time each spent blocked (postcopy-vcpu-blocktime); lower is better.' +
      `${panelNote(input, ['strategy'])}${groups.length > 1 ? ' Each panel has its own y scale.' : ''}`,
    svg: chartSvg(spec),
  };
}

/**
 * The classic trade-off (issue 10): total migration time and downtime per
 * mode against the guest's dirty rate. Precopy's downtime grows with the
 * dirty rate, and past the bandwidth precopy stops converging (a failed run:
 * no point); postcopy's downtime stays flat while its faults appear.
 */
export function modesFigure(input: FigureInput): Figure {
  const modes = valuesOf(input, 'mode');
  // --dirty-rate 0 is "as fast as it can": the highest rate, so it goes last, and says so.
  const order = (r: string): number => (Number(r) === 0 ? Infinity : Number(r));
  const rates = [...valuesOf(input, 'dirtyRate')].sort((a, b) => order(a) - order(b));
  const label = (r: string): string => (Number(r) === 0 ? 'unlimited' : r);
  const others = input.params.filter((p) => p.key !== 'mode' && p.key !== 'dirtyRate');
  const groups = panelGroups(input, ['mode', 'dirtyRate']);
  const panels: ChartPanel[] = [];
  for (const [metric, what] of [['total_time_ms', 'total time'], ['downtime_ms', 'downtime']] as const) {
    for (const g of groups) {
      panels.push({
        title: `${what}${others.length > 0 ? ` · ${g.title}` : ''}`,
        series: modes.map((mode, i) => ({
          name: mode,
          color: seriesColor(i),
          points: rates.map((rate) => ({
            category: label(rate),
            spread: g.summaries.find((x) => valueOf(input, x, 'mode') === mode && valueOf(input, x, 'dirtyRate') === rate)?.metrics.get(metric),
          })),
        })),
      });
    }
  }
  const spec: ChartSpec = {
    categories: rates.map(label),
    panels,
    mark: 'line',
    x: { title: 'dirty rate (pages/s per source vCPU; unlimited = as fast as it can)' },
    y: { title: 'time', unit: 'ms', shared: false },
    columns: 2,
    repeats: input.repeats,
    label: 'Total migration time and downtime per mode against the dirty rate',
  };
  return {
    id: 'modes',
    title: 'Total migration time and downtime per mode, against the dirty rate',
    caption:
      'Total time is QEMU’s total-time (start to the end of the migration); downtime runs from the source’s vCPUs stopping to the destination’s running. ' +
      'As the dirty rate nears the bandwidth, precopy’s downtime grows and then it stops converging (such runs fail and have no point); ' +
      'postcopy’s downtime stays flat (0 in postcopy mode, whose guest starts on the destination) while its faults appear; hybrid sits between.' +
      `${input.params.some((p) => p.key === 'dirtyRate') ? '' : ' The dirty rate was not swept (give --dirty-rate a list such as 0,2000,20000).'}` +
      `${panelNote(input, ['mode', 'dirtyRate'])} Each panel has its own y scale.`,
    svg: chartSvg(spec),
  };
}

export function figures(input: FigureInput): Figure[] {
  const out = [latencyFigure(input), demandPagingRateFigure(input), blocktimeFigure(input)];
  // Only a sweep of the phases before postcopy has something to show here.
  if (input.params.some((p) => p.key === 'mode' || p.key === 'dirtyRate')) out.push(modesFigure(input));
  return out;
}
