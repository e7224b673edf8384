/**
 * AttentionProgram: MoEAttention and MoEAttentionGrad (src/ops/attention_core.ts), softmax(q·kᵀ·scale
 * + mask)·v and its gradients flash-style: the scores and probabilities are recomputed per key (or
 * query) tile in registers and workgroup memory, never written as an [Nq, S, L] buffer. Composed,
 * the forward pass is 5 programs and keeps the probabilities for backward (32 heads × 2048² × 4 B =
 * 512 MB a layer at S = 2048); here it is 2 (O; the row statistics) and backward 3 (dQ; dK; dV), and
 * what backward keeps is q, k, v, O and 2 floats a query row (issue 15).
 *
 * Rows: a KV head g's rep·S query rows are rows g·rep·S … of q [Nq·S, Dk] (heads batch-major), so a
 * workgroup takes WORKGROUP consecutive rows of one group (dispatch x: row block, y: group) and
 * shares each tile of g's keys among them; dK and dV take WORKGROUP keys of one group and share
 * each tile of its query rows. One thread holds one row: its q (or k, v) and its accumulator in
 * private arrays of the head widths, which are the shader's constants (head widths up to
 * ATTENTION_KERNEL_MAX_HEAD_WIDTH, 256), as vec4s where both widths are multiples of 4 (every
 * family's): a quarter of the workgroup-memory loads and loop trips.
 *   forward:  s_j = (q·scale)·k_j + mask_j;  running max m and sum l over key tiles (each tile
 *             rescales the accumulator once by exp(m_old − m_new));  O = Σ_j exp(s_j − m)·v_j / l
 *   stats:    the same running m and l, written as [Nq, S, 2] = (m, l)
 *   gradQ:    p_j = exp(s_j − m) / l;  Δ = dO·O;  dQ = scale · Σ_j p_j·(dO·v_j − Δ)·k_j
 *   gradK:    dK_j = Σ_rows p·(dO·v_j − Δ)·(q·scale)      gradV: dV_j = Σ_rows p·dO
 * (Δ = Σ_j p_j·(dO·v_j), softmax's Σ dP ⊙ P, is dO·O.) The statistics are m and l, not their
 * logsumexp m + log l: a fully blocked row has every score at −1e9, and −1e9 + log L rounds back
 * to −1e9 in float32, which would give each of its keys probability 1 instead of the composed
 * path's 1/L. Kept apart, exp(s − m)/l is exactly the composed softmax's expression.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { floatUniforms, intUniforms, type ProgramUniformEntry } from './shared.js';

export type AttentionPass = 'forward' | 'stats' | 'gradQ' | 'gradK' | 'gradV';

/** Threads (rows) per workgroup. */
export const ATTENTION_WORKGROUP = 64;

/** The problem's sizes; Nq = nkv·rep. */
export interface AttentionDims {
  nkv: number;
  rep: number;
  seqLen: number;
  keyLen: number;
  dk: number;
  dv: number;
  /** B of a [B, 1, S, L] mask, 0 for a shared [S, L] mask */
  maskBatch: number;
}

/** Floats of workgroup memory per tile row, and the input names, of each pass. */
function layoutOf(pass: AttentionPass, d: AttentionDims): { perTileRow: number; inputs: string[] } {
  switch (pass) {
    case 'forward': return { perTileRow: d.dk + d.dv, inputs: ['queries', 'keys', 'values', 'mask'] };
    case 'stats': return { perTileRow: d.dk, inputs: ['queries', 'keys', 'mask'] };
    case 'gradQ': return { perTileRow: d.dk + d.dv, inputs: ['queries', 'keys', 'values', 'mask', 'outputs', 'stats', 'gradOut'] };
    // a query tile: q·scale, dO, and per row m, l, Δ and where its mask row starts
    case 'gradK': return { perTileRow: d.dk + d.dv + 4, inputs: ['queries', 'keys', 'values', 'mask', 'outputs', 'stats', 'gradOut'] };
    case 'gradV': return { perTileRow: d.dk + d.dv + 3, inputs: ['queries', 'keys', 'mask', 'stats', 'gradOut'] };
  }
}

/**
 * Rows per shared tile: as many as `workgroupBytes` (the device's maxComputeWorkgroupStorageSize,
 * 16 KiB at least) holds, a power of two, at most a workgroup's.
 */
export function attentionTileRows(pass: AttentionPass, dims: AttentionDims, workgroupBytes: number): number {
  const fit = Math.floor(workgroupBytes / 4 / layoutOf(pass, dims).perTileRow);
  let rows = 1;
  while (rows * 2 <= Math.min(fit, ATTENTION_WORKGROUP)) rows *= 2;
  return rows;
}

export class AttentionProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [ATTENTION_WORKGROUP, 1, 1];
  uniforms = 'groupRows : i32, seqLen : i32, keyLen : i32, headsPerSample : i32, scale : f32, ';
  private readonly pass: AttentionPass;
  private readonly dims: AttentionDims;
  private readonly tile: number;

  /** `workgroupBytes`: the device's maxComputeWorkgroupStorageSize (sizes the shared tiles). */
  constructor(pass: AttentionPass, dims: AttentionDims, workgroupBytes: number) {
    this.pass = pass;
    this.dims = dims;
    this.tile = attentionTileRows(pass, dims, workgroupBytes);
    this.variableNames = layoutOf(pass, dims).inputs;
    const nq = dims.nkv * dims.rep;
    this.outputShape = {
      forward: [nq, dims.seqLen, dims.dv], stats: [nq, dims.seqLen, 2], gradQ: [nq, dims.seqLen, dims.dk],
      gradK: [dims.nkv, dims.keyLen, dims.dk], gradV: [dims.nkv, dims.keyLen, dims.dv],
    }[pass];
    this.dispatchLayout = { x: this.outputShape.map((_, i) => i) };
    // a thread per query row of the group (forward, stats, gradQ) or per key (gradK, gradV)
    const threadRows = pass === 'gradK' || pass === 'gradV' ? dims.keyLen : dims.rep * dims.seqLen;
    this.dispatch = [Math.max(1, Math.ceil(threadRows / ATTENTION_WORKGROUP)), dims.nkv, 1];
    this.shaderKey = `moeAttention_${pass}_${dims.dk}_${dims.dv}_${this.tile}_${this.lanes}_${dims.maskBatch > 0 ? 'sample' : 'shared'}`;
  }

  static uniformsFor(dims: AttentionDims, scale: number): ProgramUniformEntry[] {
    const headsPerSample = dims.maskBatch > 0 ? dims.nkv * dims.rep / dims.maskBatch : 1;
    return [...intUniforms(dims.rep * dims.seqLen, dims.seqLen, dims.keyLen, headsPerSample), ...floatUniforms(scale)];
  }

  getUserCode(): string {
    return this.pass === 'gradK' || this.pass === 'gradV' ? this.keyRowsCode() : this.queryRowsCode();
  }

  /** Floats per vector: 4 (vec4 rows, a quarter of the workgroup-memory loads) where both head widths allow. */
  private get lanes(): 1 | 4 {
    return this.dims.dk % 4 === 0 && this.dims.dv % 4 === 0 ? 4 : 1;
  }

  /**
   * WGSL: the row vector type V, dotV(a, b), and for each input `name` in `names` a load
   * ld_name(i) of the V at float index i (inputs are tfjs's flat f32 arrays).
   */
  private vectorFns(names: string[]): string {
    const four = this.lanes === 4;
    const loads = names.map(name => four
      ? `fn ld_${name}(i : i32) -> V { return vec4<f32>(${name}[i], ${name}[i + 1], ${name}[i + 2], ${name}[i + 3]); }`
      : `fn ld_${name}(i : i32) -> V { return ${name}[i]; }`);
    return `
      alias V = ${four ? 'vec4<f32>' : 'f32'};
      fn dotV(a : V, b : V) -> f32 { return ${four ? 'dot(a, b)' : 'a * b'}; }
      fn storeV(i : i32, value : V) {
        ${four ? 'result[i] = value.x; result[i + 1] = value.y; result[i + 2] = value.z; result[i + 3] = value.w;' : 'result[i] = value;'}
      }
      ${loads.join('\n      ')}`;
  }

  /** WGSL: the start of query row `row`'s mask row (row = n·S + i, n's sample for a per-sample mask). */
  private maskRowFn(): string {
    const sample = this.dims.maskBatch > 0 ? 'n / uniforms.headsPerSample' : '0';
    return `
      fn maskRowStart(row : i32) -> i32 {
        let n = row / uniforms.seqLen;
        let i = row - n * uniforms.seqLen;
        return ((${sample}) * uniforms.seqLen + i) * uniforms.keyLen;
      }`;
  }

  /** forward, stats and gradQ: a thread per query row, key tiles shared. */
  private queryRowsCode(): string {
    const N = this.lanes;
    const { dk: DK, dv: DV } = this.dims;
    const [KV, VV] = [DK / N, DV / N];   // vectors per key row, per value row
    const T = this.tile;
    const W = ATTENTION_WORKGROUP;
    const pass = this.pass;
    const withV = pass !== 'stats';
    const accVectors = pass === 'gradQ' ? KV : VV;
    return `
      var<workgroup> tileK : array<V, ${T * KV}>;
      ${withV ? `var<workgroup> tileV : array<V, ${T * VV}>;` : ''}
      ${this.vectorFns(this.variableNames.filter(n => n !== 'mask' && n !== 'stats'))}
      ${this.maskRowFn()}
      fn main(index : i32) {
        let g = i32(workgroupId.y);
        let lane = i32(localIndex);
        let r = i32(workgroupId.x) * ${W} + lane;
        // rows past the group's end compute on its row 0 and write nothing: every lane reaches
        // every barrier
        let inRange = r < uniforms.groupRows;
        let row = g * uniforms.groupRows + select(0, r, inRange);
        let maskStart = maskRowStart(row);
        let keyLen = uniforms.keyLen;
        var qs : array<V, ${KV}>;
        for (var e = 0; e < ${KV}; e++) { qs[e] = ld_queries((row * ${KV} + e) * ${N}) * uniforms.scale; }
        var acc : array<V, ${accVectors}>;
        ${pass === 'gradQ' ? `
        var dO : array<V, ${VV}>;
        var delta = 0.0;
        for (var e = 0; e < ${VV}; e++) {
          dO[e] = ld_gradOut((row * ${VV} + e) * ${N});
          delta += dotV(dO[e], ld_outputs((row * ${VV} + e) * ${N}));
        }
        let m = stats[row * 2];
        let l = stats[row * 2 + 1];` : `
        var m = -3.0e38;         // below any score: the first tile's correction exp(m − mNew) is 0
        var l = 0.0;
        var scores : array<f32, ${T}>;`}
        for (var j0 = 0; j0 < keyLen; j0 += ${T}) {
          let count = min(${T}, keyLen - j0);
          workgroupBarrier();    // the previous tile is consumed
          for (var t = lane; t < count * ${KV}; t += ${W}) { tileK[t] = ld_keys(((g * keyLen + j0) * ${KV} + t) * ${N}); }
          ${withV ? `for (var t = lane; t < count * ${VV}; t += ${W}) { tileV[t] = ld_values(((g * keyLen + j0) * ${VV} + t) * ${N}); }` : ''}
          workgroupBarrier();
          ${pass === 'gradQ' ? `
          for (var jj = 0; jj < count; jj++) {
            var dot = 0.0;
            for (var e = 0; e < ${KV}; e++) { dot += dotV(qs[e], tileK[jj * ${KV} + e]); }
            let p = exp((dot + mask[maskStart + j0 + jj]) - m) / l;
            var dp = 0.0;
            for (var e = 0; e < ${VV}; e++) { dp += dotV(dO[e], tileV[jj * ${VV} + e]); }
            let ds = p * (dp - delta);
            for (var e = 0; e < ${KV}; e++) { acc[e] += ds * tileK[jj * ${KV} + e]; }
          }` : `
          var tileMax = -3.0e38;
          for (var jj = 0; jj < count; jj++) {
            var dot = 0.0;
            for (var e = 0; e < ${KV}; e++) { dot += dotV(qs[e], tileK[jj * ${KV} + e]); }
            let s = dot + mask[maskStart + j0 + jj];
            scores[jj] = s;
            tileMax = max(tileMax, s);
          }
          let mNew = max(m, tileMax);
          let correction = exp(m - mNew);
          l = l * correction;
          ${withV ? `for (var e = 0; e < ${VV}; e++) { acc[e] = acc[e] * correction; }` : ''}
          for (var jj = 0; jj < count; jj++) {
            let p = exp(scores[jj] - mNew);
            l += p;
            ${withV ? `for (var e = 0; e < ${VV}; e++) { acc[e] += p * tileV[jj * ${VV} + e]; }` : ''}
          }
          m = mNew;`}
        }
        if (!inRange) { return; }
        ${{
          forward: `for (var e = 0; e < ${VV}; e++) { storeV((row * ${VV} + e) * ${N}, acc[e] / l); }`,
          stats: 'result[row * 2] = m;\n        result[row * 2 + 1] = l;',
          gradQ: `for (var e = 0; e < ${KV}; e++) { storeV((row * ${KV} + e) * ${N}, acc[e] * uniforms.scale); }`,
        }[pass as 'forward' | 'stats' | 'gradQ']}
      }
    `;
  }

  /** gradK and gradV: a thread per key of the group, query-row tiles shared. */
  private keyRowsCode(): string {
    const N = this.lanes;
    const { dk: DK, dv: DV } = this.dims;
    const [KV, VV] = [DK / N, DV / N];
    const T = this.tile;
    const W = ATTENTION_WORKGROUP;
    const gradK = this.pass === 'gradK';
    const accVectors = gradK ? KV : VV;
    return `
      var<workgroup> tileQ : array<V, ${T * KV}>;
      var<workgroup> tileDO : array<V, ${T * VV}>;
      var<workgroup> tileM : array<f32, ${T}>;
      var<workgroup> tileL : array<f32, ${T}>;
      var<workgroup> tileMask : array<i32, ${T}>;
      ${gradK ? `var<workgroup> tileDelta : array<f32, ${T}>;` : ''}
      ${this.vectorFns(this.variableNames.filter(n => n !== 'mask' && n !== 'stats'))}
      ${this.maskRowFn()}
      fn main(index : i32) {
        let g = i32(workgroupId.y);
        let lane = i32(localIndex);
        let keyLen = uniforms.keyLen;
        let j = i32(workgroupId.x) * ${W} + lane;
        // keys past the end compute on key 0 and write nothing: every lane reaches every barrier
        let inRange = j < keyLen;
        let jc = select(0, j, inRange);
        let key = g * keyLen + jc;
        var kj : array<V, ${KV}>;
        for (var e = 0; e < ${KV}; e++) { kj[e] = ld_keys((key * ${KV} + e) * ${N}); }
        ${gradK ? `
        var vj : array<V, ${VV}>;
        for (var e = 0; e < ${VV}; e++) { vj[e] = ld_values((key * ${VV} + e) * ${N}); }` : ''}
        var acc : array<V, ${accVectors}>;
        let groupRows = uniforms.groupRows;
        for (var r0 = 0; r0 < groupRows; r0 += ${T}) {
          let count = min(${T}, groupRows - r0);
          let first = g * groupRows + r0;
          workgroupBarrier();    // the previous tile is consumed
          for (var t = lane; t < count * ${KV}; t += ${W}) { tileQ[t] = ld_queries((first * ${KV} + t) * ${N}) * uniforms.scale; }
          for (var t = lane; t < count * ${VV}; t += ${W}) { tileDO[t] = ld_gradOut((first * ${VV} + t) * ${N}); }
          if (lane < count) {
            let row = first + lane;
            tileM[lane] = stats[row * 2];
            tileL[lane] = stats[row * 2 + 1];
            tileMask[lane] = maskRowStart(row);
            ${gradK ? `
            var delta = 0.0;
            for (var e = 0; e < ${VV}; e++) {
              delta += dotV(ld_gradOut((row * ${VV} + e) * ${N}), ld_outputs((row * ${VV} + e) * ${N}));
            }
            tileDelta[lane] = delta;` : ''}
          }
          workgroupBarrier();
          for (var rr = 0; rr < count; rr++) {
            var dot = 0.0;
            for (var e = 0; e < ${KV}; e++) { dot += dotV(tileQ[rr * ${KV} + e], kj[e]); }
            let p = exp((dot + mask[tileMask[rr] + jc]) - tileM[rr]) / tileL[rr];
            ${gradK ? `
            var dp = 0.0;
            for (var e = 0; e < ${VV}; e++) { dp += dotV(tileDO[rr * ${VV} + e], vj[e]); }
            let ds = p * (dp - tileDelta[rr]);
            for (var e = 0; e < ${KV}; e++) { acc[e] += ds * tileQ[rr * ${KV} + e]; }` : `
            for (var e = 0; e < ${VV}; e++) { acc[e] += p * tileDO[rr * ${VV} + e]; }`}
          }
        }
        if (!inRange) { return; }
        for (var e = 0; e < ${accVectors}; e++) { storeV((key * ${accVectors} + e) * ${N}, acc[e]); }
      }
    `;
  }
}
