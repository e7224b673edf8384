/**
 * The MoE kernels for tfjs's 'webgpu' backend (tf.registerKernel configs) and the typed calls
 * that run them. Their names start with 'WebGPUMoE': the composed ops look kernels up by their
 * own names on whatever backend is active, and must not find these. Each kernel builds its program(s) from the attributes and runs them with
 * WebGPUBackend.runWebGPUProgram; sizes travel as uniforms, specialisations in the shader key.
 * No kernel reads anything back to the host, so all of them work inside a layer's synchronous
 * call and inside a customGrad.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { WebGPUBackend } from '@tensorflow/tfjs-backend-webgpu';
import type { ExpertActivation } from '../../ops/types.js';
import { fail } from '../../ops/validate.js';
import { describeValue } from '../../util/describe.js';
import {
  GroupedMatMulProgram, GroupedWeightGradProgram, loraTailEpilogueRank, type TileConfig, usesPairOfRow,
} from './programs/grouped_matmul_program.js';
import {
  NARROW_MAX_COLS, narrowGradChunkRows, type NarrowGradProduct, narrowGradUnitRows, NarrowGroupedMatMulProgram,
  narrowRowsPerThread, NarrowWeightGradPairProgram, NarrowWeightGradProgram, type NarrowWeightGradSpec, NarrowWeightGradSumProgram,
} from './programs/narrow_matmul_program.js';
import {
  denseNarrowBlockRows, DenseNarrowMatMulProgram, type DenseNarrowMatMulLayout, type DenseNarrowRowsPerThread,
} from './programs/dense_narrow_matmul_program.js';
import {
  narrowInnerBlockRowsFor, type NarrowInnerBlockRows, NarrowInnerGroupedMatMulProgram,
} from './programs/narrow_inner_matmul_program.js';
import {
  halfOperandFits, LORA_TAIL_MAX_RANK, matMulStaging, SUBGROUP_BLOCK_ROWS, SUBGROUP_MATRIX_BLOCK, type SubgroupBlockRows, subgroupBlockRowsFor, subgroupMatrixDispatch, SubgroupMatrixMatMulProgram, SubgroupMatrixWeightGradProgram,
  type SubgroupStaging, subgroupMatrixWorkgroupBytes, weightGradDepthFor, weightGradStaging,
} from './programs/subgroup_matrix_program.js';
import {
  activeTensorCores, TENSOR_CORES_FLAG, type TensorCoreDevice, tensorCoreDevice, wideEnoughForTensorCores,
} from './tensor_cores.js';
import { ExpertSegmentsProgram, PairOfRowProgram, RowOfPairProgram } from './programs/plan_programs.js';
import {
  ActivationBackwardProgram, CombineRowsProgram, GatherRowsProgram, GroupedColumnSumProgram, PairDotProgram,
} from './programs/row_programs.js';
import { SoftmaxTopKGradProgram, SoftmaxTopKProgram } from './programs/routing_program.js';
import { DecodePackedProgram } from './programs/decode_packed_program.js';
import { HalfOperandProgram } from './programs/half_operand_program.js';
import { MAX_ABS_CODE_EPOCHS, MAX_ABS_THREADS, MaxAbsCodeProgram, MaxAbsProgram } from './programs/max_abs_program.js';
import {
  DECODE_PACKED, type DecodePackedAttrs, type DenseKernelOverride, DENSE_MATMUL, type DenseMatMulAttrs, denseProgramChoice, type ExpertWeightTensor, GATHER_PACKED_ROWS,
  type GatherPackedRowsAttrs, type HalfKind, isPackedExpertWeight, layoutOf, PACKED_DENSE_MATMUL, type PackedDenseMatMulAttrs, type PackedFormat,
  type PackedKind,
} from '../../ops/packed.js';
import { GatherPackedRowsProgram } from './programs/gather_packed_rows_program.js';
import type { PackedWeightSpec } from './programs/shared.js';
import { AdamUpdateProgram } from './programs/adam_program.js';
import { ADAM_UPDATE, type AdamUpdateAttrs } from '../../train/adam_update.js';
import { SUM_OF_SQUARES } from '../../train/sum_of_squares.js';
import { type SumOfSquaresMode, SUM_OF_SQUARES_THREADS, SumOfSquaresProgram } from './programs/sum_of_squares_program.js';
import { addNInputsPerProgram } from './add_n.js';
import { RotaryProgram } from './programs/rotary_program.js';
import { ROTARY, type RotaryAttrs } from '../../ops/rotary.js';
import { RMSNormProgram } from './programs/rms_norm_program.js';
import { RMS_NORM, RMS_NORM_GRAD_X } from '../../ops/rms_norm.js';
import { SOFTMAX_GRAD } from '../../ops/softmax_grad.js';
import { MASKED_SOFTMAX } from '../../ops/masked_softmax.js';
import { MaskedSoftmaxProgram, SoftmaxGradProgram } from './programs/softmax_rows_program.js';
import { SumSlicesProgram } from './programs/sum_slices_program.js';
import { MATMUL_ADD } from '../../ops/matmul_add.js';
import { AttentionProgram, type AttentionDims, type AttentionPass } from './programs/attention_program.js';
import { attentionProgramKind, TiledAttentionProgram, type TiledAttentionPass } from './programs/tiled_attention_program.js';
import {
  SubgroupMatrixAttentionProgram, subgroupMatrixAttentionMisfit, type SubgroupMatrixAttentionPass,
} from './programs/subgroup_matrix_attention_program.js';
import { ATTENTION, ATTENTION_GRAD, type AttentionAttrs, registerTensorCoreAttention } from '../../ops/attention_core.js';
import { ScaledMatMulProgram } from './programs/scaled_matmul_program.js';
import { SCALED_MATMUL, type ScaledMatMulAttrs } from '../../ops/scaled_matmul.js';
import { WEIGHT_GRAD_PRODUCT, WEIGHT_GRAD_PRODUCT_PAIR } from '../../ops/weight_grad_product.js';
import { BATCH_PRODUCT, type BatchProductAttrs } from '../../ops/batch_product.js';
import { installUniformArena } from './uniform_arena.js';
import { installWrittenUploads } from './written_uploads.js';
import { installBindGroupLayoutCache } from './bind_group_layouts.js';
import { installBindGroupCache } from './bind_groups.js';
import {
  narrowGradPairSumBackend, type PairChunks, type PairGradientOut, recordNarrowGradPairSum, WEIGHT_GRAD_PAIRS_FLAG,
} from './weight_grad_pairs.js';

function packedWeightSpec(f: PackedFormat): PackedWeightSpec {
  return { kind: f.kind, cols: f.shape[2], layout: layoutOf(f) };
}
import {
  type ActivationSpec, activationUniforms, floatUniforms, intUniforms, type ProgramUniformEntry, type RowSource,
} from './programs/shared.js';

const BACKEND = 'webgpu';

export type KernelArgs = Parameters<tf.KernelFunc>[0];

function webgpu(args: KernelArgs): WebGPUBackend {
  // a backend made after registerWebGPUMoE gets the arena, the layout and bind group caches and the
  // written uploads here (WeakSet and WeakMap lookups after the first)
  installUniformArena(args.backend);
  installBindGroupLayoutCache(args.backend);
  installBindGroupCache(args.backend);
  installWrittenUploads(args.backend);
  return args.backend as unknown as WebGPUBackend;
}

/**
 * tf.env() flag: a grouped product of at least this many FLOPs submits the commands recorded so
 * far right after it is recorded (default Infinity: never; tfjs submits every
 * WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE (15) dispatches itself). Such submits let the GPU start on a
 * big product while the host records the rest; they helped M1 when its host took 2–3 ms to record
 * a step (2^27 FLOPs then: 6.18 against 6.66 ms, docs/webgpu.md), but since the uniform arena, the
 * layout cache and the written uploads, each submit costs more than it gives: on the H100 (run U2,
 * interleaved in one process) M1 full FT 5.18 → 4.70 ms and split 9.76 → 8.28 ms without them, Q
 * 1–2 % slower; OLMoE's step makes 512 of them (U1: 8246 → 8429 tokens/s without; U3: 6727 → 7256).
 */
export const SUBMIT_FLOPS_FLAG = 'WEBGPU_MOE_SUBMIT_FLOPS';
tf.env().registerFlag(SUBMIT_FLOPS_FLAG, () => Infinity);

/**
 * tf.env() flag: grouped products at most NARROW_MAX_COLS wide (split LoRA's rank-r products
 * u = x·A_eᵀ and s·dy·B_e) run NarrowGroupedMatMulProgram, and weight gradients with P or Q at
 * most that (the LoRA factors' dA_e, dB_e) NarrowWeightGradProgram, which read each row once;
 * products at most that deep (the expansions y += s·u·B_eᵀ, dx += gr·A_e) NarrowInnerGroupedMatMulProgram;
 * with DENSE_NARROW_PRODUCTS_FLAG too (on by default), so do the dense LoRA products of the same
 * ranks (attention's q/k/v/o and the router: MoEScaledMatMul's s·x·Aᵀ, s·dy·B, MoEWeightGradProduct's
 * dA, dB and MoEMatMulAdd's expansions) as one group;
 * false: the generic tiled programs, ScaledMatMulProgram and tfjs's matMul (A/B comparisons,
 * bench/webgpu_lora_products.ts, bench/webgpu_dense_lora_products.ts).
 */
export const NARROW_PRODUCTS_FLAG = 'WEBGPU_MOE_NARROW_PRODUCTS';
tf.env().registerFlag(NARROW_PRODUCTS_FLAG, () => true);

/**
 * tf.env() flag: the dense LoRA products of rank ≤ 16 (see NARROW_PRODUCTS_FLAG; both must be on)
 * on the narrow programs' single-group forms (no plan inputs, nothing uploaded per call). On by
 * default since run U1 (H100, OLMoE's step interleaved in one process: 8528 against 8246 tokens/s,
 * the step GPU-bound; run T: 9 GPU ms a step less). The first version uploaded a one-group plan
 * per call, which stalled the host about 1.7 ms a call (run S: 4933 → 1032 tokens/s).
 */
export const DENSE_NARROW_PRODUCTS_FLAG = 'WEBGPU_MOE_DENSE_NARROW_PRODUCTS';
tf.env().registerFlag(DENSE_NARROW_PRODUCTS_FLAG, () => true);

/**
 * tf.env() flag: the experts' products r wide with W contiguous along k (split LoRA's u = x·A_eᵀ
 * and act(h)·A_eᵀ; NARROW_PRODUCTS_FLAG on) on DenseNarrowMatMulProgram's planned form, lanes
 * splitting each row's k, where its block divides the plan's row tile (groupedNarrowLayoutFor).
 * false: NarrowGroupedMatMulProgram (A/B runs).
 */
export const NARROW_LANE_PRODUCTS_FLAG = 'WEBGPU_MOE_NARROW_LANE_PRODUCTS';
tf.env().registerFlag(NARROW_LANE_PRODUCTS_FLAG, () => true);

/**
 * tf.env() flag: the rows of a subgroup-matrix block for dense products on tensor cores: 128, 64 or
 * 32, or 0 (the default) for denseTensorCoreBlockRows's choice. For end-to-end A/B runs
 * (E2E_TF_FLAGS); the experts' blocks follow their plan's row tile.
 */
export const DENSE_TC_BLOCK_ROWS_FLAG = 'WEBGPU_MOE_DENSE_TC_BLOCK_ROWS';
tf.env().registerFlag(DENSE_TC_BLOCK_ROWS_FLAG, () => 0);

/**
 * tf.env() flag: a MatMul on tensor cores reads its left operand as f16 halves that
 * HalfOperandProgram writes just before it (staging 'half8'), instead of converting f32 as it
 * stages each slab; the values are the same (each rounded to f16 once either way). false: the
 * conversion in the staging (A/B runs).
 */
export const TC_HALF_OPERANDS_FLAG = 'WEBGPU_MOE_TC_HALF_OPERANDS';
tf.env().registerFlag(TC_HALF_OPERANDS_FLAG, () => true);

/**
 * tf.env() flag: the experts' weight gradients on tensor cores read L and R as f16 halves that
 * HalfOperandProgram writes just before them (staging 'half8', as the MatMul's left operand),
 * instead of converting f32 as each slab is staged; each value is rounded to f16 once either way
 * (the routing weight may ride on R instead of L: the same product). false: the conversion in the
 * staging (A/B runs).
 */
export const TC_HALF_GRAD_OPERANDS_FLAG = 'WEBGPU_MOE_TC_HALF_GRAD_OPERANDS';
tf.env().registerFlag(TC_HALF_GRAD_OPERANDS_FLAG, () => true);

/**
 * tf.env() flag: a grouped or dense tensor-core product whose result is scaled (a gradient operand's
 * 1/s, a LoRA or weight-gradient alpha; MoEBatchProduct's only with TC_BATCH_SCALED_DIRECT_STORES_FLAG
 * on too) stores its whole blocks straight to the output, each result matrix multiplied first
 * (staging `scaledDirect`), as an unscaled one does, instead of through the per-element epilogue
 * (two workgroup barriers per result matrix); the stored values are the same f32 products. On by
 * default since run Z32 (H100): check.js's grouped and dense products with it within 4.8e-4 of f32,
 * OLMoE's step 1–5 % faster by the median of interleaved A/B steps; run Z31: the Q blocks right with
 * it, chained 1.4–2.8 % faster. false: the epilogue (A/B runs).
 */
export const TC_SCALED_DIRECT_STORES_FLAG = 'WEBGPU_MOE_TC_SCALED_DIRECT_STORES';
tf.env().registerFlag(TC_SCALED_DIRECT_STORES_FLAG, () => true);

/**
 * tf.env() flag: TC_SCALED_DIRECT_STORES_FLAG's stores for MoEBatchProduct's scaled products too (the
 * composed attention's dO·vᵀ, dS·k, Pᵀ·dO, dSᵀ·q). On since run Z33 (H100): check.js's attention step
 * with it, each product and the composed training pass within 5.3e-4 of f32; OLMoE's step even with
 * the epilogue by interleaved A/B steps (one call 4.5 % faster, one 0.5 % slower by the median).
 * false: the epilogue (A/B runs).
 */
export const TC_BATCH_SCALED_DIRECT_STORES_FLAG = 'WEBGPU_MOE_TC_BATCH_SCALED_DIRECT_STORES';
tf.env().registerFlag(TC_BATCH_SCALED_DIRECT_STORES_FLAG, () => true);

/**
 * `staging` with the direct stores where TC_SCALED_DIRECT_STORES_FLAG (and, for MoEBatchProduct's
 * products, TC_BATCH_SCALED_DIRECT_STORES_FLAG) asks for them; v6 programs only: the others store per element.
 */
function withScaledDirectStores(staging: SubgroupStaging, batchProduct = false): SubgroupStaging {
  const on = tf.env().getBool(TC_SCALED_DIRECT_STORES_FLAG) &&
      (!batchProduct || tf.env().getBool(TC_BATCH_SCALED_DIRECT_STORES_FLAG));
  return staging.v6 !== undefined && on ? { ...staging, scaledDirect: true } : staging;
}

/**
 * tf.env() flag: batchProduct's MoEBatchProduct (the composed attention's six batched products) on
 * tensor cores where they are on. On by default since run X (H100, OLMoE batch 4 × S 512, A/B of 6
 * interleaved steps in one lease: 0.187 against 0.197 s a step, +5.3 %): the step is GPU-bound now.
 * In run T, when the step was host-bound, the amax passes of its scaled operands (3 dispatches each
 * then, 2 now) made it slower end to end (4555 against 6311 tokens/s; docs/benchmarks.md).
 */
export const TC_BATCH_PRODUCTS_FLAG = 'WEBGPU_MOE_TC_BATCH_PRODUCTS';
tf.env().registerFlag(TC_BATCH_PRODUCTS_FLAG, () => true);

/**
 * tf.env() flag: a grouped product on tensor cores given a `loraTail` (split LoRA's expansion of
 * its first adapter) adds it as one more 16-deep step of its own reduction
 * (SubgroupMatrixMatMulProgram's loraTail) instead of a separate expansion that reads and writes
 * the whole output again (run Y: +2.5–3.6 % end to end). The tail's T is staged under its own
 * scale cap (commit 62da94f): without it run Y3's adapter came out non-finite after 27 steps with
 * the tails on (backward's gr = s·dy·B carried past f16 by dy's operand scale); with it run Z1 passed
 * check.js's tails at gr 300× dy and saved a finite adapter after 27 steps with the tails on that
 * PEFT reads within 5.2e-3. false: the separate expansion, as off tensor cores.
 */
export const TC_LORA_TAIL_FLAG = 'WEBGPU_MOE_TC_LORA_TAIL';
tf.env().registerFlag(TC_LORA_TAIL_FLAG, () => true);

/**
 * tf.env() flag: off tensor cores, a product on GroupedMatMulProgram given a LoRA tail (split LoRA's
 * expansion of its first adapter; a dense projection's u·Bᵀ or g·A) adds it in its epilogue
 * (GroupedMatMulProgram's loraTail: each output reads its row of T and its column of V, r ≤ 16
 * values each, staged in the slabs) instead of a separate expansion that reads and writes the whole
 * output again: one dispatch fewer per tail. Off by default: in run Z33 (H100) the fold, then reading
 * V per output from global memory, was not faster than the expansion apart (the f32 split-LoRA Q block
 * even chained, M1 8 % slower chained); the slab-staged form is checked on Mesa, not yet timed on a card.
 */
export const F32_LORA_TAIL_FLAG = 'WEBGPU_MOE_F32_LORA_TAIL';
tf.env().registerFlag(F32_LORA_TAIL_FLAG, () => false);

/** Below this many blocks of 128 rows a dense product on tensor cores takes 64-row blocks. */
const DENSE_TC_FEW_BLOCKS = 128;

/**
 * The block rows of a dense [rows, cols] product on tensor cores: DENSE_TC_BLOCK_ROWS_FLAG when set,
 * else 128, or 64 where 128-row blocks would be fewer than DENSE_TC_FEW_BLOCKS (about one per SM of
 * an H100, 132). Run S (H100, OLMoE batch 4, timestamps per site, one lease): the LM head's dy·W
 * ([333, 2048], 48 blocks of 128) took 17.0 ms a step in 128-row blocks and 11.3 in 64; every
 * product of ≥ 256 blocks was slower in 64 (q/k/v/o 19.4 → 21.7 ms, the LM head's x·Wᵀ 13.0 → 17.8).
 */
export function denseTensorCoreBlockRows(rows: number, cols: number): SubgroupBlockRows {
  const forced = tf.env().getNumber(DENSE_TC_BLOCK_ROWS_FLAG);
  if (forced === 0) {
    const blocks = subgroupMatrixDispatch(rows, cols, 1, 128);
    return blocks[0] * blocks[1] < DENSE_TC_FEW_BLOCKS ? 64 : 128;
  }
  const block = SUBGROUP_BLOCK_ROWS.find(r => r === forced);
  if (block === undefined) {
    throw new Error(`${DENSE_TC_BLOCK_ROWS_FLAG} must be 0 (automatic) or one of ${SUBGROUP_BLOCK_ROWS.join(', ')} but got ${forced}`);
  }
  return block;
}

/**
 * tf.env() flag: the rows NarrowWeightGradProgram sums per workgroup, rounded to fit the plan's
 * row tile (narrowGradChunkRows in narrow_matmul_program.ts): fewer rows make more workgroups and
 * more partial sums to add (r·wide floats per chunk). For tuning on a GPU
 * (bench/webgpu_lora_products.ts --grad-chunk-rows).
 */
export const NARROW_GRAD_CHUNK_ROWS_FLAG = 'WEBGPU_MOE_NARROW_GRAD_CHUNK_ROWS';
tf.env().registerFlag(NARROW_GRAD_CHUNK_ROWS_FLAG, () => 128);

/**
 * tf.env() flag: the rows per chunk of a dense weight gradient (dA = gᵀ·x, dB = dyᵀ·u) on
 * NarrowWeightGradProgram's single-group form (runNarrowDenseWeightGrad): the rows are cut into
 * chunks of this many, each summed by its own workgroups, and NarrowWeightGradSumProgram adds the
 * chunks in order. 128 gives 16 chunks × 8 column blocks = 128 workgroups at OLMoE's 2048 tokens
 * and 2048 columns (about one per H100 SM, each summing 128 rows); fewer rows make more
 * workgroups and more partial sums to add (r·wide floats per chunk). An integer in [1, 2^24]; for
 * end-to-end A/B runs (bench/e2e/ours.ts --ab-flags) and bench/webgpu_dense_lora_products.ts
 * --chunk-rows.
 */
export const DENSE_GRAD_CHUNK_ROWS_FLAG = 'WEBGPU_MOE_DENSE_GRAD_CHUNK_ROWS';
tf.env().registerFlag(DENSE_GRAD_CHUNK_ROWS_FLAG, () => 128);

/**
 * tf.env() flag WEBGPU_MOE_WEIGHT_GRAD_PAIRS (WEIGHT_GRAD_PAIRS_FLAG, default true): a LoRA
 * projection's dA and dB (MoEWeightGradProductPair) in two dispatches together
 * (runNarrowDenseWeightGradPair) instead of two each; false: each apart, as before (the A/B).
 */
tf.env().registerFlag(WEIGHT_GRAD_PAIRS_FLAG, () => true);

/** The parts of WebGPUBackend this uses that its typings keep private. */
interface CommandQueueInternals {
  dispatchCountInPass?: number;
  activeTimers?: unknown;
  endComputePassEncoder?: () => void;
  submitQueue?: () => void;
}

/**
 * Runs a grouped product of `flops` FLOPs, then submits the recorded commands when `flops` reach
 * the flag (see SUBMIT_FLOPS_FLAG).
 */
function runGroupedProduct(
    args: KernelArgs,
    program: GroupedMatMulProgram | NarrowGroupedMatMulProgram | DenseNarrowMatMulProgram | NarrowInnerGroupedMatMulProgram | GroupedWeightGradProgram | NarrowWeightGradProgram | NarrowWeightGradPairProgram | SubgroupMatrixMatMulProgram | SubgroupMatrixWeightGradProgram,
    inputs: tf.TensorInfo[],
    uniforms: ProgramUniformEntry[], flops: number, output?: tf.TensorInfo): tf.TensorInfo {
  const backend = webgpu(args);
  const out = backend.runWebGPUProgram(program, inputs, 'float32', uniforms, output);
  if (flops < tf.env().getNumber(SUBMIT_FLOPS_FLAG)) return out;
  const q = backend as unknown as CommandQueueInternals;
  // under tf.time/profile tfjs submits after every program itself, with its timestamp queries
  if (q.activeTimers != null || !q.dispatchCountInPass) return out;
  if (typeof q.endComputePassEncoder !== 'function' || typeof q.submitQueue !== 'function') return out;
  q.endComputePassEncoder();
  q.submitQueue();
  return out;
}

function activationOf(attrs: tf.NamedAttrMap): { spec: ActivationSpec; activation: ExpertActivation } | undefined {
  if (attrs.actKind === 'none') return undefined;
  const kind = attrs.actKind as ExpertActivation['kind'];
  const activation: ExpertActivation = kind === 'clampedSwiglu'
    ? { kind, alpha: attrs.actAlpha as number, limit: attrs.actLimit as number }
    : { kind };
  return { spec: { kind, interleaved: attrs.interleaved as boolean }, activation };
}

function activationAttrs(activation: ExpertActivation | undefined, interleaved: boolean): tf.NamedAttrMap {
  return {
    actKind: activation?.kind ?? 'none',
    actAlpha: activation?.kind === 'clampedSwiglu' ? activation.alpha : 1,
    actLimit: activation?.kind === 'clampedSwiglu' ? activation.limit : 0,
    interleaved,
  };
}

function tileAttrs(tile: TileConfig): tf.NamedAttrMap {
  return { tm: tile.tm, tn: tile.tn, bk: tile.bk };
}

function tileOf(attrs: tf.NamedAttrMap): TileConfig {
  return { tm: attrs.tm as number, tn: attrs.tn as number, bk: attrs.bk as number };
}

// ---- dispatch plan ----------------------------------------------------------------------------

export const DISPATCH_PLAN = 'WebGPUMoEDispatchPlan';

const dispatchPlanConfig: tf.KernelConfig = {
  kernelName: DISPATCH_PLAN,
  backendName: BACKEND,
  kernelFunc: args => {
    const b = webgpu(args);
    const { experts } = args.inputs as { experts: tf.TensorInfo };
    const numExperts = args.attrs!.numExperts as number;
    const rowTile = args.attrs!.rowTile as number;
    const capacity = args.attrs!.capacity as number;
    const numPairs = tf.util.sizeFromShape(experts.shape);
    const flat = { dataId: experts.dataId, shape: [numPairs], dtype: experts.dtype };
    const seg = b.runWebGPUProgram(new ExpertSegmentsProgram(numExperts), [flat], 'int32',
        ExpertSegmentsProgram.uniformsFor(numPairs, rowTile));
    const rowOfPair = b.runWebGPUProgram(new RowOfPairProgram(numPairs, numExperts), [flat, seg], 'int32',
        RowOfPairProgram.uniformsFor(numPairs));
    const pairOfRow = b.runWebGPUProgram(new PairOfRowProgram(numPairs, capacity), [rowOfPair, seg], 'int32',
        PairOfRowProgram.uniformsFor(numPairs, capacity, numExperts));
    return [seg, rowOfPair, pairOfRow];
  },
};

/** The plan's tensors; rows are padded per expert to a multiple of `rowTile`. */
export interface DevicePlan {
  /** [2E+1] int32: padded starts (E+1, the last = rows in use), then the count of each expert */
  seg: tf.Tensor1D;
  /** [T·K] int32: the padded row of each pair p = t·K + k */
  rowOfPair: tf.Tensor1D;
  /** [capacity] int32: the pair of each padded row, −1 on padding */
  pairOfRow: tf.Tensor1D;
  capacity: number;
  rowTile: number;
  numTokens: number;
  topK: number;
  numExperts: number;
}

/** Rows of the padded space: N + E·(tile − 1), rounded up to the tile. */
export function planCapacity(numPairs: number, numExperts: number, rowTile: number): number {
  return Math.ceil((numPairs + numExperts * (rowTile - 1)) / rowTile) * rowTile;
}

/**
 * Sorts the (token, slot) pairs of `experts` [T, K] int32 by expert on the device. The ids must be
 * in [0, E) (a routing op's output is); an id outside is dropped from the counts, as the device
 * cannot throw.
 */
export function deviceDispatchPlan(experts: tf.Tensor2D, numExperts: number, rowTile: number): DevicePlan {
  const [numTokens, topK] = experts.shape;
  const capacity = planCapacity(numTokens * topK, numExperts, rowTile);
  const [seg, rowOfPair, pairOfRow] = tf.engine().runKernel(
      DISPATCH_PLAN, { experts }, { numExperts, rowTile, capacity }) as tf.Tensor1D[];
  return { seg, rowOfPair, pairOfRow, capacity, rowTile, numTokens, topK, numExperts };
}

// ---- grouped products -------------------------------------------------------------------------

export const GROUPED_MATMUL = 'WebGPUMoEGroupedMatMul';

const groupedMatMulConfig: tf.KernelConfig = {
  kernelName: GROUPED_MATMUL,
  backendName: BACKEND,
  kernelFunc: args => {
    const a = args.attrs!;
    const inputs = args.inputs as Record<string, tf.TensorInfo>;
    const act = activationOf(a);
    const list = [inputs.A, inputs.W, inputs.seg, inputs.pr];
    if (a.hasBias) list.push(inputs.bias);
    if (a.hasAddend) list.push(inputs.addend);
    const capacity = inputs.pr.shape[0];
    const outCols = a.outCols as number;
    const packedWeight = a.weightKind === 'float32' ? undefined : packedWeightSpec({
      kind: a.weightKind as PackedKind, shape: a.packedShape as number[], inputAxis: a.inputAxis as 1 | 2, groupSize: a.groupSize as number,
    });
    const common = {
      source: a.source as RowSource, activation: act?.spec, hasBias: a.hasBias as boolean,
      hasAddend: a.hasAddend as boolean, kContiguous: a.sK === 1, packedWeight,
    };
    // the wrapper chose tensor cores for this device; a device that is not registered (cannot
    // happen through groupedMatMul) falls back to f32 without the scale input. Packed weights of
    // every kind (bf16/f16 and the quantized ones) are decoded by the same loader in both programs.
    const tc = a.tensorCores ? tensorCoreDevice(webgpu(args).device) : undefined;
    if (tc !== undefined && inputs.amax != null) list.push(inputs.amax);
    const loraTail = a.loraTail === true;
    const half = tc !== undefined ? halfLeftOperand(args, inputs.A, common.source, act, a.inner as number, inputs.amax) : undefined;
    if (half !== undefined) list[0] = half.a;
    const program = tc !== undefined
      ? new SubgroupMatrixMatMulProgram(capacity, outCols,
          { ...common, ...(half !== undefined ? { source: half.source, activation: undefined } : {}), scaled: inputs.amax != null, loraTail },
          tc.subgroupSize,
          withScaledDirectStores(matMulStaging(common,
              { inner: a.inner as number, outCols, sE: a.sE as number, sN: a.sN as number, sK: a.sK as number }, half !== undefined)),
          a.blockRows as SubgroupBlockRows)
      // narrowLanes 0 (or absent): not on the lanes' program
      : a.narrowLanes === 32 || a.narrowLanes === 64 || a.narrowLanes === 128
        ? new DenseNarrowMatMulProgram(capacity, outCols, { lanes: a.narrowLanes, rowsPerThread: a.narrowLaneRows as DenseNarrowRowsPerThread },
          { source: common.source, activation: common.source === 'act' ? common.activation : undefined })
      // narrowRows 0 (or absent: a caller of runKernel that predates it): the tiled program
      : a.narrowRows === 1 || a.narrowRows === 2
        ? new NarrowGroupedMatMulProgram(capacity, outCols, {
          source: common.source, activation: common.activation, kContiguous: common.kContiguous, rowsPerThread: a.narrowRows as 1 | 2,
        })
        // narrowInnerRows 0 (or absent): not a narrow reduction
        : a.narrowInnerRows === 16 || a.narrowInnerRows === 32 || a.narrowInnerRows === 64
          ? new NarrowInnerGroupedMatMulProgram(capacity, outCols, a.inner as number, {
            source: common.source, activation: common.activation, hasAddend: common.hasAddend, vec4: outCols % 4 === 0,
            blockRows: a.narrowInnerRows as NarrowInnerBlockRows,
          })
          : new GroupedMatMulProgram(capacity, outCols, { ...common, tile: tileOf(a), loraTail });
    // groupedMatMul folds a LoRA tail only into a product on tensor cores or on GroupedMatMulProgram
    if (loraTail && !(program instanceof SubgroupMatrixMatMulProgram || program instanceof GroupedMatMulProgram)) {
      throw new Error(`${GROUPED_MATMUL}: a LoRA tail runs only on tensor cores or GroupedMatMulProgram, not ${program.constructor.name}`);
    }
    if (loraTail) list.push(inputs.tailA, inputs.tailW);
    const uniforms: ProgramUniformEntry[] = [
      ...intUniforms(capacity, outCols, a.inner as number, a.topK as number, a.numExperts as number,
          a.sE as number, a.sN as number, a.sK as number),
      ...floatUniforms(a.alpha as number),
      ...activationUniforms(act?.activation),
      ...(loraTail ? [...intUniforms(a.tailRank as number, a.tailSE as number, a.tailSN as number, a.tailSK as number),
        ...floatUniforms(a.tailScale as number)] : []),
    ];
    const out = runGroupedProduct(args, program, list, uniforms, 2 * capacity * outCols * (a.inner as number));
    if (half !== undefined) webgpu(args).disposeData(half.a.dataId);
    return out;
  },
};

/**
 * The left operand `a` of a MatMul on tensor cores as f16 halves (HalfOperandProgram), where
 * TC_HALF_OPERANDS_FLAG is on and its rows are whole runs of 8: `a` itself for 'gather' and 'rows'
 * (the product still gathers or skips padding rows), act(h) for 'act' (read as 'rows' then), times
 * operandScale(amax) with `amax` (a gradient operand). The caller disposes the result after the
 * product. undefined: the product converts as it stages.
 */
function halfLeftOperand(args: KernelArgs, a: tf.TensorInfo, source: RowSource,
    act: { spec: ActivationSpec; activation: ExpertActivation } | undefined, inner: number,
    amax: tf.TensorInfo | undefined): { a: tf.TensorInfo; source: 'gather' | 'rows' } | undefined {
  if (!tf.env().getBool(TC_HALF_OPERANDS_FLAG) || !halfOperandFits(inner) || a.shape[0] === 0) return undefined;
  const fromAct = source === 'act';
  const program = new HalfOperandProgram(a.shape[0], inner,
      { source: fromAct ? 'act' : 'rows', activation: fromAct ? act!.spec : undefined, scaled: amax !== undefined });
  const half = webgpu(args).runWebGPUProgram(program, amax !== undefined ? [a, amax] : [a], 'int32',
      HalfOperandProgram.uniformsFor(a.shape[0], inner, activationUniforms(fromAct ? act!.activation : undefined)));
  return { a: half, source: fromAct ? 'rows' : source };
}

/**
 * Where W_e(k, n) lives in the weight tensor: W[e·sE + n·sN + k·sK] (for a packed weight, the
 * logical float32 strides: the kernel reads half n·sN + k·sK of expert e's words).
 */
export interface WeightStrides { sE: number; sN: number; sK: number }

export interface GroupedMatMulArgs {
  /** [T, inner] ('gather'), [capacity, inner] ('rows') or h [capacity, 2·inner] ('act') */
  a: tf.Tensor2D;
  source: RowSource;
  /**
   * any tensor holding the per-expert operand at `strides`, or a packed 16-bit expert weight
   * (frozen experts: decoded in the product's loads, never copied to float32)
   */
  w: tf.Tensor | ExpertWeightTensor;
  strides: WeightStrides;
  inner: number;
  outCols: number;
  plan: DevicePlan;
  tile: TileConfig;
  activation?: ExpertActivation;
  interleaved?: boolean;
  /** [E, outCols] */
  bias?: tf.Tensor2D;
  /** [capacity, outCols], added after the product */
  addend?: tf.Tensor2D;
  alpha?: number;
  /**
   * A holds gradients (dOut, dh): on tensor cores it is scaled per tensor into f16's range
   * (SubgroupMatrixMatMulProgram)
   */
  gradient?: boolean;
  /** split LoRA's expansion added to the result (see LoRATail) */
  loraTail?: LoRATail;
}

/**
 * Split LoRA's expansion of a grouped product's result: out += alpha·T·V_e, T [capacity, rank] in
 * padded-row order (u = x·A_eᵀ in forward, gr = s·dy·B_e in backward), V_e(k, n) at
 * w[e·sE + n·sN + k·sK] (PEFT's B or A in place). On tensor cores (TC_LORA_TAIL_FLAG, rank ≤ 16, a
 * float32 factor) one more step of the product's own reduction; otherwise a product of its own
 * with the result as its addend, as before the fold.
 */
export interface LoRATail { a: tf.Tensor2D; w: tf.Tensor; strides: WeightStrides; rank: number; alpha: number }

/**
 * Whether a grouped product over `plan` of outCols × inner goes to the subgroup-matrix programs:
 * WEBGPU_MOE_TENSOR_CORES on, a registered device whose workgroup memory holds the programs' slabs,
 * the plan's row tile a multiple of a block's rows (128, 64 or 32: subgroupBlockRowsFor) and the
 * product wide enough (wideEnoughForTensorCores).
 */
export function useTensorCores(plan: DevicePlan, rows: number, cols: number, inner: number): boolean {
  if (activeTensorCores() === undefined) return false;
  const limits = (tf.backend() as unknown as { device: GPUDevice }).device.limits;
  return tensorCoresFit(plan.rowTile, limits.maxComputeWorkgroupStorageSize, rows, cols, inner);
}

/**
 * useTensorCores past the flag and the device: a block's rows divide the row tile, the
 * programs' workgroup memory at that block fits the device's `workgroupStorage` bytes, and the
 * product is wide enough.
 *
 * ```js
 * tensorCoresFit(64, 49152, 4096, 2048, 1024);   // true: 64-row blocks
 * tensorCoresFit(16, 49152, 4096, 2048, 1024);   // false: no block divides a 16-row tile
 * ```
 */
export function tensorCoresFit(rowTile: number, workgroupStorage: number, rows: number, cols: number, inner: number): boolean {
  const blockRows = subgroupBlockRowsFor(rowTile);
  return blockRows !== undefined && workgroupStorage >= subgroupMatrixWorkgroupBytes(blockRows) &&
      wideEnoughForTensorCores(rows, cols, inner);
}

/**
 * The tensor-core device a dense product (MoEDenseMatMul, MoEPackedDenseMatMul) of `rows` rows,
 * `cols` × `inner` runs on, or undefined (the f32 programs): the experts' test without the plan
 * (WEBGPU_MOE_TENSOR_CORES on, `device` registered, its workgroup memory holding the slabs, the
 * product wide enough: the rank-r LoRA products are not). One group has no row tile to align:
 * the program takes any row count.
 */
export function denseTensorCores(device: GPUDevice, rows: number, cols: number, inner: number): TensorCoreDevice | undefined {
  if (!tf.env().getBool(TENSOR_CORES_FLAG)) return undefined;
  const tc = tensorCoreDevice(device);
  if (tc === undefined || device.limits.maxComputeWorkgroupStorageSize < subgroupMatrixWorkgroupBytes()) return undefined;
  return wideEnoughForTensorCores(rows, cols, inner) ? tc : undefined;
}

/**
 * packed.ts's DenseKernelOverride for 'webgpu' (register.ts installs it): a float32 dense product
 * that runs on tensor cores here goes to MoEDenseMatMul whatever WEBGPU_MOE_DENSE_PROGRAM says.
 */
export const webgpuDenseKernelOverride: DenseKernelOverride = (rows, outCols, inner) =>
  denseTensorCores((tf.backend() as unknown as { device: GPUDevice }).device, rows, outCols, inner) !== undefined;

/**
 * max |t| as the exponent code of a gradient operand's scale on tensor cores, an int32 [1] tensor
 * on the device: maxAbsCodeInKernel on the active webgpu backend (its value is a slot's: read it in
 * the products recorded next).
 */
export function maxAbsCode(t: tf.Tensor): tf.Tensor1D {
  const args = { inputs: {}, attrs: {}, backend: tf.backend() } as unknown as KernelArgs;
  return tf.engine().makeTensorFromTensorInfo(maxAbsCodeInKernel(args, t)) as tf.Tensor1D;
}

/**
 * Whether a grouped product goes to NarrowGroupedMatMulProgram (NARROW_PRODUCTS_FLAG on): at most
 * NARROW_MAX_COLS = 16 outputs (LoRA ranks up to 16, which is what the register file holds: 2 rows
 * × 16 partial sums a thread), float32 W, no bias or addend (the rank-r products have neither).
 * Wider outputs reuse each loaded row across enough columns for the tiled program's register tile
 * to pay.
 */
export function narrowProductFits(args: Pick<GroupedMatMulArgs, 'outCols' | 'w' | 'bias' | 'addend'>): boolean {
  return tf.env().getBool(NARROW_PRODUCTS_FLAG) && args.outCols <= NARROW_MAX_COLS && !isPackedExpertWeight(args.w) &&
      args.bias == null && args.addend == null;
}

/**
 * Whether a grouped product goes to NarrowInnerGroupedMatMulProgram (NARROW_PRODUCTS_FLAG on): a
 * reduction at most NARROW_MAX_COLS deep (split LoRA's expansions, inner = r, whose bytes are the
 * addend and the output), float32 W, no bias (those products have none) and a plan whose row tile
 * a 16-, 32- or 64-row block divides. Deeper reductions reuse each loaded value across enough of
 * the tiled program's register tile to pay.
 */
export function narrowInnerProductFits(args: Pick<GroupedMatMulArgs, 'inner' | 'w' | 'bias' | 'plan'>): boolean {
  return tf.env().getBool(NARROW_PRODUCTS_FLAG) && args.inner <= NARROW_MAX_COLS && !isPackedExpertWeight(args.w) &&
      args.bias == null && narrowInnerBlockRowsFor(args.plan.rowTile) !== undefined;
}

/**
 * out [capacity, outCols] = alpha·A·W_e (+ bias_e) (+ addend) (+ the LoRA tail's alpha·T·V_e), per
 * padded row's expert.
 */
export function groupedMatMul(args: GroupedMatMulArgs): tf.Tensor2D {
  const packed = isPackedExpertWeight(args.w) ? args.w : undefined;
  const w = packed ? packed.packed : args.w as tf.Tensor;
  const inputs: tf.NamedTensorMap = { A: args.a, W: w, seg: args.plan.seg, pr: args.plan.pairOfRow };
  if (args.bias) inputs.bias = args.bias;
  if (args.addend) inputs.addend = args.addend;
  const tensorCores = useTensorCores(args.plan, args.plan.capacity, args.outCols, args.inner);
  const narrow = !tensorCores && narrowProductFits(args);
  // products both narrow and shallow without an addend stay on NarrowGroupedMatMulProgram
  const narrowInner = !tensorCores && !narrow && narrowInnerProductFits(args);
  const tail = args.loraTail;
  const foldsTail = tail !== undefined && tail.rank <= LORA_TAIL_MAX_RANK && (tensorCores
    ? tf.env().getBool(TC_LORA_TAIL_FLAG)
    // off tensor cores only GroupedMatMulProgram has the tail's epilogue
    : tf.env().getBool(F32_LORA_TAIL_FLAG) && !narrow && !narrowInner && tail.rank <= loraTailEpilogueRank(args.tile));
  if (tail !== undefined && !foldsTail) {
    // the expansion as its own product, the result its addend
    const base = groupedMatMul({ ...args, loraTail: undefined });
    const out = groupedMatMul({
      plan: args.plan, activation: args.activation, interleaved: args.interleaved, a: tail.a, source: 'rows', w: tail.w,
      strides: tail.strides, inner: tail.rank, outCols: args.outCols, addend: base, alpha: tail.alpha, tile: args.tile,
    });
    base.dispose();
    return out;
  }
  if (tail !== undefined) Object.assign(inputs, { tailA: tail.a, tailW: tail.w });
  if (tensorCores && args.gradient) inputs.amax = maxAbsCode(args.a);
  const laneLayout = narrow ? groupedNarrowLayoutFor(args.plan.rowTile, args.plan.capacity, args.strides.sK === 1) : undefined;
  const out = tf.engine().runKernel(GROUPED_MATMUL, inputs, {
    // the subgroup-matrix block's rows: the largest that divides the plan's row tile
    tensorCores, blockRows: subgroupBlockRowsFor(args.plan.rowTile) ?? 0,
    // NarrowGroupedMatMulProgram's rows per thread, 0: not narrow
    narrowRows: narrow ? narrowRowsPerThread(args.plan.rowTile) : 0,
    // or DenseNarrowMatMulProgram's planned form in this layout (0: not)
    narrowLanes: laneLayout?.lanes ?? 0, narrowLaneRows: laneLayout?.rowsPerThread ?? 0,
    // NarrowInnerGroupedMatMulProgram's rows per workgroup, 0: not a narrow reduction
    narrowInnerRows: narrowInner ? narrowInnerBlockRowsFor(args.plan.rowTile)! : 0,
    source: args.source, hasBias: args.bias != null, hasAddend: args.addend != null,
    outCols: args.outCols, inner: args.inner, topK: args.plan.topK, numExperts: args.plan.numExperts,
    ...args.strides, alpha: args.alpha ?? 1,
    // each packed expert starts on a word: its base counts words
    ...(packed ? { sE: packed.wordsPerExpert } : {}), weightKind: packed?.kind ?? 'float32',
    ...(packed ? { packedShape: [...packed.shape], inputAxis: packed.inputAxis, groupSize: packed.groupSize ?? 0 } : {}),
    ...activationAttrs(args.activation, args.interleaved ?? false), ...tileAttrs(args.tile),
    ...(tail === undefined ? {} : {
      loraTail: true, tailRank: tail.rank, tailSE: tail.strides.sE, tailSN: tail.strides.sN, tailSK: tail.strides.sK,
      // the program multiplies the whole reduction by alpha: the tail's sums are added times alpha_tail / alpha
      tailScale: tail.alpha / (args.alpha ?? 1),
    }),
  }) as tf.Tensor2D;
  if (inputs.amax) inputs.amax.dispose();
  return out;
}

export const GROUPED_WEIGHT_GRAD = 'WebGPUMoEGroupedWeightGrad';

const groupedWeightGradConfig: tf.KernelConfig = {
  kernelName: GROUPED_WEIGHT_GRAD,
  backendName: BACKEND,
  kernelFunc: args => {
    const a = args.attrs!;
    const inputs = args.inputs as Record<string, tf.TensorInfo>;
    const act = activationOf(a);
    const list = [inputs.L, inputs.R, inputs.seg];
    if (usesPairOfRow({ left: a.left as 'gather' | 'rows', right: a.right as RowSource, scaleLeft: a.scaleLeft as boolean })) {
      list.push(inputs.pr);
    }
    if (a.scaleLeft) list.push(inputs.rw);
    const numExperts = a.numExperts as number;
    const P = a.P as number;
    const Q = a.Q as number;
    const common = {
      left: a.left as 'gather' | 'rows', right: a.right as RowSource, activation: act?.spec,
      scaleLeft: a.scaleLeft as boolean,
    };
    // every row of the plan (pairOfRow's length, padding included) meets each (p, q) of its expert once
    const flops = 2 * inputs.pr.shape[0] * P * Q;
    if (a.narrow === 'P' || a.narrow === 'Q') {
      return narrowWeightGrad(args, list, { ...common, tile: tileOf(a), narrow: a.narrow as 'P' | 'Q' }, flops);
    }
    const uniforms: ProgramUniformEntry[] = [
      ...intUniforms(P, Q, a.topK as number, numExperts, a.oE as number, a.oP as number, a.oQ as number),
      ...floatUniforms(a.alpha as number),
      ...activationUniforms(act?.activation),
    ];
    const tc = a.tensorCores ? tensorCoreDevice(webgpu(args).device) : undefined;
    if (tc !== undefined) return tensorCoreWeightGrad(args, tc.subgroupSize, common, act, uniforms, flops);
    const program = new GroupedWeightGradProgram(a.outShape as number[], numExperts, P, Q, { ...common, tile: tileOf(a) });
    return runGroupedProduct(args, program, list, uniforms, flops);
  },
};

/**
 * Where the routing weight of a weight gradient on f16 operands is applied: in the conversion of L
 * (its rows are the plan's), of R (the same product: rw·L(r)ᵀ·R(r) = L(r)ᵀ·(rw·R(r))), or in the
 * product's own staging of an f32 L. A gathered L (token rows, shared by the K pairs) cannot
 * carry it, so with a gathered R too, L stays f32.
 */
export type RowScaleSite = 'none' | 'L' | 'R' | 'program';

/** Which operands of a tensor-core weight gradient are converted to f16 halves, and where its routing weight goes. */
export function weightGradHalves(spec: { left: 'gather' | 'rows'; right: RowSource; scaleLeft: boolean }, P: number, Q: number):
    { left: boolean; right: boolean; rowScale: RowScaleSite } {
  const on = tf.env().getBool(TC_HALF_GRAD_OPERANDS_FLAG);
  const left = on && halfOperandFits(P);
  const right = on && halfOperandFits(Q);
  if (!spec.scaleLeft) return { left, right, rowScale: 'none' };
  if (left && spec.left === 'rows') return { left, right, rowScale: 'L' };
  if (right && spec.right !== 'gather') return { left, right, rowScale: 'R' };
  return { left: false, right, rowScale: 'program' };
}

/**
 * The experts' weight gradient on tensor cores (SubgroupMatrixWeightGradProgram), its operands
 * converted to f16 halves first where TC_HALF_GRAD_OPERANDS_FLAG is on and their rows are whole
 * runs of 8 (L times the operand scale, the activation and the routing weight applied there).
 */
function tensorCoreWeightGrad(args: KernelArgs, subgroupSize: number,
    common: { left: 'gather' | 'rows'; right: RowSource; activation: ActivationSpec | undefined; scaleLeft: boolean },
    act: ReturnType<typeof activationOf>, uniforms: ProgramUniformEntry[], flops: number): tf.TensorInfo {
  const a = args.attrs!;
  const inputs = args.inputs as Record<string, tf.TensorInfo>;
  const backend = webgpu(args);
  const P = a.P as number;
  const Q = a.Q as number;
  const scaled = inputs.amax != null;
  const halves = weightGradHalves(common, P, Q);
  const staging = withScaledDirectStores(weightGradStaging({ P, Q }, halves));
  const converted: tf.TensorInfo[] = [];
  const half = (t: tf.TensorInfo, cols: number, spec: { source: 'rows' | 'act'; scaled: boolean; rowScale: boolean }) => {
    const fromAct = spec.source === 'act';
    const out = backend.runWebGPUProgram(new HalfOperandProgram(t.shape[0], cols, { ...spec, activation: fromAct ? act!.spec : undefined }),
        [t, ...(spec.scaled ? [inputs.amax] : []), ...(spec.rowScale ? [inputs.rw, inputs.pr] : [])], 'int32',
        HalfOperandProgram.uniformsFor(t.shape[0], cols, activationUniforms(fromAct ? act!.activation : undefined)));
    converted.push(out);
    return out;
  };
  const L = staging.left === 'half8' ? half(inputs.L, P, { source: 'rows', scaled, rowScale: halves.rowScale === 'L' }) : inputs.L;
  const R = staging.right === 'half8'
    ? half(inputs.R, Q, { source: common.right === 'act' ? 'act' : 'rows', scaled: false, rowScale: halves.rowScale === 'R' }) : inputs.R;
  const spec = {
    ...common, right: staging.right === 'half8' && common.right === 'act' ? 'rows' as const : common.right,
    scaleLeft: halves.rowScale === 'program', scaled,
  };
  const list = [L, R, inputs.seg, ...(usesPairOfRow(spec) ? [inputs.pr] : []), ...(spec.scaleLeft ? [inputs.rw] : []),
    ...(scaled ? [inputs.amax] : [])];
  const program = new SubgroupMatrixWeightGradProgram(a.outShape as number[], a.numExperts as number, P, Q, spec, subgroupSize, staging,
      a.rowDepth as 32 | 64);
  const out = runGroupedProduct(args, program, list, uniforms, flops);
  for (const t of converted) backend.disposeData(t.dataId);
  return out;
}

/**
 * The narrow weight gradient's two dispatches: the chunks' partial sums (NarrowWeightGradProgram,
 * the product: submitted after it when big, see SUBMIT_FLOPS_FLAG), then each expert's chunks added
 * into the gradient (NarrowWeightGradSumProgram, a small pass over the partial sums).
 */
function narrowWeightGrad(args: KernelArgs, list: tf.TensorInfo[], spec: NarrowWeightGradSpec, flops: number): tf.TensorInfo {
  const a = args.attrs!;
  const inputs = args.inputs as Record<string, tf.TensorInfo>;
  const backend = webgpu(args);
  const P = a.P as number;
  const Q = a.Q as number;
  const numExperts = a.numExperts as number;
  const chunkRows = a.chunkRows as number;
  const unitRows = narrowGradUnitRows(a.rowTile as number, chunkRows);
  const capacity = inputs.pr.shape[0];
  const partial = runGroupedProduct(args, new NarrowWeightGradProgram(capacity, unitRows, P, Q, spec), list, [
    ...intUniforms(P, Q, a.topK as number, numExperts, unitRows, chunkRows),
    ...activationUniforms(activationOf(a)?.activation),
  ], flops);
  const out = backend.runWebGPUProgram(new NarrowWeightGradSumProgram(a.outShape as number[], numExperts, P, Q, spec.narrow),
      [partial, inputs.seg], 'float32', [
        ...intUniforms(P, Q, numExperts, unitRows, chunkRows, a.oE as number, a.oP as number, a.oQ as number),
        ...floatUniforms(a.alpha as number),
      ]);
  backend.disposeData(partial.dataId);
  return out;
}

export interface GroupedWeightGradArgs {
  /** [T, P] ('gather') or [capacity, P] ('rows') */
  l: tf.Tensor2D;
  left: 'gather' | 'rows';
  /** [T, Q] ('gather'), [capacity, Q] ('rows') or h [capacity, 2Q] ('act') */
  r: tf.Tensor2D;
  right: RowSource;
  P: number;
  Q: number;
  /** the gradient's shape and where (e, p, q) goes in it */
  outShape: number[];
  outStrides: { oE: number; oP: number; oQ: number };
  plan: DevicePlan;
  tile: TileConfig;
  /** [T·K] routing weights multiplying the L rows */
  rowScale?: tf.Tensor1D;
  activation?: ExpertActivation;
  interleaved?: boolean;
  alpha?: number;
}

/** NARROW_GRAD_CHUNK_ROWS_FLAG's value, checked. */
function narrowGradTargetRows(): number {
  const rows = tf.env().getNumber(NARROW_GRAD_CHUNK_ROWS_FLAG);
  // at most 2^24, so that the programs' row arithmetic (chunkRows + count) stays inside an i32
  if (!Number.isInteger(rows) || rows < 1 || rows > 2 ** 24) {
    fail('groupedWeightGrad', `the flag ${NARROW_GRAD_CHUNK_ROWS_FLAG} must be an integer in [1, ${2 ** 24}] but got ${describeValue(rows)}`);
  }
  return rows;
}

/** DENSE_GRAD_CHUNK_ROWS_FLAG's value, checked. */
function denseGradChunkRows(): number {
  const rows = tf.env().getNumber(DENSE_GRAD_CHUNK_ROWS_FLAG);
  // at most 2^24, as NARROW_GRAD_CHUNK_ROWS_FLAG: the programs' row arithmetic stays inside an i32
  if (!Number.isInteger(rows) || rows < 1 || rows > 2 ** 24) {
    fail('weightGradProduct', `the flag ${DENSE_GRAD_CHUNK_ROWS_FLAG} must be an integer in [1, ${2 ** 24}] but got ${describeValue(rows)}`);
  }
  return rows;
}

/** NarrowWeightGradProgram's staged side for `args` (the narrower), 'none': the tiled or the tensor-core program. */
function narrowSideOf(args: GroupedWeightGradArgs, tensorCores: boolean): 'P' | 'Q' | 'none' {
  if (tensorCores || !tf.env().getBool(NARROW_PRODUCTS_FLAG) || Math.min(args.P, args.Q) > NARROW_MAX_COLS) return 'none';
  return args.P <= args.Q ? 'P' : 'Q';
}

/** dW (outShape): alpha·Σ_{rows of e} L(r, p)·R(r, q) for every expert at once. */
export function groupedWeightGrad(args: GroupedWeightGradArgs): tf.Tensor {
  const inputs: tf.NamedTensorMap = { L: args.l, R: args.r, seg: args.plan.seg, pr: args.plan.pairOfRow };
  if (args.rowScale) inputs.rw = args.rowScale;
  // L is the gradient operand (dy) of every weight gradient: scaled on tensor cores
  const tensorCores = useTensorCores(args.plan, args.P, args.Q, args.plan.rowTile);
  if (tensorCores) inputs.amax = maxAbsCode(args.l);
  const narrow = narrowSideOf(args, tensorCores);
  const out = tf.engine().runKernel(GROUPED_WEIGHT_GRAD, inputs, {
    // the reduction's rows per staged slab follow the plan's row tile
    tensorCores, rowDepth: weightGradDepthFor(args.plan.rowTile), narrow,
    // NarrowWeightGradProgram's chunks: rows of one expert, aligned to the row tile
    rowTile: args.plan.rowTile, chunkRows: narrow === 'none' ? 0 : narrowGradChunkRows(args.plan.rowTile, narrowGradTargetRows()),
    left: args.left, right: args.right, scaleLeft: args.rowScale != null,
    P: args.P, Q: args.Q, outShape: args.outShape, ...args.outStrides,
    topK: args.plan.topK, numExperts: args.plan.numExperts, alpha: args.alpha ?? 1,
    ...activationAttrs(args.activation, args.interleaved ?? false), ...tileAttrs(args.tile),
  }) as tf.Tensor;
  if (inputs.amax) inputs.amax.dispose();
  return out;
}

export const GROUPED_WEIGHT_GRAD_PAIR = 'WebGPUMoEGroupedWeightGradPair';

/** The attrs of one product of WebGPUMoEGroupedWeightGradPair, named with its index (P0, left0, ...). */
function pairProductAttrs(args: GroupedWeightGradArgs, i: number): tf.NamedAttrMap {
  const attrs = { P: args.P, Q: args.Q, left: args.left, right: args.right, scaleLeft: args.rowScale != null, outShape: args.outShape,
    ...args.outStrides, alpha: args.alpha ?? 1 };
  return Object.fromEntries(Object.entries(attrs).map(([name, value]) => [`${name}${i}`, value]));
}

/**
 * WebGPUMoEGroupedWeightGradPair: two of WebGPUMoEGroupedWeightGrad's narrow gradients over one plan
 * (a LoRA factor pair's dA_e and dB_e) in narrowWeightGradPair's two dispatches instead of four.
 * Inputs L0, R0, L1, R1, seg, pr and rw (when either scales its L); attrs per product i (P{i},
 * Q{i}, left{i}, right{i}, scaleLeft{i}, outShape{i}, oE{i}, oP{i}, oQ{i}, alpha{i}) and the
 * plan's and activation's, as WebGPUMoEGroupedWeightGrad's.
 */
const groupedWeightGradPairConfig: tf.KernelConfig = {
  kernelName: GROUPED_WEIGHT_GRAD_PAIR,
  backendName: BACKEND,
  kernelFunc: args => {
    const a = args.attrs!;
    const inputs = args.inputs as Record<string, tf.TensorInfo>;
    const act = activationOf(a);
    const product = (i: number): NarrowGradProduct => ({
      P: a[`P${i}`] as number, Q: a[`Q${i}`] as number,
      rows: {
        left: a[`left${i}`] as 'gather' | 'rows', right: a[`right${i}`] as RowSource, scaleLeft: a[`scaleLeft${i}`] as boolean,
        activation: act?.spec,
      },
    });
    const products: [NarrowGradProduct, NarrowGradProduct] = [product(0), product(1)];
    const out = (i: number): PairGradientOut => ({
      shape: a[`outShape${i}`] as number[], oE: a[`oE${i}`] as number, oP: a[`oP${i}`] as number, oQ: a[`oQ${i}`] as number,
      alpha: a[`alpha${i}`] as number,
    });
    const numExperts = a.numExperts as number;
    const chunkRows = a.chunkRows as number;
    const unitRows = narrowGradUnitRows(a.rowTile as number, chunkRows);
    const list = [inputs.L0, inputs.R0, inputs.L1, inputs.R1, inputs.seg, ...(products.some(p => usesPairOfRow(p.rows!)) ? [inputs.pr] : []),
      ...(products.some(p => p.rows!.scaleLeft) ? [inputs.rw] : [])];
    return narrowWeightGradPair(args, list, products, {
      capacity: inputs.pr.shape[0], unitRows, chunkRows, topK: a.topK as number, plan: { seg: inputs.seg, numExperts }, activation: act?.activation,
    }, [out(0), out(1)]);
  },
};

/**
 * [groupedWeightGrad(first), groupedWeightGrad(second)]: together (WebGPUMoEGroupedWeightGradPair)
 * where both run NarrowWeightGradProgram over the same plan, chunks and activation with at most one
 * routing-weight tensor, and WEIGHT_GRAD_PAIRS_FLAG is on; else one at a time. The gradients are
 * bit for bit the same either way.
 */
export function groupedWeightGradPair(first: GroupedWeightGradArgs, second: GroupedWeightGradArgs): [tf.Tensor, tf.Tensor] {
  const bothNarrow = [first, second].every(g => narrowSideOf(g, useTensorCores(g.plan, g.P, g.Q, g.plan.rowTile)) !== 'none');
  const sameRows = first.plan === second.plan && first.activation === second.activation && first.interleaved === second.interleaved &&
      (first.rowScale === undefined || second.rowScale === undefined || first.rowScale === second.rowScale);
  if (!tf.env().getBool(WEIGHT_GRAD_PAIRS_FLAG) || !bothNarrow || !sameRows || (first.right === 'act' && second.right === 'act')) {
    return [groupedWeightGrad(first), groupedWeightGrad(second)];
  }
  const plan = first.plan;
  const rowScale = first.rowScale ?? second.rowScale;
  const inputs: tf.NamedTensorMap = { L0: first.l, R0: first.r, L1: second.l, R1: second.r, seg: plan.seg, pr: plan.pairOfRow,
    ...(rowScale ? { rw: rowScale } : {}) };
  const [dFirst, dSecond] = tf.engine().runKernel(GROUPED_WEIGHT_GRAD_PAIR, inputs, {
    ...pairProductAttrs(first, 0), ...pairProductAttrs(second, 1),
    rowTile: plan.rowTile, chunkRows: narrowGradChunkRows(plan.rowTile, narrowGradTargetRows()), topK: plan.topK, numExperts: plan.numExperts,
    ...activationAttrs(first.activation, first.interleaved ?? false),
  }) as tf.Tensor[];
  return [dFirst, dSecond];
}

// ---- row-wise ---------------------------------------------------------------------------------

export const COMBINE_ROWS = 'WebGPUMoECombineRows';

const combineRowsConfig: tf.KernelConfig = {
  kernelName: COMBINE_ROWS,
  backendName: BACKEND,
  kernelFunc: args => {
    const inputs = args.inputs as Record<string, tf.TensorInfo>;
    const topK = args.attrs!.topK as number;
    const width = inputs.Y.shape[1];
    const numTokens = inputs.rp.shape[0] / topK;
    const weighted = inputs.rw != null;
    const list = [inputs.Y, inputs.rp, ...(weighted ? [inputs.rw] : [])];
    return webgpu(args).runWebGPUProgram(new CombineRowsProgram(numTokens, width, weighted), list, 'float32',
        CombineRowsProgram.uniformsFor(width, topK));
  },
};

/** out [T, width] = Σ_k (w[t,k]·) y[rowOfPair[t·K+k]]. */
export function combineRows(y: tf.Tensor2D, plan: DevicePlan, weights?: tf.Tensor1D): tf.Tensor2D {
  const inputs: tf.NamedTensorMap = { Y: y, rp: plan.rowOfPair };
  if (weights) inputs.rw = weights;
  return tf.engine().runKernel(COMBINE_ROWS, inputs, { topK: plan.topK }) as tf.Tensor2D;
}

export const GATHER_ROWS = 'WebGPUMoEGatherRows';

const gatherRowsConfig: tf.KernelConfig = {
  kernelName: GATHER_ROWS,
  backendName: BACKEND,
  kernelFunc: args => {
    const { X, rows } = args.inputs as Record<string, tf.TensorInfo>;
    const [count] = rows.shape;
    const width = X.shape[1];
    return webgpu(args).runWebGPUProgram(new GatherRowsProgram(count, width), [X, rows], 'float32',
        GatherRowsProgram.uniformsFor(count, width));
  },
};

/**
 * x's rows picked by `rows` (int32 [count]), zeros where an index is −1 (the plan's padding rows):
 * GatherRowsProgram where x's width is a multiple of 4, else tfjs's gather (which gives −1 zeros too).
 */
export function gatherRows(x: tf.Tensor2D, rows: tf.Tensor1D): tf.Tensor2D {
  if (x.shape[1] % 4 !== 0) return tf.gather(x, rows) as tf.Tensor2D;
  return tf.engine().runKernel(GATHER_ROWS, { X: x, rows }) as tf.Tensor2D;
}

export const ACTIVATION_BACKWARD = 'WebGPUMoEActivationBackward';

const activationBackwardConfig: tf.KernelConfig = {
  kernelName: ACTIVATION_BACKWARD,
  backendName: BACKEND,
  kernelFunc: args => {
    const inputs = args.inputs as Record<string, tf.TensorInfo>;
    const act = activationOf(args.attrs!)!;
    const [capacity, width] = inputs.g.shape;
    const program = new ActivationBackwardProgram(capacity, width, act.spec);
    return webgpu(args).runWebGPUProgram(program, [inputs.h, inputs.g, inputs.pr, inputs.rw], 'float32',
        program.uniformsFor(capacity, width, activationUniforms(act.activation)));
  },
};

/** dh [capacity, 2I] = act'(h)·(w_pair·g), zero on padding rows. */
export function activationBackward(
    h: tf.Tensor2D, g: tf.Tensor2D, weights: tf.Tensor1D, plan: DevicePlan,
    activation: ExpertActivation, interleaved: boolean): tf.Tensor2D {
  return tf.engine().runKernel(ACTIVATION_BACKWARD, { h, g, pr: plan.pairOfRow, rw: weights },
      activationAttrs(activation, interleaved)) as tf.Tensor2D;
}

export const PAIR_DOT = 'WebGPUMoEPairDot';

const pairDotConfig: tf.KernelConfig = {
  kernelName: PAIR_DOT,
  backendName: BACKEND,
  kernelFunc: args => {
    const inputs = args.inputs as Record<string, tf.TensorInfo>;
    const act = activationOf(args.attrs!)!;
    const topK = args.attrs!.topK as number;
    const width = inputs.g.shape[1];
    const numPairs = inputs.rp.shape[0];
    const withBias = inputs.b2 != null;
    const hidden = withBias ? inputs.b2.shape[1] : 0;
    const list = [inputs.g, inputs.h, inputs.rp, ...(withBias ? [inputs.dy, inputs.b2, inputs.ex] : [])];
    return webgpu(args).runWebGPUProgram(new PairDotProgram(numPairs / topK, topK, act.spec, withBias), list,
        'float32', [...intUniforms(numPairs, width, hidden, topK), ...activationUniforms(act.activation)]);
  },
};

/** dWeights [T, K]: ⟨g_r, act(h_r)⟩ (+ ⟨dOut_t, b2_e⟩) for r = rowOfPair[t·K+k]. */
export function pairDot(
    g: tf.Tensor2D, h: tf.Tensor2D, plan: DevicePlan, activation: ExpertActivation, interleaved: boolean,
    bias?: { dOut: tf.Tensor2D; downBias: tf.Tensor2D; experts: tf.Tensor }): tf.Tensor2D {
  const inputs: tf.NamedTensorMap = { g, h, rp: plan.rowOfPair };
  if (bias) Object.assign(inputs, { dy: bias.dOut, b2: bias.downBias, ex: bias.experts });
  return tf.engine().runKernel(PAIR_DOT, inputs,
      { ...activationAttrs(activation, interleaved), topK: plan.topK }) as tf.Tensor2D;
}

export const GROUPED_COLUMN_SUM = 'WebGPUMoEGroupedColumnSum';

const groupedColumnSumConfig: tf.KernelConfig = {
  kernelName: GROUPED_COLUMN_SUM,
  backendName: BACKEND,
  kernelFunc: args => {
    const inputs = args.inputs as Record<string, tf.TensorInfo>;
    const a = args.attrs!;
    const numExperts = a.numExperts as number;
    const width = inputs.S.shape[1];
    const scaled = inputs.rw != null;
    const list = [inputs.S, inputs.seg, ...(a.source === 'gather' || scaled ? [inputs.pr] : []), ...(scaled ? [inputs.rw] : [])];
    return webgpu(args).runWebGPUProgram(
        new GroupedColumnSumProgram(numExperts, width, a.source as 'gather' | 'rows', scaled), list, 'float32',
        intUniforms(width, a.topK as number, numExperts));
  },
};

/** dBias [E, width] = Σ over each expert's real rows of (w·) S(r). */
export function groupedColumnSum(
    s: tf.Tensor2D, source: 'gather' | 'rows', plan: DevicePlan, rowScale?: tf.Tensor1D): tf.Tensor2D {
  const inputs: tf.NamedTensorMap = { S: s, seg: plan.seg, pr: plan.pairOfRow };
  if (rowScale) inputs.rw = rowScale;
  return tf.engine().runKernel(GROUPED_COLUMN_SUM, inputs,
      { source, topK: plan.topK, numExperts: plan.numExperts }) as tf.Tensor2D;
}

// ---- routing ----------------------------------------------------------------------------------

export const SOFTMAX_TOPK = 'WebGPUMoESoftmaxTopK';

const softmaxTopKConfig: tf.KernelConfig = {
  kernelName: SOFTMAX_TOPK,
  backendName: BACKEND,
  kernelFunc: args => {
    const { logits } = args.inputs as { logits: tf.TensorInfo };
    const k = args.attrs!.k as number;
    const renormalize = args.attrs!.renormalize as boolean;
    const [numTokens, numExperts] = logits.shape;
    const uniforms = SoftmaxTopKProgram.uniformsFor(numTokens, numExperts);
    const b = webgpu(args);
    return [
      b.runWebGPUProgram(new SoftmaxTopKProgram(numTokens, k, 'experts', renormalize), [logits], 'int32', uniforms),
      b.runWebGPUProgram(new SoftmaxTopKProgram(numTokens, k, 'weights', renormalize), [logits], 'float32', uniforms),
    ];
  },
};

/** [experts [T, K] int32, weights [T, K]] of softmax → top-k (→ renormalize), no gradient. */
export function softmaxTopKKernel(logits: tf.Tensor2D, k: number, renormalize: boolean): [tf.Tensor2D, tf.Tensor2D] {
  return tf.engine().runKernel(SOFTMAX_TOPK, { logits }, { k, renormalize }) as [tf.Tensor2D, tf.Tensor2D];
}

export const SOFTMAX_TOPK_GRAD = 'WebGPUMoESoftmaxTopKGrad';

const softmaxTopKGradConfig: tf.KernelConfig = {
  kernelName: SOFTMAX_TOPK_GRAD,
  backendName: BACKEND,
  kernelFunc: args => {
    const { logits, chosen, dy } = args.inputs as Record<string, tf.TensorInfo>;
    const [numTokens, numExperts] = logits.shape;
    const k = chosen.shape[1];
    return webgpu(args).runWebGPUProgram(
        new SoftmaxTopKGradProgram(numTokens, numExperts, k, args.attrs!.renormalize as boolean),
        [logits, chosen, dy], 'float32', SoftmaxTopKProgram.uniformsFor(numTokens, numExperts));
  },
};

/** dLogits [T, E] of the softmaxTopK weights for their cotangent dy [T, K], the choice fixed. */
export function softmaxTopKGradKernel(
    logits: tf.Tensor2D, chosen: tf.Tensor2D, dy: tf.Tensor2D, renormalize: boolean): tf.Tensor2D {
  return tf.engine().runKernel(SOFTMAX_TOPK_GRAD, { logits, chosen, dy }, { renormalize }) as tf.Tensor2D;
}

/**
 * The composed ops' MoEDecodePacked (src/ops/packed.ts), under that op's own name: packed expert
 * weights decoded on the device, since webgpu cannot read them to the host inside a call.
 */
const decodePackedConfig: tf.KernelConfig = {
  kernelName: DECODE_PACKED,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { kind, first, count, rows, cols, inputAxis, groupSize } = args.attrs as unknown as DecodePackedAttrs;
    const packed = args.inputs.packed as tf.TensorInfo;
    const spec = packedWeightSpec({ kind, shape: [packed.shape[0], rows, cols], inputAxis, groupSize });
    return webgpu(args).runWebGPUProgram(new DecodePackedProgram(spec, count, rows), [packed],
        'float32', DecodePackedProgram.uniformsFor(count, rows, cols, first, packed.shape[1]));
  },
};

/**
 * gatherDenseRows' MoEGatherPackedRows (src/ops/packed.ts): the looked-up rows of a packed 16-bit
 * table decoded in one program, instead of the whole table decoded for a Gather of floats.
 */
const gatherPackedRowsConfig: tf.KernelConfig = {
  kernelName: GATHER_PACKED_ROWS,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { kind, cols } = args.attrs as unknown as GatherPackedRowsAttrs;
    const { packed, indices } = args.inputs as Record<string, tf.TensorInfo>;
    const count = indices.shape[0];
    return webgpu(args).runWebGPUProgram(new GatherPackedRowsProgram(kind, count, cols), [packed, indices], 'float32',
        GatherPackedRowsProgram.uniformsFor(count, cols, packed.shape[1], packed.shape[0]));
  },
};

/**
 * The register tile of a dense product over `rows` rows. From 64 rows 4×4 per thread, each thread
 * owning a contiguous block read from the slabs as vec4s (4x4x16v): on the H100 it was the fastest
 * tile or within a few % of it for every attention shape of Qwen3-30B-A3B and OLMoE at 512 and
 * 2048 tokens, both directions, where the experts' 8×8 preset (the default before) was up to 2.7×
 * slower on the narrow k/v projections and 1.6× on dy·W (run M, 2026-12-06, commit cf99476:
 * `node .gpu/bundle/webgpu_dense_packed.js --tokens 512,2048 --iters 5`, docs/webgpu.md). vec4 needs
 * tm and tn multiples of 4; below 64 rows (not measured) a 32-row tile wastes fewer threads.
 */
export function packedDenseTile(rows: number): TileConfig {
  return rows >= 64 ? { tm: 4, tn: 4, bk: 16, vec4: true } : { tm: 2, tn: 4, bk: 16 };
}

/**
 * A dense product out = a·W (+ bias) (+ addend) as the experts' grouped product with one group
 * (GroupedMatMulProgram, singleGroup), W(k, n) = w[n·sN + k·sK] for k < inner, n < outCols: float32
 * (`packed` absent: read as it is) or packed 16-bit halves of a W `cols` wide (decoded as the tile
 * loads read them, no float32 copy); the bias [outCols] and the addend [rows of a, outCols] are added in the same
 * program, after the product's rounding.
 */
function runDenseProduct(
    args: KernelArgs, a: tf.TensorInfo, w: tf.TensorInfo, added: { bias?: tf.TensorInfo; addend?: tf.TensorInfo },
    layout: { inner: number; outCols: number; sN: number; sK: number }, packed: { kind: HalfKind; cols: number } | undefined,
    tile: TileConfig, tail?: DenseKernelTail): tf.TensorInfo {
  const { inner, outCols, sN, sK } = layout;
  const n = a.shape[0];
  const tailRank = tail?.a.shape[1] ?? 0;
  if (tail !== undefined && !(tf.env().getBool(F32_LORA_TAIL_FLAG) && tailRank <= loraTailEpilogueRank(tile))) {
    return withDenseTail(args, runDenseProduct(args, a, w, added, layout, packed, tile), tail);
  }
  const program = new GroupedMatMulProgram(n, outCols, {
    source: 'rows', hasBias: added.bias != null, hasAddend: added.addend != null, kContiguous: sK === 1, tile,
    packedWeight: packed === undefined ? undefined : { ...packed, layout: null }, singleGroup: true, loraTail: tail !== undefined,
  });
  const uniforms: ProgramUniformEntry[] = [
    ...intUniforms(n, outCols, inner, 1, 1, 0, sN, sK), ...floatUniforms(1), ...activationUniforms(undefined),
    ...(tail !== undefined ? [...intUniforms(tailRank, 0, ...denseTailStrides(tail, outCols)), ...floatUniforms(1)] : []),
  ];
  const inputs = [a, w, ...(added.bias != null ? [added.bias] : []), ...(added.addend != null ? [added.addend] : []),
    ...(tail !== undefined ? [tail.a, tail.b] : [])];
  return runGroupedProduct(args, program, inputs, uniforms, 2 * n * outCols * inner);
}

/** A dense tail's V(k, n) strides [sN, sK]: b [outCols, r] (transposed) at n·r + k, b [r, outCols] at k·outCols + n. */
function denseTailStrides(tail: DenseKernelTail, outCols: number): [number, number] {
  return tail.transposeB ? [tail.a.shape[1], 1] : [1, outCols];
}

/**
 * tf.env() flag: maxAbsCodeInKernel reduces a tensor in one dispatch, its workgroups' codes taken by
 * atomicMax into a slot kept from call to call (MaxAbsCodeProgram's epochs); false: two, the partial
 * maxima (MaxAbsProgram) and their code (A/B runs: 183 dispatches of an OLMoE step).
 */
export const MAX_ABS_ONE_PASS_FLAG = 'WEBGPU_MOE_MAX_ABS_ONE_PASS';
tf.env().registerFlag(MAX_ABS_ONE_PASS_FLAG, () => true);

/**
 * max |t| of any tensor as the exponent code the tensor-core products scale a gradient operand by
 * (int32 [1], max_abs_program.ts), from inside a kernel or out; 0 for an empty tensor (operandScale
 * then leaves the operand unscaled). MaxAbsCodeProgram over the tensor in up to MAX_ABS_PARTS parts
 * (each invocation reading ~16 elements or more): one dispatch, whose result is one of a few slots
 * that later calls reuse (maxAbsCodeSlot), so a caller reads it in the products it records next,
 * before MAX_ABS_CODE_SLOTS more calls. One workgroup over a whole tensor is what tfjs-webgpu's Max
 * does, which took 409 of the 493 GPU ms of the tensor-core block at Q on the H100 (run N). The
 * caller disposes the result (a slot's tensor frees no buffer).
 */
export function maxAbsCodeInKernel(args: KernelArgs, t: tf.TensorInfo): tf.TensorInfo {
  const backend = webgpu(args);
  const count = tf.util.sizeFromShape(t.shape);
  // an empty tensor binds nothing (Dawn rejects a zero-sized binding)
  if (count === 0) return backend.makeTensorInfo([1], 'int32', new Int32Array(1));
  const flat = { dataId: t.dataId, shape: [count], dtype: t.dtype };
  const parts = Math.min(MAX_ABS_PARTS, Math.ceil(count / (16 * MAX_ABS_THREADS)));
  // 4 elements a load where the count allows (every gradient operand of the hot products)
  const quads = parts > 1 && count % 4 === 0;
  const code = (x: tf.TensorInfo, n: number, p: number, q: boolean, slot?: { info: tf.TensorInfo; epoch: number }) =>
    backend.runWebGPUProgram(new MaxAbsCodeProgram(p, q), [x], 'int32', MaxAbsCodeProgram.uniformsFor(n, p, slot?.epoch ?? 0, q), slot?.info);
  if (parts === 1) return code(flat, count, 1, false);
  if (tf.env().getBool(MAX_ABS_ONE_PASS_FLAG)) return code(flat, count, parts, quads, maxAbsCodeSlot(backend, t));
  const partial = backend.runWebGPUProgram(new MaxAbsProgram(parts, quads), [flat], 'float32', MaxAbsProgram.uniformsFor(count, parts, quads));
  const out = code(partial, parts, 1, false);
  backend.disposeData(partial.dataId);
  return out;
}

/** The most parts maxAbsCodeInKernel reduces a tensor in (workgroups: a few per SM of a large GPU). */
const MAX_ABS_PARTS = 1024;

/** A one-pass code is read before this many more calls of maxAbsCodeInKernel: its slot is not written again before. */
export const MAX_ABS_CODE_SLOTS = 4;
/** The code slots of a device: a buffer's own slot is free but where two buffers of the last calls share one. */
export const MAX_ABS_CODE_BUFFERS = 4 * MAX_ABS_CODE_SLOTS;

/**
 * A device's code slots: int32 buffers that keep their value from one call to the next, each
 * slot's last epoch, the slot and input of the last MAX_ABS_CODE_SLOTS − 1 calls, and the slot
 * each input buffer was given first.
 */
export interface MaxAbsCodeSlots {
  buffers: GPUBuffer[];
  epochs: number[];
  recent: Array<{ slot: number; dataId: object }>;
  slotOf: WeakMap<object, number>;
  given: number;
}
const maxAbsCodeSlots = new WeakMap<GPUDevice, MaxAbsCodeSlots>();

/**
 * The code slot for a code of `input` on the backend's device as a [1] int32 TensorInfo (its buffer
 * not the pool's: disposing it frees nothing) and the epoch of this call there, one above the
 * slot's last. The slot follows the input's buffer: the one it got first, unless one of the last
 * MAX_ABS_CODE_SLOTS − 1 calls wrote it for another tensor (then the next slot none of them wrote);
 * the same tensor again writes the same code, so it keeps its slot. A training step takes the same
 * buffers from the pool each step, so its products bind the same slots each step and their bind
 * groups are made once (bind_groups.ts). Slots taken in turn made new bind groups for 4 steps at
 * OLMoE's 183 codes a step (183 mod 4 = 3: the turn moved each step; run Z14: 421 bind groups made
 * in the first timed step; run Z15: none after step 2). When a slot's epoch would pass MAX_ABS_CODE_EPOCHS the slots are new buffers (zeros:
 * below every epoch) and the old ones are left to the garbage collector, since commands recorded
 * and not yet submitted may bind them.
 */
function maxAbsCodeSlot(backend: WebGPUBackend, input: tf.TensorInfo): { info: tf.TensorInfo; epoch: number } {
  const internals = backend as unknown as BackendTensorMap;
  let slots = maxAbsCodeSlots.get(backend.device);
  if (slots === undefined || slots.epochs.some(e => e >= MAX_ABS_CODE_EPOCHS)) {
    const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
    slots = {
      buffers: Array.from({ length: MAX_ABS_CODE_BUFFERS }, () => backend.device.createBuffer({ size: 16, usage })),
      epochs: new Array<number>(MAX_ABS_CODE_BUFFERS).fill(0), recent: [], slotOf: new WeakMap(), given: 0,
    };
    maxAbsCodeSlots.set(backend.device, slots);
  }
  // the input's GPU buffer (the same each step for the same site), else its data (a new key each time)
  const key = (internals.tensorMap.get(input.dataId)?.resource as object | undefined) ?? input.dataId;
  let slot = slots.slotOf.get(key);
  if (slot === undefined) {
    slot = slots.given++ % MAX_ABS_CODE_BUFFERS;
    slots.slotOf.set(key, slot);
  }
  const again = slots.recent.find(r => r.dataId === input.dataId);
  if (again !== undefined) {
    slot = again.slot;
  } else {
    while (slots.recent.some(r => r.slot === slot)) slot = (slot + 1) % MAX_ABS_CODE_BUFFERS;
  }
  slots.recent.push({ slot, dataId: input.dataId });
  if (slots.recent.length > MAX_ABS_CODE_SLOTS - 1) slots.recent.shift();
  const epoch = ++slots.epochs[slot];
  const dataId = { id: internals.nextDataId() };
  internals.tensorMap.set(dataId, { dtype: 'int32', shape: [1], values: null, refCount: 1, external: true, resource: slots.buffers[slot] });
  return { info: { dataId, shape: [1], dtype: 'int32' }, epoch };
}

/** A device's code slots, as the specs see them (undefined before its first one-pass code). */
export function maxAbsCodeSlotsOf(device: GPUDevice): MaxAbsCodeSlots | undefined {
  return maxAbsCodeSlots.get(device);
}

/** The parts of WebGPUBackend's tensor bookkeeping that maxAbsCodeSlot uses (createTensorFromGPUData's, as a TensorInfo). */
interface BackendTensorMap {
  nextDataId(): number;
  tensorMap: { set(dataId: object, data: object): void; get(dataId: object): { resource?: unknown } | undefined };
}

/**
 * A dense product out = a·W (+ bias) on tensor cores: SubgroupMatrixMatMulProgram with one group,
 * f16 operands converted as the slabs are staged, f32 accumulation and result, as the experts'
 * products; a `gradient` (dy of dx = dy·W) is scaled per tensor into f16's range first (amax).
 */
function runDenseProductOnTensorCores(
    args: KernelArgs, tc: TensorCoreDevice, a: tf.TensorInfo, w: tf.TensorInfo, bias: tf.TensorInfo | undefined,
    layout: { inner: number; outCols: number; sN: number; sK: number }, packed: { kind: HalfKind; cols: number } | undefined,
    gradient: boolean, tail?: DenseKernelTail): tf.TensorInfo {
  const { inner, outCols, sN, sK } = layout;
  const n = a.shape[0];
  const tailRank = tail?.a.shape[1] ?? 0;
  if (tail !== undefined && !(tf.env().getBool(TC_LORA_TAIL_FLAG) && tailRank <= LORA_TAIL_MAX_RANK)) {
    return withDenseTail(args, runDenseProductOnTensorCores(args, tc, a, w, bias, layout, packed, gradient), tail);
  }
  // a product that splits K takes 128-row blocks whatever its row count: the slices supply the
  // parallelism that smaller blocks would, and each row block reads all of W (the LM head's dHidden at
  // 333 rows: 6 blocks of 64 read its 206 MB 6 times, 3 of 128 three times)
  // (a product that does not split at 128 rows does not at fewer either: more blocks, no fewer slices needed)
  const splits = bias == null && tail === undefined ? denseSplitK(n, outCols, inner, SUBGROUP_MATRIX_BLOCK.rows) : 1;
  const blockRows = splits > 1 ? SUBGROUP_MATRIX_BLOCK.rows : denseTensorCoreBlockRows(n, outCols);
  const spec = {
    source: 'rows' as const, hasBias: bias != null, hasAddend: false, kContiguous: sK === 1, scaled: gradient, singleGroup: true,
    packedWeight: packed === undefined ? undefined : { ...packed, layout: null }, loraTail: tail !== undefined, splitK: splits > 1,
  };
  const amax = gradient ? maxAbsCodeInKernel(args, a) : undefined;
  const half = halfLeftOperand(args, a, 'rows', undefined, inner, amax);
  const program = new SubgroupMatrixMatMulProgram(n, outCols, spec, tc.subgroupSize,
      withScaledDirectStores(matMulStaging(spec, { inner, outCols, sE: 0, sN, sK }, half !== undefined)), blockRows, splits);
  const uniforms: ProgramUniformEntry[] = [
    ...intUniforms(n, outCols, inner, 1, 1, 0, sN, sK), ...floatUniforms(1), ...activationUniforms(undefined),
    // the tail's alpha is 1
    ...(tail !== undefined ? [...intUniforms(tailRank, 0, ...denseTailStrides(tail, outCols)), ...floatUniforms(1)] : []),
    ...(splits > 1 ? intUniforms(splitKChunk(inner, splits)) : []),
  ];
  const inputs = [half?.a ?? a, w, ...(bias != null ? [bias] : []), ...(amax !== undefined ? [amax] : []),
    ...(tail !== undefined ? [tail.a, tail.b] : [])];
  const out = runGroupedProduct(args, program, inputs, uniforms, 2 * n * outCols * inner);
  for (const t of [amax, half?.a]) if (t !== undefined) webgpu(args).disposeData(t.dataId);
  if (splits === 1) return out;
  const sum = new SumSlicesProgram([n, outCols], splits);
  const total = webgpu(args).runWebGPUProgram(sum, [out], 'float32', sum.uniformsFor());
  webgpu(args).disposeData(out.dataId);
  return total;
}

/**
 * tf.env() flag: a dense product on tensor cores of few blocks over a long reduction splits its
 * reduction over workgroups (denseSplitK) and sums the slices after. false: one pass (A/B runs).
 */
export const DENSE_SPLIT_K_FLAG = 'WEBGPU_MOE_DENSE_SPLIT_K';
tf.env().registerFlag(DENSE_SPLIT_K_FLAG, () => true);

/** The workgroups a split-K product aims for: a few per SM of a large GPU (132 on the H100). */
const SPLIT_K_TARGET_BLOCKS = 512;
/** The least reduction a slice takes: below it the slices' partial results cost more than they save. */
const SPLIT_K_MIN_CHUNK = 2048;

/**
 * The slices of a dense product's reduction (1: none): enough that blocks × slices reach
 * SPLIT_K_TARGET_BLOCKS, each at least SPLIT_K_MIN_CHUNK deep. The LM head's dHidden = dLogits·W
 * at OLMoE's 333-row loss chunks has 96 blocks of 64 × 128 over a reduction of 50304 (run X6: 52
 * TFLOP/s, 9.2 GPU ms a step, where the forward x·Wᵀ's 1179 blocks ran at 105); in 128-row blocks
 * (what a split product takes) 48.
 *
 * ```js
 * denseSplitK(333, 2048, 50304, 128);  // 11: 48 blocks
 * denseSplitK(2048, 2048, 2048, 128);  // 1: 256 blocks, and a reduction of one chunk
 * ```
 */
export function denseSplitK(rows: number, outCols: number, inner: number, blockRows: number): number {
  if (!tf.env().getBool(DENSE_SPLIT_K_FLAG)) return 1;
  const blocks = Math.ceil(rows / blockRows) * Math.ceil(outCols / SUBGROUP_MATRIX_BLOCK.cols);
  return Math.max(1, Math.min(Math.ceil(SPLIT_K_TARGET_BLOCKS / blocks), Math.floor(inner / SPLIT_K_MIN_CHUNK)));
}

/** Each slice's reduction: inner / splits rounded up to whole slabs. */
function splitKChunk(inner: number, splits: number): number {
  const depth = SUBGROUP_MATRIX_BLOCK.depth;
  return Math.ceil(inner / splits / depth) * depth;
}

/**
 * Where W [rows, cols] (rows `rowStride` elements long) sits for a·Wᵀ (`transposeWeight`: reduces
 * over W's contiguous columns) or a·W (over its rows).
 */
function denseLayout(rows: number, cols: number, transposeWeight: boolean, rowStride: number) {
  return transposeWeight
    ? { inner: cols, outCols: rows, sN: rowStride, sK: 1 }
    : { inner: rows, outCols: cols, sN: 1, sK: rowStride };
}

/**
 * denseWeightMatMul's MoEPackedDenseMatMul (src/ops/packed.ts): a·Wᵀ or a·W for a packed 16-bit W
 * through runDenseProduct, a row being 2·ceil(cols/2) halves, or on tensor cores where
 * denseTensorCores says so (the halves decoded in the f16 staging). `tile` (the f32 program's)
 * defaults to packedDenseTile (bench/webgpu_dense_packed.ts sweeps others).
 */
export function runPackedDenseMatMul(
    args: KernelArgs, a: tf.TensorInfo, packed: tf.TensorInfo, bias: tf.TensorInfo | undefined,
    attrs: PackedDenseMatMulAttrs, tile = packedDenseTile(a.shape[0]), tail?: DenseKernelTail): tf.TensorInfo {
  const layout = denseLayout(attrs.rows, attrs.cols, attrs.transposeWeight, 2 * packed.shape[1]);
  const halves = { kind: attrs.kind, cols: attrs.cols };
  const tc = denseTensorCores(webgpu(args).device, a.shape[0], layout.outCols, layout.inner);
  if (tc !== undefined) return runDenseProductOnTensorCores(args, tc, a, packed, bias, layout, halves, attrs.gradient === true, tail);
  return runDenseProduct(args, a, packed, { bias }, layout, halves, tile, tail);
}

/** A dense product's LoRA tail (DenseProductTail) as its kernel sees it. */
interface DenseKernelTail { a: tf.TensorInfo; b: tf.TensorInfo; transposeB: boolean }

/** The kernel's inputs tailA, tailB and attr tailTransposeB, if given. */
function denseKernelTail(args: KernelArgs): DenseKernelTail | undefined {
  const { tailA, tailB } = args.inputs as Record<string, tf.TensorInfo | undefined>;
  if (tailA == null || tailB == null) return undefined;
  return { a: tailA, b: tailB, transposeB: args.attrs!.tailTransposeB === true };
}

/** product + the tail's a·op(b) by MoEMatMulAdd's programs (the tail not folded into the product); disposes `product`. */
function withDenseTail(args: KernelArgs, product: tf.TensorInfo, tail: DenseKernelTail | undefined): tf.TensorInfo {
  if (tail === undefined) return product;
  const sum = runMatMulAdd(args, tail.a, tail.b, product, false, tail.transposeB);
  webgpu(args).disposeData(product.dataId);
  return sum;
}

const packedDenseMatMulConfig: tf.KernelConfig = {
  kernelName: PACKED_DENSE_MATMUL,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { a, packed, bias } = args.inputs as Record<string, tf.TensorInfo>;
    const attrs = args.attrs as unknown as PackedDenseMatMulAttrs;
    return runPackedDenseMatMul(args, a, packed, bias, attrs, packedDenseTile(a.shape[0]), denseKernelTail(args));
  },
};

/**
 * denseWeightMatMul's MoEDenseMatMul (src/ops/packed.ts): a·Wᵀ or a·W for a float32 W through
 * runDenseProduct, with packedDenseTile's tile: on the H100 that program's forward beat
 * tfjs-webgpu's MatMulPacked by up to 1.8× on the bf16 weight (docs/webgpu.md); the float32 weight
 * doubles what it reads of W. On tensor cores (denseTensorCores) the subgroup-matrix program runs
 * instead, whichever direction. `tile` defaults to packedDenseTile (the bench sweeps others).
 */
export function runDenseMatMul(
    args: KernelArgs, a: tf.TensorInfo, weight: tf.TensorInfo, bias: tf.TensorInfo | undefined,
    attrs: DenseMatMulAttrs, tile = packedDenseTile(a.shape[0]), tail?: DenseKernelTail): tf.TensorInfo {
  const layout = denseLayout(attrs.rows, attrs.cols, attrs.transposeWeight, attrs.cols);
  const tc = denseTensorCores(webgpu(args).device, a.shape[0], layout.outCols, layout.inner);
  if (tc !== undefined) return runDenseProductOnTensorCores(args, tc, a, weight, bias, layout, undefined, attrs.gradient === true, tail);
  return runDenseProduct(args, a, weight, { bias }, layout, undefined, tile, tail);
}

const denseMatMulConfig: tf.KernelConfig = {
  kernelName: DENSE_MATMUL,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { a, weight, bias } = args.inputs as Record<string, tf.TensorInfo>;
    return runDenseMatMul(args, a, weight, bias, args.attrs as unknown as DenseMatMulAttrs, packedDenseTile(a.shape[0]),
        denseKernelTail(args));
  },
};

/**
 * The training loop's MoEAdamUpdate (src/train/adam_update.ts), under that op's own name: one
 * program for the parameter and one for both moments, instead of the composed op's ~14 kernels
 * per variable (issue 15).
 */
const adamUpdateConfig: tf.KernelConfig = {
  kernelName: ADAM_UPDATE,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const inputs = args.inputs as Record<string, tf.TensorInfo>;
    const scaled = inputs.gradScale !== undefined;
    const list = [inputs.param, inputs.grad, inputs.moments, ...(scaled ? [inputs.gradScale] : [])];
    const uniforms = AdamUpdateProgram.uniformsFor(args.attrs as unknown as AdamUpdateAttrs);
    return (['param', 'moments'] as const).map(output =>
      webgpu(args).runWebGPUProgram(new AdamUpdateProgram(inputs.param.shape, output, scaled), list, 'float32', uniforms));
  },
};

/** The most workgroups SumOfSquaresProgram gives one input (a few per SM of a large GPU, as MAX_ABS_PARTS). */
const SUM_OF_SQUARES_PARTS = 1024;

/**
 * sumOfSquares's MoESumOfSquares (src/train/sum_of_squares.ts), under that op's own name: Σ x² of
 * up to addNInputsPerProgram inputs a dispatch (SumOfSquaresProgram), each input on workgroups
 * of its own that read ~16 elements a lane, then the partial sums of those dispatches, up to
 * addNInputsPerProgram of them a workgroup, until one value is left. At OLMoE's 224 LoRA gradients:
 * 15 dispatches and one more on a device of 16 storage buffers, where the composed ops took 184.
 * Empty inputs bind nothing (Dawn rejects a zero-sized binding).
 */
const sumOfSquaresConfig: tf.KernelConfig = {
  kernelName: SUM_OF_SQUARES,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const backend = webgpu(args);
    const perDispatch = addNInputsPerProgram(backend.device.limits);
    const flat = (t: tf.TensorInfo) => ({ dataId: t.dataId, shape: [tf.util.sizeFromShape(t.shape)], dtype: t.dtype });
    // AddN's convention: the inputs are the array of tensors, not a map of names
    let level = (args.inputs as unknown as tf.TensorInfo[]).map(flat).filter(t => t.shape[0] > 0);
    if (level.length === 0) return backend.makeTensorInfo([], 'float32', new Float32Array(1));
    const made: tf.TensorInfo[] = [];
    const pass = (mode: SumOfSquaresMode) => {
      const next: tf.TensorInfo[] = [];
      for (let i = 0; i < level.length; i += perDispatch) {
        const group = level.slice(i, i + perDispatch);
        const program = new SumOfSquaresProgram(group.map(t => {
          const quads = t.shape[0] % 4 === 0;
          const loads = quads ? t.shape[0] / 4 : t.shape[0];
          return { loads, quads, parts: mode.together ? 1 : Math.min(SUM_OF_SQUARES_PARTS, Math.ceil(loads / (4 * SUM_OF_SQUARES_THREADS))) };
        }), mode);
        const out = backend.runWebGPUProgram(program, group, 'float32', program.uniformsFor());
        made.push(out);
        next.push(out);
      }
      level = next;
    };
    // every input on workgroups of its own, then the partial sums, a group to one workgroup, until one value is left
    pass({ square: true, together: false });
    while (level.length > 1 || level[0].shape[0] > 1) pass({ square: false, together: true });
    const total = made.pop()!;
    made.forEach(t => backend.disposeData(t.dataId));
    return { dataId: total.dataId, shape: [], dtype: 'float32' };
  },
};

/**
 * applyRotary's and applyRotaryToHeads' MoERotary (src/ops/rotary.ts), under that op's own name:
 * rope or its gradient in one program instead of the composed Reverse, two products and a sum
 * (issue 15); with `heads`, the heads' transpose in the same program.
 */
const rotaryConfig: tf.KernelConfig = {
  kernelName: ROTARY,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { x, cos, sin } = args.inputs as Record<string, tf.TensorInfo>;
    const { transposed, heads } = args.attrs as unknown as RotaryAttrs;
    const tableRows = cos.shape.length === 2 ? 0 : cos.shape[0];
    // the rotation's [N, S, D]: x's own, or [B·h, S, D] from the forward's x [B, S, h, D]
    const shape = heads > 0 && !transposed ? [x.shape[0] * x.shape[2], x.shape[1], x.shape[3]] : x.shape;
    return webgpu(args).runWebGPUProgram(new RotaryProgram(shape, transposed, heads), [x, cos, sin],
        'float32', RotaryProgram.uniformsFor(shape, tableRows, heads));
  },
};

/**
 * rmsNorm's MoERMSNorm and MoERMSNormGradX (src/ops/rms_norm.ts), under that op's own names: a
 * frozen-weight norm and its gradient in one program each instead of six (issue 15).
 */
const rmsNormConfig: tf.KernelConfig = {
  kernelName: RMS_NORM,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { x, scale } = args.inputs as Record<string, tf.TensorInfo>;
    return webgpu(args).runWebGPUProgram(new RMSNormProgram(x.shape, 'forward'), [x, scale], 'float32',
        RMSNormProgram.uniformsFor(x.shape, args.attrs!.epsilon as number));
  },
};

const rmsNormGradXConfig: tf.KernelConfig = {
  kernelName: RMS_NORM_GRAD_X,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { dy, x, scale } = args.inputs as Record<string, tf.TensorInfo>;
    return webgpu(args).runWebGPUProgram(new RMSNormProgram(x.shape, 'gradX'), [dy, x, scale], 'float32',
        RMSNormProgram.uniformsFor(x.shape, args.attrs!.epsilon as number));
  },
};

/** maskedSoftmax's MoEMaskedSoftmax (src/ops/masked_softmax.ts): one program instead of an Add and a Softmax. */
const maskedSoftmaxConfig: tf.KernelConfig = {
  kernelName: MASKED_SOFTMAX,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { scores, mask } = args.inputs as Record<string, tf.TensorInfo>;
    const program = new MaskedSoftmaxProgram(scores.shape, mask.shape);
    return webgpu(args).runWebGPUProgram(program, [scores, mask], 'float32', program.uniformsFor());
  },
};

/** softmaxGrad's MoESoftmaxGrad (src/ops/softmax_grad.ts): one program instead of four. */
const softmaxGradConfig: tf.KernelConfig = {
  kernelName: SOFTMAX_GRAD,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { p, dP } = args.inputs as Record<string, tf.TensorInfo>;
    const program = new SoftmaxGradProgram(p.shape);
    return webgpu(args).runWebGPUProgram(program, [p, dP], 'float32', program.uniformsFor());
  },
};

/**
 * matMulAdd's MoEMatMulAdd (src/ops/matmul_add.ts): tfjs-webgpu's own _FusedMatMul (as registered
 * now, so batch_mat_mul.ts's wrapper too) with the addend as its bias, which its products add per
 * output element in any broadcastable shape: a LoRA branch or a dx part and its sum in one program.
 * A reduction at most NARROW_MAX_COLS deep with a full [M, N] addend (LoRA's expansions) runs
 * runNarrowInnerDenseProduct where denseNarrowFits; otherwise, with WEBGPU_MOE_DENSE_PROGRAM 'grouped'
 * (not the default) a·b (+ a full [M, N] addend) runs runDenseProduct, b read at its strides.
 */
const matMulAddConfig: tf.KernelConfig = {
  kernelName: MATMUL_ADD,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { a, b, addend } = args.inputs as Record<string, tf.TensorInfo>;
    const { transposeA, transposeB } = args.attrs as { transposeA: boolean; transposeB: boolean };
    return runMatMulAdd(args, a, b, addend, transposeA, transposeB);
  },
};

/** MoEMatMulAdd's a·op(b) + addend, from its kernel or a dense product's unfolded LoRA tail. */
function runMatMulAdd(args: KernelArgs, a: tf.TensorInfo, b: tf.TensorInfo, addend: tf.TensorInfo, transposeA: boolean,
    transposeB: boolean): tf.TensorInfo {
  const [m, k] = a.shape;
  const n = transposeB ? b.shape[0] : b.shape[1];
  const addendFits = !transposeA && addend.shape.length === 2 && addend.shape[0] === m && addend.shape[1] === n;
  if (addendFits && denseNarrowFits(m, k)) return runNarrowInnerDenseProduct(args, a, b, addend, transposeB);
  if (addendFits && denseProgramChoice() === 'grouped') {
    // b [K, N]: W(k, n) = b[k·N + n]; transposed, b [N, K]: b[n·K + k]
    const layout = transposeB ? { inner: k, outCols: n, sN: k, sK: 1 } : { inner: k, outCols: n, sN: 1, sK: n };
    return runDenseProduct(args, a, b, { addend }, layout, undefined, packedDenseTile(m));
  }
  const fused = tf.getKernel(tf._FusedMatMul, BACKEND)!;
  return fused.kernelFunc({
    inputs: { a, b, bias: addend }, backend: args.backend,
    attrs: { transposeA, transposeB, activation: 'linear', leakyreluAlpha: 0 },
  }) as tf.TensorInfo;
}

/**
 * scaledDotProductAttention's MoEAttention and MoEAttentionGrad (src/ops/attention_core.ts), under
 * that op's own names, none holding an [Nq, S, L] buffer (issue 15). MOE_ATTENTION_PROGRAM picks
 * the programs: 'tiled' (TiledAttentionProgram: forward 2 programs, O; with `withStats`, the rows'
 * max and sum; backward 4: Δ = rowsum(dO ⊙ O), dQ, dK, dV) or 'rows' (AttentionProgram, a thread
 * per row: forward 2, backward 3: dQ, dK, dV). With 'tiled' on tensor cores (attentionTensorCores)
 * SubgroupMatrixAttentionProgram runs instead: forward 2 programs whether or not the statistics are
 * output (the statistics, then O from them), backward 5 (Δ, max |dO| in tfjs's Abs and two Max,
 * dQ and dV on tensor cores, dK still on the tiled f32 program).
 */
function attentionDims(q: tf.TensorInfo, k: tf.TensorInfo, v: tf.TensorInfo, mask: tf.TensorInfo): AttentionDims {
  const [nq, seqLen, dk] = q.shape;
  const [nkv, keyLen] = k.shape;
  return { nkv, rep: nq / nkv, seqLen, keyLen, dk, dv: v.shape[2], maskBatch: mask.shape.length === 4 ? mask.shape[0] : 0 };
}

/**
 * The TensorCoreDevice on which MoEAttention / MoEAttentionGrad run heads of Dk, Dv on
 * SubgroupMatrixAttentionProgram, or undefined (the f32 programs, exactly as without tensor
 * cores): WEBGPU_MOE_TENSOR_CORES on and a registered device (activeTensorCores), the 'tiled'
 * programs chosen ('rows' stays AttentionProgram, for timing), and head widths, subgroup size and
 * workgroup memory that fit (subgroupMatrixAttentionMisfit: Dk, Dv multiples of 16 up to 128).
 */
export function attentionTensorCores(dk: number, dv: number): TensorCoreDevice | undefined {
  const tc = activeTensorCores();
  if (tc === undefined || attentionProgramKind() !== 'tiled') return undefined;
  const limits = (tf.backend() as unknown as { device: GPUDevice }).device.limits;
  return subgroupMatrixAttentionMisfit({ dk, dv }, tc.subgroupSize, limits.maxComputeWorkgroupStorageSize) === undefined ? tc : undefined;
}
// the op applies MOE_ATTENTION_TENSOR_CORE_MIN_BYTES where the programs above would run
registerTensorCoreAttention(BACKEND, (dk, dv) => attentionTensorCores(dk, dv) !== undefined);

function runAttentionPass(args: KernelArgs, pass: AttentionPass, dims: AttentionDims, inputs: tf.TensorInfo[]): tf.TensorInfo {
  const b = webgpu(args);
  const program = new AttentionProgram(pass, dims, b.device.limits.maxComputeWorkgroupStorageSize);
  return b.runWebGPUProgram(program, inputs, 'float32', AttentionProgram.uniformsFor(dims, (args.attrs as unknown as AttentionAttrs).scale));
}

function runTiledAttentionPass(args: KernelArgs, pass: TiledAttentionPass, dims: AttentionDims, inputs: tf.TensorInfo[]): tf.TensorInfo {
  const b = webgpu(args);
  const program = new TiledAttentionProgram(pass, dims, b.device.limits.maxComputeWorkgroupStorageSize);
  return b.runWebGPUProgram(program, inputs, 'float32', TiledAttentionProgram.uniformsFor(dims, (args.attrs as unknown as AttentionAttrs).scale));
}

function runTensorCoreAttentionPass(args: KernelArgs, pass: SubgroupMatrixAttentionPass, dims: AttentionDims, inputs: tf.TensorInfo[],
    tc: TensorCoreDevice): tf.TensorInfo {
  const program = new SubgroupMatrixAttentionProgram(pass, dims, tc.subgroupSize);
  // the same uniforms as the tiled programs'
  return webgpu(args).runWebGPUProgram(program, inputs, 'float32',
      TiledAttentionProgram.uniformsFor(dims, (args.attrs as unknown as AttentionAttrs).scale));
}

const attentionConfig: tf.KernelConfig = {
  kernelName: ATTENTION,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { q, k, v, mask } = args.inputs as Record<string, tf.TensorInfo>;
    const dims = attentionDims(q, k, v, mask);
    const withStats = (args.attrs as unknown as AttentionAttrs).withStats;
    const tc = attentionTensorCores(dims.dk, dims.dv);
    if (tc !== undefined) {
      // O from exact probabilities: the rows' statistics first
      const stats = runTensorCoreAttentionPass(args, 'stats', dims, [q, k, mask], tc);
      const o = runTensorCoreAttentionPass(args, 'forward', dims, [q, k, v, mask, stats], tc);
      if (withStats) return [o, stats];
      webgpu(args).disposeData(stats.dataId);
      return [o];
    }
    const run = attentionProgramKind() === 'tiled' ? runTiledAttentionPass : runAttentionPass;
    const o = run(args, 'forward', dims, [q, k, v, mask]);
    if (!withStats) return [o];
    return [o, run(args, 'stats', dims, [q, k, mask])];
  },
};

const attentionGradConfig: tf.KernelConfig = {
  kernelName: ATTENTION_GRAD,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { q, k, v, mask, o, stats, dy } = args.inputs as Record<string, tf.TensorInfo>;
    const dims = attentionDims(q, k, v, mask);
    if (attentionProgramKind() === 'rows') {
      return [
        runAttentionPass(args, 'gradQ', dims, [q, k, v, mask, o, stats, dy]),
        runAttentionPass(args, 'gradK', dims, [q, k, v, mask, o, stats, dy]),
        runAttentionPass(args, 'gradV', dims, [q, k, mask, stats, dy]),
      ];
    }
    const deltas = runTiledAttentionPass(args, 'delta', dims, [o, dy]);     // [Nq, S]
    const tc = attentionTensorCores(dims.dk, dims.dv);
    let grads: tf.TensorInfo[];
    if (tc !== undefined) {
      const amax = maxAbsCodeInKernel(args, dy);                                     // [1]
      grads = [
        runTensorCoreAttentionPass(args, 'gradQ', dims, [q, k, v, mask, stats, deltas, dy, amax], tc),
        // dK on the f32 tiled program: SubgroupMatrixAttentionProgram has no gradK pass (its file
        // comment says why)
        runTiledAttentionPass(args, 'gradK', dims, [q, k, v, mask, stats, deltas, dy]),
        runTensorCoreAttentionPass(args, 'gradV', dims, [q, k, mask, stats, dy, amax], tc),
      ];
      webgpu(args).disposeData(amax.dataId);
    } else {
      grads = [
        runTiledAttentionPass(args, 'gradQ', dims, [q, k, v, mask, stats, deltas, dy]),
        runTiledAttentionPass(args, 'gradK', dims, [q, k, v, mask, stats, deltas, dy]),
        runTiledAttentionPass(args, 'gradV', dims, [q, k, mask, stats, dy]),
      ];
    }
    webgpu(args).disposeData(deltas.dataId);
    return grads;
  },
};

// ---- dense LoRA products ------------------------------------------------------------------------

/**
 * From this many rows a dense product runs DenseNarrowMatMulProgram with 2 rows a thread (8-row
 * workgroups of 4 rows × 64 lanes), below it 1 (4-row): 2 rows share each load of W (n loads of W
 * per load of A at 1 row, L1 traffic n times A's) and still leave 256 workgroups at 2048 rows,
 * about two per H100 SM; fewer rows keep 1 so that the workgroups stay many. Run V (H100, OLMoE's
 * s·x·Aᵀ at 2048 rows, bench/webgpu_dense_lora_products.ts): 17.4 µs a call, the fastest of the nine
 * layouts 16.8 (128 lanes × 2), NarrowGroupedMatMulProgram's single-group form 53.4.
 */
const DENSE_NARROW_MANY_ROWS = 2048;

/** DenseNarrowMatMulProgram's layout for a dense product of `rows` rows (DENSE_NARROW_MANY_ROWS). */
export function denseNarrowLayoutFor(rows: number): DenseNarrowMatMulLayout {
  return { lanes: 64, rowsPerThread: rows >= DENSE_NARROW_MANY_ROWS ? 2 : 1 };
}

/**
 * DenseNarrowMatMulProgram's layout for an experts' product r wide over a plan (the dense
 * products' at its capacity), or undefined: NarrowGroupedMatMulProgram. Only where W_e is
 * contiguous along k (`kContiguous`: LoRA's A [r·E, in], the forward's x·A_eᵀ and act(h)·A_eᵀ):
 * each lane reads W straight from memory, and PEFT's B [in, r·E] (backward's s·dy·B_e) puts a k's
 * r values E apart, r cache lines a k, which made those products 2–4× slower than staging W (run
 * Z12: 332 and 584 µs a call against ~140). Also undefined where NARROW_LANE_PRODUCTS_FLAG is off or
 * the block does not divide the row tile (a block must not span two experts).
 *
 * ```js
 * groupedNarrowLayoutFor(128, 24576, true);    // { lanes: 64, rowsPerThread: 2 }: 8-row blocks
 * groupedNarrowLayoutFor(128, 24576, false);   // undefined
 * groupedNarrowLayoutFor(4, 64, true);         // undefined
 * ```
 */
export function groupedNarrowLayoutFor(rowTile: number, capacity: number, kContiguous: boolean): DenseNarrowMatMulLayout | undefined {
  const layout = denseNarrowLayoutFor(capacity);
  return tf.env().getBool(NARROW_LANE_PRODUCTS_FLAG) && kContiguous && rowTile % denseNarrowBlockRows(layout) === 0 ? layout : undefined;
}

/**
 * Which program runs a dense product r wide: DenseNarrowMatMulProgram with a layout (the kernel's,
 * denseNarrowLayoutFor), or NarrowGroupedMatMulProgram's single-group form with its rows per
 * thread (the program before, which bench/webgpu_dense_lora_products.ts times against it).
 */
export type DenseNarrowProductForm =
  | { program: 'dense'; layout: DenseNarrowMatMulLayout }
  | { program: 'grouped'; rowsPerThread: 1 | 2 };

/**
 * Whether a dense LoRA product over `rows` rows whose result's narrow side is `narrowSide` (r)
 * runs the narrow programs: NARROW_PRODUCTS_FLAG and DENSE_NARROW_PRODUCTS_FLAG on, r ≤ NARROW_MAX_COLS
 * and at least one row (the programs are sized by the rows; an empty product keeps the programs before).
 */
export function denseNarrowFits(rows: number, narrowSide: number): boolean {
  return tf.env().getBool(NARROW_PRODUCTS_FLAG) && tf.env().getBool(DENSE_NARROW_PRODUCTS_FLAG) &&
      narrowSide <= NARROW_MAX_COLS && rows > 0;
}

/**
 * out [m, n] = scale·a·op(b) with n ≤ NARROW_MAX_COLS, one group of plain rows (no plan, nothing
 * uploaded): DenseNarrowMatMulProgram (lanes splitting each row's k) in the kernel's layout, or
 * `form`. Any m: rows past m are not written. MoEScaledMatMul's kernel calls it with the default;
 * bench/webgpu_dense_lora_products.ts times every layout against NarrowGroupedMatMulProgram's
 * single-group form ({ program: 'grouped' }), 16 rows a workgroup with W staged per 64-deep chunk.
 */
export function runNarrowDenseProduct(args: KernelArgs, a: tf.TensorInfo, b: tf.TensorInfo, transposeB: boolean, scale: number,
    form: DenseNarrowProductForm = { program: 'dense', layout: denseNarrowLayoutFor(a.shape[0]) }): tf.TensorInfo {
  const [m, k] = a.shape;
  const n = transposeB ? b.shape[0] : b.shape[1];
  // W(k, n) = b[n·K + k] transposed ([N, K], e.g. LoRA's A), else b[k·N + n] ([K, N], LoRA's B)
  const [sN, sK] = transposeB ? [k, 1] : [1, n];
  if (form.program === 'dense') {
    const program = new DenseNarrowMatMulProgram(m, n, form.layout);
    return runGroupedProduct(args, program, [a, b], [...intUniforms(m, n, k, sN, sK), ...floatUniforms(scale)], 2 * m * n * k);
  }
  const program = new NarrowGroupedMatMulProgram(m, n, {
    source: 'rows', kContiguous: sK === 1, rowsPerThread: form.rowsPerThread, singleGroup: true,
  });
  const uniforms: ProgramUniformEntry[] = [
    ...intUniforms(m, n, k, 1, 1, 0, sN, sK), ...floatUniforms(scale), ...activationUniforms(undefined),
  ];
  return runGroupedProduct(args, program, [a, b], uniforms, 2 * m * n * k);
}

/**
 * out [m, n] = addend + a·op(b) with a reduction k ≤ NARROW_MAX_COLS deep (dense LoRA's expansions
 * y + u·Bᵀ and dx + g·A, [m, r]·[r, n]) as the experts' expansions with one group
 * (NarrowInnerGroupedMatMulProgram in 64-row blocks, singleGroup: no plan, nothing uploaded): bound
 * by reading the addend and writing out, where tfjs's matMul stages an r-deep reduction built for
 * deep ones.
 */
function runNarrowInnerDenseProduct(args: KernelArgs, a: tf.TensorInfo, b: tf.TensorInfo, addend: tf.TensorInfo,
    transposeB: boolean): tf.TensorInfo {
  const [m, k] = a.shape;
  const n = transposeB ? b.shape[0] : b.shape[1];
  const [sN, sK] = transposeB ? [k, 1] : [1, n];
  const program = new NarrowInnerGroupedMatMulProgram(m, n, k, {
    source: 'rows', hasAddend: true, vec4: n % 4 === 0, blockRows: 64, singleGroup: true,
  });
  const uniforms: ProgramUniformEntry[] = [
    ...intUniforms(m, n, k, 1, 1, 0, sN, sK), ...floatUniforms(1), ...activationUniforms(undefined),
  ];
  return runGroupedProduct(args, program, [a, b, addend], uniforms, 2 * m * n * k);
}

/**
 * scaledMatMul's MoEScaledMatMul (src/ops/scaled_matmul.ts): LoRA's rank-sized product and its
 * scale s in one program instead of a product and a BinaryOpProgram. r ≤ NARROW_MAX_COLS outputs
 * (s·x·Aᵀ, s·dy·B) run DenseNarrowMatMulProgram (runNarrowDenseProduct) where denseNarrowFits,
 * reading each row of x or dy once; otherwise ScaledMatMulProgram.
 */
const scaledMatMulConfig: tf.KernelConfig = {
  kernelName: SCALED_MATMUL,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { a, b } = args.inputs as Record<string, tf.TensorInfo>;
    const { transposeB, scale } = args.attrs as unknown as ScaledMatMulAttrs;
    const [m, k] = a.shape;
    const n = transposeB ? b.shape[0] : b.shape[1];
    if (denseNarrowFits(m, n)) return runNarrowDenseProduct(args, a, b, transposeB, scale);
    const program = new ScaledMatMulProgram(m, n, transposeB);
    return webgpu(args).runWebGPUProgram(program, [a, b], 'float32', program.uniformsFor(k, scale));
  },
};

/**
 * aᵀ·b [P, Q] for a [N, P], b [N, Q] with P or Q ≤ NARROW_MAX_COLS (dA = gᵀ·x, dB = dyᵀ·u): the
 * experts' narrow weight gradient in its single-group form (no plan, nothing uploaded), the N rows
 * summed in chunks of `chunkRows` (the last one the rest) and the chunks added after, in order
 * (narrowWeightGrad's two programs). MoEWeightGradProduct's kernel calls it with
 * DENSE_GRAD_CHUNK_ROWS_FLAG's rows; bench/webgpu_dense_lora_products.ts times others.
 */
export function runNarrowDenseWeightGrad(args: KernelArgs, a: tf.TensorInfo, b: tf.TensorInfo,
    chunkRows = denseGradChunkRows()): tf.TensorInfo {
  const backend = webgpu(args);
  const [rows, P] = a.shape;
  const Q = b.shape[1];
  const narrow = P <= Q ? 'P' : 'Q';
  const partial = runGroupedProduct(args, new NarrowWeightGradProgram(rows, chunkRows, P, Q, {
    left: 'rows', right: 'rows', scaleLeft: false, narrow, singleGroup: true,
    // the tiled program's tile, which the narrow one does not read
    tile: { tm: 1, tn: 1, bk: 16 },
  }), [a, b], [...intUniforms(P, Q, rows, chunkRows), ...activationUniforms(undefined)], 2 * rows * P * Q);
  // [P, Q] row-major: oP Q, oQ 1
  const out = backend.runWebGPUProgram(new NarrowWeightGradSumProgram([P, Q], 1, P, Q, narrow, true), [partial], 'float32', [
    ...intUniforms(P, Q, rows, chunkRows, Q, 1), ...floatUniforms(1),
  ]);
  backend.disposeData(partial.dataId);
  return out;
}

/**
 * weightGradProduct's MoEWeightGradProduct (src/ops/weight_grad_product.ts): aᵀ·b [P, Q] for a
 * [N, P], b [N, Q]; runNarrowDenseWeightGrad where denseNarrowFits (P or Q ≤ NARROW_MAX_COLS),
 * else tfjs's BatchMatMul as tf.matMul(a, b, true, false) runs it. No rows:
 * zeros (tfjs's Fill), since any program would bind the empty a, which Dawn rejects (a zero-sized
 * binding invalidates the whole command buffer, tfjs's matMul included).
 */
const weightGradProductConfig: tf.KernelConfig = {
  kernelName: WEIGHT_GRAD_PRODUCT,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { a, b } = args.inputs as Record<string, tf.TensorInfo>;
    return weightGradProductOnWebGPU(args, a, b);
  },
};

/** MoEWeightGradProduct's aᵀ·b (see weightGradProductConfig). */
function weightGradProductOnWebGPU(args: KernelArgs, a: tf.TensorInfo, b: tf.TensorInfo): tf.TensorInfo {
  if (a.shape[0] === 0) {
    return tf.getKernel(tf.Fill, BACKEND)!.kernelFunc({
      inputs: {}, backend: args.backend, attrs: { shape: [a.shape[1], b.shape[1]], value: 0, dtype: 'float32' },
    }) as tf.TensorInfo;
  }
  if (denseNarrowFits(a.shape[0], Math.min(a.shape[1], b.shape[1]))) return runNarrowDenseWeightGrad(args, a, b);
  return tf.getKernel(tf.BatchMatMul, BACKEND)!.kernelFunc({
    inputs: { a, b }, backend: args.backend, attrs: { transposeA: true, transposeB: false },
  }) as tf.TensorInfo;
}

/**
 * [a0ᵀ·b0, a1ᵀ·b1] over the same N rows, both narrow (a LoRA projection's dA = gᵀ·x and dB = dyᵀ·u):
 * narrowWeightGradPair's two dispatches in the single-group form, chunks of DENSE_GRAD_CHUNK_ROWS_FLAG's
 * rows, where runNarrowDenseWeightGrad takes two per product; the same gradients bit for bit.
 */
export function runNarrowDenseWeightGradPair(args: KernelArgs, a0: tf.TensorInfo, b0: tf.TensorInfo, a1: tf.TensorInfo, b1: tf.TensorInfo,
    chunkRows = denseGradChunkRows()): [tf.TensorInfo, tf.TensorInfo] {
  const products: [NarrowGradProduct, NarrowGradProduct] = [{ P: a0.shape[1], Q: b0.shape[1] }, { P: a1.shape[1], Q: b1.shape[1] }];
  const rowMajor = ({ P, Q }: NarrowGradProduct): PairGradientOut => ({ shape: [P, Q], oE: 0, oP: Q, oQ: 1, alpha: 1 });
  return narrowWeightGradPair(args, [a0, b0, a1, b1], products, { capacity: a0.shape[0], unitRows: chunkRows, chunkRows, topK: 1 },
      [rowMajor(products[0]), rowMajor(products[1])]);
}

/**
 * Two narrow weight gradients over the same rows and chunks in two dispatches: both products'
 * chunks in NarrowWeightGradPairProgram (the product: submitted after it when big, see
 * SUBMIT_FLOPS_FLAG), then one sum of our own into both gradients (weight_grad_pairs.ts), where
 * NarrowWeightGradProgram and its sum take two per product. `inputs` as the program's
 * variableNames; `rows.seg` the plan's segments with a plan.
 */
function narrowWeightGradPair(args: KernelArgs, inputs: tf.TensorInfo[], products: [NarrowGradProduct, NarrowGradProduct],
    rows: PairChunks & { capacity: number; topK: number; activation?: ExpertActivation },
    outs: [PairGradientOut, PairGradientOut]): [tf.TensorInfo, tf.TensorInfo] {
  const own = narrowGradPairSumBackend();  // before the first program: a refusal leaves nothing behind
  const program = new NarrowWeightGradPairProgram(rows.capacity, rows.unitRows, products, rows.plan === undefined);
  const { parts, perUnit } = program;
  const numExperts = rows.plan?.numExperts ?? 1;
  const flops = products.reduce((sum, { P, Q }) => sum + 2 * rows.capacity * P * Q, 0);
  const partial = runGroupedProduct(args, program, inputs, [
    ...intUniforms(products[0].P, products[0].Q, products[1].P, products[1].Q, rows.capacity, rows.topK, numExperts, rows.unitRows,
        rows.chunkRows, perUnit, parts[1].firstBlock, parts[1].offset),
    ...activationUniforms(rows.activation),
  ], flops);
  const gradients = recordNarrowGradPairSum(own, partial, parts, outs, rows);
  // kept by the command queue until the sum is submitted
  webgpu(args).disposeData(partial.dataId);
  return gradients;
}

/**
 * weightGradProductPair's MoEWeightGradProductPair (src/ops/weight_grad_product.ts): two products
 * aᵀ·b as MoEWeightGradProduct computes each; runNarrowDenseWeightGradPair where both take the
 * narrow programs over the same rows and WEIGHT_GRAD_PAIRS_FLAG is on, else one at a time.
 */
const weightGradProductPairConfig: tf.KernelConfig = {
  kernelName: WEIGHT_GRAD_PRODUCT_PAIR,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { a0, b0, a1, b1 } = args.inputs as Record<string, tf.TensorInfo>;
    const rows = a0.shape[0];
    const narrow = (a: tf.TensorInfo, b: tf.TensorInfo) => denseNarrowFits(rows, Math.min(a.shape[1], b.shape[1]));
    if (tf.env().getBool(WEIGHT_GRAD_PAIRS_FLAG) && a1.shape[0] === rows && narrow(a0, b0) && narrow(a1, b1)) {
      return runNarrowDenseWeightGradPair(args, a0, b0, a1, b1);
    }
    return [weightGradProductOnWebGPU(args, a0, b0), weightGradProductOnWebGPU(args, a1, b1)];
  },
};

/** How MoEBatchProduct runs on tensor cores: its program with that program's block rows or slab depth, or why not. */
export type BatchProductTensorCoreRoute =
  | { program: 'matMul'; blockRows: SubgroupBlockRows }
  | { program: 'weightGrad'; depth: 32 | 64 }
  | { f32: string };

/**
 * MoEBatchProduct's route on a device with tensor cores, for an output [batch, m, n] reduced over
 * k: op(a)·op(b) as SubgroupMatrixMatMulProgram with uniform groups of m rows (b along n, or
 * transposeB: b stored [n, k], kContiguous), aᵀ·b as SubgroupMatrixWeightGradProgram with
 * segments of k rows; f32 (tfjs's BatchMatMul) where the programs have no form for it (aᵀ·bᵀ; the
 * MatMul scales only its left operand, so not a gradient b), where a block of 32 rows or more
 * would span two batches (m no multiple of 32), or where the product is too narrow
 * (wideEnoughForTensorCores). MatMul blocks as the dense products': 128 rows, 64 where blocks of
 * 128 would be fewer than DENSE_TC_FEW_BLOCKS.
 *
 * ```js
 * batchProductTensorCoreRoute({ transposeA: false, transposeB: true, gradient: 'none' }, 64, 512, 512, 128);
 * // { program: 'matMul', blockRows: 128 }   (attention's scores at OLMoE's shape)
 * ```
 */
export function batchProductTensorCoreRoute(attrs: BatchProductAttrs, batch: number, m: number, n: number, k: number):
    BatchProductTensorCoreRoute {
  if (batch < 1) return { f32: 'an empty batch' };
  if (attrs.transposeA && attrs.transposeB) return { f32: 'aᵀ·bᵀ has no subgroup-matrix form' };
  if (!wideEnoughForTensorCores(m, n, k)) return { f32: `too narrow: [${m}, ${n}] over ${k} (sides >= 32, reduction >= 16)` };
  if (attrs.transposeA) return { program: 'weightGrad', depth: weightGradDepthFor(k) };
  if (attrs.gradient === 'b') return { f32: 'the MatMul scales only its left operand, not a gradient b' };
  const blockRows = subgroupBlockRowsFor(m);
  if (blockRows === undefined) return { f32: `${m} rows per batch, no multiple of 32: a block would span two batches` };
  const few = blockRows === 128 && batch * (m / 128) * Math.ceil(n / SUBGROUP_MATRIX_BLOCK.cols) < DENSE_TC_FEW_BLOCKS;
  return { program: 'matMul', blockRows: few ? 64 : blockRows };
}

/**
 * The sizes of MoEBatchProduct's output [batch, m, n] and reduction k, from its inputs' shapes
 * (checked by batchProduct).
 */
function batchProductSizes(a: tf.TensorInfo, b: tf.TensorInfo, attrs: BatchProductAttrs) {
  const [batch] = a.shape;
  return {
    batch, m: attrs.transposeA ? a.shape[2] : a.shape[1], n: attrs.transposeB ? b.shape[1] : b.shape[2],
    k: attrs.transposeA ? a.shape[1] : a.shape[2],
  };
}

/**
 * MoEBatchProduct on tensor cores (batchProductTensorCoreRoute's program), f16 operands, f32
 * accumulation, the gradient operand scaled by its amax; per batch b, W's group b is b[b·sE].
 */
function runBatchProductOnTensorCores(args: KernelArgs, tc: TensorCoreDevice, a: tf.TensorInfo, b: tf.TensorInfo,
    attrs: BatchProductAttrs, route: Exclude<BatchProductTensorCoreRoute, { f32: string }>): tf.TensorInfo {
  const backend = webgpu(args);
  const { batch, m, n, k } = batchProductSizes(a, b, attrs);
  // a MatMul block takes its group from its first row: it must not span two batches
  if (route.program === 'matMul' && m % route.blockRows !== 0) {
    throw new Error(`MoEBatchProduct: ${route.blockRows}-row blocks would span two batches of ${m} rows`);
  }
  const amax = attrs.gradient === 'none' ? undefined : maxAbsCodeInKernel(args, attrs.gradient === 'a' ? a : b);   // [1]
  const inputs = [a, b, ...(amax !== undefined ? [amax] : [])];
  let out: tf.TensorInfo;
  if (route.program === 'matMul') {
    // a [batch·m, k] as rows; b's group: [n, k] (transposeB, W along k) or [k, n] (along n)
    const strides = attrs.transposeB ? { sN: k, sK: 1 } : { sN: 1, sK: n };
    const spec = {
      source: 'rows' as const, hasBias: false, hasAddend: false, kContiguous: attrs.transposeB, scaled: amax !== undefined,
      uniformGroups: true,
    };
    const program = new SubgroupMatrixMatMulProgram(batch * m, n, spec, tc.subgroupSize,
        withScaledDirectStores(matMulStaging({}, { inner: k, outCols: n, sE: n * k, ...strides }), true), route.blockRows);
    const uniforms: ProgramUniformEntry[] = [
      ...intUniforms(batch * m, n, k, 1, batch, n * k, strides.sN, strides.sK), ...floatUniforms(1),
      ...activationUniforms(undefined), ...intUniforms(m),
    ];
    // the program writes rows batch·m × n; the output is their [batch, m, n] view
    out = runGroupedProduct(args, program, inputs, uniforms, 2 * batch * m * n * k, backend.makeTensorInfo([batch, m, n], 'float32'));
  } else {
    // aᵀ·b per batch: L = a [batch·k, m], R = b [batch·k, n], segment b = rows b·k ..
    const spec = {
      left: 'rows' as const, right: 'rows' as const, scaleLeft: false, scaled: amax !== undefined, scaledRight: attrs.gradient === 'b',
      uniformGroups: true,
    };
    const program = new SubgroupMatrixWeightGradProgram([batch, m, n], batch, m, n, spec, tc.subgroupSize,
        withScaledDirectStores(weightGradStaging({ P: m, Q: n }), true), route.depth);
    const uniforms: ProgramUniformEntry[] = [
      ...intUniforms(m, n, 1, batch, m * n, n, 1), ...floatUniforms(1), ...activationUniforms(undefined), ...intUniforms(k),
    ];
    out = runGroupedProduct(args, program, inputs, uniforms, 2 * batch * m * n * k);
  }
  if (amax !== undefined) backend.disposeData(amax.dataId);
  return out;
}

/**
 * batchProduct's MoEBatchProduct (src/ops/batch_product.ts): on tensor cores where TC_BATCH_PRODUCTS_FLAG
 * and they are on for a product this size (denseTensorCores: the flag, a registered device, workgroup memory) and
 * batchProductTensorCoreRoute has a program for it; else tfjs's BatchMatMul, as tf.matMul runs it.
 */
const batchProductConfig: tf.KernelConfig = {
  kernelName: BATCH_PRODUCT,
  backendName: BACKEND,
  kernelFunc: (args: KernelArgs) => {
    const { a, b } = args.inputs as Record<string, tf.TensorInfo>;
    const attrs = args.attrs as unknown as BatchProductAttrs;
    const { batch, m, n, k } = batchProductSizes(a, b, attrs);
    const tc = tf.env().getBool(TC_BATCH_PRODUCTS_FLAG) ? denseTensorCores(webgpu(args).device, m, n, k) : undefined;
    const route = tc === undefined ? undefined : batchProductTensorCoreRoute(attrs, batch, m, n, k);
    if (tc !== undefined && route !== undefined && !('f32' in route)) return runBatchProductOnTensorCores(args, tc, a, b, attrs, route);
    return tf.getKernel(tf.BatchMatMul, BACKEND)!.kernelFunc({
      inputs: { a, b }, backend: args.backend, attrs: { transposeA: attrs.transposeA, transposeB: attrs.transposeB },
    }) as tf.TensorInfo;
  },
};

export const webgpuMoEKernelConfigs: tf.KernelConfig[] = [
  dispatchPlanConfig, groupedMatMulConfig, groupedWeightGradConfig, combineRowsConfig, gatherRowsConfig,
  activationBackwardConfig, pairDotConfig, groupedColumnSumConfig, softmaxTopKConfig, softmaxTopKGradConfig,
  decodePackedConfig, gatherPackedRowsConfig, packedDenseMatMulConfig, denseMatMulConfig, adamUpdateConfig, sumOfSquaresConfig, rotaryConfig, rmsNormConfig, rmsNormGradXConfig, softmaxGradConfig, maskedSoftmaxConfig,
  matMulAddConfig, attentionConfig, attentionGradConfig, scaledMatMulConfig, weightGradProductConfig, weightGradProductPairConfig,
  groupedWeightGradPairConfig, batchProductConfig,
];
