/**
 * The plain reference MoE block, written like transformers' eager code: plain routing, then a
 * loop over the experts that got tokens — gather their rows, run the expert with its own weight
 * (W_e + s·B_e·A_e when LoRA is on), weight by the routing weight, index-add back. Plain autodiff
 * only. It is the oracle for the fused path and the benchmark baseline: keep it plain, and share
 * nothing with the fused implementation beyond argument checks and the shared-expert MLP.
 */
import * as tf from '@tensorflow/tfjs-core';
import { checkExpertArgs } from '../experts/check_args.js';
import { hasDropout, loraDropoutMask } from '../lora/dropout.js';
import { routerLogits } from '../lora/router_logits.js';
import { isPackedExpertWeight, unpackExpertWeight } from '../packed.js';
import { sharedExpert } from '../shared_expert.js';
import { fail } from '../validate.js';
import type { ExpertActivation, LoRAFactors, MoEBlockConfig, MoEBlockWeights, Routing } from '../types.js';
import { referenceRoute } from './routing.js';

/** Expert e's A_e [r, in] and B_e [out, r] from PEFT's layouts A [r·E, in], B [out, r·E]. */
function expertFactors(A: tf.Tensor2D, B: tf.Tensor2D, e: number, numExperts: number): [tf.Tensor2D, tf.Tensor2D] {
  const r = A.shape[0] / numExperts;
  const out = B.shape[0];
  const ae = tf.slice(A, [e * r, 0], [r, -1]);                                                       // [r, in]
  const be = tf.reshape(tf.slice(tf.reshape(B, [out, r, numExperts]), [0, 0, e], [out, r, 1]), [out, r]) as tf.Tensor2D;
  return [ae, be];
}

/** W_e [out, in] (or [in, out] when transposed) with every adapter's delta added, plain ops. */
function expertWeight(w: tf.Tensor3D, e: number, lora: LoRAFactors[], transposed: boolean): tf.Tensor2D {
  const [numExperts, a, b] = w.shape;
  let we: tf.Tensor2D = tf.reshape(tf.slice(w, [e, 0, 0], [1, a, b]), [a, b]);
  for (const { A, B, scaling } of lora) {
    const [ae, be] = expertFactors(A, B, e, numExperts);
    const delta = tf.mul(tf.matMul(be, ae), scaling);                                               // [out, in]
    we = tf.add(we, transposed ? tf.transpose(delta) : delta) as tf.Tensor2D;
  }
  return we;
}

/**
 * An expert projection of rows xe [n, in] (the pairs `pairs` routed to expert e): adapters without
 * dropout are merged into W_e; each adapter with dropout adds s·((xe ⊙ its mask rows)·A_eᵀ)·B_eᵀ,
 * as a per-expert nn.Linear with lora_dropout does. `masks[i]` is adapter i's mask [T·K, in] in
 * (token, slot) pair order.
 */
function expertProjection(xe: tf.Tensor2D, w: tf.Tensor3D, e: number, lora: LoRAFactors[], transposed: boolean,
    masks: Array<tf.Tensor | undefined>, pairs: tf.Tensor1D): tf.Tensor2D {
  const merged = lora.filter((_, i) => masks[i] === undefined);
  let y = tf.matMul(xe, expertWeight(w, e, merged, transposed), false, !transposed) as tf.Tensor2D;
  lora.forEach((f, i) => {
    if (masks[i] === undefined) return;
    const [ae, be] = expertFactors(f.A, f.B, e, w.shape[0]);
    const dropped = tf.mul(xe, tf.gather(masks[i]!, pairs));
    y = tf.add(y, tf.mul(tf.matMul(tf.matMul(dropped, ae, false, true), be, false, true), f.scaling));
  });
  return y;
}

function activate(h: tf.Tensor2D, activation: ExpertActivation, interleaved: boolean): tf.Tensor {
  const [n, twoI] = h.shape;
  let gate: tf.Tensor;
  let up: tf.Tensor;
  if (interleaved) {
    const pairs = tf.reshape(h, [n, twoI / 2, 2]);
    gate = tf.reshape(tf.slice(pairs, [0, 0, 0], [n, twoI / 2, 1]), [n, twoI / 2]);
    up = tf.reshape(tf.slice(pairs, [0, 0, 1], [n, twoI / 2, 1]), [n, twoI / 2]);
  } else {
    [gate, up] = tf.split(h, 2, 1);
  }
  if (activation.kind === 'swiglu') return tf.mul(tf.mul(gate, tf.sigmoid(gate)), up);
  if (activation.kind === 'gegluTanh') {
    // PyTorch's gelu(approximate='tanh'), plain ops: autodiff gives its gradient
    const inner = tf.mul(Math.sqrt(2 / Math.PI), tf.add(gate, tf.mul(0.044715, tf.mul(gate, tf.mul(gate, gate)))));
    return tf.mul(tf.mul(tf.mul(0.5, gate), tf.add(1, tf.tanh(inner))), up);
  }
  const g = tf.minimum(gate, activation.limit);
  const u = tf.clipByValue(up, -activation.limit, activation.limit);
  return tf.mul(tf.add(u, 1), tf.mul(g, tf.sigmoid(tf.mul(g, activation.alpha))));
}

export interface ReferenceOptions {
  /**
   * `routing.experts` as already read to the host (`await experts.data()`), so that the loop can
   * run where a synchronous read is impossible (webgpu) — as transformers' eager loop reads its
   * routing to the host too. It must hold what the routing computes; only its shape and range are
   * checked.
   */
  hostExperts?: ArrayLike<number>;
}

/** Backends where a synchronous read is impossible (and whose work runs on a GPU). */
export const ASYNC_READ_BACKENDS: readonly string[] = ['webgpu'];

/**
 * The chosen experts on the host: `hostExperts` when given (checked), else one synchronous read
 * (cpu, wasm, tensorflow, webgl; refused where there is none: the reference is their oracle).
 */
function chosenExperts(op: string, experts: tf.Tensor2D, numExperts: number, hostExperts?: ArrayLike<number>): ArrayLike<number> {
  if (hostExperts === undefined) {
    const backend = tf.getBackend();
    if (ASYNC_READ_BACKENDS.includes(backend)) {
      fail(op, `the reference expert loop reads the chosen experts synchronously, which the ${backend} backend cannot do: ` +
          "register() the plugin (its fused kernels run there; an unregistered SparseMoE uses 'reference'), or pass " +
          "options.hostExperts (await routing.experts.data())");
    }
    return experts.dataSync();
  }
  if (hostExperts == null || typeof hostExperts.length !== 'number' || hostExperts.length !== experts.size) {
    fail(op, `'options.hostExperts' must hold the ${experts.size} chosen experts of routing.experts [${experts.shape}] ` +
        `but got length ${hostExperts?.length}`);
  }
  for (let i = 0; i < hostExperts.length; i++) {
    const e = hostExperts[i];
    if (!Number.isInteger(e) || e < 0 || e >= numExperts) {
      fail(op, `'options.hostExperts' must hold expert ids in [0, ${numExperts}) but element ${i} is ${e}`);
    }
  }
  return hostExperts;
}

/** referenceExperts' options: the block's and where the routing weight applies. */
export interface ReferenceExpertsOptions extends ReferenceOptions {
  /** Llama 4: out[t] = Σ_k expert_{e[t,k]}(w[t,k]·x[t]) (MoEBlockConfig.weightedInput); default false */
  weightedInput?: boolean;
}

/**
 * Routed experts only: out[t] = Σ_k w[t,k]·expert_{e[t,k]}(x[t]) (or Σ_k expert_{e[t,k]}(w[t,k]·x[t])
 * with `weightedInput`), one loop step per expert hit.
 */
export function referenceExperts(
    x: tf.Tensor2D, routing: { weights: tf.Tensor2D; experts: tf.Tensor2D },
    weights: MoEBlockWeights['experts'], activation: ExpertActivation, options: ReferenceExpertsOptions = {}): tf.Tensor2D {
  const op = 'referenceExperts';
  const dims = checkExpertArgs(op, x, routing?.weights, routing?.experts, weights, activation);
  const { numTokens: t, topK: k, numExperts, transposed, interleaved } = dims;
  const chosen = chosenExperts(op, routing.experts, numExperts, options.hostExperts);
  return tf.tidy(() => {
    // the oracle decodes packed (bf16/f16) experts whole, once per call; they get no gradient
    const gateUp = isPackedExpertWeight(weights.gateUp) ? unpackExpertWeight(weights.gateUp) : weights.gateUp;
    const down = isPackedExpertWeight(weights.down) ? unpackExpertWeight(weights.down) : weights.down;
    const flatWeights = tf.reshape(routing.weights, [t * k]);
    let out: tf.Tensor = tf.zeros([t, dims.hidden]);
    // LoRA dropout: one mask row per (token, slot) pair, drawn in pair order as the fused op draws it
    const masksOf = (lora: LoRAFactors[] | undefined, inSize: number) => (lora ?? []).map(f =>
      hasDropout(f) ? loraDropoutMask([t * k, inSize], f.dropout!.p, f.dropout!.seed) : undefined);
    const upMasks = masksOf(weights.gateUpLoRA, dims.hidden);
    const downMasks = masksOf(weights.downLoRA, dims.inter);
    for (let e = 0; e < numExperts; e++) {
      const tokens: number[] = [];
      const pairs: number[] = [];
      for (let p = 0; p < t * k; p++) {
        if (chosen[p] === e) { tokens.push(Math.floor(p / k)); pairs.push(p); }
      }
      if (tokens.length === 0) continue;
      const tokenIdx = tf.tensor1d(tokens, 'int32');
      const pairIdx = tf.tensor1d(pairs, 'int32');
      const w = tf.gather(flatWeights, pairIdx);
      const xe = options.weightedInput ? tf.mul(tf.gather(x, tokenIdx), tf.expandDims(w, 1)) as tf.Tensor2D : tf.gather(x, tokenIdx);
      let h = expertProjection(xe, gateUp, e, weights.gateUpLoRA ?? [], transposed, upMasks, pairIdx);
      if (weights.gateUpBias) h = tf.add(h, tf.slice(weights.gateUpBias, [e, 0], [1, -1]));
      const a = activate(h, activation, interleaved) as tf.Tensor2D;
      let y: tf.Tensor = expertProjection(a, down, e, weights.downLoRA ?? [], transposed, downMasks, pairIdx);
      if (weights.downBias) y = tf.add(y, tf.slice(weights.downBias, [e, 0], [1, -1]));
      out = tf.add(out, tf.unsortedSegmentSum(options.weightedInput ? y : tf.mul(y, tf.expandDims(w, 1)), tokenIdx, t));
    }
    return out as tf.Tensor2D;
  });
}

/** The whole block, plainly: router (+ LoRA), routing, the expert loop, shared experts. */
export function referenceMoEBlock(
    x: tf.Tensor2D, weights: MoEBlockWeights, config: MoEBlockConfig,
    options: ReferenceOptions = {}): { out: tf.Tensor2D; routing: Routing } {
  const logits = routerLogits(x, weights.router);
  let routing = referenceRoute(logits, config.routing, weights.router.correctionBias);
  const expertScale = weights.router.expertScale;
  if (expertScale) {
    // Gemma 4's per_expert_scale, picked with a one-hot product (no gather gradient needed)
    const unscaled = routing.weights;
    const scaled = tf.tidy(() => {
      const ids = tf.range(0, logits.shape[1], 1, 'int32');
      const chosen = tf.cast(tf.equal(tf.expandDims(routing.experts, 2), ids), 'float32');         // [T, K, E]
      return tf.mul(unscaled, tf.sum(tf.mul(chosen, expertScale), 2)) as tf.Tensor2D;             // [T, K]
    });
    unscaled.dispose();
    routing = { ...routing, weights: scaled };
  }
  try {
    const out = tf.tidy(() => {
      const routed = referenceExperts(x, routing, weights.experts, config.activation,
          { ...options, weightedInput: config.weightedInput });
      return weights.shared ? tf.add(routed, sharedExpert(x, weights.shared)) as tf.Tensor2D : routed;
    });
    return { out, routing };
  } catch (err) {
    tf.dispose([logits, routing.weights, routing.experts]);
    throw err;
  }
}
