/**
 * The routed experts on WebGPU with fusedExperts' signature and contract, built from the MoE
 * kernels of kernels.ts so that nothing is read back to the host: the dispatch plan is sorted on
 * the device into per-expert row segments padded to the row tile, and every grouped product is
 * one dispatch over the padded rows (a tile finds its expert in the plan, tiles past the rows in
 * use skip the work).
 *
 * Forward: h = x[tok]·W1_eᵀ (+b1) — the gather fused into the load; y = act(h)·W2_eᵀ (+b2) — the
 * activation computed on load; out[t] = Σ_k w·y[rowOfPair] (a gather and a sum over K, no float
 * atomics). Backward keeps only x, the routing weights, h (in pair order: N rows, not the padded
 * capacity), like the composed op, and split LoRA's u = x·A_eᵀ (r floats a padded row), and never
 * recomputes y: g = dOut[tok]·W2_e gives both dWeights = ⟨g, act(h)⟩ (+ ⟨dOut, b2⟩) and
 * dh = act'(h)·(w·g); dx[t] = Σ_k (dh·W1_e)[rowOfPair]; dW1 = Σ dhᵀ·x[tok], dW2 = Σ (w·dOut[tok])ᵀ·act(h)
 * per expert over its rows. Split LoRA adds rank-r grouped products on PEFT's factor layouts read
 * in place; materialize goes through the composed materializeExpertLoRA, which runs anywhere.
 * Packed 16-bit experts (frozen) go to the same products, which decode each element as they load
 * it: no float32 copy of the experts is made (except W_eff, when LoRA is materialized on them).
 */
import * as tf from '@tensorflow/tfjs-core';
import { resolveExpertCall } from '../../ops/experts/check_args.js';
import type { FusedExpertsOptions } from '../../ops/experts/fused_experts.js';
import { isPackedExpertWeight, unpackExpertWeight, type ExpertWeightTensor } from '../../ops/packed.js';
import { planProjection, projectionTrainables, restoreProjection, type ProjectionPlan } from '../../ops/experts/projection.js';
import { hasDropout } from '../../ops/lora/dropout.js';
import { materializeExpertLoRA } from '../../ops/lora/materialize.js';
import type { ExpertActivation, ExpertWeights, LoRAFactors, LoRAMode } from '../../ops/types.js';
import { assertInteger, fail } from '../../ops/validate.js';
import {
  activationBackward, combineRows, deviceDispatchPlan, type DevicePlan, gatherRows, groupedColumnSum, groupedMatMul,
  groupedWeightGrad, type GroupedWeightGradArgs, groupedWeightGradPair, type LoRATail, pairDot, type WeightStrides,
} from './kernels.js';
import type { TileConfig } from './programs/grouped_matmul_program.js';
import type { RowSource } from './programs/shared.js';

/** Tile sizes of the WebGPU experts (see setWebGPUMoETuning). */
export interface WebGPUMoETuning {
  /** padded rows per expert are a multiple of this; 16·tile.tm must divide it */
  rowTile: number;
  /** the row-space products (forward, input gradients) */
  tile: TileConfig;
  /** the per-expert weight gradients */
  gradTile: TileConfig;
}

/**
 * The automatic choice, measured on the H100 (docs/webgpu.md): 128-row tiles with 8×8 register
 * tiles when experts get a few hundred rows each (training batches), 64-row tiles with 4×4 for
 * fewer rows, where the padding of big tiles would dominate, and 32-row tiles with 2×4 below 64
 * rows per expert (Qwen3-30B-A3B's 128 experts at 512 tokens: 32 rows each on average).
 */
export const WEBGPU_MOE_TUNING_LARGE: Readonly<WebGPUMoETuning> = {
  rowTile: 128, tile: { tm: 8, tn: 8, bk: 16 }, gradTile: { tm: 8, tn: 8, bk: 16 },
};
export const WEBGPU_MOE_TUNING_SMALL: Readonly<WebGPUMoETuning> = {
  rowTile: 64, tile: { tm: 4, tn: 4, bk: 16 }, gradTile: { tm: 4, tn: 4, bk: 16 },
};
/**
 * Every padded-row tensor (h, which backward keeps, the down output, the gradients in row space)
 * has planCapacity rows, N + E·(rowTile − 1) rounded up: at 4096 rows over 128 experts a 64-row
 * tile makes them 12160 rows (3× N) and a 32-row tile 8064, and the tiles of an expert with ~32
 * rows are half padding at 64.
 */
export const WEBGPU_MOE_TUNING_FEW: Readonly<WebGPUMoETuning> = {
  rowTile: 32, tile: { tm: 2, tn: 4, bk: 16 }, gradTile: { tm: 4, tn: 4, bk: 16 },
};

let explicitTuning: WebGPUMoETuning | undefined;

function checkTile(op: string, arg: string, t: TileConfig): void {
  for (const k of ['tm', 'tn', 'bk'] as const) assertInteger(op, `${arg}.${k}`, t?.[k], 1);
  if (t.tm > 8 || t.tn > 8) fail(op, `'${arg}' must have tm, tn <= 8 but got ${t.tm}x${t.tn}`);
  if (t.vec4 && (t.tm % 4 !== 0 || t.tn % 4 !== 0)) {
    fail(op, `'${arg}' with vec4 must have tm, tn multiples of 4 but got ${t.tm}x${t.tn}`);
  }
}

/**
 * Fixes the tile sizes (benchmarks, tuning for another GPU), or with `undefined` goes back to the
 * automatic choice by rows per expert; returns the previous setting (undefined: automatic).
 * Missing fields come from the current setting (the large preset when automatic).
 *
 * ```js
 * const previous = setWebGPUMoETuning({ rowTile: 64, tile: { tm: 4, tn: 4, bk: 16 } });
 * setWebGPUMoETuning(previous);
 * ```
 */
export function setWebGPUMoETuning(change: Partial<WebGPUMoETuning> | undefined): WebGPUMoETuning | undefined {
  const op = 'setWebGPUMoETuning';
  const previous = explicitTuning;
  if (change === undefined) {
    explicitTuning = undefined;
    return previous;
  }
  const next = { ...(explicitTuning ?? WEBGPU_MOE_TUNING_LARGE), ...change };
  assertInteger(op, 'rowTile', next.rowTile, 1);
  checkTile(op, 'tile', next.tile);
  checkTile(op, 'gradTile', next.gradTile);
  if (next.rowTile % (16 * next.tile.tm) !== 0) {
    fail(op, `'rowTile' must be a multiple of 16·tile.tm = ${16 * next.tile.tm} but got ${next.rowTile}`);
  }
  explicitTuning = next;
  return previous;
}

/** The fixed tile sizes, or undefined when they are chosen per call. */
export function getWebGPUMoETuning(): WebGPUMoETuning | undefined {
  return explicitTuning && { ...explicitTuning };
}

/**
 * tf.env() flag: the experts' row tile, 128, 64 or 32 (the presets above), or 0 (the default) for
 * the choice by rows per expert. For end-to-end A/B runs (bench/e2e/ours.ts --ab-flags): the
 * tensor-core blocks follow the plan's row tile, and an expert's padding (up to a tile less one
 * row) is work those blocks do, a quarter of the rows at OLMoE's ~256 rows per expert and 128.
 * setWebGPUMoETuning's explicit tiles come first.
 */
export const ROW_TILE_FLAG = 'WEBGPU_MOE_ROW_TILE';
tf.env().registerFlag(ROW_TILE_FLAG, () => 0);

/**
 * tf.env() flag: forward keeps the up projection's output h for backward as it is, padded to the
 * plan's capacity, where that capacity is at most this many times the T·K pairs; above it, h
 * goes to pair order (gatherRows, N rows) and back (the memory of every layer's kept h at the
 * loss is what bounds Qwen3-30B-A3B's 128 experts, whose capacity is 2–3× N). At OLMoE's batch
 * (16384 pairs over 64 experts, capacity 24576: 1.5×) keeping it padded saves the two gathers
 * (4.2 GPU ms a step, run Z11's profile) for a third more bytes per layer (67 MB). 0: always
 * pair order.
 */
export const PADDED_H_MAX_RATIO_FLAG = 'WEBGPU_MOE_PADDED_H_MAX_RATIO';
tf.env().registerFlag(PADDED_H_MAX_RATIO_FLAG, () => 1.5);

const TUNING_BY_ROW_TILE: ReadonlyArray<Readonly<WebGPUMoETuning>> = [WEBGPU_MOE_TUNING_LARGE, WEBGPU_MOE_TUNING_SMALL, WEBGPU_MOE_TUNING_FEW];

/** The tiles for a call with `rows` = T·K pairs over `numExperts` experts. */
export function webgpuMoETuningFor(rows: number, numExperts: number): WebGPUMoETuning {
  if (explicitTuning !== undefined) return explicitTuning;
  const forced = tf.env().getNumber(ROW_TILE_FLAG);
  if (forced !== 0) {
    const preset = TUNING_BY_ROW_TILE.find(t => t.rowTile === forced);
    if (preset === undefined) {
      throw new Error(`${ROW_TILE_FLAG} must be 0 (automatic) or one of ${TUNING_BY_ROW_TILE.map(t => t.rowTile).join(', ')} but got ${forced}`);
    }
    return preset;
  }
  const perExpert = rows / numExperts;
  return perExpert >= 256 ? WEBGPU_MOE_TUNING_LARGE : perExpert >= 64 ? WEBGPU_MOE_TUNING_SMALL : WEBGPU_MOE_TUNING_FEW;
}

/** Where (e, out, in) of a per-expert operand lives: e·sE + out·outStride + in·inStride. */
interface OperandLayout { sE: number; outStride: number; inStride: number }

/** For y = x·Opᵀ: reduction over `in`. */
function forwardStrides(l: OperandLayout): WeightStrides {
  return { sE: l.sE, sN: l.outStride, sK: l.inStride };
}

/** For dx = dy·Op: reduction over `out`. */
function backwardStrides(l: OperandLayout): WeightStrides {
  return { sE: l.sE, sN: l.inStride, sK: l.outStride };
}

/** W [E, out, in], or [E, in, out] when transposed. */
function weightLayout(outSize: number, inSize: number, transposed: boolean): OperandLayout {
  return transposed
    ? { sE: outSize * inSize, outStride: 1, inStride: outSize }
    : { sE: outSize * inSize, outStride: inSize, inStride: 1 };
}

/** PEFT's A [r·E, in]: rows e·r + j. */
function factorALayout(rank: number, inSize: number): OperandLayout {
  return { sE: rank * inSize, outStride: inSize, inStride: 1 };
}

/** PEFT's B [out, r·E]: column j·E + e. */
function factorBLayout(rank: number, numExperts: number): OperandLayout {
  return { sE: 1, outStride: rank * numExperts, inStride: numExperts };
}

/** One projection as the kernels see it, and which of its tensors get gradients. */
interface Projection extends ProjectionPlan {
  inSize: number;
  outSize: number;
}

function projection(
    weight: ExpertWeightTensor, bias: tf.Tensor2D | undefined, lora: LoRAFactors[], transposed: boolean,
    train: boolean, mode: LoRAMode, rows: number, inSize: number, outSize: number): Projection {
  const plan = planProjection(weight, bias, lora, transposed, train, mode, rows, materializeExpertLoRALayout);
  return { ...plan, inSize, outSize };
}

/**
 * The composed materializeExpertLoRA, which runs anywhere, on a weight of either layout. A packed
 * base is decoded for it and dropped at once: W_eff is float32 of that size anyway, and its
 * gradient (to A and B) does not read W.
 */
function materializeExpertLoRALayout(weight: ExpertWeightTensor, lora: LoRAFactors[], transposed: boolean): tf.Tensor3D {
  const layout = { layout: transposed ? 'inOut' : 'outIn' } as const;
  if (!isPackedExpertWeight(weight)) return materializeExpertLoRA(weight, lora, layout);
  const decoded = unpackExpertWeight(weight);
  const effective = materializeExpertLoRA(decoded, lora, layout);
  decoded.dispose();
  return effective;
}

/** Rows of a product's left operand: where they come from and the tensor. */
interface Rows { source: RowSource; t: tf.Tensor2D }

interface Context {
  plan: DevicePlan; transposed: boolean; interleaved: boolean; activation: ExpertActivation; numExperts: number;
  tuning: WebGPUMoETuning;
}

/**
 * y [capacity, out] = rows·W_eᵀ (+ b_e) + Σ s·(rows·A_eᵀ)·B_eᵀ, and each factor's u = rows·A_eᵀ
 * [capacity, r]: backward's dB reads it, and keeping it (r floats a row) saves recomputing it from
 * rows (the whole input read again, a narrow product per factor and layer). The first factor's
 * expansion is the base product's LoRA tail (one more step of its reduction on tensor cores).
 */
function projectionForward(x: Rows, p: Projection, c: Context): { y: tf.Tensor2D; us: tf.Tensor2D[] } {
  const common = { plan: c.plan, activation: c.activation, interleaved: c.interleaved };
  const us = p.lora.map(f => groupedMatMul({
    ...common, a: x.t, source: x.source, w: f.A, strides: forwardStrides(factorALayout(f.A.shape[0] / c.numExperts, p.inSize)),
    inner: p.inSize, outCols: f.A.shape[0] / c.numExperts, tile: narrowColumns(c.tuning.tile),
  }));
  const expansion = (i: number): LoRATail => {
    const rank = p.lora[i].A.shape[0] / c.numExperts;
    return { a: us[i], w: p.lora[i].B, strides: forwardStrides(factorBLayout(rank, c.numExperts)), rank, alpha: p.lora[i].scaling };
  };
  let y = groupedMatMul({
    ...common, a: x.t, source: x.source, w: p.weight, strides: forwardStrides(weightLayout(p.outSize, p.inSize, c.transposed)),
    inner: p.inSize, outCols: p.outSize, bias: p.bias, tile: c.tuning.tile, loraTail: us.length > 0 ? expansion(0) : undefined,
  });
  for (let i = 1; i < us.length; i++) {
    const tail = expansion(i);
    const next = groupedMatMul({
      ...common, a: tail.a, source: 'rows', w: tail.w, strides: tail.strides, inner: tail.rank, outCols: p.outSize, addend: y,
      alpha: tail.alpha, tile: c.tuning.tile,
    });
    y.dispose();
    y = next;
  }
  return { y, us };
}

/**
 * Tiles for the rank-r products of split LoRA on the tiled programs: a 16-wide (or 16-tall)
 * register tile instead of the 64–128 of the base products, which would leave most of a tile idle
 * for r = 8. For r ≤ 16 the kernels pick the narrow programs instead (NARROW_PRODUCTS_FLAG, on by
 * default), which ignore the tile; these apply with the flag off and for r > 16.
 */
function narrowColumns(t: TileConfig): TileConfig {
  return { ...t, tn: 1, vec4: false };
}
function narrowRows(t: TileConfig): TileConfig {
  return { ...t, tm: 1, vec4: false };
}

interface ProjectionGrads { dx: tf.Tensor2D; grads: tf.Tensor[] }

/**
 * For dy (the rows `dy`, optionally times the pair's routing weight `rowScale`, which the input
 * gradient leaves out: the caller applies it), returns dx [capacity, in] = dy·W_e + Σ s·(dy·B_e)·A_e
 * and the gradients of the projection's trainables in projectionTrainables order; `us`: each
 * factor's u = x·A_eᵀ as projectionForward returned it.
 */
function projectionBackward(
    dy: Rows & { source: 'gather' | 'rows' }, x: Rows, rowScale: tf.Tensor1D | undefined, p: Projection,
    us: tf.Tensor2D[], c: Context): ProjectionGrads {
  const common = { plan: c.plan, activation: c.activation, interleaved: c.interleaved };
  const wLayout = weightLayout(p.outSize, p.inSize, c.transposed);
  // gr = s·dy·B_e per factor, without the routing weight like dx
  const grs = p.lora.map(f => groupedMatMul({
    ...common, a: dy.t, source: dy.source, w: f.B, strides: backwardStrides(factorBLayout(f.A.shape[0] / c.numExperts, c.numExperts)),
    inner: p.outSize, outCols: f.A.shape[0] / c.numExperts, alpha: f.scaling, tile: narrowColumns(c.tuning.tile), gradient: true,
  }));
  // dx += gr·A_e: the first factor's as the base product's LoRA tail
  const expansion = (i: number): LoRATail => {
    const rank = p.lora[i].A.shape[0] / c.numExperts;
    return { a: grs[i], w: p.lora[i].A, strides: backwardStrides(factorALayout(rank, p.inSize)), rank, alpha: 1 };
  };
  let dx = groupedMatMul({
    ...common, a: dy.t, source: dy.source, w: p.weight, strides: backwardStrides(wLayout),
    inner: p.outSize, outCols: p.inSize, tile: c.tuning.tile, gradient: true, loraTail: grs.length > 0 ? expansion(0) : undefined,
  });
  for (let i = 1; i < grs.length; i++) {
    const tail = expansion(i);
    const next = groupedMatMul({
      ...common, a: tail.a, source: 'rows', w: tail.w, strides: tail.strides, inner: tail.rank, outCols: p.inSize, addend: dx,
      tile: c.tuning.tile,
    });
    dx.dispose();
    dx = next;
  }
  const grads: tf.Tensor[] = [];
  const gradArgs = (l: Rows & { source: 'gather' | 'rows' }, r: Rows, P: number, Q: number, layout: OperandLayout,
      shape: number[], scale: tf.Tensor1D | undefined, alpha = 1, tile = c.tuning.gradTile): GroupedWeightGradArgs => ({
    ...common, l: l.t, left: l.source, r: r.t, right: r.source, P, Q, outShape: shape,
    outStrides: { oE: layout.sE, oP: layout.outStride, oQ: layout.inStride }, rowScale: scale, alpha, tile,
  });
  if (p.trainWeight) grads.push(groupedWeightGrad(gradArgs(dy, x, p.outSize, p.inSize, wLayout, p.weight.shape, rowScale)));
  if (p.trainBias) grads.push(groupedColumnSum(dy.t, dy.source, c.plan, rowScale));
  for (const [i, f] of p.lora.entries()) {
    const rank = f.A.shape[0] / c.numExperts;
    // dA_e and dB_e together where both are narrow (two dispatches instead of four), else apart
    grads.push(...groupedWeightGradPair(
        gradArgs({ source: 'rows', t: grs[i] }, x, rank, p.inSize, factorALayout(rank, p.inSize), f.A.shape, rowScale, 1,
            narrowRows(c.tuning.gradTile)),
        gradArgs(dy, { source: 'rows', t: us[i] }, p.outSize, rank, factorBLayout(rank, c.numExperts), f.B.shape, rowScale,
            f.scaling, narrowColumns(c.tuning.gradTile))));
  }
  tf.dispose(grs);
  return { dx, grads };
}

/**
 * fusedExperts for the 'webgpu' backend: the same arguments, result and gradients, with no host
 * read. `options.plan` (a host plan) is checked against the call and otherwise not needed.
 *
 * ```js
 * registerExpertsImplementation('webgpu', webgpuFusedExperts);
 * ```
 */
export function webgpuFusedExperts(
    x: tf.Tensor2D, routing: { weights: tf.Tensor2D; experts: tf.Tensor2D },
    weights: ExpertWeights, activation: ExpertActivation, options: FusedExpertsOptions = {}): tf.Tensor2D {
  const op = 'fusedExperts';
  const { dims, loraMode, upLoRA, downLoRA, train } = resolveExpertCall(op, x, routing, weights, activation, options);
  const { numTokens: t, topK: k, hidden, inter, numExperts, transposed, interleaved } = dims;
  const dropped = [...upLoRA.map((f, i) => [f, `weights.gateUpLoRA[${i}]`] as const),
    ...downLoRA.map((f, i) => [f, `weights.downLoRA[${i}]`] as const)].find(([f]) => hasDropout(f));
  if (dropped !== undefined) {
    fail(op, `'${dropped[1]}.dropout' must be absent or p 0 on webgpu but got p ${dropped[0].dropout!.p}: ` +
        'expert LoRA dropout runs on cpu, wasm and the stock-op backends; on webgpu use lora.dropout 0 on expert targets');
  }
  const rows = t * k;
  const experts = routing.experts;
  const tuning = webgpuMoETuningFor(rows, numExperts);

  return tf.tidy(() => {
    const up = projection(weights.gateUp, weights.gateUpBias, upLoRA, transposed, train, loraMode, rows, hidden, 2 * inter);
    const down = projection(weights.down, weights.downBias, downLoRA, transposed, train, loraMode, rows, inter, hidden);
    const upInputs = projectionTrainables(up);
    const downInputs = projectionTrainables(down);

    const run = tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
      const save = args[args.length - 1] as tf.GradSaveFunc;
      const [xIn, wIn] = args as tf.Tensor2D[];
      const plan = deviceDispatchPlan(experts, numExperts, tuning.rowTile);
      const c: Context = { plan, transposed, interleaved, activation, numExperts, tuning };
      const { y: h, us: upUs } = projectionForward({ source: 'gather', t: xIn }, up, c);    // [cap, 2I]
      const { y, us: downUs } = projectionForward({ source: 'act', t: h }, down, c);       // [cap, H]
      const value = combineRows(y, plan, tf.reshape(wIn, [rows]) as tf.Tensor1D);  // [T, H]
      // h is kept for backward in pair order, [N, 2I], not padded [capacity, 2I], where the
      // capacity is more than PADDED_H_MAX_RATIO_FLAG × N: at 128 experts it is up to 2-3× N, and
      // every layer's kept h is alive at the loss (issue 15)
      const keptPadded = plan.capacity <= tf.env().getNumber(PADDED_H_MAX_RATIO_FLAG) * rows;
      const hKept = keptPadded ? h : gatherRows(h, plan.rowOfPair);            // [cap or N, 2I]
      save([xIn, wIn, hKept, plan.seg, plan.rowOfPair, plan.pairOfRow, experts,
          ...projectionTrainables(up), ...projectionTrainables(down), ...upUs, ...downUs]);

      const gradFunc = (dOut: tf.Tensor, saved: tf.Tensor[]): tf.Tensor[] => tf.tidy(() => {
        const [xS, wS, hKeptS, seg, rowOfPair, pairOfRow, expertsS] = saved as tf.Tensor2D[];
        // back to padded rows; a padding row (pairOfRow −1) gets zeros (gatherRows; the products
        // write 0 there too), which are only ever multiplied by the zero gradient of a padding row
        // or left out of the reductions
        const hS = keptPadded ? hKeptS : gatherRows(hKeptS, pairOfRow as unknown as tf.Tensor1D);  // [cap, 2I]
        const [upS, next] = restoreProjection(up, saved, 7);
        const [downS, usAt] = restoreProjection(down, saved, next);
        const upUsS = saved.slice(usAt, usAt + up.lora.length) as tf.Tensor2D[];
        const downUsS = saved.slice(usAt + up.lora.length, usAt + up.lora.length + down.lora.length) as tf.Tensor2D[];
        const planS: DevicePlan = { ...plan, seg: seg as unknown as tf.Tensor1D, rowOfPair: rowOfPair as unknown as tf.Tensor1D,
          pairOfRow: pairOfRow as unknown as tf.Tensor1D };
        const cS: Context = { ...c, plan: planS };
        const wFlat = tf.reshape(wS, [rows]) as tf.Tensor1D;
        const dy = { source: 'gather' as const, t: dOut as tf.Tensor2D };
        const downGrads = projectionBackward(dy, { source: 'act', t: hS }, wFlat, downS, downUsS, cS);
        const g = downGrads.dx;                                                  // [cap, I], before w
        const dWeights = pairDot(g, hS, planS, activation, interleaved,
            downS.bias ? { dOut: dOut as tf.Tensor2D, downBias: downS.bias, experts: expertsS } : undefined);  // [T, K]
        const dh = activationBackward(hS, g, wFlat, planS, activation, interleaved);  // [cap, 2I]
        const upGrads = projectionBackward({ source: 'rows', t: dh }, { source: 'gather', t: xS }, undefined, upS, upUsS, cS);
        const dx = combineRows(upGrads.dx, planS);                               // [T, H]
        return [dx, dWeights, ...upGrads.grads, ...downGrads.grads];
      }) as tf.Tensor[];
      return { value, gradFunc };
    });
    return run(x, routing.weights, ...upInputs, ...downInputs) as tf.Tensor2D;
  });
}
