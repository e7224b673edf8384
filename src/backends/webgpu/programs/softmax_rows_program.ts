/**
 * The composed attention's row programs over the last axis L, one workgroup per row, FLAT_THREADS
 * lanes that stride over the row (4 elements a load where L is a multiple of 4) and reduce in
 * workgroup memory; each row is read again from cache after its reduction (2 KB at L 512).
 *
 * SoftmaxGradProgram: MoESoftmaxGrad (src/ops/softmax_grad.ts), dS = p ⊙ (dP − Σ_j dP ⊙ p).
 * MaskedSoftmaxProgram: MoEMaskedSoftmax (src/ops/masked_softmax.ts), softmax(scores + mask), the
 * row's max and then its sum of exponentials.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { FLAT_THREADS, intUniforms, type ProgramUniformEntry, reduceLanes } from './shared.js';

/** Rows of a shape: the product of all axes but the last. */
function rowsOf(shape: readonly number[]): number {
  return shape.slice(0, -1).reduce((a, b) => a * b, 1);
}

/**
 * WGSL (inside main): this workgroup's row, its lane, and where the row starts in loads (`base`):
 * rows past the end (tfjs may fold a long dispatch into x and y) read row 0 and write nothing, so
 * every lane reaches every barrier.
 */
const ROW_START = `
        let row = i32(workgroupId.x + workgroupId.y * numWorkgroups.x);
        let lane = i32(localIndex);
        let inRange = row < uniforms.rows;
        let r = select(0, row, inRange);
        let base = r * uniforms.loads;`;

/** One row program's common parts: a workgroup per row, quads where L is a multiple of 4. */
abstract class RowProgram implements WebGPUProgram {
  abstract variableNames: string[];
  variableComponents: number[] | undefined;
  outputComponent: number | undefined;
  outputShape: number[];
  abstract shaderKey: string;
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  protected readonly quads: boolean;

  constructor(shape: readonly number[], inputs: number) {
    this.outputShape = [...shape];
    this.dispatchLayout = { x: shape.map((_, i) => i) };
    this.dispatch = [Math.max(1, rowsOf(shape)), 1, 1];
    this.quads = shape[shape.length - 1] % 4 === 0;
    this.variableComponents = this.quads ? new Array<number>(inputs).fill(4) : undefined;
    this.outputComponent = this.quads ? 4 : undefined;
  }

  /** rows, and loads a row (quads or elements) */
  protected rowUniforms(): ProgramUniformEntry[] {
    const width = this.outputShape[this.outputShape.length - 1];
    return intUniforms(rowsOf(this.outputShape), this.quads ? width / 4 : width);
  }

  abstract getUserCode(): string;
}

export class SoftmaxGradProgram extends RowProgram {
  variableNames = ['p', 'dP'];
  shaderKey: string;
  uniforms = 'rows : i32, loads : i32, ';

  /** `shape`: p's and dP's, rank ≥ 1 */
  constructor(shape: readonly number[]) {
    super(shape, 2);
    this.shaderKey = `moeSoftmaxGrad${this.quads ? '_v4' : ''}`;
  }

  uniformsFor(): ProgramUniformEntry[] {
    return this.rowUniforms();
  }

  getUserCode(): string {
    const dotOf = this.quads ? 'dot(dP[base + i], p[base + i])' : 'dP[base + i] * p[base + i]';
    return `
      var<workgroup> lanes : array<f32, ${FLAT_THREADS}>;
      fn main(index : i32) {
        ${ROW_START}
        var sum = 0.0;
        for (var i = lane; i < uniforms.loads; i += ${FLAT_THREADS}) {
          sum += ${dotOf};
        }
        ${reduceLanes('lanes', 'total', 'sum', (a, b) => `${a} + ${b}`)}
        if (!inRange) { return; }
        for (var i = lane; i < uniforms.loads; i += ${FLAT_THREADS}) {
          result[base + i] = p[base + i] * (dP[base + i] - total);
        }
      }
    `;
  }
}

export class MaskedSoftmaxProgram extends RowProgram {
  variableNames = ['scores', 'mask'];
  shaderKey: string;
  uniforms = 'rows : i32, loads : i32, maskRows : i32, rowsPerMaskBatch : i32, ';
  private readonly maskShape: number[];

  /**
   * `shape`: the scores' [..., S, L]; `maskShape`: [S, L], or [B, 1, S, L] for scores [B, n, S, L]
   * (mask row (r / (n·S))·S + r % S for score row r)
   */
  constructor(shape: readonly number[], maskShape: readonly number[]) {
    super(shape, 2);
    this.maskShape = [...maskShape];
    this.shaderKey = `moeMaskedSoftmax${this.quads ? '_v4' : ''}`;
  }

  uniformsFor(): ProgramUniformEntry[] {
    const maskRows = this.maskShape[this.maskShape.length - 2];
    const maskBatches = this.maskShape.length === 4 ? this.maskShape[0] : 1;
    return [...this.rowUniforms(), ...intUniforms(maskRows, rowsOf(this.outputShape) / maskBatches)];
  }

  getUserCode(): string {
    const [maxOf, sumOf] = this.quads
      ? [(v: string) => `max(max(${v}.x, ${v}.y), max(${v}.z, ${v}.w))`, (v: string) => `dot(${v}, vec4<f32>(1.0))`]
      : [(v: string) => v, (v: string) => v];
    return `
      var<workgroup> lanes : array<f32, ${FLAT_THREADS}>;
      fn main(index : i32) {
        ${ROW_START}
        let maskBase = ((r / uniforms.rowsPerMaskBatch) * uniforms.maskRows + r % uniforms.maskRows) * uniforms.loads;
        var m = -3.4e38;
        for (var i = lane; i < uniforms.loads; i += ${FLAT_THREADS}) {
          let v = scores[base + i] + mask[maskBase + i];
          m = max(m, ${maxOf('v')});
        }
        ${reduceLanes('lanes', 'rowMax', 'm', (a, b) => `max(${a}, ${b})`)}
        var sum = 0.0;
        for (var i = lane; i < uniforms.loads; i += ${FLAT_THREADS}) {
          let e = exp(scores[base + i] + mask[maskBase + i] - rowMax);
          sum += ${sumOf('e')};
        }
        ${reduceLanes('lanes', 'total', 'sum', (a, b) => `${a} + ${b}`)}
        if (!inRange) { return; }
        for (var i = lane; i < uniforms.loads; i += ${FLAT_THREADS}) {
          result[base + i] = exp(scores[base + i] + mask[maskBase + i] - rowMax) / total;
        }
      }
    `;
  }
}
