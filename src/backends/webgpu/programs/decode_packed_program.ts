/**
 * Packed expert weights (16-bit or quantized: src/ops/packed.ts, src/ops/quantized.ts) decoded to float32 on the device, for the
 * composed fusedExperts and unpackExpertWeight on webgpu (which cannot read the words to the host
 * in a synchronous call): experts first … first + count − 1, the layout of src/ops/README.md
 * ("Packed expert weights"). webgpuFusedExperts does not use it: its grouped products decode each
 * weight element as they load it (GroupedMatMulProgram's packed specialisation).
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import {
  FLAT_THREADS, flatDispatch, intUniforms, packedElementSnippet, packedWeightKey, type PackedWeightSpec, type ProgramUniformEntry,
} from './shared.js';

export class DecodePackedProgram implements WebGPUProgram {
  variableNames = ['packed'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  uniforms = 'size : i32, block : i32, words : i32, first : i32, ';
  private readonly spec: PackedWeightSpec;

  constructor(spec: PackedWeightSpec, count: number, rows: number) {
    this.spec = spec;
    this.outputShape = [count, rows, spec.cols];
    this.dispatch = flatDispatch(count * rows * spec.cols);
    this.shaderKey = `moeDecodePacked_${packedWeightKey(spec)}`;
  }

  /** `words`: int32 words per expert */
  static uniformsFor(count: number, rows: number, cols: number, first: number, words: number): ProgramUniformEntry[] {
    return intUniforms(count * rows * cols, rows * cols, words, first);
  }

  getUserCode(): string {
    return `
      ${packedElementSnippet(this.spec, 'packed', 'decodeElement')}
      fn main(index : i32) {
        if (index < uniforms.size) {
          let e = uniforms.first + index / uniforms.block;
          let j = index % uniforms.block;
          setOutputAtIndex(index, decodeElement(e * uniforms.words, j));
        }
      }
    `;
  }
}
