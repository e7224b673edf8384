/**
 * TiledAttentionProgram: MoEAttention and MoEAttentionGrad (src/ops/attention_core.ts) as tiled,
 * FlashAttention-2-style programs, the successor of AttentionProgram (one thread per query row,
 * attention_program.ts; still selectable with the MOE_ATTENTION_PROGRAM flag, for timing). Same
 * op boundary: O, the rows' statistics (m, l) [Nq, S, 2], and dQ, dK, dV from q, k, v, the mask,
 * O, the statistics and dO; no [Nq, S, L] buffer (issue 15).
 *
 * Why tiled: a thread per row held its whole q (128 floats), its accumulator (128) and a tile of
 * scores in private arrays, past the registers a thread gets, and each workgroup had 64 threads.
 * Here a row is split over LANES threads (lane p holds the row's vectors p, p + LANES, ...: 32
 * floats of q and 32 of the accumulator at head 128), a workgroup of 128 threads owns 128 / LANES
 * rows, and the score q·k_j is summed from the lanes' partial dots through workgroup memory.
 *
 * Passes (the workgroup owns a block of a KV head g's rep·S query rows, heads batch-major, so a
 * block's rows share g's K/V tiles whichever of g's query heads they belong to: grouped-query
 * attention reads each tile once per block, not once per head):
 *   forward, stats: K (and V) tiles of g through workgroup memory, online softmax per row
 *     (running max m and sum l, the accumulator rescaled once per tile); O = acc / l, or (m, l)
 *   delta:  Δ = rowsum(dO ⊙ O) [Nq, S], once, read by gradQ and gradK
 *   gradQ:  per query block, K and V tiles: p = exp(s − m) / l, dQ = scale · Σ_j p·(dO·v_j − Δ)·k_j
 *   gradK, gradV: per block of g's keys, tiles of its query rows (q·scale, dO, m, l, Δ):
 *     dK_j = Σ_rows p·(dO·v_j − Δ)·(q·scale), dV_j = Σ_rows p·dO (summed over the group's heads)
 * Skipped tiles: a tile whose mask entries are all blocked (≤ BLOCKED_MASK, −1e9 is what
 * attentionMask writes) for every row it meets is skipped: a causal mask's tiles past the diagonal,
 * a packed sample's other segments. That is exact where each such row has an unblocked key
 * somewhere: its max m is then a real score and exp(−1e9 − m) is 0 in float32. A fully blocked row
 * (m ≤ BLOCKED_ROW_MAX) must see every key (the composed softmax spreads it evenly over the keys
 * at the row's largest mask value): backward knows m and keeps every tile such a row meets; the
 * forward passes find out at the end of the row block and run it again without skipping.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import type { AttentionDims } from './attention_program.js';
import { fail } from '../../../ops/validate.js';
import { describeValue } from '../../../util/describe.js';
import { floatUniforms, intUniforms, type ProgramUniformEntry } from './shared.js';

export type TiledAttentionPass = 'forward' | 'stats' | 'delta' | 'gradQ' | 'gradK' | 'gradV';

/**
 * tf.env() flag: which programs run MoEAttention / MoEAttentionGrad on webgpu: 'tiled'
 * (TiledAttentionProgram) or 'rows' (AttentionProgram, a thread per row), to time one against
 * the other (tools/webgpu_attention/time_attention.ts).
 */
export const ATTENTION_PROGRAM_FLAG = 'MOE_ATTENTION_PROGRAM';
export type AttentionProgramKind = 'tiled' | 'rows';
tf.env().registerFlag(ATTENTION_PROGRAM_FLAG, () => 'tiled');

/** The flag's value, checked: an unknown name is an error, not a silent fallback. */
export function attentionProgramKind(): AttentionProgramKind {
  const kind = tf.env().get(ATTENTION_PROGRAM_FLAG);
  if (kind !== 'tiled' && kind !== 'rows') {
    fail('scaledDotProductAttention', `tf.env() flag ${ATTENTION_PROGRAM_FLAG} must be 'tiled' or 'rows' but got ${describeValue(kind)}`);
  }
  return kind;
}

/** Threads per workgroup. */
export const TILED_ATTENTION_THREADS = 128;

/** A mask entry at or below this is blocked (attentionMask writes −1e9). */
export const BLOCKED_MASK = -1e8;
/** A row whose max score is at or below this has no unblocked key. */
export const BLOCKED_ROW_MAX = -5e7;
/** The largest number of keys (query passes) or query rows (key passes) per shared tile. */
const MAX_TILE = 32;

/** How a problem is split: lanes per row, rows (or keys) per workgroup, tile, floats per vector. */
export interface TiledAttentionLayout {
  /** threads per query row (per key in gradK, gradV); each holds every lanes-th vector of it */
  lanes: number;
  /** query rows (keys in gradK, gradV) per workgroup: TILED_ATTENTION_THREADS / lanes */
  blockRows: number;
  /** keys (query rows in gradK, gradV) per shared tile */
  tile: number;
  /** 4 where both head widths' slices are multiples of 4 (vec4 loads), else 1 */
  vector: 1 | 4;
}

function gcd(a: number, b: number): number {
  return b === 0 ? a : gcd(b, a % b);
}

/**
 * The layout of `pass` for `dims` within `workgroupBytes` of workgroup memory (the device's
 * maxComputeWorkgroupStorageSize: 16 KiB at least, 32 KiB and more on desktop GPUs). Lanes: the
 * fewest (a power of two up to 8 dividing both head widths) that leave each thread at most 32
 * floats of the wider head; the tile: the largest power of two up to 32 whose K/V (or Q/dO) rows,
 * mask entries and partial dots fit.
 */
export function tiledAttentionLayout(pass: TiledAttentionPass, dims: AttentionDims, workgroupBytes: number): TiledAttentionLayout {
  const common = gcd(dims.dk, dims.dv);
  let lanes = 1;
  while (lanes < 8 && common % (lanes * 2) === 0 && Math.max(dims.dk, dims.dv) / lanes > 32) lanes *= 2;
  const blockRows = TILED_ATTENTION_THREADS / lanes;
  const vector = (dims.dk / lanes) % 4 === 0 && (dims.dv / lanes) % 4 === 0 ? 4 : 1;
  const W = TILED_ATTENTION_THREADS;
  // workgroup floats per tile entry: shared rows, partial dots (a float per thread), mask, row values
  const perEntry = {
    forward: dims.dk + dims.dv + W + blockRows,
    stats: dims.dk + W + blockRows,
    gradQ: dims.dk + dims.dv + 2 * W + blockRows,
    gradK: dims.dk + dims.dv + 2 * W + blockRows + 3,
    gradV: dims.dk + dims.dv + W + blockRows + 2,
    delta: 0,
  }[pass];
  const floats = Math.floor((workgroupBytes - 64) / 4);    // 64 bytes for the flags
  let tile = 1;
  while (tile * 2 <= MAX_TILE && tile * 2 * perEntry <= floats) tile *= 2;
  return { lanes, blockRows, tile, vector };
}

/**
 * WGSL: maskRowStart(row), where the mask row of query row `row` (of the [Nq·S] rows) starts:
 * row i of its position in a shared [S, L] mask, or of its sample's (`perSample`: [B, 1, S, L],
 * uniforms.headsPerSample query heads a sample) (uniforms seqLen, keyLen, headsPerSample).
 */
export function maskRowStartSnippet(perSample: boolean): string {
  return `
      fn maskRowStart(row : i32) -> i32 {
        let n = row / uniforms.seqLen;
        let i = row - n * uniforms.seqLen;
        return ((${perSample ? 'n / uniforms.headsPerSample' : '0'}) * uniforms.seqLen + i) * uniforms.keyLen;
      }`;
}

export class TiledAttentionProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [TILED_ATTENTION_THREADS, 1, 1];
  uniforms = 'groupRows : i32, seqLen : i32, keyLen : i32, headsPerSample : i32, totalRows : i32, scale : f32, ';
  readonly layout: TiledAttentionLayout;
  private readonly pass: TiledAttentionPass;
  private readonly dims: AttentionDims;

  /** `workgroupBytes`: the device's maxComputeWorkgroupStorageSize (sizes the shared tiles). */
  constructor(pass: TiledAttentionPass, dims: AttentionDims, workgroupBytes: number) {
    this.pass = pass;
    this.dims = dims;
    this.layout = tiledAttentionLayout(pass, dims, workgroupBytes);
    const nq = dims.nkv * dims.rep;
    const inputs = {
      forward: ['queries', 'keys', 'values', 'mask'],
      stats: ['queries', 'keys', 'mask'],
      delta: ['outputs', 'gradOut'],
      gradQ: ['queries', 'keys', 'values', 'mask', 'stats', 'deltas', 'gradOut'],
      gradK: ['queries', 'keys', 'values', 'mask', 'stats', 'deltas', 'gradOut'],
      gradV: ['queries', 'keys', 'mask', 'stats', 'gradOut'],
    };
    this.variableNames = inputs[pass];
    this.outputShape = {
      forward: [nq, dims.seqLen, dims.dv], stats: [nq, dims.seqLen, 2], delta: [nq, dims.seqLen],
      gradQ: [nq, dims.seqLen, dims.dk], gradK: [dims.nkv, dims.keyLen, dims.dk], gradV: [dims.nkv, dims.keyLen, dims.dv],
    }[pass];
    this.dispatchLayout = { x: this.outputShape.map((_, i) => i) };
    const W = TILED_ATTENTION_THREADS;
    if (pass === 'delta') {
      this.dispatch = [Math.max(1, Math.ceil(nq * dims.seqLen / W)), 1, 1];
    } else {
      // a workgroup per block of a group's query rows (forward, stats, gradQ) or keys (gradK, gradV)
      const rows = pass === 'gradK' || pass === 'gradV' ? dims.keyLen : dims.rep * dims.seqLen;
      this.dispatch = [Math.max(1, Math.ceil(rows / this.layout.blockRows)), dims.nkv, 1];
    }
    const { lanes, tile, vector } = this.layout;
    this.shaderKey = `moeTiledAttention_${pass}_${dims.dk}_${dims.dv}_${lanes}_${tile}_${vector}_${dims.maskBatch > 0 ? 'sample' : 'shared'}`;
  }

  static uniformsFor(dims: AttentionDims, scale: number): ProgramUniformEntry[] {
    const nq = dims.nkv * dims.rep;
    const headsPerSample = dims.maskBatch > 0 ? nq / dims.maskBatch : 1;
    return [...intUniforms(dims.rep * dims.seqLen, dims.seqLen, dims.keyLen, headsPerSample, nq * dims.seqLen), ...floatUniforms(scale)];
  }

  getUserCode(): string {
    if (this.pass === 'delta') return this.deltaCode();
    return this.pass === 'gradK' || this.pass === 'gradV' ? this.keyBlockCode() : this.queryBlockCode();
  }

  /**
   * WGSL: the vector type V, dotV, storeV(i, v) into result, and a load ld_name(i) of the V at
   * float index i of each input in `names` (tfjs's inputs are flat f32 arrays).
   */
  private vectorFns(names: string[]): string {
    const four = this.layout.vector === 4;
    const loads = names.map(name => four
      ? `fn ld_${name}(i : i32) -> V { return vec4<f32>(${name}[i], ${name}[i + 1], ${name}[i + 2], ${name}[i + 3]); }`
      : `fn ld_${name}(i : i32) -> V { return ${name}[i]; }`);
    return `
      alias V = ${four ? 'vec4<f32>' : 'f32'};
      fn dotV(a : V, b : V) -> f32 { return ${four ? 'dot(a, b)' : 'a * b'}; }
      fn storeV(i : i32, value : V) {
        ${four ? 'result[i] = value.x; result[i + 1] = value.y; result[i + 2] = value.z; result[i + 3] = value.w;' : 'result[i] = value;'}
      }
      ${loads.join('\n      ')}
      ${maskRowStartSnippet(this.dims.maskBatch > 0)}`;
  }

  /** Sizes in vectors: of a whole K row and V row (DKV, DVV), of a lane's slice of them (KS, VS). */
  private vectorSizes() {
    const { lanes: P, vector: N } = this.layout;
    return { N, P, DKV: this.dims.dk / N, DVV: this.dims.dv / N, KS: this.dims.dk / N / P, VS: this.dims.dv / N / P };
  }

  /** delta: Δ = rowsum(dO ⊙ O), a thread per query row. */
  private deltaCode(): string {
    const DV = this.dims.dv;
    return `
      fn main(index : i32) {
        if (index >= uniforms.totalRows) { return; }
        var sum = 0.0;
        for (var e = 0; e < ${DV}; e++) { sum += gradOut[index * ${DV} + e] * outputs[index * ${DV} + e]; }
        result[index] = sum;
      }`;
  }

  /** forward, stats and gradQ: a workgroup per block of query rows, K (and V) tiles shared. */
  private queryBlockCode(): string {
    const { N, P, DKV, DVV, KS, VS } = this.vectorSizes();
    const { blockRows: BR, tile: T } = this.layout;
    const W = TILED_ATTENTION_THREADS;
    const pass = this.pass;
    const gradQ = pass === 'gradQ';
    const withV = pass !== 'stats';
    // forward and stats learn whether a row is fully blocked only at its end: then the block runs
    // again without skipping. gradQ knows m beforehand.
    const attempts = gradQ ? 1 : 2;
    const partial = (name: string) => `var<workgroup> ${name} : array<f32, ${BR * T * P}>;`;
    return `
      var<workgroup> tileK : array<V, ${T * DKV}>;
      ${withV ? `var<workgroup> tileV : array<V, ${T * DVV}>;` : ''}
      var<workgroup> tileMask : array<f32, ${BR * T}>;
      ${partial('partS')}
      ${gradQ ? partial('partD') : ''}
      var<workgroup> tileOpen : i32;
      var<workgroup> fullyBlocked : i32;
      ${this.vectorFns(this.variableNames.filter(n => n !== 'mask' && n !== 'stats' && n !== 'deltas'))}
      fn main(index : i32) {
        let g = i32(workgroupId.y);
        let t = i32(localIndex);
        let p = t % ${P};                        // lane: vectors p, p + ${P}, ... of the row
        let rl = t / ${P};                       // the row within the block
        let groupRows = uniforms.groupRows;
        let keyLen = uniforms.keyLen;
        let blockStart = i32(workgroupId.x) * ${BR};
        let blockCount = min(${BR}, groupRows - blockStart);
        let firstRow = g * groupRows + blockStart;
        // rows past the group's end compute on its row 0 and write nothing: every thread reaches
        // every barrier
        let inRange = rl < blockCount;
        let row = select(g * groupRows, firstRow + rl, inRange);
        var qs : array<V, ${KS}>;
        for (var e = 0; e < ${KS}; e++) { qs[e] = ld_queries((row * ${DKV} + e * ${P} + p) * ${N}) * uniforms.scale; }
        var acc : array<V, ${gradQ ? KS : VS}>;
        ${gradQ ? `
        var dOs : array<V, ${VS}>;
        for (var e = 0; e < ${VS}; e++) { dOs[e] = ld_gradOut((row * ${DVV} + e * ${P} + p) * ${N}); }
        let delta = deltas[row];
        let m = stats[row * 2];
        let l = stats[row * 2 + 1];
        if (inRange && m <= ${BLOCKED_ROW_MAX}) { fullyBlocked = 1; }
        let mayPass = workgroupUniformLoad(&fullyBlocked) == 0;` : `
        var m = -3.0e38;
        var l = 0.0;`}
        var tileNumber = 0;
        for (var attempt = 0; attempt < ${attempts}; attempt++) {
          ${gradQ ? '' : `
          let mayPass = attempt == 0;
          m = -3.0e38;           // below any score: the first tile's correction exp(m − mNew) is 0
          l = 0.0;
          for (var e = 0; e < ${VS}; e++) { acc[e] = V(0.0); }`}
          for (var j0 = 0; j0 < keyLen; j0 += ${T}) {
            tileNumber++;
            let count = min(${T}, keyLen - j0);
            workgroupBarrier();    // the previous tile is consumed
            for (var i = t; i < ${T * DKV}; i += ${W}) {
              if (i / ${DKV} < count) { tileK[i] = ld_keys(((g * keyLen + j0) * ${DKV} + i) * ${N}); } else { tileK[i] = V(0.0); }
            }
            ${withV ? `
            for (var i = t; i < ${T * DVV}; i += ${W}) {
              if (i / ${DVV} < count) { tileV[i] = ld_values(((g * keyLen + j0) * ${DVV} + i) * ${N}); } else { tileV[i] = V(0.0); }
            }` : ''}
            // the block's mask entries; keys past the end get −3e38, whose exp is 0
            for (var i = t; i < ${BR * T}; i += ${W}) {
              let rr = i / ${T};
              let jj = i - rr * ${T};
              var value = -3.0e38;
              if (rr < blockCount && jj < count) {
                value = mask[maskRowStart(firstRow + rr) + j0 + jj];
                if (value > ${BLOCKED_MASK}) { tileOpen = tileNumber; }
              }
              tileMask[i] = value;
            }
            // (also the barrier after the loads)
            let open = workgroupUniformLoad(&tileOpen) == tileNumber;
            if (mayPass && !open) { continue; }   // every entry blocked
            for (var jj = 0; jj < ${T}; jj++) {
              var dot = 0.0;
              for (var e = 0; e < ${KS}; e++) { dot += dotV(qs[e], tileK[jj * ${DKV} + e * ${P} + p]); }
              partS[(rl * ${T} + jj) * ${P} + p] = dot;
              ${gradQ ? `
              var dp = 0.0;
              for (var e = 0; e < ${VS}; e++) { dp += dotV(dOs[e], tileV[jj * ${DVV} + e * ${P} + p]); }
              partD[(rl * ${T} + jj) * ${P} + p] = dp;` : ''}
            }
            workgroupBarrier();
            var s : array<f32, ${T}>;
            var tileMax = -3.0e38;
            for (var jj = 0; jj < ${T}; jj++) {
              var dot = 0.0;
              for (var lane = 0; lane < ${P}; lane++) { dot += partS[(rl * ${T} + jj) * ${P} + lane]; }
              s[jj] = dot + tileMask[rl * ${T} + jj];
              tileMax = max(tileMax, s[jj]);
            }
            ${gradQ ? `
            for (var jj = 0; jj < ${T}; jj++) {
              var dp = 0.0;
              for (var lane = 0; lane < ${P}; lane++) { dp += partD[(rl * ${T} + jj) * ${P} + lane]; }
              let ds = exp(s[jj] - m) / l * (dp - delta);
              for (var e = 0; e < ${KS}; e++) { acc[e] += ds * tileK[jj * ${DKV} + e * ${P} + p]; }
            }` : `
            let mNew = max(m, tileMax);
            let correction = exp(m - mNew);
            l = l * correction;
            ${withV ? `for (var e = 0; e < ${VS}; e++) { acc[e] = acc[e] * correction; }` : ''}
            for (var jj = 0; jj < ${T}; jj++) {
              let pj = exp(s[jj] - mNew);
              l += pj;
              ${withV ? `for (var e = 0; e < ${VS}; e++) { acc[e] += pj * tileV[jj * ${DVV} + e * ${P} + p]; }` : ''}
            }
            m = mNew;`}
          }
          ${gradQ ? '' : `
          if (attempt == 0) {
            if (inRange && m <= ${BLOCKED_ROW_MAX}) { fullyBlocked = 1; }
            if (workgroupUniformLoad(&fullyBlocked) == 0) { break; }
          }`}
        }
        if (!inRange) { return; }
        ${{
          forward: `for (var e = 0; e < ${VS}; e++) { storeV((row * ${DVV} + e * ${P} + p) * ${N}, acc[e] / l); }`,
          stats: 'if (p == 0) {\n          result[row * 2] = m;\n          result[row * 2 + 1] = l;\n        }',
          gradQ: `for (var e = 0; e < ${KS}; e++) { storeV((row * ${DKV} + e * ${P} + p) * ${N}, acc[e] * uniforms.scale); }`,
        }[pass as 'forward' | 'stats' | 'gradQ']}
      }
    `;
  }

  /** gradK and gradV: a workgroup per block of a group's keys, tiles of its query rows shared. */
  private keyBlockCode(): string {
    const { N, P, DKV, DVV, KS, VS } = this.vectorSizes();
    const { blockRows: BK, tile: T } = this.layout;
    const W = TILED_ATTENTION_THREADS;
    const gradK = this.pass === 'gradK';
    const partial = (name: string) => `var<workgroup> ${name} : array<f32, ${BK * T * P}>;`;
    return `
      var<workgroup> tileQ : array<V, ${T * DKV}>;
      var<workgroup> tileDO : array<V, ${T * DVV}>;
      var<workgroup> tileMask : array<f32, ${T * BK}>;
      var<workgroup> tileM : array<f32, ${T}>;
      var<workgroup> tileL : array<f32, ${T}>;
      ${gradK ? `var<workgroup> tileDelta : array<f32, ${T}>;` : ''}
      ${partial('partS')}
      ${gradK ? partial('partD') : ''}
      var<workgroup> tileOpen : i32;
      ${this.vectorFns(this.variableNames.filter(n => n !== 'mask' && n !== 'stats' && n !== 'deltas'))}
      fn main(index : i32) {
        let g = i32(workgroupId.y);
        let t = i32(localIndex);
        let p = t % ${P};
        let jl = t / ${P};                       // the key within the block
        let keyLen = uniforms.keyLen;
        let groupRows = uniforms.groupRows;
        let firstKey = i32(workgroupId.x) * ${BK};
        let keyCount = min(${BK}, keyLen - firstKey);
        // keys past the end compute on key 0 and write nothing: every thread reaches every barrier
        let inRange = jl < keyCount;
        let key = g * keyLen + select(0, firstKey + jl, inRange);
        var ks : array<V, ${KS}>;
        for (var e = 0; e < ${KS}; e++) { ks[e] = ld_keys((key * ${DKV} + e * ${P} + p) * ${N}); }
        ${gradK ? `
        var vs : array<V, ${VS}>;
        for (var e = 0; e < ${VS}; e++) { vs[e] = ld_values((key * ${DVV} + e * ${P} + p) * ${N}); }` : ''}
        var acc : array<V, ${gradK ? KS : VS}>;
        var tileNumber = 0;
        for (var r0 = 0; r0 < groupRows; r0 += ${T}) {
          tileNumber++;
          let count = min(${T}, groupRows - r0);
          let first = g * groupRows + r0;
          workgroupBarrier();    // the previous tile is consumed
          for (var i = t; i < ${T * DKV}; i += ${W}) {
            if (i / ${DKV} < count) { tileQ[i] = ld_queries((first * ${DKV} + i) * ${N}) * uniforms.scale; } else { tileQ[i] = V(0.0); }
          }
          for (var i = t; i < ${T * DVV}; i += ${W}) {
            if (i / ${DVV} < count) { tileDO[i] = ld_gradOut((first * ${DVV} + i) * ${N}); } else { tileDO[i] = V(0.0); }
          }
          // rows past the end: m 0, l 1 and mask −3e38, so p = 0
          for (var i = t; i < ${T}; i += ${W}) {
            var m = 0.0;
            var l = 1.0;
            ${gradK ? 'var delta = 0.0;' : ''}
            if (i < count) {
              m = stats[(first + i) * 2];
              l = stats[(first + i) * 2 + 1];
              ${gradK ? 'delta = deltas[first + i];' : ''}
              if (m <= ${BLOCKED_ROW_MAX}) { tileOpen = tileNumber; }   // a fully blocked row sees every key
            }
            tileM[i] = m;
            tileL[i] = l;
            ${gradK ? 'tileDelta[i] = delta;' : ''}
          }
          for (var i = t; i < ${T * BK}; i += ${W}) {
            let rr = i / ${BK};
            let jj = i - rr * ${BK};
            var value = -3.0e38;
            if (rr < count && jj < keyCount) {
              value = mask[maskRowStart(first + rr) + firstKey + jj];
              if (value > ${BLOCKED_MASK}) { tileOpen = tileNumber; }
            }
            tileMask[i] = value;
          }
          // (also the barrier after the loads)
          if (workgroupUniformLoad(&tileOpen) != tileNumber) { continue; }   // every entry blocked
          for (var rr = 0; rr < ${T}; rr++) {
            var dot = 0.0;
            for (var e = 0; e < ${KS}; e++) { dot += dotV(ks[e], tileQ[rr * ${DKV} + e * ${P} + p]); }
            partS[(jl * ${T} + rr) * ${P} + p] = dot;
            ${gradK ? `
            var dp = 0.0;
            for (var e = 0; e < ${VS}; e++) { dp += dotV(vs[e], tileDO[rr * ${DVV} + e * ${P} + p]); }
            partD[(jl * ${T} + rr) * ${P} + p] = dp;` : ''}
          }
          workgroupBarrier();
          for (var rr = 0; rr < ${T}; rr++) {
            var dot = 0.0;
            for (var lane = 0; lane < ${P}; lane++) { dot += partS[(jl * ${T} + rr) * ${P} + lane]; }
            let pr = exp((dot + tileMask[rr * ${BK} + jl]) - tileM[rr]) / tileL[rr];
            ${gradK ? `
            var dp = 0.0;
            for (var lane = 0; lane < ${P}; lane++) { dp += partD[(jl * ${T} + rr) * ${P} + lane]; }
            let ds = pr * (dp - tileDelta[rr]);
            for (var e = 0; e < ${KS}; e++) { acc[e] += ds * tileQ[rr * ${DKV} + e * ${P} + p]; }` : `
            for (var e = 0; e < ${VS}; e++) { acc[e] += pr * tileDO[rr * ${DVV} + e * ${P} + p]; }`}
          }
        }
        if (!inRange) { return; }
        ${gradK
          ? `for (var e = 0; e < ${KS}; e++) { storeV((key * ${DKV} + e * ${P} + p) * ${N}, acc[e]); }`
          : `for (var e = 0; e < ${VS}; e++) { storeV((key * ${DVV} + e * ${P} + p) * ${N}, acc[e]); }`}
      }
    `;
  }
}
