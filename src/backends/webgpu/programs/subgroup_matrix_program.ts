/**
 * The grouped products of grouped_matmul_program.ts on tensor cores (issue 13): the same inputs,
 * uniforms and results, computed with WGSL's subgroup matrices (chromium_experimental_subgroup_matrix)
 * on f16 operands with f32 accumulation.
 *
 * One subgroup per workgroup (workgroup size = the device's fixed subgroup size, 32 on NVIDIA; the
 * probe's proven pattern, and no subgroup id is needed) owns a 64×64 block of the output as 4×4
 * result matrices of 16×16 f32. Each step stages a 32-deep slab of both operands in workgroup
 * memory as f16 — converted on the fly from f32 activations (the activation computed on load, the
 * gather fused as in the f32 program) and from f32 or packed weights, bf16/f16 or quantized
 * (int8/int4/nf4/mxfp4), decoded to f32 by the f32 program's own loader — and multiplies
 * them with subgroupMatrixLoad / subgroupMatrixMultiplyAccumulate. The accumulators go through a
 * workgroup f32 block so that the epilogue (alpha, bias, addend, padding rows, edges) is the f32
 * program's, per element.
 *
 * Gradient operands can be tiny (a mean loss over many tokens), below f16's smallest normal
 * (6e-5): with `scaled`, the left operand is multiplied by a power of two s that brings its
 * largest magnitude (input `amax`, a [1] tensor the caller computes on the device) to at most
 * 2^14, and the result by 1/s, both exact.
 *
 * Matrix types are written as Dawn documents them and the probe confirmed on the H100:
 * subgroup_matrix_left<T, K, M>, subgroup_matrix_right<T, N, K>, subgroup_matrix_result<T, N, M>.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import {
  type GroupedMatMulSpec, type GroupedWeightGradSpec, rowLoadSnippet, usesPairOfRow, weightGradLoadSnippets,
  weightLoadSnippet, tileRowsSnippet,
} from './grouped_matmul_program.js';
import { ACTIVATION_UNIFORMS, activationKey, EXPERT_OF_ROW, packedWeightKey } from './shared.js';

/**
 * The output block of one workgroup and the depth of a staged slab: 2×2 subgroups, each owning a
 * 64×64 part as 4×4 result matrices. Four subgroups share each staged slab, so that staging
 * (the gather, activation or weight decode, and the f16 conversion) is amortized over 4× the
 * matrix work of a one-subgroup block.
 */
export const SUBGROUP_MATRIX_BLOCK = { rows: 128, cols: 128, depth: 32, subgroupRows: 2, subgroupCols: 2 } as const;

/** The 16×16×16 matrices the programs use. */
const EDGE = 16;
/** One subgroup's part of the block: 64×64 as TILES×TILES result matrices. */
const PART = 64;
const TILES = PART / EDGE;
const SUBGROUPS = SUBGROUP_MATRIX_BLOCK.subgroupRows * SUBGROUP_MATRIX_BLOCK.subgroupCols;

/**
 * Workgroups for an output of rows × cols (per expert: × experts): one per block.
 *
 * ```js
 * subgroupMatrixDispatch(256, 100);   // [1, 2, 1]
 * ```
 */
export function subgroupMatrixDispatch(rows: number, cols: number, experts = 1): [number, number, number] {
  return [Math.ceil(cols / SUBGROUP_MATRIX_BLOCK.cols), Math.ceil(rows / SUBGROUP_MATRIX_BLOCK.rows), experts];
}

/** Bytes of workgroup memory a program uses: two f16 slabs, a 16×16 f32 tile per subgroup, the row sources. */
export function subgroupMatrixWorkgroupBytes(): number {
  const { rows, cols, depth } = SUBGROUP_MATRIX_BLOCK;
  return 2 * (rows * depth + depth * cols) + 4 * SUBGROUPS * EDGE * EDGE + 4 * rows + 8;
}

/**
 * The extensions, and Tint's subgroup-matrix uniformity check off: it asks every matrix offset to
 * be uniform across the workgroup, which four subgroups owning four parts cannot be (each offset
 * is uniform across its subgroup, which is what the hardware needs; llama.cpp's and ONNX
 * Runtime's WebGPU matrix kernels turn the check off likewise).
 */
const ENABLES = 'enable f16;\nenable chromium_experimental_subgroup_matrix;\n' +
    'diagnostic(off, chromium.subgroup_matrix_uniformity);';

/**
 * WGSL: operandScale(), the power of two s with s·amax <= 2^14 (1 when amax is 0 or not finite).
 */
const OPERAND_SCALE = `
  fn operandScale() -> f32 {
    let m = amax[0];
    if (!(m > 0.0) || m > 3.0e38) { return 1.0; }
    return exp2(clamp(floor(log2(16384.0 / m)), -100.0, 100.0));
  }`;

/**
 * WGSL: which part of the block this invocation's subgroup owns, (partRow, partCol), and its lane.
 * Subgroups are consecutive runs of local_invocation_index (as on every GPU these programs are
 * registered for: a fixed subgroup size, one-dimensional workgroups).
 */
function subgroupPart(subgroupSize: number): string {
  const { subgroupCols } = SUBGROUP_MATRIX_BLOCK;
  return `let subgroup = lid / ${subgroupSize};
        let lane = lid % ${subgroupSize};
        let partRow = (subgroup / ${subgroupCols}) * ${PART};
        let partCol = (subgroup % ${subgroupCols}) * ${PART};`;
}

/** WGSL: the unrolled K loop over a staged slab, As [rows][depth] and Bs [depth][cols] row-major. */
function multiplySlab(leftColMajor: boolean): string {
  const { rows, cols, depth } = SUBGROUP_MATRIX_BLOCK;
  const lines: string[] = [];
  lines.push(`for (var kk = 0u; kk < ${depth}u; kk += ${EDGE}u) {`);
  for (let i = 0; i < TILES; i++) {
    // left (m, k): row-major As[m·depth + k], or column-major Ls[k·rows + m]
    const offset = leftColMajor ? `kk * ${rows}u + u32(partRow) + ${i * EDGE}u` : `(u32(partRow) + ${i * EDGE}u) * ${depth}u + kk`;
    lines.push(`  let a${i} = subgroupMatrixLoad<subgroup_matrix_left<f16, ${EDGE}, ${EDGE}>>(&As, ${offset}, ` +
        `${leftColMajor}, ${leftColMajor ? rows : depth}u);`);
  }
  for (let j = 0; j < TILES; j++) {
    lines.push(`  let b${j} = subgroupMatrixLoad<subgroup_matrix_right<f16, ${EDGE}, ${EDGE}>>(&Bs, ` +
        `kk * ${cols}u + u32(partCol) + ${j * EDGE}u, false, ${cols}u);`);
  }
  for (let i = 0; i < TILES; i++) {
    for (let j = 0; j < TILES; j++) lines.push(`  c${i}_${j} = subgroupMatrixMultiplyAccumulate(a${i}, b${j}, c${i}_${j});`);
  }
  lines.push('}');
  return lines.join('\n          ');
}

/** WGSL: the accumulators' declarations. */
function declareAccumulators(): string {
  const declare: string[] = [];
  for (let i = 0; i < TILES; i++) {
    for (let j = 0; j < TILES; j++) declare.push(`var c${i}_${j} = subgroup_matrix_result<f32, ${EDGE}, ${EDGE}>();`);
  }
  return declare.join('\n        ');
}

/**
 * WGSL: the epilogue, one result matrix at a time: each subgroup stores its matrix (i, j) to its
 * 16×16 slot of Ts, and its lanes write the slot's elements through `write(m, n, v)` (m, n in the
 * block); every subgroup takes the same steps, so the barriers are in uniform control flow.
 */
function epilogue(subgroupSize: number, write: (m: string, n: string, v: string) => string): string {
  const lines: string[] = [];
  for (let i = 0; i < TILES; i++) {
    for (let j = 0; j < TILES; j++) {
      lines.push(`subgroupMatrixStore(&Ts, u32(subgroup) * ${EDGE * EDGE}u, c${i}_${j}, false, ${EDGE}u);`);
      lines.push('workgroupBarrier();');
      lines.push(`for (var t = lane; t < ${EDGE * EDGE}; t += ${subgroupSize}) {
          let m = partRow + ${i * EDGE} + t / ${EDGE};
          let n = partCol + ${j * EDGE} + t % ${EDGE};
          ${write('m', 'n', `Ts[subgroup * ${EDGE * EDGE} + t]`)}
        }`);
      lines.push('workgroupBarrier();');
    }
  }
  return lines.join('\n        ');
}

function workgroupArrays(): string {
  const { rows, cols, depth } = SUBGROUP_MATRIX_BLOCK;
  return `
      var<workgroup> As : array<f16, ${rows * depth}>;
      var<workgroup> Bs : array<f16, ${depth * cols}>;
      var<workgroup> Ts : array<f32, ${SUBGROUPS * EDGE * EDGE}>;`;
}

/**
 * GroupedMatMulProgram's product (its spec without the register tile) on subgroup matrices;
 * `scaled` adds the input `amax` (see the file comment). The plan's row tile must be a multiple
 * of 64, so that a block never spans two experts.
 */
export class SubgroupMatrixMatMulProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0], y: [1] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number];
  uniforms = 'numRows : i32, outCols : i32, inner : i32, topK : i32, numExperts : i32, ' +
      'sE : i32, sN : i32, sK : i32, alpha : f32, ' + ACTIVATION_UNIFORMS;
  private readonly spec: Omit<GroupedMatMulSpec, 'tile'> & { scaled: boolean };

  /** out [capacity, outCols]; capacity a multiple of 64 */
  constructor(capacity: number, outCols: number, spec: Omit<GroupedMatMulSpec, 'tile'> & { scaled: boolean },
      subgroupSize: number) {
    this.spec = spec;
    this.outputShape = [capacity, outCols];
    this.workgroupSize = [SUBGROUPS * subgroupSize, 1, 1];
    this.dispatch = subgroupMatrixDispatch(capacity, outCols);
    this.variableNames = ['A', 'W', 'seg', 'pr', ...(spec.hasBias ? ['bias'] : []),
      ...(spec.hasAddend ? ['addend'] : []), ...(spec.scaled ? ['amax'] : [])];
    this.shaderKey = `moeSubgroupMatMul_${spec.source}_${activationKey(spec.source === 'act' ? spec.activation : undefined)}_` +
        `${spec.hasBias ? 'b' : ''}${spec.hasAddend ? 'a' : ''}${spec.scaled ? 's' : ''}${spec.kContiguous ? 'k' : 'n'}_` +
        `${subgroupSize}${spec.packedWeight ? `_${packedWeightKey(spec.packedWeight)}` : ''}`;
  }

  getUserCode(): string {
    const { rows, cols, depth } = SUBGROUP_MATRIX_BLOCK;
    const threads = this.workgroupSize[0];
    const subgroupSize = threads / SUBGROUPS;
    const loadW = weightLoadSnippet(this.spec.packedWeight);
    // B's staging walks k fastest for an [out, in] weight (coalesced reads), n fastest otherwise
    const bIndex = this.spec.kContiguous
      ? `let kk = i % ${depth}; let nn = i / ${depth};`
      : `let nn = i % ${cols}; let kk = i / ${cols};`;
    return `
      ${ENABLES}
      ${workgroupArrays()}
      var<workgroup> rowSrc : array<i32, ${rows}>;
      var<workgroup> tileExpert : i32;
      ${EXPERT_OF_ROW}
      ${rowLoadSnippet(this.spec.source, this.spec.activation)}
      ${loadW.fn}
      ${this.spec.scaled ? OPERAND_SCALE : ''}

      fn main() {
        let lid = i32(localIndex);
        let col0 = i32(workgroupId.x) * ${cols};
        let row0 = i32(workgroupId.y) * ${rows};
        ${subgroupPart(subgroupSize)}
        let s = ${this.spec.scaled ? 'operandScale()' : '1.0'};
        ${tileRowsSnippet(this.spec.source, rows, threads)}
        let e = workgroupUniformLoad(&tileExpert);
        ${declareAccumulators()}
        if (e >= 0) {
          let wBase = e * uniforms.sE;
          for (var k0 = 0; k0 < uniforms.inner; k0 += ${depth}) {
            for (var i = lid; i < ${rows * depth}; i += ${threads}) {
              let mm = i / ${depth};
              let k = k0 + i % ${depth};
              var v = 0.0;
              if (k < uniforms.inner) { v = loadA(mm, k) * s; }
              As[i] = f16(v);
            }
            for (var i = lid; i < ${depth * cols}; i += ${threads}) {
              ${bIndex}
              let k = k0 + kk;
              let n = col0 + nn;
              var v = 0.0;
              if (n < uniforms.outCols && k < uniforms.inner) { ${loadW.assign} }
              Bs[kk * ${cols} + nn] = f16(v);
            }
            workgroupBarrier();
          ${multiplySlab(false)}
            workgroupBarrier();
          }
        }
        let unscale = uniforms.alpha / s;
        ${epilogue(subgroupSize, (m, n, v) => `let r = row0 + ${m};
          let c = col0 + ${n};
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[${m}] >= 0) {
              v = unscale * ${v};
              ${this.spec.hasBias ? 'v += bias[e * uniforms.outCols + c];' : ''}
              ${this.spec.hasAddend ? 'v += addend[r * uniforms.outCols + c];' : ''}
            }
            result[r * uniforms.outCols + c] = v;
          }`)}
      }
    `;
  }
}

/**
 * GroupedWeightGradProgram's product on subgroup matrices: per expert, dW(p, q) = alpha·Σ_r
 * L(r, p)·R(r, q) over its real rows, 64 rows of the reduction per two staged slabs; `scaled`
 * scales L (the gradient operand) by `amax` as above.
 */
export class SubgroupMatrixWeightGradProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0], y: [1], z: [2] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number];
  uniforms = 'P : i32, Q : i32, topK : i32, numExperts : i32, oE : i32, oP : i32, oQ : i32, alpha : f32, ' +
      ACTIVATION_UNIFORMS;
  private readonly spec: Omit<GroupedWeightGradSpec, 'tile'> & { scaled: boolean };

  constructor(outputShape: number[], numExperts: number, P: number, Q: number,
      spec: Omit<GroupedWeightGradSpec, 'tile'> & { scaled: boolean }, subgroupSize: number) {
    this.spec = spec;
    this.outputShape = outputShape;
    this.workgroupSize = [SUBGROUPS * subgroupSize, 1, 1];
    this.dispatch = subgroupMatrixDispatch(P, Q, numExperts);
    this.variableNames = ['L', 'R', 'seg', ...(usesPairOfRow(spec) ? ['pr'] : []), ...(spec.scaleLeft ? ['rw'] : []),
      ...(spec.scaled ? ['amax'] : [])];
    this.shaderKey = `moeSubgroupWeightGrad_${spec.left}_${spec.right}_${activationKey(spec.right === 'act' ? spec.activation : undefined)}_` +
        `${spec.scaleLeft ? 's' : ''}${spec.scaled ? 'x' : ''}_${subgroupSize}_${outputShape.length}`;
  }

  getUserCode(): string {
    const { rows, cols, depth } = SUBGROUP_MATRIX_BLOCK;
    const threads = this.workgroupSize[0];
    const subgroupSize = threads / SUBGROUPS;
    const { loadL, loadR } = weightGradLoadSnippets({ ...this.spec, tile: { tm: 1, tn: 1, bk: 1 } });
    return `
      ${ENABLES}
      ${workgroupArrays()}
      var<workgroup> segStart : i32;
      var<workgroup> segCount : i32;
      ${loadL}
      ${loadR}
      ${this.spec.scaled ? OPERAND_SCALE : ''}

      fn main() {
        let lid = i32(localIndex);
        let e = i32(workgroupId.z);
        let q0 = i32(workgroupId.x) * ${cols};
        let p0 = i32(workgroupId.y) * ${rows};
        ${subgroupPart(subgroupSize)}
        let s = ${this.spec.scaled ? 'operandScale()' : '1.0'};
        if (lid == 0) {
          segStart = seg[e];
          segCount = seg[uniforms.numExperts + 1 + e];
        }
        let start = workgroupUniformLoad(&segStart);
        let count = workgroupUniformLoad(&segCount);
        ${declareAccumulators()}
        for (var r0 = 0; r0 < count; r0 += ${depth}) {
          // As holds Lᵀ column-major: As[rr·rows + pp] = L(r0 + rr, p0 + pp)
          for (var i = lid; i < ${rows * depth}; i += ${threads}) {
            let pp = i % ${rows};
            let rr = i / ${rows};
            let p = p0 + pp;
            var v = 0.0;
            if (p < uniforms.P && r0 + rr < count) { v = loadL(start + r0 + rr, p) * s; }
            As[i] = f16(v);
          }
          for (var i = lid; i < ${depth * cols}; i += ${threads}) {
            let qq = i % ${cols};
            let rr = i / ${cols};
            let q = q0 + qq;
            var v = 0.0;
            if (q < uniforms.Q && r0 + rr < count) { v = loadR(start + r0 + rr, q); }
            Bs[i] = f16(v);
          }
          workgroupBarrier();
          ${multiplySlab(true)}
          workgroupBarrier();
        }
        let unscale = uniforms.alpha / s;
        ${epilogue(subgroupSize, (m, n, v) => `let p = p0 + ${m};
          let q = q0 + ${n};
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * ${v};
          }`)}
      }
    `;
  }
}
