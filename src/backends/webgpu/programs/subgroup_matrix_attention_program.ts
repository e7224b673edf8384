/**
 * SubgroupMatrixAttentionProgram: MoEAttention and MoEAttentionGrad (src/ops/attention_core.ts) on
 * tensor cores (issues 13 and 15): TiledAttentionProgram's problem, inputs, outputs and saved
 * statistics, with the products on WGSL's subgroup matrices (chromium_experimental_subgroup_matrix):
 * f16 operands staged in workgroup memory (q·scale, k, v and dO converted from f32 on load), f32
 * accumulation, the softmax and its statistics in f32.
 *
 * A subgroup matrix cannot be rescaled per row, so no accumulator is ever rescaled: every product
 * uses the exact probabilities p = exp(s − m) / l from the rows' final statistics.
 *   stats:   per block of 64 query rows, tiles of 32 keys: S = (q·scale)·kᵀ on the matrices, then
 *            per row the online max m and sum l (scalars, f32) of s + mask
 *   forward: the same S again, P = exp(S + mask − m) / l (f16), O += P·V
 *   gradQ:   S and dP = dO·Vᵀ per key tile, dS = P ⊙ (dP − Δ), dQ += dS·K (· scale at the end)
 *   gradV:   per block of 64 keys, tiles of 32 of the group's query rows: Sᵀ = k·(q·scale)ᵀ,
 *            dV += Pᵀ·dO
 * dK has no pass here: the kernel runs TiledAttentionProgram's gradK (f32). A gradK pass (dPᵀ =
 * v·dOᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ − Δ), dK += dSᵀ·(q·scale), commit 751221b) was removed unverified: the
 * spec's emulation (matrices as private f32 arrays on Mesa's llvmpipe) gave it wrong numbers,
 * but it also gives gradV wrong numbers once one extra, unused product is added to gradV's tile
 * loop, so that emulation cannot judge a pass with gradK's number of matrices; only a device
 * check could, and none was run.
 * The forward pass computes S twice (stats, then O), as FlashAttention would with a rescaled
 * accumulator once; Δ = rowsum(dO ⊙ O) is TiledAttentionProgram's 'delta' pass (f32, cheap).
 *
 * Layout: 4 subgroups per workgroup, each owning 16 of the block's 64 rows (or keys), holding its
 * rows of q·scale and dO (or of k) as left matrices in registers for the whole pass (staged
 * once through workgroup memory). Per tile, the workgroup stages the tile's k and v (or q·scale
 * and dO) as f16 rows padded by 8 halves (16-byte aligned rows, spread over the banks, as in
 * subgroup_matrix_program.ts); the scores go through an f32 array Ts (rows padded by 4 floats)
 * for the per-element softmax, whose result (P or dS, f16) is the left operand of the next
 * product. dO is scaled per tensor by a power of two (input `amax`, the exponent code of max |dO|)
 * that brings its largest magnitude to 2^8: a mean loss's dO lies far below f16's smallest normal, and dP, dS and
 * the accumulators carry the same factor, which the epilogue divides out in f32 (exact). 2^8 and
 * not 2^14 as in the expert products: dS = P ⊙ (dP − Δ) is stored in f16 too, and dP sums Dv
 * products of dO with v.
 *
 * Skipped tiles and fully blocked rows: as TiledAttentionProgram (a tile whose mask entries are
 * all blocked is skipped unless a row it meets is fully blocked; stats runs a block again without
 * skipping when it finds such a row).
 *
 * Head widths: Dk and Dv multiples of 16 up to 128 (subgroupMatrixAttentionMisfit), where a
 * subgroup's left matrices (Dk/16 and Dv/16 of them) and accumulators (up to 128/16) stay within
 * its registers and every pass fits 32 KiB of workgroup memory.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import type { AttentionDims } from './attention_program.js';
import { operandScaleSnippet } from './max_abs_program.js';
import { type SlabLayout, declareAccumulators, epilogueThroughSlots, MATRIX_EDGE, uniformStrideLoop } from './subgroup_matrix_core.js';
import { BLOCKED_MASK, BLOCKED_ROW_MAX, maskRowStartSnippet } from './tiled_attention_program.js';

export type SubgroupMatrixAttentionPass = 'stats' | 'forward' | 'gradQ' | 'gradV';

/** Subgroups per workgroup, each owning 16 rows (keys) of the block. */
const SUBGROUPS = 4;
/** Query rows (stats, forward, gradQ) or keys (gradV) per workgroup. */
export const ATTENTION_BLOCK = SUBGROUPS * MATRIX_EDGE;
/** Keys (row passes) or query rows (gradV) per staged tile. */
export const ATTENTION_TILE = 32;
/** f16 elements added to every staged row (16-byte aligned rows, different banks). */
const PAD = 8;
/** f32 elements added to every row of the scores (the per-row reads of stats fall on 8 banks, not 1). */
const SCORE_PAD = 4;
/** The widest head the programs take (registers: see the file comment). */
export const ATTENTION_MAX_HEAD_WIDTH = 128;
/** log2 of dO's largest magnitude after scaling, 256 (see the file comment). */
const GRAD_OUT_TARGET_LOG2 = 8;

const LEFT = `subgroup_matrix_left<f16, ${MATRIX_EDGE}, ${MATRIX_EDGE}>`;
const RIGHT = `subgroup_matrix_right<f16, ${MATRIX_EDGE}, ${MATRIX_EDGE}>`;
const RESULT = `subgroup_matrix_result<f32, ${MATRIX_EDGE}, ${MATRIX_EDGE}>`;
const ENABLES = 'enable f16;\nenable chromium_experimental_subgroup_matrix;\n' +
    'diagnostic(off, chromium.subgroup_matrix_uniformity);';

/** Where each f16 operand lives in the workgroup arena H (halves), and the arrays' sizes. */
interface Arena {
  /** row passes: the key tile (k), the value tile (v); gradV: the query tile (q·scale), dO's */
  first: number;
  second: number;
  /** the tile's P or dS, [64][32 + 8] */
  probs: number;
  /** halves of H */
  halves: number;
  /** floats of Ts */
  scores: number;
  /** floats of the per-row statistics (m, l, Δ) */
  rowFloats: number;
}

function arenaOf(pass: SubgroupMatrixAttentionPass, dims: Pick<AttentionDims, 'dk' | 'dv'>): Arena {
  const B = ATTENTION_BLOCK;
  const T = ATTENTION_TILE;
  const SK = dims.dk + PAD;
  const SV = dims.dv + PAD;
  const rowPass = pass === 'stats' || pass === 'forward' || pass === 'gradQ';
  const first = 0;
  const second = T * SK;
  const usesSecond = pass !== 'stats';
  const probs = second + (usesSecond ? T * SV : 0);
  const end = probs + (pass === 'stats' ? 0 : B * (T + PAD));
  // the block's own rows (q·scale and dO, or k) are staged once through the same arena
  const prologue = B * Math.max(SK, pass === 'gradQ' ? SV : 0);
  const rowFloats = pass === 'stats' ? 0 : (rowPass ? B : T) * (pass === 'gradQ' ? 3 : 2);
  return { first, second, probs, halves: Math.max(end, prologue), scores: B * (T + SCORE_PAD), rowFloats };
}

/** Bytes of workgroup memory of a pass (the arena, the scores, the rows' statistics, 4 flags). */
export function subgroupMatrixAttentionBytes(pass: SubgroupMatrixAttentionPass, dims: Pick<AttentionDims, 'dk' | 'dv'>): number {
  const a = arenaOf(pass, dims);
  return 2 * a.halves + 4 * a.scores + 4 * a.rowFloats + 16;
}

const PASSES: SubgroupMatrixAttentionPass[] = ['stats', 'forward', 'gradQ', 'gradV'];

/**
 * Why these head widths, subgroup size and workgroup memory cannot run the programs, or
 * undefined when they can: Dk and Dv multiples of 16 up to 128, a subgroup of 16 to 64
 * invocations (a workgroup of 4 subgroups covers the 64 rows of the per-row loops) and every
 * pass within `workgroupBytes`.
 *
 * ```js
 * subgroupMatrixAttentionMisfit({ dk: 128, dv: 128 }, 32, 32768);   // undefined
 * subgroupMatrixAttentionMisfit({ dk: 80, dv: 80 }, 32, 32768);     // undefined
 * subgroupMatrixAttentionMisfit({ dk: 72, dv: 72 }, 32, 32768);     // 'head widths ...'
 * ```
 */
export function subgroupMatrixAttentionMisfit(dims: Pick<AttentionDims, 'dk' | 'dv'>, subgroupSize: number,
    workgroupBytes: number): string | undefined {
  const fits = (d: number) => d > 0 && d % MATRIX_EDGE === 0 && d <= ATTENTION_MAX_HEAD_WIDTH;
  if (!fits(dims.dk) || !fits(dims.dv)) {
    return `head widths Dk ${dims.dk}, Dv ${dims.dv}: both must be multiples of ${MATRIX_EDGE} up to ${ATTENTION_MAX_HEAD_WIDTH}`;
  }
  if (!(subgroupSize >= 16 && subgroupSize <= 64 && (subgroupSize & (subgroupSize - 1)) === 0)) {
    return `subgroup size ${subgroupSize}: must be 16, 32 or 64`;
  }
  const most = Math.max(...PASSES.map(p => subgroupMatrixAttentionBytes(p, dims)));
  if (most > workgroupBytes) return `${most} bytes of workgroup memory needed, the device has ${workgroupBytes}`;
  return undefined;
}

export class SubgroupMatrixAttentionProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number];
  /** TiledAttentionProgram.uniformsFor's */
  uniforms = 'groupRows : i32, seqLen : i32, keyLen : i32, headsPerSample : i32, totalRows : i32, scale : f32, ';
  private readonly pass: SubgroupMatrixAttentionPass;
  private readonly dims: AttentionDims;
  private readonly subgroupSize: number;

  /** `subgroupSize`: the device's (TensorCoreDevice); the dims must pass subgroupMatrixAttentionMisfit. */
  constructor(pass: SubgroupMatrixAttentionPass, dims: AttentionDims, subgroupSize: number) {
    const misfit = subgroupMatrixAttentionMisfit(dims, subgroupSize, Infinity);
    if (misfit !== undefined) throw new Error(`SubgroupMatrixAttentionProgram: ${misfit}`);
    this.pass = pass;
    this.dims = dims;
    this.subgroupSize = subgroupSize;
    this.workgroupSize = [SUBGROUPS * subgroupSize, 1, 1];
    const nq = dims.nkv * dims.rep;
    this.variableNames = {
      stats: ['queries', 'keys', 'mask'],
      forward: ['queries', 'keys', 'values', 'mask', 'stats'],
      gradQ: ['queries', 'keys', 'values', 'mask', 'stats', 'deltas', 'gradOut', 'amax'],
      gradV: ['queries', 'keys', 'mask', 'stats', 'gradOut', 'amax'],
    }[pass];
    this.outputShape = {
      stats: [nq, dims.seqLen, 2], forward: [nq, dims.seqLen, dims.dv], gradQ: [nq, dims.seqLen, dims.dk],
      gradV: [dims.nkv, dims.keyLen, dims.dv],
    }[pass];
    this.dispatchLayout = { x: this.outputShape.map((_, i) => i) };
    // a workgroup per block of a group's query rows (stats, forward, gradQ) or keys (gradV)
    const rows = pass === 'gradV' ? dims.keyLen : dims.rep * dims.seqLen;
    this.dispatch = [Math.max(1, Math.ceil(rows / ATTENTION_BLOCK)), dims.nkv, 1];
    this.shaderKey = `moeSubgroupAttention_${pass}_${dims.dk}_${dims.dv}_${subgroupSize}_${dims.maskBatch > 0 ? 'sample' : 'shared'}`;
  }

  getUserCode(): string {
    return this.pass === 'gradV' ? this.keyBlockCode() : this.rowBlockCode();
  }

  /** The epilogue's view of the block: 4 subgroups of 16 rows × `width` columns. */
  private resultLayout(width: number): SlabLayout {
    return { rows: ATTENTION_BLOCK, cols: width, depth: ATTENTION_TILE, subgroupRows: SUBGROUPS, subgroupCols: 1,
      tilesM: 1, tilesN: width / MATRIX_EDGE, leftColMajor: false, pad: PAD };
  }

  /** WGSL: the declarations every pass shares. */
  private declarations(arena: Arena, rowArrays: string[]): string {
    const perRow = this.pass === 'gradV' ? ATTENTION_TILE : ATTENTION_BLOCK;
    return `
      ${ENABLES}
      var<workgroup> H : array<f16, ${arena.halves}>;
      var<workgroup> Ts : array<f32, ${arena.scores}>;
      ${rowArrays.map(name => `var<workgroup> ${name} : array<f32, ${perRow}>;`).join('\n      ')}
      // [0]: the last tile number with an open entry, [1]: a row of the block is fully blocked
      var<workgroup> flags : array<i32, 4>;
      ${maskRowStartSnippet(this.dims.maskBatch > 0)}
      ${this.variableNames.includes('amax') ? `
      // the power of two s with s·max|dO| <= 2^${GRAD_OUT_TARGET_LOG2} (1 when max|dO| is 0 or not finite)
      ${operandScaleSnippet('gradOutScale', GRAD_OUT_TARGET_LOG2)}` : ''}`;
  }

  /**
   * WGSL: `count` rows (first `first`, `valid` of them real: the others 0) of `input` [.., width]
   * times `factor` into H at `at`, rows `width` + 8 apart, then the subgroup's 16 of them as left
   * matrices `name`0, `name`1, ... (one per 16 columns), between barriers.
   */
  private stageLeftMatrices(name: string, input: string, width: number, first: string, valid: string, factor: string): string {
    const threads = this.workgroupSize[0];
    const stride = width + PAD;
    const loads: string[] = [];
    for (let c = 0; c < width / MATRIX_EDGE; c++) {
      loads.push(`let ${name}${c} = subgroupMatrixLoad<${LEFT}>(&H, partRow * ${stride}u + ${c * MATRIX_EDGE}u, false, ${stride}u);`);
    }
    return `${this.stageRows(input, width, ATTENTION_BLOCK, 0, first, valid, factor, threads)}
        workgroupBarrier();
        ${loads.join('\n        ')}
        workgroupBarrier();    // H is reused`;
  }

  /** WGSL: rows of `input` into H at `at` (f16, `width` + 8 apart), as stageLeftMatrices says. */
  private stageRows(input: string, width: number, count: number, at: number, first: string, valid: string, factor: string,
      threads: number): string {
    return uniformStrideLoop('i', 'localIndex', count * width, threads, `let r = i32(i / ${width}u);
            let d = i % ${width}u;
            let value = ${input}[(${first} + min(r, ${valid} - 1)) * ${width} + i32(d)]${factor};
            H[${at}u + (i / ${width}u) * ${width + PAD}u + d] = f16(select(0.0, value, r < ${valid}));`);
  }

  /**
   * WGSL: `${name}n` (n < 32 / 16) = Σ_c left_c · right, right matrix (c, n) read column-major from
   * H at `at` (rows `stride` apart: element (d, j) of the product's right operand is row j's d):
   * a tile's 32 rows against the subgroup's 16; stored to Ts (row-major, rows 32 + 4 apart).
   */
  private productToScores(name: string, left: string, width: number, at: number): string {
    const stride = width + PAD;
    const ts = ATTENTION_TILE + SCORE_PAD;
    const lines: string[] = [];
    for (let n = 0; n < ATTENTION_TILE / MATRIX_EDGE; n++) {
      lines.push(`var ${name}${n} = ${RESULT}();`);
      for (let c = 0; c < width / MATRIX_EDGE; c++) {
        const offset = at + n * MATRIX_EDGE * stride + c * MATRIX_EDGE;
        lines.push(`${name}${n} = subgroupMatrixMultiplyAccumulate(${left}${c}, ` +
            `subgroupMatrixLoad<${RIGHT}>(&H, ${offset}u, true, ${stride}u), ${name}${n});`);
      }
      lines.push(`subgroupMatrixStore(&Ts, partRow * ${ts}u + ${n * MATRIX_EDGE}u, ${name}${n}, false, ${ts}u);`);
    }
    return lines.join('\n          ');
  }

  /**
   * WGSL: c0_j += (P or dS at H's `probs`, the subgroup's 16 rows × 32) · (the tile at `at`,
   * 32 rows × `width`, row-major, rows `width` + 8 apart).
   */
  private accumulate(arena: Arena, at: number, width: number): string {
    const st = ATTENTION_TILE + PAD;
    const stride = width + PAD;
    const lines: string[] = [];
    for (let kk = 0; kk < ATTENTION_TILE; kk += MATRIX_EDGE) {
      lines.push(`let p${kk} = subgroupMatrixLoad<${LEFT}>(&H, ${arena.probs}u + partRow * ${st}u + ${kk}u, false, ${st}u);`);
      for (let j = 0; j < width / MATRIX_EDGE; j++) {
        lines.push(`c0_${j} = subgroupMatrixMultiplyAccumulate(p${kk}, ` +
            `subgroupMatrixLoad<${RIGHT}>(&H, ${at + kk * stride + j * MATRIX_EDGE}u, false, ${stride}u), c0_${j});`);
      }
    }
    return lines.join('\n          ');
  }

  /** stats, forward and gradQ: a workgroup per block of 64 of a group's query rows, tiles of 32 keys. */
  /** main's first lines in both passes: this invocation's subgroup and lane, its matrices' origin, the group and its sizes. */
  private invocationIds(): string {
    return `let subgroup = localIndex / ${this.subgroupSize}u;
        let lane = localIndex % ${this.subgroupSize}u;
        let partRow = subgroup * ${MATRIX_EDGE}u;
        let partCol = 0u;
        let g = i32(workgroupId.y);
        let groupRows = uniforms.groupRows;
        let keyLen = uniforms.keyLen;`;
  }

  private rowBlockCode(): string {
    const { dk, dv } = this.dims;
    const B = ATTENTION_BLOCK;
    const T = ATTENTION_TILE;
    const TS = T + SCORE_PAD;
    const ST = T + PAD;
    const threads = this.workgroupSize[0];
    const pass = this.pass;
    const stats = pass === 'stats';
    const gradQ = pass === 'gradQ';
    const arena = arenaOf(pass, this.dims);
    const width = gradQ ? dk : dv;
    // element i of the tile: row r (of the block), key j; its mask entry, −3e38 past the ends
    const element = `let r = i / ${T}u;
            let j = i % ${T}u;
            var mv = -3.0e38;
            if (i32(r) < blockCount && i32(j) < count) { mv = mask[maskRowStart(firstRow + i32(r)) + j0 + i32(j)]; }`;
    const probability = `exp(Ts[r * ${TS}u + j] + mv - rowM[r]) / rowL[r]`;
    const tileBody = `
          tileNumber++;
          let count = min(${T}, keyLen - j0);
          workgroupBarrier();    // the previous tile is consumed
          ${uniformStrideLoop('i', 'localIndex', B * T, threads, `let r = i32(i / ${T}u);
            let j = i32(i % ${T}u);
            if (r < blockCount && j < count) {
              if (mask[maskRowStart(firstRow + r) + j0 + j] > ${BLOCKED_MASK}) { flags[0] = tileNumber; }
            }`)}
          // (also the barrier after the scan)
          let open = workgroupUniformLoad(&flags[0]) == tileNumber;
          if (mayPass && !open) { continue; }    // every entry blocked
          ${this.stageRows('keys', dk, T, arena.first, 'g * keyLen + j0', 'count', '', threads)}
          ${stats ? '' : this.stageRows('values', dv, T, arena.second, 'g * keyLen + j0', 'count', '', threads)}
          workgroupBarrier();
          ${this.productToScores('s', 'q', dk, arena.first)}
          workgroupBarrier();
          ${stats ? `
          if (localIndex < ${B}u) {
            let r = localIndex;
            var row : array<f32, ${T}>;
            var tileMax = -3.0e38;
            for (var j = 0; j < ${T}; j++) {
              var mv = -3.0e38;
              if (i32(r) < blockCount && j < count) { mv = mask[maskRowStart(firstRow + i32(r)) + j0 + j]; }
              row[j] = Ts[r * ${TS}u + u32(j)] + mv;
              tileMax = max(tileMax, row[j]);
            }
            let mNew = max(m, tileMax);
            l = l * exp(m - mNew);
            for (var j = 0; j < ${T}; j++) { l += exp(row[j] - mNew); }
            m = mNew;
          }` : `
          ${uniformStrideLoop('i', 'localIndex', B * T, threads, `${element}
            H[${arena.probs}u + r * ${ST}u + j] = f16(${probability});`)}
          workgroupBarrier();
          ${gradQ ? `
          // dP = dO·Vᵀ through Ts, then dS = P ⊙ (dP − Δ) in place of P (both scaled by s)
          ${this.productToScores('dp', 'o', dv, arena.second)}
          workgroupBarrier();
          ${uniformStrideLoop('i', 'localIndex', B * T, threads, `let r = i / ${T}u;
            let j = i % ${T}u;
            let at = ${arena.probs}u + r * ${ST}u + j;
            H[at] = f16(f32(H[at]) * (Ts[r * ${TS}u + j] - rowDelta[r]));`)}
          workgroupBarrier();
          ${this.accumulate(arena, arena.first, dk)}` : this.accumulate(arena, arena.second, dv)}`}`;
    return `
      ${this.declarations(arena, stats ? [] : gradQ ? ['rowM', 'rowL', 'rowDelta'] : ['rowM', 'rowL'])}
      fn main(index : i32) {
        ${this.invocationIds()}
        let blockStart = i32(workgroupId.x) * ${B};
        let blockCount = min(${B}, groupRows - blockStart);
        let firstRow = g * groupRows + blockStart;
        ${gradQ ? 'let s = gradOutScale();' : ''}
        ${this.stageLeftMatrices('q', 'queries', dk, 'firstRow', 'blockCount', ' * uniforms.scale')}
        ${gradQ ? this.stageLeftMatrices('o', 'gradOut', dv, 'firstRow', 'blockCount', ' * s') : ''}
        var tileNumber = 0;
        ${stats ? `
        // the rows' statistics, a thread per row; rows past the group's end are computed and not written
        var m = -3.0e38;
        var l = 0.0;
        for (var attempt = 0; attempt < 2; attempt++) {
          // the first attempt skips blocked tiles; a second runs where a row found no open key
          let mayPass = attempt == 0;
          m = -3.0e38;
          l = 0.0;
          for (var j0 = 0; j0 < keyLen; j0 += ${T}) {${tileBody}
          }
          if (attempt == 0) {
            if (localIndex < ${B}u && i32(localIndex) < blockCount && m <= ${BLOCKED_ROW_MAX}) { flags[1] = 1; }
            if (workgroupUniformLoad(&flags[1]) == 0) { break; }
          }
        }
        if (localIndex < ${B}u && i32(localIndex) < blockCount) {
          let row = firstRow + i32(localIndex);
          result[row * 2] = m;
          result[row * 2 + 1] = l;
        }` : `
        // the rows' m, l${gradQ ? ' and s·Δ' : ''}; rows past the group's end get p = 0 (m 0, l 1, mask −3e38)
        if (localIndex < ${B}u) {
          let r = i32(localIndex);
          let row = firstRow + min(r, blockCount - 1);
          let m = stats[row * 2];
          rowM[localIndex] = select(0.0, m, r < blockCount);
          rowL[localIndex] = select(1.0, stats[row * 2 + 1], r < blockCount);
          ${gradQ ? 'rowDelta[localIndex] = select(0.0, deltas[row] * s, r < blockCount);' : ''}
          if (r < blockCount && m <= ${BLOCKED_ROW_MAX}) { flags[1] = 1; }
        }
        // a fully blocked row sees every key: then no tile is skipped
        let mayPass = workgroupUniformLoad(&flags[1]) == 0;
        ${declareAccumulators(this.resultLayout(width))}
        for (var j0 = 0; j0 < keyLen; j0 += ${T}) {${tileBody}
        }
        let unscale = ${gradQ ? 'uniforms.scale / s' : '1.0'};
        workgroupBarrier();    // Ts is free
        ${epilogueThroughSlots(this.resultLayout(width), 'subgroup', 'lane', this.subgroupSize, 'partRow', 'partCol', (mm, nn, v) => `{
          let r = blockStart + i32(${mm});
          if (r < groupRows) { result[(g * groupRows + r) * ${width} + i32(${nn})] = unscale * ${v}; }
        }`)}`}
      }
    `;
  }

  /** gradV: a workgroup per block of 64 of a group's keys, tiles of 32 of its query rows. */
  private keyBlockCode(): string {
    const { dk, dv } = this.dims;
    const B = ATTENTION_BLOCK;
    const T = ATTENTION_TILE;
    const TS = T + SCORE_PAD;
    const ST = T + PAD;
    const threads = this.workgroupSize[0];
    const arena = arenaOf(this.pass, this.dims);
    return `
      ${this.declarations(arena, ['tileM', 'tileL'])}
      fn main(index : i32) {
        ${this.invocationIds()}
        let firstKey = i32(workgroupId.x) * ${B};
        let keyCount = min(${B}, keyLen - firstKey);
        let s = gradOutScale();
        ${this.stageLeftMatrices('k', 'keys', dk, 'g * keyLen + firstKey', 'keyCount', '')}
        ${declareAccumulators(this.resultLayout(dv))}
        var tileNumber = 0;
        for (var r0 = 0; r0 < groupRows; r0 += ${T}) {
          tileNumber++;
          let count = min(${T}, groupRows - r0);
          let first = g * groupRows + r0;
          workgroupBarrier();    // the previous tile is consumed
          // rows past the end: m 0, l 1 and mask −3e38, so p = 0
          if (localIndex < ${T}u) {
            let r = i32(localIndex);
            var m = 0.0;
            var l = 1.0;
            if (r < count) {
              m = stats[(first + r) * 2];
              l = stats[(first + r) * 2 + 1];
              if (m <= ${BLOCKED_ROW_MAX}) { flags[0] = tileNumber; }   // a fully blocked row sees every key
            }
            tileM[localIndex] = m;
            tileL[localIndex] = l;
          }
          ${uniformStrideLoop('i', 'localIndex', T * B, threads, `let r = i32(i / ${B}u);
            let j = i32(i % ${B}u);
            if (r < count && j < keyCount) {
              if (mask[maskRowStart(first + r) + firstKey + j] > ${BLOCKED_MASK}) { flags[0] = tileNumber; }
            }`)}
          // (also the barrier after the loads)
          if (workgroupUniformLoad(&flags[0]) != tileNumber) { continue; }   // every entry blocked
          ${this.stageRows('queries', dk, T, arena.first, 'first', 'count', ' * uniforms.scale', threads)}
          ${this.stageRows('gradOut', dv, T, arena.second, 'first', 'count', ' * s', threads)}
          workgroupBarrier();
          // Sᵀ: the subgroup's 16 keys against the tile's 32 rows
          ${this.productToScores('st', 'k', dk, arena.first)}
          workgroupBarrier();
          ${uniformStrideLoop('i', 'localIndex', T * B, threads, `let r = i % ${T}u;
            let j = i / ${T}u;
            var mv = -3.0e38;
            if (i32(r) < count && i32(j) < keyCount) { mv = mask[maskRowStart(first + i32(r)) + firstKey + i32(j)]; }
            H[${arena.probs}u + j * ${ST}u + r] = f16(exp(Ts[j * ${TS}u + r] + mv - tileM[r]) / tileL[r]);`)}
          workgroupBarrier();
          ${this.accumulate(arena, arena.second, dv)}
        }
        let unscale = 1.0 / s;
        workgroupBarrier();    // Ts is free
        ${epilogueThroughSlots(this.resultLayout(dv), 'subgroup', 'lane', this.subgroupSize, 'partRow', 'partCol', (mm, nn, v) => `{
          let key = firstKey + i32(${mm});
          if (key < keyLen) { result[(g * keyLen + key) * ${dv} + i32(${nn})] = unscale * ${v}; }
        }`)}
      }
    `;
  }
}
