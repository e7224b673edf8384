/**
 * A frozen linear projection with its LoRA branches as one op with its own gradient: what
 * LinearLoRA.apply trains with (attention q/k/v/o, the dense MLP's gate/up/down). Composed on
 * tfjs's tape, a projection with one adapter ran 23 kernels a step: 12 products and adds, an
 * Identity for each of the 8 inputs its kernels saved, and the Reshapes and Cast of tfjs-core's
 * Add and Mul gradients. Here the forward runs 1 + 4 products and adds per adapter (+1 with a
 * bias, +1 per dropout mask) and saves 5 tensors per adapter, the backward 1 + 6 per adapter
 * (+1 per mask; 1 + 5 where dA and dB are one kernel, weightGradProductPair's on webgpu): 15
 * kernels for that projection. Public tfjs ops only, so every backend runs it.
 *
 *   y = x·Wᵀ + b + Σ_a s_a·((m_a ⊙ x)·A_aᵀ)·B_aᵀ
 *
 * with the closed-form gradient (u_a = s_a·(m_a ⊙ x)·A_aᵀ, g_a = s_a·dy·B_a):
 *   dB_a = dyᵀ·u_a,  dA_a = g_aᵀ·(m_a ⊙ x),  dx = dy·W + Σ_a (g_a·A_a) ⊙ m_a.
 * W and b are captured, not inputs: they get no gradient (frozen under LoRA). W may be packed
 * 16-bit (PackedDenseWeight): on webgpu its products (forward, and dx in backward) read the halves
 * in their tile loads (MoEPackedDenseMatMul: no float32 copy at all); elsewhere it is decoded inside
 * each product that uses it and freed when that product is done (the copy is never saved).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Scalar, Tensor, Tensor1D, Tensor2D } from '@tensorflow/tfjs-core';
import { matMulAdd } from '../matmul_add.js';
import { scaledMatMul } from '../scaled_matmul.js';
import { weightGradProductPair } from '../weight_grad_product.js';
import { assertDenseWeight, denseWeightMatMul, type DenseWeightTensor } from '../packed.js';
import { passScalar } from '../pass_constants.js';
import { assertFiniteNumber, assertShape, assertTensor, fail } from '../validate.js';

/** One applied adapter of a projection: A [r, in], B [out, r], s, and its dropout mask if any. */
export interface LinearLoRABranch {
  A: Tensor2D;
  B: Tensor2D;
  scaling: number;
  /** PEFT's dropout on the branch input, already divided by 1 − p ([N, in], from loraDropoutMask); absent: none */
  mask?: Tensor2D;
}

/**
 * The one LoRA branch formula, s·(input·Aᵀ)·Bᵀ, with s applied on the rank-sized product:
 * returns that scaled down-projection [N, r] (the op's backward needs it) and the branch [N, out].
 * `loraBranch` (the composed reference, on the tape) and `loraLinear`'s forward both call it.
 */
export function loraBranchForward(input: Tensor2D, A: Tensor2D, B: Tensor2D, scaling: number | Scalar):
    { down: Tensor2D; branch: Tensor2D } {
  const down = loraBranchDown(input, A, scaling);
  return { down, branch: tf.matMul(down, B, false, true) };  // [N, out]
}

/** The branch's scaled down-projection s·(input·Aᵀ) [N, r]. */
function loraBranchDown(input: Tensor2D, A: Tensor2D, scaling: number | Scalar): Tensor2D {
  return tf.tidy(() => tf.mul(tf.matMul(input, A, false, true), scaling) as Tensor2D);  // [N, r]
}

/**
 * The gradients of loraBranchForward w.r.t. A and B, given dy [N, out], what the forward kept (its
 * input, its scaled down-projection) and g = s·(dy·B) [N, r], which the input's part g·A also reads.
 */
function loraFactorGrads(dy: Tensor2D, input: Tensor2D, down: Tensor2D, g: Tensor2D): { dA: Tensor2D; dB: Tensor2D } {
  // the factors' gradients sum N rows into r-wide results: one memory-speed kernel for both where the backend has one
  const [dA, dB] = weightGradProductPair(g, input, dy, down);  // [r, in], [out, r]
  return { dA, dB };
}

/**
 * x·Wᵀ + b + Σ s·((mask ⊙ x)·Aᵀ)·Bᵀ for x [N, in], a frozen W [out, in] (float32 or a
 * PackedDenseWeight, decoded per product) and b [out] (or null),
 * and the applied adapters; gradients flow to x and every A and B, never to W or b. One op: its
 * forward and backward leave nothing on tfjs's tape but the tensors its backward reads.
 *
 * ```js
 * const y = loraLinear(x, W, null, [{ A, B, scaling: 2 }]);  // x [N, in] → [N, out]
 * const { grads } = tf.variableGrads(() => tf.sum(loraLinear(x, W, null, [{ A, B, scaling: 2 }])));
 * ```
 */
export function loraLinear(x: Tensor2D, weight: DenseWeightTensor, bias: Tensor1D | null, adapters: readonly LinearLoRABranch[]): Tensor2D {
  const op = 'loraLinear';
  assertTensor(op, 'x', x, 2);
  assertDenseWeight(op, 'weight', weight);
  const [n, inSize] = x.shape;
  const out = weight.shape[0];
  const shapes = `x [N,in] = [${x.shape}], weight [out,in] = [${weight.shape}]`;
  if (weight.shape[1] !== inSize) fail(op, `'weight' must have shape [*,${inSize}] but got [${weight.shape}] (${shapes})`);
  if (bias !== null) {
    assertTensor(op, 'bias', bias, 1);
    assertShape(op, 'bias', bias, [out], shapes);
  }
  if (!Array.isArray(adapters)) fail(op, `'adapters' must be an array of {A, B, scaling, mask?} but got ${adapters === null ? 'null' : typeof adapters}`);
  adapters.forEach((a, i) => {
    const arg = `adapters[${i}]`;
    assertTensor(op, `${arg}.A`, a.A, 2);
    const r = a.A.shape[0];
    assertShape(op, `${arg}.A`, a.A, [null, inSize], shapes);
    assertTensor(op, `${arg}.B`, a.B, 2);
    assertShape(op, `${arg}.B`, a.B, [out, r], `${shapes}, ${arg}.A [r,in] = [${a.A.shape}]`);
    assertFiniteNumber(op, `${arg}.scaling`, a.scaling);
    if (a.mask !== undefined) {
      assertTensor(op, `${arg}.mask`, a.mask, 2);
      assertShape(op, `${arg}.mask`, a.mask, [n, inSize], shapes);
    }
  });
  // inside a pass, one uploaded scalar per scaling for every projection of it (made outside the op's kernel)
  const scalings = adapters.map(a => passScalar(a.scaling));
  const forward = tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    const xs = args[0] as Tensor2D;
    const save = args[args.length - 1] as GradSaveFunc;
    const factors = adapters.map((_, i) => ({ A: args[1 + 2 * i] as Tensor2D, B: args[2 + 2 * i] as Tensor2D }));
    const kept: Tensor[] = [];
    const downs = adapters.map((a, i) => {
      const shared = scalings[i];
      const scaling = typeof shared === 'number' ? tf.scalar(shared) : shared;
      const input = a.mask === undefined ? xs : tf.mul(xs, a.mask) as Tensor2D;  // [N, in]
      // s·(input·Aᵀ) as loraBranchDown computes it, the scale inside the product's kernel where the backend has one
      const down = scaledMatMul(input, factors[i].A, true, a.scaling, scaling);  // [N, r]
      kept.push(input, down, factors[i].A, factors[i].B, scaling, ...(a.mask === undefined ? [] : [a.mask]));
      return down;
    });
    // x·Wᵀ + b with the first branch's down·Bᵀ added inside the product where the backend folds it
    let y = denseWeightMatMul(xs, weight, true, bias, 'activation',
        downs.length > 0 ? { a: downs[0], b: factors[0].B, transposeB: true } : undefined);  // [N, out]
    for (let i = 1; i < downs.length; i++) {
      const sum = matMulAdd(downs[i], factors[i].B, false, true, y);  // y + down·Bᵀ, one kernel where the backend has it
      y.dispose();
      y = sum;
    }
    save(kept);
    return {
      value: y,
      gradFunc: (dy: Tensor, saved: Tensor[]) => {
        const dy2 = dy as Tensor2D;
        let at = 0;
        const branches = adapters.map(a => {
          const [input, down, A, B, scaling] = saved.slice(at, at + 5) as [Tensor2D, Tensor2D, Tensor2D, Tensor2D, Scalar];
          const mask = a.mask === undefined ? null : saved[at + 5] as Tensor2D;
          at += mask === null ? 5 : 6;
          // g = s·(dy·B) [N, r], the scale inside the product's kernel where the backend has one
          return { input, down, A, mask, g: scaledMatMul(dy2, B, false, a.scaling, scaling) };
        });
        // dy·W, W read again (or decoded again), not saved; an unmasked first branch's g·A added inside that
        // product where the backend folds it
        const folded = branches.length > 0 && branches[0].mask === null;
        let dx = denseWeightMatMul(dy2, weight, false, null, 'gradient',
            folded ? { a: branches[0].g, b: branches[0].A, transposeB: false } : undefined);  // [N, in]
        const grads: Tensor[] = [];
        branches.forEach(({ input, down, A, mask, g }, i) => {
          if (!(folded && i === 0)) {
            // without a mask the branch's part of dx is added to dx in its product's kernel
            const sum = mask === null ? matMulAdd(g, A, false, false, dx) : tf.tidy(() => tf.add(dx, tf.mul(tf.matMul(g, A), mask)) as Tensor2D);
            dx.dispose();
            dx = sum;
          }
          const { dA, dB } = loraFactorGrads(dy2, input, down, g);
          grads.push(dA, dB);
        });
        tf.dispose(branches.map(b => b.g));
        return [dx, ...grads];
      },
    };
  });
  // the forward runs in a tidy of tfjs's engine: what it does not return or save is freed
  return forward(x, ...adapters.flatMap(a => [a.A, a.B])) as Tensor2D;
}
