/**
 * The fused expert computation: sort the T·K (token, slot) pairs by expert once, one grouped
 * product per projection over the expert-sorted rows (the token gather folded into the up
 * projection), activation, down projection, weighted scatter-add back to tokens (as a gather
 * through the inverse permutation plus a sum over K). The building blocks are kernels on cpu and
 * wasm and stock-op compositions elsewhere (./kernels.ts).
 *
 * Its backward keeps only x, the routing weights and the up projection's output h (with split
 * LoRA on it also each up adapter's [N, r] u = s·x·A_eᵀ, r/2I of h's size), and recomputes
 * the activation (SonicMoE's design: about half the activation memory of autodiff, which would
 * keep the gathered rows, h, the activation and the down output). The down output y is never
 * recomputed: the routing weights' gradient comes from the down projection's dx (see gradFunc).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { ExpertWeightTensor } from '../packed.js';
import type { ExpertActivation, ExpertWeights, LoRAFactors, LoRAMode } from '../types.js';
import { resolveExpertCall } from './check_args.js';
import { materializeGrouped } from './materialize_grouped.js';
import { planProjection, projectionTrainables, restoreProjection, type ProjectionPlan } from './projection.js';
import { buildDispatchPlan, type DispatchPlan } from './dispatch_plan.js';
import {
  groupedRowsBackward, groupedRowsForward, groupedRowsForwardWithLoRADown, type GroupedGrads, type GroupedLoRA, type GroupedWeight,
} from './grouped_matmul.js';
import { hasDropout, loraDropoutMask } from '../lora/dropout.js';
import {
  combineRows, expertActivation, expertActivationGrad, groupedProduct, groupedWeightGrad, pairRowDot, type Rows,
} from './kernels.js';

export interface FusedExpertsOptions {
  /**
   * Compute gradients for the base expert weights (and biases). Default: true when no expert
   * LoRA adapter is active (full fine-tuning), false with adapters (the base stays frozen and no
   * gradient of its size is ever allocated).
   */
  trainExpertWeights?: boolean;
  /** how expert LoRA is applied; 'auto' (default) picks per projection by arithmetic cost */
  loraMode?: LoRAMode;
  /** a plan built beforehand, e.g. with buildDispatchPlanAsync on backends without sync reads */
  plan?: DispatchPlan;
}

// chooseLoRAMode lives beside planProjection, which both experts implementations share
export { chooseLoRAMode } from './projection.js';

/** A projection as the grouped products see it (a GroupedWeight), and which of its tensors get gradients. */
interface Projection extends ProjectionPlan {
  transposed: boolean;
}

function projection(
    weight: ExpertWeightTensor, bias: tf.Tensor2D|undefined, lora: LoRAFactors[], transposed: boolean,
    train: boolean, mode: LoRAMode, rows: number): Projection {
  return { ...planProjection(weight, bias, lora, transposed, train, mode, rows, materializeGrouped), transposed };
}

/**
 * The dropout mask of each adapter's branch input in expert-sorted row order [N, in] (undefined
 * for an adapter without dropout): drawn [T·K, in] in (token, slot) pair order from the adapter's
 * seed, as the reference block draws it, then sorted like the rows.
 */
function expertRowMasks(lora: LoRAFactors[], rows: number, inSize: number, plan: DispatchPlan): Array<tf.Tensor2D | undefined> {
  return lora.map(f => !hasDropout(f) ? undefined :
    tf.gather(loraDropoutMask([rows, inSize], f.dropout!.p, f.dropout!.seed), tf.tensor1d(plan.pairOfRow, 'int32')) as tf.Tensor2D);
}

/** The gradients of a projection's trainables, in projectionTrainables order. */
function gradsOf(p: Projection, g: GroupedGrads): tf.Tensor[] {
  const list: tf.Tensor[] = [];
  if (p.trainWeight) list.push(g.dWeight!);
  if (p.trainBias) list.push(g.dBias!);
  p.lora.forEach((_, i) => list.push(g.dA[i], g.dB[i]));
  return list;
}

/**
 * Mixture-of-experts feed-forward for routed tokens: out[t] = Σ_k w[t,k] · expert_{e[t,k]}(x[t]).
 *
 * Reads `routing.experts` to the host once per call to size the per-expert products (pass
 * `options.plan` to avoid that, e.g. on webgpu). Gradients: x, routing.weights (dS = ⟨dO_t, y_(t,k)⟩),
 * the base weights when `trainExpertWeights`, and every active adapter's A and B. An adapter with
 * `dropout` (PEFT's lora_dropout) reads dropout(input) as its branch input, one mask row per
 * (token, slot) pair drawn [T·K, in] in pair order from its seed (split mode only).
 *
 * ```js
 * const out = fusedExperts(x, {weights, experts}, {gateUp, down}, {kind: 'swiglu'});
 * ```
 */
export function fusedExperts(
    x: tf.Tensor2D, routing: { weights: tf.Tensor2D; experts: tf.Tensor2D },
    weights: ExpertWeights, activation: ExpertActivation, options: FusedExpertsOptions = {}): tf.Tensor2D {
  const op = 'fusedExperts';
  const { dims, loraMode, upLoRA, downLoRA, train } = resolveExpertCall(op, x, routing, weights, activation, options);
  const plan = options.plan ?? buildDispatchPlan(routing.experts, dims.numExperts);
  const { numTokens: t, topK: k, transposed } = dims;
  const rows = t * k;
  const groups = plan.groupSizes;
  // the row index tensors, made where they are used: customGrad keeps nothing from its forward
  const tokenIndex = () => tf.tensor1d(plan.tokenOfRow, 'int32');
  const rowIndex = () => tf.tensor1d(plan.rowOfPair, 'int32');
  const rowWeights = (w: tf.Tensor2D) => tf.gather(tf.reshape(w, [rows]), tf.tensor1d(plan.pairOfRow, 'int32')) as tf.Tensor1D;

  return tf.tidy(() => {
    const up = projection(weights.gateUp, weights.gateUpBias, upLoRA, transposed, train, loraMode, rows);
    const down = projection(weights.down, weights.downBias, downLoRA, transposed, train, loraMode, rows);
    const upInputs = projectionTrainables(up);
    const downInputs = projectionTrainables(down);
    // LoRA dropout: one mask row per (token, slot) pair, drawn in pair order and sorted like the rows
    const upMasks = expertRowMasks(up.lora, rows, dims.hidden, plan);
    const downMasks = expertRowMasks(down.lora, rows, dims.inter, plan);
    const masks = [...upMasks, ...downMasks].filter((m): m is tf.Tensor2D => m !== undefined);
    const withMasks = (lora: LoRAFactors[], list: Array<tf.Tensor2D | undefined>): GroupedLoRA[] =>
      lora.map((f, i) => ({ ...f, rowMask: list[i] }));

    const run = tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
      const save = args[args.length - 1] as tf.GradSaveFunc;
      const [xIn, wIn] = args as tf.Tensor2D[];
      // a base that gets no gradient is frozen (W_eff of materialize is trained: new every step)
      const upW: GroupedWeight = { weight: up.weight, bias: up.bias, lora: withMasks(up.lora, upMasks), transposed, frozen: !up.trainWeight };
      const downW: GroupedWeight = { weight: down.weight, bias: down.bias, lora: withMasks(down.lora, downMasks), transposed, frozen: !down.trainWeight };
      const { y: h, loraDown: upU } = groupedRowsForwardWithLoRADown({ t: xIn, index: tokenIndex() }, groups, upW);  // [N, 2I], gather folded in
      const a = expertActivation(h, activation, dims.interleaved);                  // [N, I]
      const y = groupedRowsForward({ t: a }, groups, downW);                        // [N, H]
      const value = combineRows(y, rowIndex(), t, k, wIn);                          // [T, H]
      // backward keeps each projection's trainables; a frozen base is read through the closure
      // (and the dropout masks, drawn once: backward must drop what forward dropped), and the up
      // adapters' u = s·x·A_eᵀ [N, r]: recomputing them would gather x's rows again
      save([xIn, wIn, h, ...projectionTrainables(up), ...projectionTrainables(down), ...masks, ...upU]);

      const gradFunc = (dOut: tf.Tensor, saved: tf.Tensor[]): tf.Tensor[] => {
        const [xS, wS, hS] = saved as tf.Tensor2D[];
        const [upP, next] = restoreProjection(up, saved, 3);
        const [downP, afterTrainables] = restoreProjection(down, saved, next);
        let at = afterTrainables;
        const restoreMasks = (list: Array<tf.Tensor2D | undefined>) => list.map(m => m === undefined ? undefined : saved[at++] as tf.Tensor2D);
        const upS = { ...upP, lora: withMasks(upP.lora, restoreMasks(upMasks)) };
        const downS = { ...downP, lora: withMasks(downP.lora, restoreMasks(downMasks)) };
        const upLoRADown = upU.map(() => saved[at++] as tf.Tensor2D);
        const rowIdx = rowIndex();
        const tokenIdx = tokenIndex();
        const dRows: Rows = { t: dOut as tf.Tensor2D, index: tokenIdx };            // dO of each row's token
        const wRow = rowWeights(wS);                                                 // [N]
        const [aS, aw] = expertActivation(hS, activation, dims.interleaved, wRow);  // [N, I] recomputed, and ·w
        // The down projection's backward runs on the unweighted dO with the weighted input a·w:
        // the weight and adapter gradients come out the same (linear in both), its dx is
        // g = dO·W2_eff, and from g both da = w·g and the routing gradient ⟨dO, y⟩ = ⟨g, a⟩ (+ ⟨dO, b2⟩)
        // follow without recomputing y.
        const downG = groupedRowsBackward(dRows, { t: aw }, groups, { ...downS, frozen: !down.trainWeight },
            { weight: down.trainWeight, bias: false });
        let dWeights = pairRowDot(downG.dx, aS, rowIdx, t, k);                        // [T, K]
        if (downS.bias) {
          const bias3 = tf.reshape(downS.bias, [dims.numExperts, dims.hidden, 1]) as tf.Tensor3D;
          const biasTerm = groupedProduct(dRows, bias3, groups, false);             // [N, 1]
          dWeights = tf.add(dWeights, tf.reshape(tf.gather(tf.reshape(biasTerm, [rows]), rowIdx), [t, k]));
        }
        const dDownBias = down.trainBias ?                                           // Σ_rows w·dO
          tf.reshape(groupedWeightGrad({ t: tf.reshape(wRow, [rows, 1]) as tf.Tensor2D }, dRows, groups),
              [dims.numExperts, dims.hidden]) as tf.Tensor2D : undefined;
        tf.dispose(aS);
        const dh = expertActivationGrad(hS, downG.dx, activation, dims.interleaved, wRow);  // [N, 2I]
        tf.dispose([aw, downG.dx]);
        const upG = groupedRowsBackward({ t: dh }, { t: xS, index: tokenIdx }, groups, { ...upS, frozen: !up.trainWeight },
            { weight: up.trainWeight, bias: up.trainBias, loraDown: upLoRADown });
        tf.dispose(dh);
        const dx = combineRows(upG.dx, rowIdx, t, k);                               // [T, H]
        return [dx, dWeights, ...gradsOf(up, upG), ...gradsOf(down, { ...downG, dBias: dDownBias })];
      };
      return { value, gradFunc };
    });
    return run(x, routing.weights, ...upInputs, ...downInputs) as tf.Tensor2D;
  });
}
