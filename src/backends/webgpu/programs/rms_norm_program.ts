/**
 * RMSNormProgram: MoERMSNorm and MoERMSNormGradX (src/ops/rms_norm.ts), a norm over the last axis
 * of x [rows, D] or its gradient in one program: one workgroup per row, FLAT_THREADS lanes that
 * stride over D and sum in workgroup memory. The composed op is six programs each way (square,
 * mean, add, rsqrt and two products; backward three products, a mean and a difference), four norms
 * per OLMoE layer (issue 15). The backward recomputes r from x, so forward keeps only x.
 *   forward: r = 1 / √(Σx²/D + ε),  y = (x·r)·scale
 *   gradX:   g = dy·scale,  x̂ = x·r,  dx = (g − x̂·Σ(g·x̂)/D)·r
 * Where D is a multiple of 4 every input and the result are bound as vec4<f32> and each lane
 * loads 4 elements at a time: with one f32 a load the 64 lanes of a row kept too few bytes in
 * flight (run X6 on the H100: 42 µs forward and 55 µs gradX per [2048, 2048], about 3× what the
 * bytes need; 5.9 GPU ms a step for OLMoE's 129 norms).
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { FLAT_THREADS, floatUniforms, intUniforms, type ProgramUniformEntry } from './shared.js';

export type RMSNormPass = 'forward' | 'gradX';

export class RMSNormProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  uniforms = 'rows : i32, width : i32, epsilon : f32, ';
  variableComponents: number[] | undefined;
  outputComponent: number | undefined;
  private readonly pass: RMSNormPass;
  private readonly quads: boolean;

  /** `shape`: x's, any rank ≥ 1 (rows: the product of all axes but the last). */
  constructor(shape: readonly number[], pass: RMSNormPass) {
    this.pass = pass;
    this.variableNames = pass === 'forward' ? ['x', 'scale'] : ['dy', 'x', 'scale'];
    this.outputShape = [...shape];
    this.dispatchLayout = { x: shape.map((_, i) => i) };
    const rows = shape.slice(0, -1).reduce((a, b) => a * b, 1);
    this.dispatch = [Math.max(1, rows), 1, 1];    // one workgroup per row
    this.quads = shape[shape.length - 1] % 4 === 0;
    this.variableComponents = this.quads ? this.variableNames.map(() => 4) : undefined;
    this.outputComponent = this.quads ? 4 : undefined;
    this.shaderKey = `moeRMSNorm_${pass}${this.quads ? '_v4' : ''}`;
  }

  static uniformsFor(shape: readonly number[], epsilon: number): ProgramUniformEntry[] {
    return [...intUniforms(shape.slice(0, -1).reduce((a, b) => a * b, 1), shape[shape.length - 1]), ...floatUniforms(epsilon)];
  }

  getUserCode(): string {
    const T = FLAT_THREADS;
    const gradX = this.pass === 'gradX';
    // the loops run over x's loads: quads (width / 4 a row) or elements; dot() sums a quad's lanes
    const [unit, sumOf] = this.quads ? ['4', (v: string) => `dot(${v}, ${v})`] : ['1', (v: string) => `${v} * ${v}`];
    const gxOf = this.quads ? 'dot(dy[base + i] * scale[i], v)' : '(dy[base + i] * scale[i]) * v';
    // lane sums: Σx² (both), Σ dy·scale·x (gradX); the tree below adds them pairwise
    return `
      var<workgroup> sumSq : array<f32, ${T}>;
      ${gradX ? `var<workgroup> sumGx : array<f32, ${T}>;` : ''}
      fn main(index : i32) {
        // a row per workgroup (tfjs may fold a long dispatch into x and y); rows past the end
        // read row 0 and write nothing, so every lane reaches every barrier
        let row = i32(workgroupId.x + workgroupId.y * numWorkgroups.x);
        let lane = i32(localIndex);
        let width = uniforms.width;
        let loads = width / ${unit};
        let inRange = row < uniforms.rows;
        let base = select(0, row, inRange) * loads;
        var sq = 0.0;
        ${gradX ? 'var gx = 0.0;' : ''}
        for (var i = lane; i < loads; i += ${T}) {
          let v = x[base + i];
          sq += ${sumOf('v')};
          ${gradX ? `gx += ${gxOf};` : ''}
        }
        sumSq[lane] = sq;
        ${gradX ? 'sumGx[lane] = gx;' : ''}
        workgroupBarrier();
        for (var s = ${T / 2}; s > 0; s = s >> 1) {
          if (lane < s) {
            sumSq[lane] += sumSq[lane + s];
            ${gradX ? 'sumGx[lane] += sumGx[lane + s];' : ''}
          }
          workgroupBarrier();
        }
        let r = 1.0 / sqrt(sumSq[0] / f32(width) + uniforms.epsilon);
        ${gradX ? 'let projection = (sumGx[0] * r) / f32(width);' : ''}
        if (!inRange) { return; }
        for (var i = lane; i < loads; i += ${T}) {
          ${gradX ?
            'let g = dy[base + i] * scale[i];\n          result[base + i] = (g - (x[base + i] * r) * projection) * r;' :
            'result[base + i] = (x[base + i] * r) * scale[i];'}
        }
      }
    `;
  }
}
