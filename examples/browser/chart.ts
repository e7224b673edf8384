/**
 * A small canvas line chart for the loss curve: y axis from the data's range with rounded ticks,
 * x axis in steps up to the planned number. Redrawn whole on each step; a few hundred points
 * cost nothing to draw.
 */

export interface LossChartOptions {
  /** the x axis runs to this step count from the start */
  steps: number;
  title?: string;
}

/** Rounded tick values covering [lo, hi], about `count` of them. */
function ticks(lo: number, hi: number, count: number): number[] {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map(m => m * magnitude).find(s => s >= raw)!;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

export class LossChart {
  private readonly ctx: CanvasRenderingContext2D;
  private values: number[] = [];

  constructor(private readonly canvas: HTMLCanvasElement, private readonly options: LossChartOptions) {
    const ctx = canvas.getContext('2d');
    if (ctx === null) throw new Error('this browser gives no 2d canvas context');
    this.ctx = ctx;
    // sharp lines on high-density screens: a backing store of CSS size × devicePixelRatio
    const ratio = globalThis.devicePixelRatio || 1;
    const { width, height } = canvas.getBoundingClientRect();
    canvas.width = Math.round((width || canvas.width) * ratio);
    canvas.height = Math.round((height || canvas.height) * ratio);
    this.ctx.scale(ratio, ratio);
    this.draw();
  }

  /** Replaces the curve's values (one per step) and redraws. */
  update(values: readonly number[]): void {
    this.values = [...values];
    this.draw();
  }

  private draw(): void {
    const { ctx } = this;
    const ratio = globalThis.devicePixelRatio || 1;
    const width = this.canvas.width / ratio;
    const height = this.canvas.height / ratio;
    const pad = { left: 56, right: 16, top: 28, bottom: 36 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    ctx.clearRect(0, 0, width, height);
    ctx.fillStyle = '#fff';
    ctx.fillRect(0, 0, width, height);
    ctx.font = '12px system-ui, sans-serif';
    ctx.fillStyle = '#222';
    ctx.textBaseline = 'alphabetic';
    ctx.textAlign = 'left';
    ctx.fillText(this.options.title ?? 'training loss', pad.left, 18);

    const finite = this.values.filter(Number.isFinite);
    const lo = finite.length > 0 ? Math.min(...finite) : 0;
    const hi = finite.length > 0 ? Math.max(...finite) : 1;
    const margin = (hi - lo) * 0.05 || Math.abs(hi) * 0.05 || 0.5;
    const yLo = lo - margin;
    const yHi = hi + margin;
    const xMax = Math.max(this.options.steps, this.values.length, 2) - 1;
    const x = (i: number) => pad.left + (i / xMax) * plotW;
    const y = (v: number) => pad.top + (1 - (v - yLo) / (yHi - yLo)) * plotH;

    // grid and tick labels
    ctx.strokeStyle = '#e4e4e4';
    ctx.lineWidth = 1;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (const v of ticks(yLo, yHi, 5)) {
      ctx.beginPath();
      ctx.moveTo(pad.left, y(v));
      ctx.lineTo(pad.left + plotW, y(v));
      ctx.stroke();
      ctx.fillText(String(v), pad.left - 6, y(v));
    }
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    for (const s of ticks(0, xMax + 1, 6).filter(s => s >= 1 && s <= xMax + 1)) {
      ctx.fillText(String(s), x(s - 1), pad.top + plotH + 6);
    }
    ctx.fillText('step', pad.left + plotW / 2, pad.top + plotH + 20);
    ctx.strokeStyle = '#888';
    ctx.strokeRect(pad.left, pad.top, plotW, plotH);

    // the curve, with a dot on the latest value
    if (this.values.length === 0) return;
    ctx.strokeStyle = '#1f6feb';
    ctx.lineWidth = 2;
    ctx.beginPath();
    this.values.forEach((v, i) => (i === 0 ? ctx.moveTo(x(i), y(v)) : ctx.lineTo(x(i), y(v))));
    ctx.stroke();
    const last = this.values.length - 1;
    ctx.fillStyle = '#1f6feb';
    ctx.beginPath();
    ctx.arc(x(last), y(this.values[last]), 3, 0, 2 * Math.PI);
    ctx.fill();
  }
}
