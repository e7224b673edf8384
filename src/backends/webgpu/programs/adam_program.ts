/**
 * AdamUpdateProgram: one of the three outputs of MoEAdamUpdate (src/train/adam_update.ts) in one
 * pass over the elements: the new first moment, second moment or parameter. Each instance reads
 * param, grad, m and v and computes all three (a few flops per element) rather than reading the
 * other programs' outputs, so the three are independent and compute the moments alike.
 * Float32, in the composed op's order: m' = m·β1 + g·(1 − β1), v' = v·β2 + g²·(1 − β2),
 * param' = param − (m' / (√v' / c2 + ε)) · stepSize.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { FLAT_THREADS, flatDispatch, floatUniforms, type ProgramUniformEntry } from './shared.js';

/** Which output a program writes. */
export type AdamOutput = 'param' | 'm' | 'v';

export class AdamUpdateProgram implements WebGPUProgram {
  variableNames = ['param', 'grad', 'm', 'v'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  size = true;
  uniforms = 'beta1 : f32, oneMinusBeta1 : f32, beta2 : f32, oneMinusBeta2 : f32, epsilon : f32, correction2Sqrt : f32, stepSize : f32, ';
  private readonly output: AdamOutput;

  constructor(shape: readonly number[], output: AdamOutput) {
    this.output = output;
    this.outputShape = [...shape];
    this.dispatchLayout = { x: shape.map((_, i) => i) };
    this.dispatch = flatDispatch(shape.reduce((a, b) => a * b, 1));
    this.shaderKey = `moeAdamUpdate_${output}`;
  }

  /** 1 − β is taken in float64 and rounded once, as the composed op's scalar is. */
  static uniformsFor(a: { beta1: number; beta2: number; epsilon: number; correction2Sqrt: number; stepSize: number }): ProgramUniformEntry[] {
    return floatUniforms(a.beta1, 1 - a.beta1, a.beta2, 1 - a.beta2, a.epsilon, a.correction2Sqrt, a.stepSize);
  }

  getUserCode(): string {
    // every variant reads all four inputs: the pipeline's automatic layout drops unused bindings,
    // and tfjs binds every input
    return `
      fn main(index : i32) {
        if (index >= uniforms.size) { return; }
        let g = grad[index];
        let m2 = m[index] * uniforms.beta1 + g * uniforms.oneMinusBeta1;
        let v2 = v[index] * uniforms.beta2 + (g * g) * uniforms.oneMinusBeta2;
        let denom = sqrt(v2) / uniforms.correction2Sqrt + uniforms.epsilon;
        let p2 = param[index] - (m2 / denom) * uniforms.stepSize;
        result[index] = ${{ param: 'p2', m: 'm2', v: 'v2' }[this.output]};
      }
    `;
  }
}
