/**
 * AdamUpdateProgram: one of the two outputs of MoEAdamUpdate (src/train/adam_update.ts) in one
 * pass over the elements: the new parameter, or both new moments [2, n] (m' then v', one thread
 * per value). Each instance reads param, grad and the moments and computes what it needs (a few
 * flops per element) rather than reading the other program's output, so the two are independent
 * and compute the moments alike. Float32, in the composed op's order: m' = m·β1 + g·(1 − β1),
 * v' = v·β2 + g²·(1 − β2), param' = param − (m' / (√v' / c2 + ε)) · stepSize; `scaled`: g = grad·s
 * with s the input gradScale[0], and where s is 0 the old values are written back (a skipped step).
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { FLAT_THREADS, flatDispatch, floatUniforms, type ProgramUniformEntry } from './shared.js';

/** Which output a program writes: param' (n values) or the moments m', v' ([2, n]). */
export type AdamOutput = 'param' | 'moments';

export class AdamUpdateProgram implements WebGPUProgram {
  variableNames = ['param', 'grad', 'moments'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  size = true;
  uniforms = 'beta1 : f32, oneMinusBeta1 : f32, beta2 : f32, oneMinusBeta2 : f32, epsilon : f32, correction2Sqrt : f32, stepSize : f32, ';
  private readonly output: AdamOutput;
  private readonly scaled: boolean;

  /** `shape`: the parameter's; `scaled`: a fourth input gradScale (MoEAdamUpdate's). */
  constructor(shape: readonly number[], output: AdamOutput, scaled = false) {
    this.output = output;
    this.scaled = scaled;
    if (scaled) this.variableNames = [...this.variableNames, 'gradScale'];
    this.outputShape = output === 'param' ? [...shape] : [2, ...shape];
    this.dispatchLayout = { x: this.outputShape.map((_, i) => i) };
    this.dispatch = flatDispatch(this.outputShape.reduce((a, b) => a * b, 1));
    this.shaderKey = `moeAdamUpdate_${output}${scaled ? '_scaled' : ''}`;
  }

  /** 1 − β is taken in float64 and rounded once, as the composed op's scalar is. */
  static uniformsFor(a: { beta1: number; beta2: number; epsilon: number; correction2Sqrt: number; stepSize: number }): ProgramUniformEntry[] {
    return floatUniforms(a.beta1, 1 - a.beta1, a.beta2, 1 - a.beta2, a.epsilon, a.correction2Sqrt, a.stepSize);
  }

  getUserCode(): string {
    // n: the parameter's size; the moments output has 2n values, m' then v'. Both variants read
    // all three inputs: the pipeline's automatic layout drops unused bindings, and tfjs binds every input
    const n = this.output === 'param' ? 'uniforms.size' : 'uniforms.size / 2';
    const write = this.output === 'param' ? 'result[index] = p2;' : 'if (index < n) { result[index] = m2; } else { result[index] = v2; }';
    // a skipped step (gradScale 0) copies the old value: param[i], or the moment at index
    const skip = !this.scaled ? '' : `
        if (s == 0.0) {
          ${this.output === 'param' ? 'result[index] = param[i];' : 'result[index] = moments[index];'}
          return;
        }`;
    return `
      fn main(index : i32) {
        if (index >= uniforms.size) { return; }
        let n = ${n};
        let i = index % n;${this.scaled ? `
        let s = gradScale[0];${skip}
        let g = grad[i] * s;` : `
        let g = grad[i];`}
        let m2 = moments[i] * uniforms.beta1 + g * uniforms.oneMinusBeta1;
        let v2 = moments[n + i] * uniforms.beta2 + (g * g) * uniforms.oneMinusBeta2;
        let denom = sqrt(v2) / uniforms.correction2Sqrt + uniforms.epsilon;
        let p2 = param[i] - (m2 / denom) * uniforms.stepSize;
        ${write}
      }
    `;
  }
}
