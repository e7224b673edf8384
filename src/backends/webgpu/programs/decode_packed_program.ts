/**
 * Packed 16-bit expert weights (src/ops/packed.ts) decoded to float32 on the device, for the
 * composed fusedExperts and unpackExpertWeight on webgpu (which cannot read the words to the host
 * in a synchronous call): experts first … first + count − 1, the layout of src/ops/README.md
 * ("Packed expert weights"). webgpuFusedExperts does not use it: its grouped products decode each
 * weight element as they load it (GroupedMatMulProgram's packed specialisation).
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { FLAT_THREADS, flatDispatch, intUniforms, packedHalfSnippet, type ProgramUniformEntry } from './shared.js';

export class DecodePackedProgram implements WebGPUProgram {
  variableNames = ['packed'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  uniforms = 'size : i32, block : i32, words : i32, first : i32, ';
  private readonly kind: 'bf16' | 'f16';

  constructor(kind: 'bf16' | 'f16', count: number, rows: number, cols: number) {
    this.kind = kind;
    this.outputShape = [count, rows, cols];
    this.dispatch = flatDispatch(count * rows * cols);
    this.shaderKey = `moeDecodePacked_${kind}`;
  }

  static uniformsFor(count: number, rows: number, cols: number, first: number): ProgramUniformEntry[] {
    return intUniforms(count * rows * cols, rows * cols, Math.ceil((rows * cols) / 2), first);
  }

  getUserCode(): string {
    return `
      ${packedHalfSnippet(this.kind, 'decodeHalf')}
      fn main(index : i32) {
        if (index < uniforms.size) {
          let e = uniforms.first + index / uniforms.block;
          let j = index % uniforms.block;
          let w = bitcast<u32>(packed[e * uniforms.words + j / 2]);
          setOutputAtIndex(index, decodeHalf(w, (j & 1) == 1));
        }
      }
    `;
  }
}
