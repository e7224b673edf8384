/**
 * The loss curve as an SVG file, drawn by Apache ECharts' server-side SVG renderer (no DOM, no
 * canvas, no native dependency): the training loss of every step, its running mean, and the
 * validation loss of the base and the adapted model as horizontal lines.
 */
import { LineChart } from 'echarts/charts';
import { GridComponent, LegendComponent, MarkLineComponent, TitleComponent } from 'echarts/components';
import * as echarts from 'echarts/core';
import { SVGRenderer } from 'echarts/renderers';

echarts.use([LineChart, GridComponent, LegendComponent, MarkLineComponent, TitleComponent, SVGRenderer]);

export interface LossChartData {
  title: string;
  /** the training loss of steps 1, 2, ... */
  losses: number[];
  /** validation loss of the model before training (adapters off) */
  baseValLoss: number;
  /** validation loss after training */
  adaptedValLoss: number;
}

/** Mean of the last `window` values at each point. */
function runningMean(values: number[], window: number): number[] {
  let sum = 0;
  return values.map((v, i) => {
    sum += v - (i >= window ? values[i - window] : 0);
    return sum / Math.min(i + 1, window);
  });
}

/**
 * ```js
 * writeFileSync('loss.svg', lossChartSVG({title: 'LoRA', losses, baseValLoss: 1.9, adaptedValLoss: 0.7}));
 * ```
 */
export function lossChartSVG(data: LossChartData, width = 800, height = 420): string {
  const chart = echarts.init(null, null, { renderer: 'svg', ssr: true, width, height });
  const steps = data.losses.map((_, i) => i + 1);
  const window = Math.max(1, Math.round(data.losses.length / 40));
  const round = (v: number) => Math.round(v * 1e4) / 1e4;
  const mean = runningMean(data.losses, window);
  const vals = [data.baseValLoss, data.adaptedValLoss];
  chart.setOption({
    animation: false,
    backgroundColor: '#ffffff',
    title: { text: data.title, left: 'center', top: 8, textStyle: { fontSize: 15 } },
    legend: { top: 38 },
    grid: { left: 60, right: 150, top: 80, bottom: 50 },
    xAxis: { type: 'value', name: 'step', nameLocation: 'middle', nameGap: 28, min: 1, max: Math.max(2, steps.length) },
    yAxis: {
      type: 'value', name: 'loss (nats/char)', nameLocation: 'middle', nameGap: 42,
      // the validation lines stay in view even where the training losses never reach them
      min: (extent: { min: number }) => Math.floor(Math.min(extent.min, ...vals) * 2) / 2,
      max: (extent: { max: number }) => Math.ceil(Math.max(extent.max, ...vals) * 2) / 2,
    },
    series: [
      {
        name: 'train loss', type: 'line', showSymbol: false, lineStyle: { width: 1, opacity: 0.45 },
        data: steps.map((s, i) => [s, round(data.losses[i])]),
      },
      {
        name: `running mean (${window})`, type: 'line', showSymbol: false, lineStyle: { width: 2.5 },
        data: steps.map((s, i) => [s, round(mean[i])]),
        markLine: {
          symbol: 'none',
          label: { position: 'end', formatter: '{b}: {c}' },
          data: [
            { name: 'val base', yAxis: round(data.baseValLoss), lineStyle: { type: 'dashed', color: '#c23531' } },
            { name: 'val adapted', yAxis: round(data.adaptedValLoss), lineStyle: { type: 'dashed', color: '#2f9e44' } },
          ],
        },
      },
    ],
  });
  const svg = chart.renderToSVGString();
  chart.dispose();
  return svg;
}
