/**
 * ScaledMatMulProgram: MoEScaledMatMul (src/ops/scaled_matmul.ts), out [M, N] = alpha·a·op(b) for
 * a [M, K] and b [K, N] (or [N, K] transposed), alpha a uniform: LoRA's rank-sized products
 * s·(x·Aᵀ) and s·(dy·B) with their scale in the product's last write instead of a BinaryOpProgram
 * after it (issue 15). Their output is narrow (N = r) and their reduction long (K = in or out), so
 * a workgroup of 16×16 threads owns 16·rowsPerThread rows × 16 columns (each thread rowsPerThread
 * rows of one column) and walks K in 16-deep slabs of both operands in workgroup memory. Few rows
 * (short inputs) take 1 row per thread, so that more workgroups share the product.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { floatUniforms, intUniforms, TILE_THREADS, type ProgramUniformEntry } from './shared.js';

const MAX_WORKGROUPS = 65535;
/** below this many rows a thread computes 1 row, above it 4 (a guess until timed on a GPU: tools/lora_products/) */
const FEW_ROWS = 8192;

/** rows per thread for a product of `m` rows */
export function scaledMatMulRowsPerThread(m: number): 1 | 4 {
  return m <= FEW_ROWS ? 1 : 4;
}

export class ScaledMatMulProgram implements WebGPUProgram {
  variableNames = ['a', 'b'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [1], y: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [TILE_THREADS, TILE_THREADS, 1];
  uniforms = 'M : i32, N : i32, K : i32, rowWorkgroups : i32, alpha : f32, ';
  private readonly transposeB: boolean;
  private readonly rowsPerThread: number;

  /**
   * out [m, n]; `maxRowWorkgroups` (WebGPU's 65535 per dimension; lower in specs) bounds the
   * dispatch's y: past it each workgroup takes every maxRowWorkgroups-th block of rows
   */
  constructor(m: number, n: number, transposeB: boolean, rowsPerThread: 1 | 4 = scaledMatMulRowsPerThread(m),
      maxRowWorkgroups = MAX_WORKGROUPS) {
    this.transposeB = transposeB;
    this.rowsPerThread = rowsPerThread;
    this.outputShape = [m, n];
    this.dispatch = [Math.ceil(n / TILE_THREADS), Math.min(maxRowWorkgroups, Math.ceil(m / (TILE_THREADS * rowsPerThread))), 1];
    this.shaderKey = `moeScaledMatMul_${transposeB ? 't' : 'n'}${rowsPerThread}`;
  }

  /** the uniforms of this program for a [m, k] and alpha */
  uniformsFor(k: number, alpha: number): ProgramUniformEntry[] {
    const [m, n] = this.outputShape;
    return [...intUniforms(m, n, k, this.dispatch[1]), ...floatUniforms(alpha)];
  }

  getUserCode(): string {
    const T = TILE_THREADS;
    const rowsPerThread = this.rowsPerThread;
    const BM = T * rowsPerThread;
    // a's slab is stored k-major, one element of padding per k row so the stores (k fastest) spread over the banks
    const aStride = BM + 1;
    // b(k, n): Bᵀ rows are k-contiguous, so a transposed B is read with k fastest as a is
    const bLoad = this.transposeB
      ? `let nn = lid / ${T}; let kk = lid % ${T}; let n = col0 + nn; let k = k0 + kk;
         if (n < uniforms.N && k < uniforms.K) { v = b[n * uniforms.K + k]; }`
      : `let kk = lid / ${T}; let nn = lid % ${T}; let n = col0 + nn; let k = k0 + kk;
         if (n < uniforms.N && k < uniforms.K) { v = b[k * uniforms.N + n]; }`;
    return `
      var<workgroup> As : array<f32, ${T * aStride}>;
      var<workgroup> Bs : array<f32, ${T * T}>;
      var<workgroup> firstBlock : i32;
      fn main() {
        let tx = i32(localId.x);
        let ty = i32(localId.y);
        let lid = ty * ${T} + tx;
        let col0 = i32(workgroupId.x) * ${T};
        let col = col0 + tx;
        // the loop's bounds must be uniform for its barriers: the block index goes through workgroup memory
        if (lid == 0) { firstBlock = i32(workgroupId.y); }
        for (var block = workgroupUniformLoad(&firstBlock); block * ${BM} < uniforms.M; block += uniforms.rowWorkgroups) {
          let row0 = block * ${BM};
          var acc : array<f32, ${rowsPerThread}>;
          for (var k0 = 0; k0 < uniforms.K; k0 += ${T}) {
            for (var q = 0; q < ${rowsPerThread}; q++) {
              let i = lid + q * ${T * T};
              let mm = i / ${T};
              let kk = i % ${T};
              let r = row0 + mm;
              let k = k0 + kk;
              var v = 0.0;
              if (r < uniforms.M && k < uniforms.K) { v = a[r * uniforms.K + k]; }
              As[kk * ${aStride} + mm] = v;
            }
            {
              var v = 0.0;
              ${bLoad}
              Bs[kk * ${T} + nn] = v;
            }
            workgroupBarrier();
            for (var kk = 0; kk < ${T}; kk++) {
              let bv = Bs[kk * ${T} + tx];
              for (var i = 0; i < ${rowsPerThread}; i++) {
                acc[i] += As[kk * ${aStride} + ty + ${T} * i] * bv;
              }
            }
            workgroupBarrier();
          }
          for (var i = 0; i < ${rowsPerThread}; i++) {
            let r = row0 + ty + ${T} * i;
            if (r < uniforms.M && col < uniforms.N) { result[r * uniforms.N + col] = uniforms.alpha * acc[i]; }
          }
        }
      }
    `;
  }
}
