/**
 * The grouped products of grouped_matmul_program.ts on tensor cores (issue 13): the same inputs,
 * uniforms and results, computed with WGSL's subgroup matrices (chromium_experimental_subgroup_matrix)
 * on f16 operands with f32 accumulation.
 *
 * Four subgroups per workgroup own a 128×128 block of the output, each a 64×64 part as 4×4 result
 * matrices of 16×16 f32 (the products' blocks have 64 or 32 rows where the plan's row tile is
 * smaller: subgroupBlockRowsFor). Each step stages a 64-deep slab of both operands in workgroup memory as
 * f16, every slab row padded by 8 halves (the layout of the exact 97 TFLOP/s GEMM of variants v3
 * on the H100; since v7, a weight stored [out, in] goes to a column-major Bs, see SubgroupStaging),
 * loaded and stored in the same step with no register prefetch — converted on the fly from f32
 * activations (the activation computed on load, the gather fused as in the f32 program) and from f32 or packed weights, bf16/f16 or quantized
 * (int8/int4/nf4/mxfp4), decoded to f32 by the f32 program's own loader — and multiplies them with
 * subgroupMatrixLoad / subgroupMatrixMultiplyAccumulate. Each accumulator goes through its
 * subgroup's 16×16 f32 slot in workgroup memory so that the epilogue (alpha, bias, addend, padding
 * rows, edges) is the f32 program's, per element. The index math (slab layouts, which subgroup owns
 * which part, the matrix offsets and strides, the epilogue's element of each lane) is
 * subgroup_matrix_core.ts's, shared with the raw Dawn variants and the emulator spec.
 *
 * Gradient operands can be tiny (a mean loss over many tokens), below f16's smallest normal
 * (6e-5): with `scaled`, the left operand is multiplied by a power of two s that brings its
 * largest magnitude (input `amax`: int32 [1], its exponent code, which the caller computes on the
 * device with maxAbsCodeInKernel) to at most 2^14, and the result by 1/s, both exact.
 *
 * Matrix types are written as Dawn documents them and the probe confirmed on the H100:
 * subgroup_matrix_left<T, K, M>, subgroup_matrix_right<T, N, K>, subgroup_matrix_result<T, N, M>.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { operandScaleSnippet } from './max_abs_program.js';
import {
  type GroupedMatMulSpec, type GroupedWeightGradSpec, rowLoadSnippet, singleGroupRowsSnippet, usesPairOfRow, weightGradLoadSnippets,
  weightLoadSnippet, tileRowsSnippet,
} from './grouped_matmul_program.js';
import {
  ACTIVATION_UNIFORMS, type ActivationSpec, activationKey, activationSnippet, EXPERT_OF_ROW, GROUPED_MATMUL_UNIFORMS, LORA_TAIL_UNIFORMS,
  type PackedWeightSpec, packedWeightKey, type RowSource,
} from './shared.js';
import {
  aIndex, bIndex, checkSlabLayout, declareAccumulators, epilogueThroughSlots, MATRIX_EDGE, multiplySlab, partOrigin,
  type SlabLayout, slabSizes, stagedElementA, stagedElementB, stagedQuadA, stagedQuadB, uniformStrideLoop, wgslU32,
} from './subgroup_matrix_core.js';

/**
 * The output block of one workgroup and the depth of a staged slab: 2×2 subgroups, each owning a
 * 64×64 part as 4×4 result matrices. Four subgroups share each staged slab, so that staging
 * (the gather, activation or weight decode, and the f16 conversion) is amortized over 4× the
 * matrix work of a one-subgroup block.
 */
export const SUBGROUP_MATRIX_BLOCK = { rows: 128, cols: 128, depth: 64, subgroupRows: 2, subgroupCols: 2 } as const;

/**
 * Halves added to every slab row: rows 144 (row-major As) or 272 bytes apart, so that the 16 rows
 * of a matrix load fall on different banks (the exact 97 TFLOP/s GEMM's padding), and every row
 * and every matrix starts on a 16-byte boundary, as the hardware's matrix loads want.
 */
const SLAB_PAD = 8;

/** A subgroup's part of the block: 64×64 as 4×4 result matrices. */
const TILES = 4;
const SUBGROUPS = SUBGROUP_MATRIX_BLOCK.subgroupRows * SUBGROUP_MATRIX_BLOCK.subgroupCols;

/**
 * The block of the products (As holds the left operand's rows) and of the weight gradients (As
 * holds Lᵀ, read column-major): the index math of subgroup_matrix_core.ts, the same that
 * tools/webgpu_tc/variants.ts runs on raw Dawn and spec/backends/webgpu/subgroup_matrix_emulator.spec.ts
 * emulates.
 */
export const MATMUL_LAYOUT: SlabLayout = {
  ...SUBGROUP_MATRIX_BLOCK, tilesM: TILES, tilesN: TILES, leftColMajor: false, pad: SLAB_PAD,
};
export const WEIGHT_GRAD_LAYOUT: SlabLayout = { ...MATMUL_LAYOUT, leftColMajor: true };
checkSlabLayout(MATMUL_LAYOUT);

/**
 * The MatMul's block rows, largest first (issue 13/15). A block never spans two experts, so its
 * rows must divide the plan's row tile: 128 where the tile is a multiple of it (training
 * batches: 4×4 result matrices per subgroup, the most work per staged slab), 64 and 32 for the
 * row tiles of fewer rows per expert (batch 1: OLMoE-1B-7B at 512 tokens has 64 rows per expert,
 * Qwen3-30B-A3B 32), where padding expert rows to 128 would waste half the products or more.
 * The subgroups stay 2×2 over 128 columns and the slab 64 deep; only the matrices per subgroup
 * along the rows shrink (tilesM = rows / 32). The device's f16→f32 config has M = 16 (16×16×16,
 * tensorCoreSupport), so 32 rows is the smallest block that two subgroup rows can split.
 */
export const SUBGROUP_BLOCK_ROWS = [128, 64, 32] as const;
export type SubgroupBlockRows = typeof SUBGROUP_BLOCK_ROWS[number];

/**
 * The largest block rows dividing the plan's row tile, or undefined (no block fits: f32).
 *
 * ```js
 * subgroupBlockRowsFor(256);  // 128
 * subgroupBlockRowsFor(64);   // 64
 * subgroupBlockRowsFor(96);   // 32
 * subgroupBlockRowsFor(16);   // undefined
 * ```
 */
export function subgroupBlockRowsFor(rowTile: number): SubgroupBlockRows | undefined {
  return SUBGROUP_BLOCK_ROWS.find(rows => rowTile % rows === 0);
}

/**
 * The MatMul's layout for a block of `blockRows` rows (MATMUL_LAYOUT at 128); `rightColMajor`:
 * Bs column-major (v7's staging of a weight stored [out, in]).
 */
export function matMulLayout(blockRows: SubgroupBlockRows, rightColMajor = false): SlabLayout {
  if (!SUBGROUP_BLOCK_ROWS.includes(blockRows)) {
    throw new Error(`SubgroupMatrixMatMulProgram: block rows must be one of ${SUBGROUP_BLOCK_ROWS.join(', ')} but got ${blockRows}`);
  }
  const layout = { ...MATMUL_LAYOUT, rows: blockRows, tilesM: blockRows / (MATRIX_EDGE * SUBGROUP_MATRIX_BLOCK.subgroupRows),
    ...(rightColMajor ? { rightColMajor } : {}) };
  checkSlabLayout(layout);
  return layout;
}

/**
 * The weight gradient's slab depth (rows of the reduction per staged slab) for a plan's row
 * tile: its block is P × Q and its reduction runs over each expert's rows, so the row tile sets
 * its depth, not its block. 64 (the exact GEMM's) unless the tile is below it: at a 32-row tile
 * experts have fewer than 64 rows on average, and a 64-deep slab would be half zeros.
 */
export function weightGradDepthFor(rowTile: number): 32 | 64 {
  return rowTile % SUBGROUP_MATRIX_BLOCK.depth === 0 ? 64 : 32;
}

/** The weight gradient's layout at slab depth `depth` (WEIGHT_GRAD_LAYOUT at 64). */
export function weightGradLayout(depth: 32 | 64): SlabLayout {
  if (depth !== 32 && depth !== 64) throw new Error(`SubgroupMatrixWeightGradProgram: depth must be 32 or 64 but got ${depth}`);
  const layout = { ...WEIGHT_GRAD_LAYOUT, depth };
  checkSlabLayout(layout);
  return layout;
}

/**
 * i32 elements of the small workgroup array beside the slabs (the MatMul's row sources and its
 * block's expert, the weight gradient's segment start and count): a whole number of 16-byte
 * units, so that every workgroup array's size is, and no placement of the arrays by the driver
 * can start a slab off a 16-byte boundary (a 4-byte scalar placed first would; the matrix loads
 * from workgroup memory assume aligned rows).
 */
function rowInts(blockRows: number): number {
  return blockRows + 4;
}

/**
 * Workgroups for an output of rows × cols (per expert: × experts): one per block of `blockRows`
 * rows (the weight gradients' blocks: 128).
 *
 * ```js
 * subgroupMatrixDispatch(256, 100);          // [1, 2, 1]
 * subgroupMatrixDispatch(256, 100, 1, 32);   // [1, 8, 1]
 * ```
 */
export function subgroupMatrixDispatch(rows: number, cols: number, experts = 1,
    blockRows: SubgroupBlockRows = SUBGROUP_MATRIX_BLOCK.rows): [number, number, number] {
  return [Math.ceil(cols / SUBGROUP_MATRIX_BLOCK.cols), Math.ceil(rows / blockRows), experts];
}

/**
 * Bytes of workgroup memory the largest program uses with MatMul blocks of `blockRows` rows: two
 * f16 slabs (the MatMul's at that block, Bs in either major order, or the weight gradient's
 * 128 × 128 ones, whichever are larger), a 16×16 f32 slot per subgroup, and the MatMul's row
 * sources with the block's expert (more than the gradient's 4 ints).
 *
 * ```js
 * subgroupMatrixWorkgroupBytes();     // 41488: 2·(128·72 + 128·72) + 4096 + 528
 * ```
 */
export function subgroupMatrixWorkgroupBytes(blockRows: SubgroupBlockRows = SUBGROUP_MATRIX_BLOCK.rows): number {
  const slabs = [matMulLayout(blockRows), matMulLayout(blockRows, true), WEIGHT_GRAD_LAYOUT].map(l => {
    const { a, b } = slabSizes(l);
    return a + b;
  });
  return 2 * Math.max(...slabs) + 4 * SUBGROUPS * MATRIX_EDGE * MATRIX_EDGE + 4 * rowInts(blockRows);
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
 * WGSL: operandScale(), the power of two s with s·max|A| <= 2^14 from input `amax` (1 when max|A| is
 * 0 or not finite).
 */
export const OPERAND_SCALE = operandScaleSnippet('operandScale', 14);

/**
 * WGSL: this invocation's subgroup and lane and where its part starts (u32): subgroups are
 * consecutive runs of local_invocation_index (as on every GPU these programs are registered for:
 * a fixed subgroup size, one-dimensional workgroups).
 */
function subgroupPart(layout: SlabLayout, subgroupSize: number): string {
  const { row, col } = partOrigin(wgslU32, layout, 'subgroup');
  return `let subgroup = localIndex / ${subgroupSize}u;
        let lane = localIndex % ${subgroupSize}u;
        let partRow = ${row};
        let partCol = ${col};`;
}

function workgroupArrays(layout: SlabLayout): string {
  const { a, b } = slabSizes(layout);
  return `
      var<workgroup> As : array<f16, ${a}>;
      var<workgroup> Bs : array<f16, ${b}>;
      var<workgroup> Ts : array<f32, ${SUBGROUPS * MATRIX_EDGE * MATRIX_EDGE}>;`;
}

/**
 * WGSL: one staging loop, `count` slab elements over the workgroup's invocations, the same number
 * of steps for each (uniformStrideLoop): `at` declares the coordinates (u32) of element i, `body`
 * computes `v` (f32) without branching (indices clamped into range, then select: every invocation
 * runs the same instructions up to the matrix operations) and `index` is where the f16 goes.
 */
function stage(array: string, count: number, threads: number, at: string, body: string, index: string): string {
  return uniformStrideLoop('i', 'localIndex', count, threads, `${at}
            var v = 0.0;
            ${body}
            ${array}[${index}] = f16(v);`);
}

/**
 * How a program stages each operand (issue 13's speed): 'vec4' loads 4 consecutive elements of
 * the operand's contiguous direction at once (one vec4<f32>, or one vec2<u32> of 4 packed 16-bit
 * halves), resolves the row and the bounds once per 4 elements and converts to vec4<f16>; 'vec8'
 * (the MatMul's packed bf16 / f16 weight along k) loads 8 halves at once (one vec4<u32>, 16 bytes:
 * variants v7-c); 'element' is the per-element path through the f32 program's loaders (every
 * quantized format, and any shape whose 4-element groups would not be aligned). The caller picks
 * it from the shapes and strides (matMulStaging, weightGradStaging); it is part of the shader key.
 *
 * The staging itself is v7's (variants v7-a / v7-b on the H100 at Q's up shape: 77.5 and 110.8
 * TFLOP/s against 15.1 for the same program with v6's staging): each slab is fetched and stored to
 * workgroup memory in the same step, then barrier, multiply, barrier, with no register holding the
 * next slab across the products; and the MatMul's weight stored [out, in] (kContiguous) goes to a
 * column-major Bs, so that its k-runs land on consecutive halves, not 4 slab rows apart.
 */
export interface SubgroupStaging {
  /**
   * 'half8': the MatMul's A, or the weight gradient's L, holds f16 halves, two per int32 word,
   * that HalfOperandProgram wrote before the product (the activation, the routing weight and the
   * operand scale already applied), loaded 8 per 16-byte fetch and staged as they are (variants
   * v7-o against v7-c on the H100: 146 against 115 TFLOP/s at Q's up shape, the same W).
   */
  left: 'vec4' | 'half8' | 'element';
  /** 'half8' (the weight gradient only): R held as f16 halves, as the left operand's 'half8' */
  right: 'vec4' | 'vec8' | 'half8' | 'element';
  /**
   * v6's staging (selectable for the variants' comparison, v6Staging): the next slab's quads kept
   * in registers while the current one multiplies, Bs row-major, 4-element loads only.
   */
  registerPrefetch?: boolean;
  /**
   * The v6 structure (issue 13's speed, after v5's quads reached 11–14 TFLOP/s against the exact
   * GEMM's 97): where the shape is whole blocks (`whole`: the reduction a multiple of the slab
   * depth, the output's rows / columns multiples of 128), the quads load without clamps or
   * selects; the MatMul's quad rows are resolved once per block to their vec4 offsets (in rowSrc,
   * in place: the sign, which the epilogue reads, is kept), not per fetch; and a block fully in
   * range with nothing to add and no scale (alpha / s = 1) stores its result matrices straight to
   * the output (subgroupMatrixStore), the slots and lanes only otherwise. Absent: v5's programs
   * (tools/webgpu_tc/variants.ts runs both).
   */
  v6?: { whole: { depth: boolean; rows: boolean; cols: boolean } };
  /**
   * v6's direct stores for any alpha / s too (a gradient product's 1/s, a LoRA scale): each result
   * matrix is multiplied by it (subgroupMatrixScalarMultiply, the same f32 product the per-element
   * epilogue computes) and stored straight to the output, where those blocks otherwise went through
   * the slots: two workgroup barriers per result matrix, 32 a block.
   */
  scaledDirect?: boolean;
}

export const ELEMENT_STAGING: SubgroupStaging = { left: 'element', right: 'element' };

/**
 * SubgroupMatrixMatMulProgram's product: GroupedMatMulProgram's spec without the register tile;
 * `scaled` adds the input `amax` (see the file comment). `uniformGroups`: a batch of equal groups
 * with no plan (the composed attention's batched products, batchProduct): rows b·G .. b·G + G − 1
 * of A are group b, multiplied by W's group b (from W[b·sE]), G the uniform groupRows, a multiple
 * of the block's rows so that a block's group is its first row's; source 'rows', no plan inputs.
 */
export type SubgroupMatMulSpec = Omit<GroupedMatMulSpec, 'tile'> & {
  scaled: boolean; uniformGroups?: boolean; loraTail?: boolean;
  /**
   * split K (one group only, nothing added): workgroup z reduces k in [z·kChunk, (z + 1)·kChunk)
   * (the uniform kChunk, a multiple of the slab depth) into its own [numRows, outCols] slice of
   * the result ([splits·numRows, outCols]), which the caller sums (SumSlicesProgram): a product
   * of few blocks over a long reduction (the LM head's dHidden = dLogits·W) otherwise leaves
   * most of the GPU idle.
   */
  splitK?: boolean;
};

/** The uniform of the split-K specialisation, last. */
const SPLIT_K_UNIFORM = 'kChunk : i32, ';

/** The deepest LoRA tail: one 16-deep step of the matrices. */
export const LORA_TAIL_MAX_RANK = MATRIX_EDGE;

/**
 * WGSL (after the K loop, with e, s, row0, col0, partRow and partCol set): split LoRA's expansion
 * as one more 16-deep step of the reduction, out += tailScale·alpha·T(r, k)·V_e(k, n) for k < rank
 * (T = u = x·A_eᵀ in forward, V = B_e; T = gr = s·dy·B_e in backward, V = A_e), so that the base
 * product's result already holds it: no separate expansion reads and writes the whole output again
 * (run X6: 10.5 GPU ms a step of NarrowInnerGroupedMatMulProgram). As gets s·T of the block's own
 * rows (T is in padded-row order; padding rows, rows past the rows in use and k ≥ rank give 0),
 * Bs gets tailScale·V_e; both in the layout's strides, read by the first 16 columns' matrices only.
 * T's scale is s only while the block's T fits f16 that way: backward's gr = s_lora·dy·B_e grows
 * with B during training, and s was chosen for dy alone (its largest magnitude to 2^14), so a
 * trained B can carry s·gr past f16's 65504 (an infinity, then NaN weights). The block's largest
 * |T| (reduced in Ts, free until the epilogue) caps it: tScale = min(s, 2^14 / max |T|), a power
 * of two, and V takes the ratio s / tScale back, exactly.
 * Every invocation takes the same steps (uniformStrideLoop), as before the matrix operations.
 */
function loraTailStep(layout: SlabLayout, threads: number): string {
  const x = wgslU32;
  const shallow = { ...layout, depth: MATRIX_EDGE };
  // Bs in its memory order: k fastest into a column-major Bs, n fastest into a row-major one
  const b = stagedElementB(x, shallow, 'i', layout.rightColMajor === true);
  // T's element i of the block (rows × 16 per staging pass): in use, and its value (indices clamped)
  const tailElement = `let mm = i / ${MATRIX_EDGE}u; let kk = i % ${MATRIX_EDGE}u;
            let inUse = e >= 0 && rowSrc[mm] >= 0 && i32(kk) < uniforms.tailRank;
            let t = tailA[min(row0 + i32(mm), uniforms.numRows - 1) * uniforms.tailRank + min(i32(kk), uniforms.tailRank - 1)];`;
  return `// split LoRA's expansion: one more 16-deep step of the reduction. First the block's largest |T|
        var tailLocal = 0.0;
        ${uniformStrideLoop('i', 'localIndex', layout.rows * MATRIX_EDGE, threads, `${tailElement}
            tailLocal = max(tailLocal, select(0.0, abs(t), inUse));`)}
        Ts[localIndex] = tailLocal;
        workgroupBarrier();
        for (var width = ${threads / 2}u; width > 0u; width = width / 2u) {
          if (localIndex < width) {
            Ts[localIndex] = max(Ts[localIndex], Ts[localIndex + width]);
          }
          workgroupBarrier();
        }
        let tailMax = Ts[0];
        workgroupBarrier();
        let tScale = select(s, min(s, exp2(floor(log2(16384.0 / tailMax)))), tailMax > 0.0 && tailMax <= 3.0e38);
        let vScale = uniforms.tailScale * (s / tScale);
        ${uniformStrideLoop('i', 'localIndex', layout.rows * MATRIX_EDGE, threads, `${tailElement}
            As[${aIndex(x, layout, 'mm', 'kk')}] = f16(select(0.0, t * tScale, inUse));`)}
        ${uniformStrideLoop('i', 'localIndex', MATRIX_EDGE * layout.cols, threads, `let kk = ${b.k}; let nn = ${b.n};
            let n = col0 + i32(nn);
            let inRange = i32(kk) < uniforms.tailRank && n < uniforms.outCols;
            let v = tailW[max(e, 0) * uniforms.tailSE + min(n, uniforms.outCols - 1) * uniforms.tailSN +
                min(i32(kk), uniforms.tailRank - 1) * uniforms.tailSK];
            Bs[${bIndex(x, layout, 'kk', 'nn')}] = f16(select(0.0, v * vScale, inRange));`)}
        workgroupBarrier();
        ${multiplySlab(layout, 'partRow', 'partCol', MATRIX_EDGE)}`;
}

/**
 * SubgroupMatrixWeightGradProgram's product: GroupedWeightGradSpec without the register tile;
 * `scaled` scales L by `amax` (the gradient operand of the experts' dW = Lᵀ·R), or R with
 * `scaledRight` (attention's dV = Pᵀ·dO, where the right operand is the gradient).
 * `uniformGroups`: segment b is rows b·G .. b·G + G − 1 of L and R (G the uniform groupRows), no
 * plan inputs; L and R 'rows', no row scale.
 */
export type SubgroupWeightGradSpec = Omit<GroupedWeightGradSpec, 'tile'> & {
  scaled: boolean; scaledRight?: boolean; uniformGroups?: boolean;
};

/** The uniform of the uniform-groups specialisations, after the grouped products' own. */
const GROUP_ROWS_UNIFORM = 'groupRows : i32, ';

/**
 * The MatMul's staging for a product of reduction `inner` and `outCols` columns with W_e(k, n) at
 * W[e·sE + n·sN + k·sK] (sE in words for a packed weight): A in quads when every row's quads are
 * aligned (inner a multiple of 4); W when float32, bf16 or f16, contiguous along k (sK = 1) or
 * n (sN = 1), and every quad starts on a 16-byte boundary (the other stride, the length along the
 * contiguous direction and the expert's start multiples of 4 elements).
 *
 * ```js
 * matMulStaging({}, { inner: 2048, outCols: 1536, sE: 1536 * 2048, sN: 2048, sK: 1 });  // both 'vec4'
 * matMulStaging({ packedWeight: { kind: 'bf16', cols: 2048, layout: null } },
 *     { inner: 2048, outCols: 1536, sE: 1536 * 1024, sN: 2048, sK: 1 });             // A 'vec4', W 'vec8'
 * ```
 */
export function matMulStaging(spec: { packedWeight?: PackedWeightSpec },
    d: { inner: number; outCols: number; sE: number; sN: number; sK: number }, halfLeft = false): SubgroupStaging {
  const left = halfLeft && halfOperandFits(d.inner) ? 'half8' : d.inner >= 4 && d.inner % 4 === 0 ? 'vec4' : 'element';
  const packed = spec.packedWeight;
  const decodable = packed === undefined || packed.layout === null;
  // the expert's start: 4 f32 elements, or 2 words of 2 halves
  const expertAligned = d.sE % (packed === undefined ? 4 : 2) === 0;
  const alongK = d.sK === 1 && d.inner >= 4 && d.inner % 4 === 0 && d.sN % 4 === 0;
  const alongN = d.sK !== 1 && d.sN === 1 && d.outCols >= 4 && d.outCols % 4 === 0 && d.sK % 4 === 0;
  // 16-byte loads of 8 halves: whole runs along k, rows and the expert's start on 16 bytes (4 words)
  const eightAlongK = packed !== undefined && alongK && d.inner % 8 === 0 && d.sN % 8 === 0 && d.sE % 4 === 0;
  const right = decodable && expertAligned && (alongK || alongN) ? (eightAlongK ? 'vec8' : 'vec4') : 'element';
  const { cols, depth } = SUBGROUP_MATRIX_BLOCK;
  // rows always: the output's capacity is whole blocks (the program's contract), its padding rows resolved through rowSrc
  return { left, right, v6: { whole: { depth: d.inner % depth === 0, rows: true, cols: d.outCols % cols === 0 } } };
}

/**
 * Whether a MatMul's left operand of reduction `inner` can be held as f16 halves ('half8'): whole
 * 16-byte runs of 8 halves per row.
 */
export function halfOperandFits(inner: number): boolean {
  return inner >= 8 && inner % 8 === 0;
}

/**
 * The weight gradient's staging: L in quads along p when P is a multiple of 4, R along q when Q is;
 * `half` names the operands held as f16 halves ('half8', each where its length is whole runs of 8:
 * halfOperandFits), which the caller converts before the product.
 *
 * ```js
 * weightGradStaging({ P: 1536, Q: 2048 });                                    // both 'vec4'
 * weightGradStaging({ P: 1536, Q: 2052 }, { left: true, right: true });       // L 'half8', R 'vec4'
 * ```
 */
export function weightGradStaging(d: { P: number; Q: number },
    half: { left: boolean; right: boolean } = { left: false, right: false }): SubgroupStaging {
  const { rows, cols } = SUBGROUP_MATRIX_BLOCK;
  const side = (length: number, halves: boolean) =>
    halves && halfOperandFits(length) ? 'half8' : length >= 4 && length % 4 === 0 ? 'vec4' : 'element';
  // the reduction runs over each expert's rows, a count known on the device only: never whole
  return { left: side(d.P, half.left), right: side(d.Q, half.right),
    v6: { whole: { depth: false, rows: d.P % rows === 0, cols: d.Q % cols === 0 } } };
}

/** 4-element loads where `s` has 8 (v6's and v5's staging have no 16-byte runs). */
function fourWide(right: SubgroupStaging['right']): SubgroupStaging['right'] {
  return right === 'vec8' ? 'vec4' : right;
}

/** The same operands with v6's staging (register prefetch, Bs row-major): the variants' comparison. */
export function v6Staging(s: SubgroupStaging): SubgroupStaging {
  return { ...s, right: fourWide(s.right), registerPrefetch: true };
}

/** The same staging in v5's structure (the variants' comparison; v5 prefetched into registers too). */
export function v5Structure(s: SubgroupStaging): SubgroupStaging {
  return { left: s.left, right: fourWide(s.right), registerPrefetch: true };
}

function stagingKey(s: SubgroupStaging): string {
  const w = s.v6?.whole;
  return `${{ vec4: 'v', half8: 'h', element: 'e' }[s.left]}${{ vec4: 'v', vec8: 'w', half8: 'h', element: 'e' }[s.right]}${s.registerPrefetch ? 'p' : ''}` +
      (w === undefined ? '' : `_6${w.depth ? 'd' : ''}${w.rows ? 'r' : ''}${w.cols ? 'c' : ''}${s.scaledDirect ? 's' : ''}`);
}

/**
 * WGSL (v6): the result matrices straight to `result` at element `at(i, j)` (u32) of matrix (i, j)'s
 * first element, rows `stride` (u32) apart: the exact GEMM's epilogue, for a block that needs none
 * of the per-element one; `scale` (an f32 expression, staging `scaledDirect`) multiplies each first.
 */
function directStores(layout: SlabLayout, at: (i: number, j: number) => string, stride: string, scale?: string): string {
  const lines: string[] = [];
  for (let i = 0; i < layout.tilesM; i++) {
    for (let j = 0; j < layout.tilesN; j++) {
      const c = scale === undefined ? `c${i}_${j}` : `subgroupMatrixScalarMultiply(c${i}_${j}, ${scale})`;
      lines.push(`subgroupMatrixStore(&result, ${at(i, j)}, ${c}, false, ${stride});`);
    }
  }
  return lines.join('\n          ');
}

/** WGSL: the direct stores' condition on the scale, and the scale they apply (none: alpha / s must be 1). */
function directScale(staging: SubgroupStaging): { condition: string; scale?: string } {
  return staging.scaledDirect ? { condition: '', scale: 'unscale' } : { condition: ' && uniforms.alpha / s == 1.0' };
}

/**
 * WGSL: `fn ${name}(r : i32, c : i32) -> vec4<f32>`, columns c..c+3 (c a multiple of 4) of row
 * `rowOf` (an expression of r) of `array` (bound as vec4<f32>, rows `width` long), times
 * `rowScale`; or with `activation` of its h row (2·width: gate and up halves, or interleaved
 * pairs), the activation applied per element after the loads, as the f32 program's loader does.
 */
export function rowQuadSnippet(name: string, array: string, width: string, activation: ActivationSpec | undefined,
    rowOf = 'r', rowScale = ''): string {
  if (activation === undefined) {
    return `
      fn ${name}(r : i32, c : i32) -> vec4<f32> {
        let row = ${rowOf};
        return ${array}[(row * ${width} + c) / 4]${rowScale};
      }`;
  }
  const act = (g: string, u: string) => `actForward(${g}, ${u})`;
  const body = activation.interleaved
    ? `let at = (base + 2 * c) / 4;
        let p = ${array}[at];
        let q = ${array}[at + 1];
        return vec4<f32>(${act('p.x', 'p.y')}, ${act('p.z', 'p.w')}, ${act('q.x', 'q.y')}, ${act('q.z', 'q.w')});`
    : `let g = ${array}[(base + c) / 4];
        let u = ${array}[(base + ${width} + c) / 4];
        return vec4<f32>(${act('g.x', 'u.x')}, ${act('g.y', 'u.y')}, ${act('g.z', 'u.z')}, ${act('g.w', 'u.w')});`;
  return `
      ${activationSnippet(activation)}
      fn ${name}(r : i32, c : i32) -> vec4<f32> {
        let base = ${rowOf} * 2 * ${width};
        ${body}
      }`;
}

/**
 * WGSL (v6): `fn ${name}(at : i32, c : i32) -> vec4<f32>`, columns c..c+3 (c >= 0, a multiple of 4)
 * of the row whose first vec4 is `at` (rowQuadOffsets: the row's source times its length in vec4s),
 * with `activation` as rowQuadSnippet does.
 */
function rowQuadAtSnippet(name: string, array: string, width: string, activation: ActivationSpec | undefined): string {
  if (activation === undefined) {
    return `
      fn ${name}(at : i32, c : i32) -> vec4<f32> {
        return ${array}[at + (c >> 2u)];
      }`;
  }
  const act = (g: string, u: string) => `actForward(${g}, ${u})`;
  const body = activation.interleaved
    ? `let i = at + (c >> 1u);
        let p = ${array}[i];
        let q = ${array}[i + 1];
        return vec4<f32>(${act('p.x', 'p.y')}, ${act('p.z', 'p.w')}, ${act('q.x', 'q.y')}, ${act('q.z', 'q.w')});`
    : `let g = ${array}[at + (c >> 2u)];
        let u = ${array}[at + (${width} >> 2u) + (c >> 2u)];
        return vec4<f32>(${act('g.x', 'u.x')}, ${act('g.y', 'u.y')}, ${act('g.z', 'u.z')}, ${act('g.w', 'u.w')});`;
  return `
      ${activationSnippet(activation)}
      fn ${name}(at : i32, c : i32) -> vec4<f32> {
        ${body}
      }`;
}

/** WGSL ('half8'): `halfQuad`, a pair of words of f16 halves as vec4<f16>. */
const HALF_QUAD_SNIPPET = `
      fn halfQuad(w : vec2<u32>) -> vec4<f16> {
        return vec4<f16>(bitcast<vec2<f16>>(w.x), bitcast<vec2<f16>>(w.y));
      }`;

/**
 * WGSL ('half8'): `fn loadA8(at : i32, c : i32) -> vec4<u32>`, the 8 halves c..c+7 (c a multiple of 8)
 * of the f16 row whose first vec4 of words is `at` (rowQuadOffsets), and halfQuad.
 */
const HALF_ROW_SNIPPET = `
      fn loadA8(at : i32, c : i32) -> vec4<u32> {
        return bitcast<vec4<u32>>(A[at + (c >> 3u)]);
      }${HALF_QUAD_SNIPPET}`;

/**
 * WGSL ('half8', the weight gradient): `fn ${name}(r : i32, c : i32) -> vec4<u32>`, the 8 halves
 * c..c+7 (c a multiple of 8) of row `rowOf` (an expression of r) of `array`, f16 rows `width`
 * halves long (a multiple of 8) bound as vec4 of words.
 */
function halfRowSnippet(name: string, array: string, width: string, rowOf: string): string {
  return `
      fn ${name}(r : i32, c : i32) -> vec4<u32> {
        return bitcast<vec4<u32>>(${array}[(${rowOf} * ${width} + c) >> 3u]);
      }`;
}

/**
 * WGSL: `fn loadW4(wBase : i32, n : i32, k : i32) -> vec4<f32>`, the 4 weight elements from
 * j = n·sN + k·sK on (j a multiple of 4): one vec4<f32>, or one vec2<u32> of 4 packed halves
 * decoded as packedHalfSnippet does (bf16: the high half of an f32; f16: unpack2x16float).
 * `eight` (staging 'vec8'): `fn loadW8(wBase, n, k) -> vec4<u32>` instead, the 8 packed halves
 * from j (a multiple of 8) as one 16-byte load, and `halves4` to decode each pair of words.
 */
function weightQuadSnippet(packed: PackedWeightSpec | undefined, eight = false): string {
  if (packed === undefined) {
    return `
      fn loadW4(wBase : i32, n : i32, k : i32) -> vec4<f32> {
        return W[(wBase + n * uniforms.sN + k * uniforms.sK) / 4];
      }`;
  }
  const decode = packed.kind === 'bf16'
    ? 'vec4<f32>(bitcast<f32>(w.x << 16u), bitcast<f32>(w.x & 0xffff0000u), bitcast<f32>(w.y << 16u), bitcast<f32>(w.y & 0xffff0000u))'
    : 'vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y))';
  const halves4 = `
      fn halves4(w : vec2<u32>) -> vec4<f32> {
        return ${decode};
      }`;
  if (eight) {
    return `${halves4}
      fn loadW8(wBase : i32, n : i32, k : i32) -> vec4<u32> {
        return bitcast<vec4<u32>>(W[(wBase + (n * uniforms.sN + k * uniforms.sK) / 2) / 4]);
      }`;
  }
  return `${halves4}
      fn loadW4(wBase : i32, n : i32, k : i32) -> vec4<f32> {
        return halves4(bitcast<vec2<u32>>(W[(wBase + (n * uniforms.sN + k * uniforms.sK) / 2) / 2]));
      }`;
}

/**
 * An operand staged in runs of 4 (or 8) consecutive elements: `count` runs of the slab over the
 * workgroup's invocations, unrolled; `quad` declares the run's coordinates from q, `value` gives
 * its elements as vec4<f32> expressions, one per 4 (branch-free: indices clamped, then select;
 * they may use what `prelude` declares), `at` and `step` where its halves go in `slab`. `fetch`
 * loads a slab into registers (vec4<f16>), `store` writes them to the slab:
 * v7 declares the registers inside the K loop and fetches and stores in the same step (every
 * operand's loads issued before the first store, nothing live across the products); v6 keeps them
 * across the products, fetching the next slab while the current one multiplies.
 */
class QuadStaging {
  readonly perInvocation: number;
  private readonly quadsPerRun: number;
  constructor(private readonly reg: string, private readonly slab: string, count: number, private readonly threads: number,
      private readonly quad: string, private readonly value: (k0: string) => string[],
      private readonly at: string, private readonly step: number, private readonly prelude: (k0: string) => string = () => '') {
    if (count % threads !== 0) throw new Error(`QuadStaging: ${count} quads are not whole steps of ${threads} invocations`);
    this.perInvocation = count / threads;
    this.quadsPerRun = value('0').length;
  }

  private each(body: (t: number) => string): string {
    return Array.from({ length: this.perInvocation }, (_, t) => `{
          let q = localIndex + ${t * this.threads}u;
          ${body(t)}
        }`).join('\n        ');
  }

  /** run t's h-th 4 elements: `${reg}${t}` (runs of 4), `${reg}${t}_${h}` (runs of 8) */
  private register(t: number, h: number): string {
    return this.quadsPerRun === 1 ? `${this.reg}${t}` : `${this.reg}${t}_${h}`;
  }

  declarations(): string {
    return Array.from({ length: this.perInvocation * this.quadsPerRun },
        (_, i) => `var ${this.register(Math.floor(i / this.quadsPerRun), i % this.quadsPerRun)} : vec4<f16>;`).join(' ');
  }

  /** the slab from k0 (i32) into the registers */
  fetch(k0: string): string {
    return this.each(t => `${this.quad}
          ${this.prelude(k0)}
          ${this.value(k0).map((v, h) => `${this.register(t, h)} = vec4<f16>(${v});`).join('\n          ')}`);
  }

  /** the registers into the slab */
  store(): string {
    const s = this.step;
    return this.each(t => `${this.quad}
          let d = ${this.at};
          ${Array.from({ length: 4 * this.quadsPerRun }, (_, c) =>
            `${this.slab}[d + ${c * s}u] = ${this.register(t, Math.floor(c / 4))}.${'xyzw'[c % 4]};`).join('\n          ')}`);
  }
}

/**
 * WGSL of one K loop over slabs `depth` deep from `begin` (v7 only) up to `end` (both
 * workgroup-uniform). v7 (`prefetch`
 * false): each step loads every quad operand's slab into registers and stores them to workgroup
 * memory (and stages the element operands), barrier, multiplies, barrier. v6: each step stores
 * the quad operands' registers (and stages the element operands in place), barrier, fetches the
 * next slab's quads into the registers, multiplies, barrier.
 */
function slabLoop(index: string, end: string, depth: number, quads: QuadStaging[], elementStaging: string[], multiply: string,
    prefetch: boolean, begin = '0'): string {
  if (begin !== '0' && prefetch) throw new Error(`slabLoop: a loop from ${begin} has no register prefetch`);
  if (quads.length === 0 || !prefetch) {
    // v7-a/b's order: every load of the slab, then every store
    return `for (var ${index} = ${begin}; ${index} < ${end}; ${index} += ${depth}) {
          ${quads.map(q => q.declarations()).join('\n          ')}
          ${quads.map(q => q.fetch(index)).join('\n          ')}
          ${quads.map(q => q.store()).join('\n          ')}
          ${elementStaging.join('\n          ')}
          workgroupBarrier();
          ${multiply}
          workgroupBarrier();
        }`;
  }
  return `${quads.map(q => q.declarations()).join('\n        ')}
        if (${end} > 0) {
          ${quads.map(q => q.fetch('0')).join('\n          ')}
        }
        for (var ${index} = 0; ${index} < ${end}; ${index} += ${depth}) {
          ${quads.map(q => q.store()).join('\n          ')}
          ${elementStaging.join('\n          ')}
          workgroupBarrier();
          let next = ${index} + ${depth};
          if (next < ${end}) {
            ${quads.map(q => q.fetch('next')).join('\n            ')}
          }
          ${multiply}
          workgroupBarrier();
        }`;
}

/**
 * WGSL (v6, after the row sources and the block's expert are published): each rowSrc entry that is
 * a source row becomes that row's first vec4 in A (the row times `rowLength`, an i32 expression, / 4);
 * −1 (padding) stays. Each invocation rewrites the entries it would have written, then a barrier.
 */
function rowQuadOffsets(rows: number, threads: number, rowLength: string): string {
  // the same steps in every invocation, as before every matrix operation
  return `for (var step = 0u; step < ${Math.ceil(rows / threads)}u; step++) {
          let m = localIndex + step * ${threads}u;
          if (m < ${rows}u) {
            let src = rowSrc[m];
            rowSrc[m] = select(-1, src * ((${rowLength}) >> 2u), src >= 0);
          }
        }
        workgroupBarrier();`;
}

/** The inputs' components for tfjs's declarations: vec4 (a vec2 of words for a packed weight) where staged in quads. */
function components(names: string[], quadded: Record<string, number>): number[] {
  return names.map(n => quadded[n] ?? 1);
}

/**
 * GroupedMatMulProgram's product (its spec without the register tile) on subgroup matrices;
 * `scaled` adds the input `amax` (see the file comment). The plan's row tile must be a multiple
   * of the block's rows (subgroupBlockRowsFor), so that a block never spans two experts. With `singleGroup` (a dense
   * projection, MoEDenseMatMul / MoEPackedDenseMatMul): no plan inputs, rows straight from A, any
   * row count, as in GroupedMatMulProgram. With `uniformGroups` (MoEBatchProduct): no plan inputs,
   * rows straight from A, group b of every G rows (SubgroupMatMulSpec).
 */
export class SubgroupMatrixMatMulProgram implements WebGPUProgram {
  variableNames: string[];
  variableComponents: number[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0], y: [1] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number];
  uniforms: string;
  private readonly spec: SubgroupMatMulSpec;
  private readonly staging: SubgroupStaging;
  private readonly layout: SlabLayout;

  /**
   * out [capacity, outCols]; capacity a multiple of `blockRows`. `staging`: matMulStaging of the
   * product's shape and strides (per element when absent); `blockRows`: subgroupBlockRowsFor of
   * the plan's row tile.
   */
  constructor(capacity: number, outCols: number, spec: SubgroupMatMulSpec,
      subgroupSize: number, staging: SubgroupStaging = ELEMENT_STAGING, blockRows: SubgroupBlockRows = SUBGROUP_MATRIX_BLOCK.rows,
      splits = 1) {
    this.spec = spec;
    if (spec.splitK ? !(spec.singleGroup && !spec.hasBias && !spec.hasAddend && !spec.loraTail && !staging.registerPrefetch) : splits !== 1) {
      throw new Error('SubgroupMatrixMatMulProgram: split K takes one group with nothing added and no register prefetch, and only it ' +
          `takes splits other than 1, but got splitK ${spec.splitK === true}, singleGroup ${spec.singleGroup === true}, bias ${spec.hasBias}, ` +
          `addend ${spec.hasAddend}, loraTail ${spec.loraTail === true}, registerPrefetch ${staging.registerPrefetch === true}, splits ${splits}`);
    }
    if (!Number.isInteger(splits) || splits < 1 || splits > 65535) {
      throw new Error(`SubgroupMatrixMatMulProgram: splits must be an integer in [1, 65535] but got ${splits}`);
    }
    if (spec.uniformGroups && (spec.singleGroup || spec.source !== 'rows')) {
      throw new Error(`SubgroupMatrixMatMulProgram: uniform groups read A as rows, one group per G rows, but got source '${spec.source}'` +
          `${spec.singleGroup ? ' and singleGroup' : ''}`);
    }
    this.staging = staging;
    // v7: a weight stored [out, in] goes to a column-major Bs (its k-runs on consecutive halves)
    this.layout = matMulLayout(blockRows, spec.kContiguous && !staging.registerPrefetch);
    if (staging.right !== 'element' && spec.packedWeight !== undefined && spec.packedWeight.layout !== null) {
      throw new Error(`SubgroupMatrixMatMulProgram: ${spec.packedWeight.kind} weights are staged per element, not in quads`);
    }
    if (staging.left === 'half8' && (spec.source === 'act' || staging.registerPrefetch || staging.v6 === undefined)) {
      throw new Error('SubgroupMatrixMatMulProgram: an f16 left operand (staging \'half8\') is read as rows or gathered rows ' +
          `with v6's row offsets and no register prefetch, but got source '${spec.source}', ` +
          `registerPrefetch ${staging.registerPrefetch === true}, v6 ${staging.v6 !== undefined}`);
    }
    if (spec.loraTail && (spec.uniformGroups || staging.registerPrefetch)) {
      throw new Error('SubgroupMatrixMatMulProgram: a LoRA tail is added to a planned or single-group product with no register ' +
          `prefetch, but got uniformGroups ${spec.uniformGroups === true}, registerPrefetch ${staging.registerPrefetch === true}`);
    }
    if (staging.right === 'half8') {
      throw new Error('SubgroupMatrixMatMulProgram: W is staged per element or in runs of 4 or 8 packed halves, not as f16 rows');
    }
    if (staging.right === 'vec8' && (spec.packedWeight === undefined || !spec.kContiguous || staging.registerPrefetch)) {
      throw new Error('SubgroupMatrixMatMulProgram: 8-element runs of W need a packed 16-bit weight contiguous along k ' +
          `and no register prefetch, but got ${spec.packedWeight?.kind ?? 'float32'}, kContiguous ${spec.kContiguous}, ` +
          `registerPrefetch ${staging.registerPrefetch === true}`);
    }
    this.outputShape = [splits * capacity, outCols];
    this.workgroupSize = [SUBGROUPS * subgroupSize, 1, 1];
    this.dispatch = subgroupMatrixDispatch(capacity, outCols, splits, blockRows);
    this.uniforms = GROUPED_MATMUL_UNIFORMS + (spec.uniformGroups ? GROUP_ROWS_UNIFORM : '') + (spec.loraTail ? LORA_TAIL_UNIFORMS : '') +
        (spec.splitK ? SPLIT_K_UNIFORM : '');
    const planned = !spec.singleGroup && !spec.uniformGroups;
    this.variableNames = ['A', 'W', ...(planned ? ['seg', 'pr'] : []), ...(spec.hasBias ? ['bias'] : []),
      ...(spec.hasAddend ? ['addend'] : []), ...(spec.scaled ? ['amax'] : []), ...(spec.loraTail ? ['tailA', 'tailW'] : [])];
    this.variableComponents = components(this.variableNames, {
      // 'half8': 8 halves, 4 words, 16 bytes
      ...(staging.left !== 'element' ? { A: 4 } : {}),
      ...(staging.right === 'vec4' ? { W: spec.packedWeight ? 2 : 4 } : {}),
      // 8 packed halves: 4 words, 16 bytes
      ...(staging.right === 'vec8' ? { W: 4 } : {}),
    });
    this.shaderKey = `moeSubgroupMatMul_${spec.source}_${activationKey(spec.source === 'act' ? spec.activation : undefined)}_` +
        `${spec.hasBias ? 'b' : ''}${spec.hasAddend ? 'a' : ''}${spec.scaled ? 's' : ''}${spec.kContiguous ? 'k' : 'n'}_` +
        `${subgroupSize}${spec.packedWeight ? `_${packedWeightKey(spec.packedWeight)}` : ''}_${stagingKey(staging)}_r${blockRows}` +
        (spec.singleGroup ? '_single' : '') + (spec.uniformGroups ? '_uniformGroups' : '') + (spec.loraTail ? '_loraTail' : '') +
        (spec.splitK ? '_splitK' : '');
  }

  /**
   * WGSL: the block's group into tileExpert and its rows' sources into rowSrc: from the plan, or
   * with one group or uniform groups straight from A (a uniform group's block lies inside one group:
   * G is a multiple of the block's rows, which the caller checks).
   */
  private rowsSnippet(rows: number, threads: number): string {
    if (this.spec.uniformGroups) return singleGroupRowsSnippet(rows, threads, true, 'row0 / uniforms.groupRows');
    if (this.spec.singleGroup) return singleGroupRowsSnippet(rows, threads, true);
    return tileRowsSnippet(this.spec.source, rows, threads, true);
  }

  getUserCode(): string {
    const layout = this.layout;
    const { rows, cols, depth } = layout;
    const threads = this.workgroupSize[0];
    const subgroupSize = threads / SUBGROUPS;
    const halfA = this.staging.left === 'half8';
    const quadA = this.staging.left !== 'element';
    const quadW = this.staging.right !== 'element';
    const eightW = this.staging.right === 'vec8';
    const prefetch = this.staging.registerPrefetch === true;
    const loadW = weightLoadSnippet(this.spec.packedWeight);
    const x = wgslU32;
    const a = stagedElementA(x, layout, 'i');
    // B's staging walks k fastest for an [out, in] weight (coalesced reads), n fastest otherwise
    const b = stagedElementB(x, layout, 'i', this.spec.kContiguous);
    const qa = stagedQuadA(x, layout, 'q', halfA ? 8 : 4);
    const widthW = eightW ? 8 : 4;
    const qb = stagedQuadB(x, layout, 'q', this.spec.kContiguous, widthW);
    const direct = this.staging.v6 !== undefined && !this.spec.hasBias && !this.spec.hasAddend;
    const activation = this.spec.source === 'act' ? this.spec.activation : undefined;
    const v6 = this.staging.v6;
    // split K: where this workgroup's slice of the result starts (the other programs' WGSL as it was)
    const slice = (offset: string) => (this.spec.splitK ? offset : '');
    const quads: QuadStaging[] = [];
    const elements: string[] = [];
    if (halfA) {
      // 8 halves per 16-byte load from the row's first vec4 (rowQuadOffsets), staged as they are: the
      // conversion pass applied the activation and the scale; padding rows and the K tail give 0
      const inRange = (k0: string) => `rowSrc[mm] >= 0${v6!.whole.depth ? '' : ` && ${k0} + i32(kk) < uniforms.inner`}`;
      quads.push(new QuadStaging('ra', 'As', rows * depth / 8, threads, `let mm = ${qa.m}; let kk = ${qa.k};`,
          k0 => ['a.xy', 'a.zw'].map(h => `select(vec4<f16>(), halfQuad(${h}), ${inRange(k0)})`), qa.at, qa.step,
          k0 => `let a = loadA8(max(rowSrc[mm], 0), ${v6!.whole.depth ? `${k0} + i32(kk)` : `min(${k0} + i32(kk), uniforms.inner - 8)`});`));
    } else if (quadA && v6 !== undefined) {
      // rowSrc holds each row's first vec4 (rowQuadOffsets) or −1: one workgroup read and an add per quad
      const value = v6.whole.depth
        ? (k0: string) => [`select(vec4<f32>(0.0), loadA4(max(rowSrc[mm], 0), ${k0} + i32(kk)) * s, rowSrc[mm] >= 0)`]
        : (k0: string) => [`select(vec4<f32>(0.0), loadA4(max(rowSrc[mm], 0), min(${k0} + i32(kk), uniforms.inner - 4)) * s, ` +
            `rowSrc[mm] >= 0 && ${k0} + i32(kk) < uniforms.inner)`];
      quads.push(new QuadStaging('ra', 'As', rows * depth / 4, threads, `let mm = ${qa.m}; let kk = ${qa.k};`, value, qa.at, qa.step));
    } else if (quadA) {
      // the row's source once per 4 elements; padding rows and the K tail (whole quads: inner % 4 == 0) give 0
      quads.push(new QuadStaging('ra', 'As', rows * depth / 4, threads, `let mm = ${qa.m}; let kk = ${qa.k};`,
          k0 => [`select(vec4<f32>(0.0), loadA4(max(rowSrc[mm], 0), min(${k0} + i32(kk), uniforms.inner - 4)) * s, ` +
              `rowSrc[mm] >= 0 && ${k0} + i32(kk) < uniforms.inner)`], qa.at, qa.step));
    } else {
      elements.push(stage('As', rows * depth, threads, `let mm = ${a.m}; let kk = ${a.k};`,
          'let kAt = k0 + i32(kk);\n' +
          '            let a = loadA(i32(mm), min(kAt, uniforms.inner - 1)) * s;\n' +
          '            v = select(0.0, a, kAt < uniforms.inner);',
          aIndex(x, layout, 'mm', 'kk')));
    }
    const runW = `let kk = ${qb.k}; let nn = ${qb.n};`;
    const wholeW = v6 !== undefined && v6.whole.depth && v6.whole.cols;
    if (eightW) {
      // 16-byte loads of 8 packed halves along k (matMulStaging: whole runs); clamped into range and 0 past the edges unless whole
      const inRange = (k0: string) => `col0 + i32(nn) < uniforms.outCols && ${k0} + i32(kk) < uniforms.inner`;
      quads.push(new QuadStaging('rb', 'Bs', depth * cols / 8, threads, runW,
          k0 => ['w.xy', 'w.zw'].map(h => (wholeW ? `halves4(${h})` : `select(vec4<f32>(0.0), halves4(${h}), ${inRange(k0)})`)),
          qb.at, qb.step,
          k0 => (wholeW ? `let w = loadW8(wBase, col0 + i32(nn), ${k0} + i32(kk));`
            : `let w = loadW8(wBase, min(col0 + i32(nn), uniforms.outCols - 1), min(${k0} + i32(kk), uniforms.inner - 8));`)));
    } else if (quadW && wholeW) {
      // whole blocks: every quad in range
      quads.push(new QuadStaging('rb', 'Bs', depth * cols / 4, threads, runW,
          k0 => [`loadW4(wBase, col0 + i32(nn), ${k0} + i32(kk))`], qb.at, qb.step));
    } else if (quadW) {
      // quads along the weight's contiguous direction, whole (matMulStaging): clamped into range, then 0 past the edges
      const [nMax, kMax] = this.spec.kContiguous ? ['uniforms.outCols - 1', 'uniforms.inner - 4'] : ['uniforms.outCols - 4', 'uniforms.inner - 1'];
      quads.push(new QuadStaging('rb', 'Bs', depth * cols / 4, threads, runW,
          k0 => [`select(vec4<f32>(0.0), loadW4(wBase, min(col0 + i32(nn), ${nMax}), min(${k0} + i32(kk), ${kMax})), ` +
              `col0 + i32(nn) < uniforms.outCols && ${k0} + i32(kk) < uniforms.inner)`], qb.at, qb.step));
    } else {
      elements.push(stage('Bs', depth * cols, threads, `let kk = ${b.k}; let nn = ${b.n};`,
          'let kAt = k0 + i32(kk);\n            let nAt = col0 + i32(nn);\n' +
          '            let k = min(kAt, uniforms.inner - 1);\n            let n = min(nAt, uniforms.outCols - 1);\n' +
          `            ${loadW.assign}\n` +
          '            v = select(0.0, v, nAt < uniforms.outCols && kAt < uniforms.inner);',
          bIndex(x, layout, 'kk', 'nn')));
    }
    return `
      ${ENABLES}
      ${workgroupArrays(layout)}
      var<workgroup> rowSrc : array<i32, ${rowInts(rows)}>;
      ${this.spec.singleGroup || this.spec.uniformGroups ? '' : EXPERT_OF_ROW}
      ${halfA ? HALF_ROW_SNIPPET
        : quadA ? (v6 !== undefined ? rowQuadAtSnippet('loadA4', 'A', 'uniforms.inner', activation) : rowQuadSnippet('loadA4', 'A', 'uniforms.inner', activation))
        : rowLoadSnippet(this.spec.source, this.spec.activation)}
      ${quadW ? weightQuadSnippet(this.spec.packedWeight, eightW) : loadW.fn}
      ${this.spec.scaled ? OPERAND_SCALE : ''}

      fn main() {
        let lid = i32(localIndex);
        let col0 = i32(workgroupId.x) * ${cols};
        let row0 = i32(workgroupId.y) * ${rows};
        ${subgroupPart(layout, subgroupSize)}
        let s = ${this.spec.scaled ? 'operandScale()' : '1.0'};
        ${this.rowsSnippet(rows, threads)
          .replace(/\btileExpert\b/g, `rowSrc[${rows}]`)}
        ${direct ? `// v6: whether this block stores straight to the output (published with e: the same for the whole
        // workgroup by construction, as the barriers of the other epilogue need)
        if (lid == 0) {
          rowSrc[${rows + 1}] = select(0, 1, row0 + ${rows} <= uniforms.numRows && col0 + ${cols} <= uniforms.outCols${directScale(this.staging).condition});
        }` : ''}
        let e = workgroupUniformLoad(&rowSrc[${rows}]);
        ${direct ? `let direct = workgroupUniformLoad(&rowSrc[${rows + 1}]) == 1;` : ''}
        ${declareAccumulators(layout)}
        // a block past the rows in use (e < 0) runs no step: a loop bound that is the same for the
        // whole workgroup (e comes from workgroupUniformLoad) rather than a branch around the
        // matrix operations
        ${this.spec.splitK ? `// split K: this workgroup's k range and its slice of the result
        let kBegin = i32(workgroupId.z) * uniforms.kChunk;
        let kEnd = select(0, min(kBegin + uniforms.kChunk, uniforms.inner), e >= 0);
        let outBase = i32(workgroupId.z) * uniforms.numRows * uniforms.outCols;` : 'let kEnd = select(0, uniforms.inner, e >= 0);'}
        let wBase = max(e, 0) * uniforms.sE;
        ${quadA && v6 !== undefined ? rowQuadOffsets(rows, threads, halfA ? 'uniforms.inner / 2' : activation === undefined ? 'uniforms.inner' : '2 * uniforms.inner') : ''}
        ${slabLoop('k0', 'kEnd', depth, quads, elements, multiplySlab(layout, 'partRow', 'partCol'), prefetch, this.spec.splitK ? 'kBegin' : '0')}
        ${this.spec.loraTail ? loraTailStep(layout, threads) : ''}
        let unscale = uniforms.alpha / s;
        ${direct ? `// v6: a block fully in range with nothing to add stores its matrices straight to the output (padding
        // rows are 0 there: their A quads were staged as 0); the slots and lanes otherwise
        if (direct) {
          ${directStores(layout, (i, j) => `${slice('u32(outBase) + ')}(u32(row0) + partRow + ${16 * i}u) * u32(uniforms.outCols) + u32(col0) + partCol + ${16 * j}u`,
              'u32(uniforms.outCols)', directScale(this.staging).scale)}
        } else {` : ''}
        ${epilogueThroughSlots(layout, 'subgroup', 'lane', subgroupSize, 'partRow', 'partCol', (m, n, v) => `{
          let m = ${m};
          let r = row0 + i32(m);
          let c = col0 + i32(${n});
          // the store is the only branch: no subgroup-wide operation inside, and padding rows and
          // blocks past the rows in use get 0 by select
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = unscale * ${v};
            ${this.spec.hasBias ? 'v += bias[max(e, 0) * uniforms.outCols + c];' : ''}
            ${this.spec.hasAddend ? 'v += addend[r * uniforms.outCols + c];' : ''}
            result[${slice('outBase + ')}r * uniforms.outCols + c] = select(0.0, v, e >= 0 && rowSrc[m] >= 0);
          }
        }`)}
        ${direct ? '}' : ''}
      }
    `;
  }
}

/**
 * GroupedWeightGradProgram's product on subgroup matrices: per expert, dW(p, q) = alpha·Σ_r
 * L(r, p)·R(r, q) over its real rows, 64 rows of the reduction per pair of staged slabs; `scaled`
 * scales L (the gradient operand) by `amax` as above.
 */
export class SubgroupMatrixWeightGradProgram implements WebGPUProgram {
  variableNames: string[];
  variableComponents: number[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0], y: [1], z: [2] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number];
  uniforms: string;
  private readonly spec: SubgroupWeightGradSpec;
  private readonly staging: SubgroupStaging;
  private readonly layout: SlabLayout;

  /**
   * `staging`: weightGradStaging of P and Q (per element when absent); `depth`: the rows of the
   * reduction per staged slab, weightGradDepthFor of the plan's row tile (of G with uniformGroups).
   * `numExperts`: the groups (the batch with uniformGroups).
   */
  constructor(outputShape: number[], numExperts: number, P: number, Q: number, spec: SubgroupWeightGradSpec, subgroupSize: number,
      staging: SubgroupStaging = ELEMENT_STAGING, depth: 32 | 64 = 64) {
    this.spec = spec;
    this.staging = staging;
    this.layout = weightGradLayout(depth);
    if (staging.right === 'vec8') throw new Error('SubgroupMatrixWeightGradProgram: R is staged per element or in runs of 4, not 8');
    const halfL = staging.left === 'half8';
    const halfR = staging.right === 'half8';
    // the conversion pass applied the activation and the routing weight: the halves are plain rows
    if ((halfL && (spec.scaleLeft || P % 8 !== 0)) || (halfR && (spec.right === 'act' || Q % 8 !== 0)) ||
        ((halfL || halfR) && (staging.registerPrefetch || spec.uniformGroups))) {
      throw new Error('SubgroupMatrixWeightGradProgram: f16 operands (staging \'half8\') are rows or gathered rows whose length is a ' +
          'multiple of 8, with no row scale, register prefetch or uniform groups, but got ' +
          `left ${staging.left} (P ${P}, scaleLeft ${spec.scaleLeft}), right ${staging.right} ('${spec.right}', Q ${Q}), ` +
          `registerPrefetch ${staging.registerPrefetch === true}, uniformGroups ${spec.uniformGroups === true}`);
    }
    if (spec.scaledRight && !spec.scaled) throw new Error('SubgroupMatrixWeightGradProgram: scaledRight needs scaled (the amax input)');
    if (spec.uniformGroups && (spec.left !== 'rows' || spec.right !== 'rows' || spec.scaleLeft)) {
      throw new Error('SubgroupMatrixWeightGradProgram: uniform groups read L and R as rows with no row scale, but got ' +
          `left '${spec.left}', right '${spec.right}', scaleLeft ${spec.scaleLeft}`);
    }
    this.outputShape = outputShape;
    this.workgroupSize = [SUBGROUPS * subgroupSize, 1, 1];
    this.dispatch = subgroupMatrixDispatch(P, Q, numExperts);
    this.uniforms = 'P : i32, Q : i32, topK : i32, numExperts : i32, oE : i32, oP : i32, oQ : i32, alpha : f32, ' +
        ACTIVATION_UNIFORMS + (spec.uniformGroups ? GROUP_ROWS_UNIFORM : '');
    this.variableNames = ['L', 'R', ...(spec.uniformGroups ? [] : ['seg']), ...(usesPairOfRow(spec) ? ['pr'] : []),
      ...(spec.scaleLeft ? ['rw'] : []), ...(spec.scaled ? ['amax'] : [])];
    // 'half8': 8 halves, 4 words, 16 bytes
    this.variableComponents = components(this.variableNames, {
      ...(staging.left !== 'element' ? { L: 4 } : {}), ...(staging.right !== 'element' ? { R: 4 } : {}),
    });
    this.shaderKey = `moeSubgroupWeightGrad_${spec.left}_${spec.right}_${activationKey(spec.right === 'act' ? spec.activation : undefined)}_` +
        `${spec.scaleLeft ? 's' : ''}${spec.scaled ? (spec.scaledRight ? 'xr' : 'x') : ''}_${subgroupSize}_${outputShape.length}_` +
        `${stagingKey(staging)}_d${depth}${spec.uniformGroups ? '_uniformGroups' : ''}`;
  }

  getUserCode(): string {
    const layout = this.layout;
    const { rows, cols, depth } = layout;
    const threads = this.workgroupSize[0];
    const subgroupSize = threads / SUBGROUPS;
    const quadL = this.staging.left === 'vec4';
    const quadR = this.staging.right === 'vec4';
    const halfL = this.staging.left === 'half8';
    const halfR = this.staging.right === 'half8';
    const { loadL, loadR } = weightGradLoadSnippets(this.spec);
    const x = wgslU32;
    // As holds Lᵀ column-major: its element (p, r) is L(r0 + r, p0 + p), walked p fastest
    const a = stagedElementA(x, layout, 'i');
    const b = stagedElementB(x, layout, 'i', false);
    const qa = stagedQuadA(x, layout, 'q', halfL ? 8 : 4);
    const qb = stagedQuadB(x, layout, 'q', false, halfR ? 8 : 4);
    const gathered = (side: 'gather' | RowSource) => (side === 'gather' ? '(pr[r] / uniforms.topK)' : 'r');
    const whole = this.staging.v6?.whole;
    // the operand scaled into f16's range by s (1 unless scaled): L, or R with scaledRight
    const sL = this.spec.scaledRight ? '' : ' * s';
    const sR = this.spec.scaledRight ? ' * s' : '';
    const quads: QuadStaging[] = [];
    const elements: string[] = [];
    // f16 rows (L into As, R into Bs, 128 × depth each): 8 halves per 16-byte load of row `rr`'s column
    // `col`, staged as they are (the pass applied the scale); rows past the expert's count, and
    // columns past `edge` (a block that is not whole), give 0
    const halfRun = (reg: 'ra' | 'rb', load: string, coords: string, at: string, step: number, col: string, edge: string | undefined) => {
      const inRange = (r0: string) => `${r0} + i32(rr) < count${edge === undefined ? '' : ` && ${col} < ${edge}`}`;
      return new QuadStaging(reg, reg === 'ra' ? 'As' : 'Bs', rows * depth / 8, threads, coords,
          r0 => ['h.xy', 'h.zw'].map(w => `select(vec4<f16>(), halfQuad(${w}), ${inRange(r0)})`), at, step,
          r0 => `let h = ${load}(start + min(${r0} + i32(rr), count - 1), ${edge === undefined ? col : `min(${col}, ${edge} - 8)`});`);
    };
    if (halfL) {
      quads.push(halfRun('ra', 'loadL8', `let pp = ${qa.m}; let rr = ${qa.k};`, qa.at, qa.step, 'p0 + i32(pp)',
          whole?.rows ? undefined : 'uniforms.P'));
    } else if (quadL && whole?.rows) {
      // v6, P whole blocks: only the reduction's end is checked
      quads.push(new QuadStaging('ra', 'As', rows * depth / 4, threads, `let pp = ${qa.m}; let rr = ${qa.k};`,
          r0 => [`select(vec4<f32>(0.0), loadL4(start + min(${r0} + i32(rr), count - 1), p0 + i32(pp))${sL}, ${r0} + i32(rr) < count)`],
          qa.at, qa.step));
    } else if (quadL) {
      // whole quads along p (P % 4 == 0); rows past the expert's count give 0
      quads.push(new QuadStaging('ra', 'As', rows * depth / 4, threads, `let pp = ${qa.m}; let rr = ${qa.k};`,
          r0 => [`select(vec4<f32>(0.0), loadL4(start + min(${r0} + i32(rr), count - 1), min(p0 + i32(pp), uniforms.P - 4))${sL}, ` +
              `p0 + i32(pp) < uniforms.P && ${r0} + i32(rr) < count)`], qa.at, qa.step));
    } else {
      elements.push(stage('As', rows * depth, threads, `let pp = ${a.m}; let rr = ${a.k};`,
          'let p = p0 + i32(pp);\n            let r = r0 + i32(rr);\n' +
          `            let l = loadL(start + min(r, count - 1), min(p, uniforms.P - 1))${sL};\n` +
          '            v = select(0.0, l, p < uniforms.P && r < count);',
          aIndex(x, layout, 'pp', 'rr')));
    }
    if (halfR) {
      quads.push(halfRun('rb', 'loadR8', `let rr = ${qb.k}; let qq = ${qb.n};`, qb.at, qb.step, 'q0 + i32(qq)',
          whole?.cols ? undefined : 'uniforms.Q'));
    } else if (quadR && whole?.cols) {
      quads.push(new QuadStaging('rb', 'Bs', depth * cols / 4, threads, `let rr = ${qb.k}; let qq = ${qb.n};`,
          r0 => [`select(vec4<f32>(0.0), loadR4(start + min(${r0} + i32(rr), count - 1), q0 + i32(qq))${sR}, ${r0} + i32(rr) < count)`],
          qb.at, qb.step));
    } else if (quadR) {
      quads.push(new QuadStaging('rb', 'Bs', depth * cols / 4, threads, `let rr = ${qb.k}; let qq = ${qb.n};`,
          r0 => [`select(vec4<f32>(0.0), loadR4(start + min(${r0} + i32(rr), count - 1), min(q0 + i32(qq), uniforms.Q - 4))${sR}, ` +
              `q0 + i32(qq) < uniforms.Q && ${r0} + i32(rr) < count)`], qb.at, qb.step));
    } else {
      elements.push(stage('Bs', depth * cols, threads, `let rr = ${b.k}; let qq = ${b.n};`,
          'let q = q0 + i32(qq);\n            let r = r0 + i32(rr);\n' +
          `            let rv = loadR(start + min(r, count - 1), min(q, uniforms.Q - 1))${sR};\n` +
          '            v = select(0.0, rv, q < uniforms.Q && r < count);',
          bIndex(x, layout, 'rr', 'qq')));
    }
    const right = this.spec.right;
    return `
      ${ENABLES}
      ${workgroupArrays(layout)}
      var<workgroup> segment : array<i32, 4>;
      ${halfL ? halfRowSnippet('loadL8', 'L', 'uniforms.P', gathered(this.spec.left))
        : quadL ? rowQuadSnippet('loadL4', 'L', 'uniforms.P', undefined, gathered(this.spec.left), this.spec.scaleLeft ? ' * rw[pr[r]]' : '') : loadL}
      ${halfR ? halfRowSnippet('loadR8', 'R', 'uniforms.Q', gathered(right))
        : quadR ? rowQuadSnippet('loadR4', 'R', 'uniforms.Q', right === 'act' ? this.spec.activation : undefined, gathered(right)) : loadR}
      ${halfL || halfR ? HALF_QUAD_SNIPPET : ''}
      ${this.spec.scaled ? OPERAND_SCALE : ''}

      fn main() {
        let lid = i32(localIndex);
        let e = i32(workgroupId.z);
        let q0 = i32(workgroupId.x) * ${cols};
        let p0 = i32(workgroupId.y) * ${rows};
        ${subgroupPart(layout, subgroupSize)}
        let s = ${this.spec.scaled ? 'operandScale()' : '1.0'};
        if (lid == 0) {
          ${this.spec.uniformGroups ? `// uniform groups: group e is rows e·G .. e·G + G − 1
          segment[0] = e * uniforms.groupRows;
          segment[1] = uniforms.groupRows;` : `segment[0] = seg[e];
          segment[1] = seg[uniforms.numExperts + 1 + e];`}
          ${whole !== undefined ? `// v6: a block fully in range of a row-major dW with no scale stores straight to the output
          segment[2] = select(0, 1, p0 + ${rows} <= uniforms.P && q0 + ${cols} <= uniforms.Q && uniforms.oQ == 1${directScale(this.staging).condition});` : ''}
        }
        let start = workgroupUniformLoad(&segment[0]);
        let count = workgroupUniformLoad(&segment[1]);
        ${whole !== undefined ? 'let direct = workgroupUniformLoad(&segment[2]) == 1;' : ''}
        ${declareAccumulators(layout)}
        ${slabLoop('r0', 'count', depth, quads, elements, multiplySlab(layout, 'partRow', 'partCol'), this.staging.registerPrefetch === true)}
        let unscale = uniforms.alpha / s;
        ${whole !== undefined ? `if (direct) {
          ${directStores(layout, (i, j) => `u32(e * uniforms.oE + p0 * uniforms.oP + q0) + (partRow + ${16 * i}u) * u32(uniforms.oP) + partCol + ${16 * j}u`,
              'u32(uniforms.oP)', directScale(this.staging).scale)}
        } else {` : ''}
        ${epilogueThroughSlots(layout, 'subgroup', 'lane', subgroupSize, 'partRow', 'partCol', (m, n, v) => `{
          let p = p0 + i32(${m});
          let q = q0 + i32(${n});
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * ${v};
          }
        }`)}
        ${whole !== undefined ? '}' : ''}
      }
    `;
  }
}
