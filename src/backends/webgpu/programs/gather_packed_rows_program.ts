/**
 * gatherDenseRows' MoEGatherPackedRows on webgpu (src/ops/packed.ts): rows of a packed 16-bit dense
 * weight (an embedding table, int32 words [rows, ceil(cols/2)], each row starting on a word) picked
 * by index and decoded, one thread per output element. Only the looked-up rows are read: no
 * float32 copy of the table (Qwen3-30B-A3B's 151936 × 2048 would be a 1.24 GB transient per step).
 * The word is read as i32 and bitcast, never converted, and the offsets are u32, so every bit
 * pattern comes back as the host decode gives it (tfjs-webgpu's own Gather moves int32 through
 * float32 and rounds words above 2^24).
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import type { HalfKind } from '../../../ops/packed.js';
import { FLAT_THREADS, flatDispatch, intUniforms, packedHalfSnippet, type ProgramUniformEntry } from './shared.js';

export class GatherPackedRowsProgram implements WebGPUProgram {
  variableNames = ['packed', 'indices'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  uniforms = 'size : i32, cols : i32, words : i32, rows : i32, ';
  private readonly kind: HalfKind;

  /** out [count, cols] */
  constructor(kind: HalfKind, count: number, cols: number) {
    this.kind = kind;
    this.outputShape = [count, cols];
    this.dispatch = flatDispatch(count * cols);
    this.shaderKey = `moeGatherPackedRows_${kind}`;
  }

  /** `words`: int32 words per row; `rows`: the table's rows (an index outside gives zeros) */
  static uniformsFor(count: number, cols: number, words: number, rows: number): ProgramUniformEntry[] {
    return intUniforms(count * cols, cols, words, rows);
  }

  getUserCode(): string {
    return `
      ${packedHalfSnippet(this.kind, 'decodeHalf')}
      fn main(index : i32) {
        if (index < uniforms.size) {
          let i = u32(index);
          let cols = u32(uniforms.cols);
          let row = i / cols;
          let col = i - row * cols;
          let id = indices[row];
          var v = 0.0;
          if (id >= 0 && id < uniforms.rows) {
            let word = bitcast<u32>(packed[u32(id) * u32(uniforms.words) + col / 2u]);
            v = decodeHalf(word, (col & 1u) == 1u);
          }
          setOutputAtIndex(index, v);
        }
      }
    `;
  }
}
