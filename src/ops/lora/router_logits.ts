/**
 * Router logits with router LoRA, never forming W_g + ΔW_g: each adapter adds two thin products.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor2D } from '@tensorflow/tfjs-core';
import { MATMUL_ADD } from '../matmul_add.js';
import type { RouterWeights } from '../types.js';
import { assertFiniteNumber, assertShape, assertTensor, fail } from '../validate.js';
import { droppedInput, hasDropout, loraDropoutMask } from './dropout.js';
import { loraLinear } from './linear.js';
import { assertAdapterList, checkRouterFactors } from './validate_lora.js';

/**
 * logits = x·W_gᵀ + bias + Σ_k s_k·(x·A_kᵀ)·B_kᵀ, with PEFT's router factors A [r, H], B [E, r].
 * With `router.inputScale` (Gemma 4) x is first rms(x)·inputScale·H^-½.
 *
 * Plain autodiff ops (2-D matMuls), so `tf.grads` gives gradients for x, the weight, the bias and
 * every A and B. The router weight stays frozen simply by leaving it out of the trained variable
 * list. `router.correctionBias` is not used here: it only affects expert selection (routing).
 *
 * Where the backend has MoEMatMulAdd (webgpu) and the weight and bias are non-trainable
 * tf.Variables (as LoRA leaves them), the adapters run as one loraLinear op instead (the same
 * formula, a closed-form backward, sums and scales inside products): on webgpu 3 programs forward
 * and 5 backward where the tape's composition runs 7 and 9, each a host cost there (issue 15).
 * Weight and bias then get no gradient, as they get none from `tf.variableGrads`; trainable ones
 * keep the composed path.
 *
 * ```js
 * const x = tf.randomNormal([6, 64]);                      // T = 6, H = 64
 * const weight = tf.randomNormal([8, 64]);                 // E = 8
 * const A = tf.randomNormal([4, 64]), B = tf.zeros([8, 4]);
 * routerLogits(x, { weight, lora: [{ A, B, scaling: 2 }] });   // [6, 8]
 * ```
 *
 * @param x [T, H] float32 hidden states
 * @param router weight W_g [E, H], optional bias [E], optional active adapters
 * @returns [T, E]
 */
export function routerLogits(x: Tensor2D, router: RouterWeights): Tensor2D {
  const op = 'routerLogits';
  assertTensor(op, 'x', x, 2);
  if (router == null || typeof router !== 'object') {
    fail(op, `'router' must be a RouterWeights object {weight, bias?, lora?} but got ` +
        `${router === null ? 'null' : typeof router}`);
  }
  assertTensor(op, 'router.weight', router.weight, 2);
  const [E, H] = router.weight.shape;
  assertShape(op, 'x', x, [null, H], `[T, H] with H = ${H} from router.weight [${E},${H}]`);
  if (router.bias != null) {
    assertTensor(op, 'router.bias', router.bias, 1);
    assertShape(op, 'router.bias', router.bias, [E], `E = ${E} from router.weight [${E},${H}]`);
  }
  const inputScale = router.inputScale;
  if (inputScale !== undefined) {
    assertTensor(op, 'router.inputScale', inputScale, 1);
    assertShape(op, 'router.inputScale', inputScale, [H], `H = ${H} from router.weight [${E},${H}]`);
    assertFiniteNumber(op, 'router.inputNormEpsilon', router.inputNormEpsilon);
  }
  const lora = router.lora ?? [];
  assertAdapterList(op, 'router.lora', lora);
  lora.forEach((f, i) => checkRouterFactors(op, `router.lora[${i}].`, f, E, H));

  if (lora.length > 0 && isFrozenVariable(router.weight) && (router.bias == null || isFrozenVariable(router.bias)) &&
      tf.getKernel(MATMUL_ADD, tf.getBackend()) != null) {
    return tf.tidy(() => {
      const input = inputScale === undefined ? x : scaledRouterInput(x, inputScale, router.inputNormEpsilon!, H);
      return loraLinear(input, router.weight, router.bias ?? null, lora.map(f => ({
        A: f.A, B: f.B, scaling: f.scaling,
        // droppedInput's mask, drawn from the same seed
        ...(hasDropout(f) ? { mask: loraDropoutMask(input.shape, f.dropout!.p, f.dropout!.seed) as Tensor2D } : {}),
      })));
    });
  }
  return tf.tidy(() => {
    if (inputScale !== undefined) {
      x = scaledRouterInput(x, inputScale, router.inputNormEpsilon!, H);
    }
    // Transposing the small weight keeps the big product untransposed (fast path on wasm).
    let logits: Tensor2D = tf.matMul(x, tf.transpose(router.weight));  // [T, E]
    if (router.bias != null) logits = tf.add(logits, router.bias);
    for (const f of lora) {
      const { A, B, scaling } = f;
      // PEFT's lora.Linear: the branch input is dropped, the base product above sees x
      const low = tf.mul(tf.matMul(droppedInput(x, f), tf.transpose(A)), scaling);  // [T, r]
      logits = tf.add(logits, tf.matMul(low, tf.transpose(B)));        // [T, E]
    }
    return logits;
  });
}

/** Gemma4TextRouter's input: norm without scale, then × scale × H^-½. */
function scaledRouterInput(x: Tensor2D, inputScale: tf.Tensor1D, epsilon: number, H: number): Tensor2D {
  return tf.tidy(() => {
    const inv = tf.rsqrt(tf.add(tf.mean(tf.square(x), 1, true), epsilon));  // [T, 1]
    return tf.mul(tf.mul(x, inv), tf.mul(inputScale, H ** -0.5)) as Tensor2D;  // [T, H]
  });
}

/** A tf.Variable that tf.variableGrads leaves out: the frozen base weight under LoRA. */
function isFrozenVariable(t: tf.Tensor): boolean {
  return t instanceof tf.Variable && !t.trainable;
}
