/**
 * The attention core softmax(q·kᵀ·scale + mask)·v as one op with its own gradient. Composed on
 * tfjs's tape, each of its kernels saves its inputs (an Identity kernel each) and the grouped-KV
 * repeat's Tile has a slice and an add per repeat for gradient; on webgpu a training step is bound
 * by the host recording kernels, not by the GPU. Here, where a backend registers MoEAttention and
 * MoEAttentionGrad (webgpu), the forward pass is 2 programs (O and the rows' softmax statistics;
 * 1 when no gradient is recorded) and the backward 3 (dQ, dK, dV), flash-style: the [Nq, S, L]
 * probabilities are never held (512 MB a layer at 32 heads and S = 2048), backward recomputes them
 * per tile from q, k, v, O and the statistics (issue 15). The kernels trade GPU time for memory: on
 * an H100 (docs/benchmarks.md, run L) a training pass of 16 heads of 128 took 15.8 ms against the
 * composed 13.9 at S = 512 (and OLMoE's step fell from 1785 to 1460 tokens/s with them), 112 ms
 * against 47 at S = 2048, where the composed pass peaked at 2000 MiB against 256. So they run where
 * the probabilities would be large (MOE_ATTENTION_KERNEL_MIN_BYTES, 64 MiB: OLMoE from S = 1024),
 * the composed path below that. Elsewhere (cpu, wasm: the reference) and below the threshold the
 * forward pass runs five kernels with the tape off (plus Reshapes, no GPU work, with grouped heads
 * or a per-sample mask), saving the probabilities, and the backward the closed-form gradient in nine.
 * Their six products go through batchProduct (batch_product.ts): tf.matMul, or on webgpu with tensor
 * cores on the subgroup-matrix programs (f16 operands, f32 accumulation, dO and dS scaled by amax).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Tensor, Tensor2D, Tensor3D, Tensor4D } from '@tensorflow/tfjs-core';
import { describeValue } from '../util/describe.js';
import { batchProduct } from './batch_product.js';
import { maskedSoftmax } from './masked_softmax.js';
import { softmaxGrad } from './softmax_grad.js';
import { assertFiniteNumber, assertTensor, fail } from './validate.js';

/**
 * MoEAttention: inputs q [Nq, S, Dk], k [Nkv, L, Dk], v [Nkv, L, Dv], mask ([S, L] or [B, 1, S, L]),
 * all float32 and checked by scaledDotProductAttention; attrs AttentionAttrs. Outputs [O [Nq, S, Dv]]
 * or, with withStats, [O, stats [Nq, S, 2]]: per query row the max m of its scores s = (q·scale)·k +
 * mask and the sum l of exp(s − m), so that softmax's p = exp(s − m) / l.
 * MoEAttentionGrad: inputs q, k, v, mask, o, stats, dy [Nq, S, Dv]; attrs AttentionAttrs; outputs
 * [dQ, dK, dV] (dK and dV summed over each KV head's rep query heads). A backend's kernels must
 * compute in float32 what the composed path below does.
 */
export const ATTENTION = 'MoEAttention';
export const ATTENTION_GRAD = 'MoEAttentionGrad';

/** The attributes of MoEAttention and MoEAttentionGrad. */
export interface AttentionAttrs {
  scale: number;
  /** MoEAttention: also output the rows' statistics (backward needs them) */
  withStats: boolean;
}

/** The widest head (Dk and Dv) the kernels take; wider heads run the composed path. */
export const ATTENTION_KERNEL_MAX_HEAD_WIDTH = 256;

/**
 * tf.env() flag: false runs the composed path even where MoEAttention is registered (to compare
 * the two, or count what the kernels save: bench/e2e/profile_narrow.ts with the flag set).
 */
export const ATTENTION_KERNEL_FLAG = 'MOE_ATTENTION_KERNEL';
tf.env().registerFlag(ATTENTION_KERNEL_FLAG, () => true);

/**
 * tf.env() flag: the kernels run only where the composed path would hold at least this many bytes
 * of probabilities (Nq·S·L float32): below it the composed path is faster and its buffer small
 * (see the header). 0: the kernels wherever they are registered.
 */
export const ATTENTION_KERNEL_MIN_BYTES_FLAG = 'MOE_ATTENTION_KERNEL_MIN_BYTES';
export const ATTENTION_KERNEL_MIN_BYTES = 64 * 2 ** 20;
tf.env().registerFlag(ATTENTION_KERNEL_MIN_BYTES_FLAG, () => ATTENTION_KERNEL_MIN_BYTES);

/**
 * tf.env() flag: MOE_ATTENTION_KERNEL_MIN_BYTES's counterpart where the backend runs the kernels
 * on tensor cores (registerTensorCoreAttention: webgpu's subgroup-matrix programs). 256 MiB of
 * probabilities, from the H100 (run Q, docs/webgpu.md; `time_attention.js --tensor-cores on`, ms per
 * training pass composed / tiled f32 / tensor cores): OLMoE's 16 heads at batch 4 × S 512 (64 MiB)
 * 34.1 / 39.5 / 57.5, and the end-to-end step 12.7 % faster composed there; at S 2048 (256 MiB)
 * 56.4 / 70.7 / 48.4. Below 256 MiB composed is faster and holds little.
 */
export const ATTENTION_TENSOR_CORE_MIN_BYTES_FLAG = 'MOE_ATTENTION_TENSOR_CORE_MIN_BYTES';
export const ATTENTION_TENSOR_CORE_MIN_BYTES = 256 * 2 ** 20;
tf.env().registerFlag(ATTENTION_TENSOR_CORE_MIN_BYTES_FLAG, () => ATTENTION_TENSOR_CORE_MIN_BYTES);

/** Per backend: whether its MoEAttention kernels would run heads of Dk, Dv on tensor cores now. */
const tensorCoreAttention = new Map<string, (dk: number, dv: number) => boolean>();

/**
 * Registers `backend`'s answer to whether its kernels run heads of (dk, dv) on tensor cores now
 * (the webgpu kernels register theirs), so that scaledDotProductAttention applies
 * MOE_ATTENTION_TENSOR_CORE_MIN_BYTES there. The op never imports a backend.
 */
export function registerTensorCoreAttention(backend: string, usesTensorCores: (dk: number, dv: number) => boolean): void {
  tensorCoreAttention.set(backend, usesTensorCores);
}

/**
 * softmax(q·kᵀ·scale + mask)·v per query head, with grouped KV heads read in place: query head n
 * of q [Nq, S, Dk] attends KV head floor(n / rep) of k [Nkv, L, Dk] and v [Nkv, L, Dv], rep =
 * Nq / Nkv (heads batch-major, B·nh and B·nkv: each KV head's rep query heads are adjacent, so
 * the group is one product of rep·S rows, no repeated keys). `mask` is additive: [S, L], shared
 * by every head, or [B, 1, S, L] per sample (packed segments); a blocked entry is a large negative
 * number (−1e9, see attentionMask) and gets exactly 0 probability. The mask is a constant: it gets
 * no gradient; q, k and v do (dK and dV summed over each group). Returns [Nq, S, Dv].
 *
 * ```js
 * // 4 query heads on 2 KV heads, 3 positions, causal
 * const o = scaledDotProductAttention(q, k, v, causalMask(3, null), 1 / Math.sqrt(dk));  // [4, 3, Dv]
 * ```
 */
export function scaledDotProductAttention(q: Tensor3D, k: Tensor3D, v: Tensor3D, mask: Tensor2D | Tensor4D,
    scale: number): Tensor3D {
  const op = 'scaledDotProductAttention';
  assertTensor(op, 'q', q, 3);
  assertTensor(op, 'k', k, 3);
  assertTensor(op, 'v', v, 3);
  const [nq, s, dk] = q.shape;
  const [nkv, keyLen] = k.shape;
  const dv = v.shape[2];
  const shapes = `q [${q.shape}], k [${k.shape}], v [${v.shape}]`;
  if (k.shape[2] !== dk) fail(op, `'k' must have q's head width ${dk} in its last axis but got [${k.shape}] (${shapes})`);
  if (v.shape[0] !== nkv || v.shape[1] !== keyLen) {
    fail(op, `'v' must be [${nkv},${keyLen},*] like k's heads and keys but got [${v.shape}] (${shapes})`);
  }
  if (nq % nkv !== 0) fail(op, `k's ${nkv} heads must divide q's ${nq} heads (${shapes})`);
  if (!(mask instanceof tf.Tensor) || (mask.rank !== 2 && mask.rank !== 4)) {
    fail(op, `'mask' must be a 2-D [S, L] or 4-D [B, 1, S, L] float32 tensor but got ${describeValue(mask)}`);
  }
  assertTensor(op, 'mask', mask, mask.rank);
  const batch = mask.rank === 4 ? mask.shape[0] : 1;
  const maskShape = mask.rank === 2 ? [s, keyLen] : [batch, 1, s, keyLen];
  if (mask.shape.some((d, i) => d !== maskShape[i]) || nkv % batch !== 0) {
    fail(op, `'mask' must be [S, L] = [${s},${keyLen}] or [B, 1, S, L] with B dividing k's ${nkv} heads but got [${mask.shape}] (${shapes})`);
  }
  assertFiniteNumber(op, 'scale', scale);
  if (!(scale > 0)) fail(op, `'scale' must be > 0 but got ${scale}`);
  if (useAttentionKernels(nq, dk, dv, s, keyLen)) return attentionKernels(q, k, v, mask, scale);
  const rep = nq / nkv;
  const rows = rep * s;                     // a KV head's query rows: its rep heads' S positions
  // the mask's view of the scores: [Nkv, rep, S, L] for a shared mask, [B, nh, S, L] per sample
  const maskedShape = mask.rank === 2 ? [nkv, rep, s, keyLen] : [batch, nq / batch, s, keyLen];
  const needsView = rep > 1 || mask.rank === 4;
  // with rep 1 the grouped shapes are the given ones: no Reshape kernels (each costs host time)
  const grouped = <T extends Tensor>(t: Tensor, shape: number[]) => (rep > 1 ? tf.reshape(t, shape) : t) as T;
  // the mask is data, not a trainable input: captured here, it gets no gradient
  const attend = tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    const [q3, k3, v3] = args as Tensor3D[];
    const save = args[3] as GradSaveFunc;
    const scaledQ = grouped<Tensor3D>(tf.mul(q3, scale), [nkv, rows, dk]);       // [Nkv, rep·S, Dk]
    const probs = tf.tidy(() => {
      const scores = batchProduct(scaledQ, k3, false, true);                       // [Nkv, rep·S, L]
      if (!needsView) return maskedSoftmax(scores, mask);
      return tf.reshape(maskedSoftmax(tf.reshape(scores, maskedShape), mask), [nkv, rows, keyLen]) as Tensor3D;
    });
    save([scaledQ, k3, v3, probs]);
    const value = tf.tidy(() => grouped<Tensor3D>(batchProduct(probs, v3), [nq, s, dv]));
    return {
      value,
      gradFunc: (dy: Tensor, saved: Tensor[]) => tf.tidy(() => {
        const [qs, ks, vs, p] = saved as Tensor3D[];
        const dO = grouped<Tensor3D>(dy, [nkv, rows, dv]);
        // dO and dS are the gradient operands: scaled into f16's range where a backend rounds to it
        const dV = batchProduct(p, dO, true, false, 'b');                         // [Nkv, L, Dv]
        const dP = batchProduct(dO, vs, false, true, 'a');                        // [Nkv, rep·S, L]
        // softmax's gradient: dS = P ⊙ (dP − Σ_j dP ⊙ P); blocked keys have P = 0 and get 0
        const dS = softmaxGrad(p, dP);                                            // [Nkv, rep·S, L]
        const dQ = grouped(tf.mul(batchProduct(dS, ks, false, false, 'a'), scale), [nq, s, dk]);  // [Nq, S, Dk]
        const dK = batchProduct(dS, qs, true, false, 'a');                        // [Nkv, L, Dk], q already scaled
        return [dQ, dK, dV];
      }),
    };
  });
  return attend(q, k, v) as Tensor3D;
}

/**
 * Whether the backend's MoEAttention / MoEAttentionGrad run this problem: flag on, head widths up
 * to 256, no empty axis, and the composed path's probabilities (Nq·S·L float32) at least
 * MOE_ATTENTION_KERNEL_MIN_BYTES (MOE_ATTENTION_TENSOR_CORE_MIN_BYTES where the backend runs
 * them on tensor cores).
 */
export function useAttentionKernels(nq: number, dk: number, dv: number, s: number, keyLen: number): boolean {
  const backend = tf.getBackend();
  if (!(tf.env().getBool(ATTENTION_KERNEL_FLAG) && tf.getKernel(ATTENTION, backend) != null &&
      tf.getKernel(ATTENTION_GRAD, backend) != null && Math.max(dk, dv) <= ATTENTION_KERNEL_MAX_HEAD_WIDTH &&
      Math.min(dk, dv, s, keyLen) > 0)) {
    return false;
  }
  const onTensorCores = tensorCoreAttention.get(backend)?.(dk, dv) ?? false;
  return nq * s * keyLen * 4 >= tf.env().getNumber(onTensorCores ? ATTENTION_TENSOR_CORE_MIN_BYTES_FLAG : ATTENTION_KERNEL_MIN_BYTES_FLAG);
}

/**
 * The op through MoEAttention / MoEAttentionGrad. Saved for backward: q, k, v, O, the statistics
 * and the mask (a constant the caller may dispose before backward; the saved clone shares its
 * data). With no gradient recorded (inference, generation, a checkpointed layer's first pass) only
 * O is computed.
 */
function attentionKernels(q: Tensor3D, k: Tensor3D, v: Tensor3D, mask: Tensor2D | Tensor4D, scale: number): Tensor3D {
  if (!tf.engine().isTapeOn()) {
    return (tf.engine().runKernel(ATTENTION, { q, k, v, mask }, { scale, withStats: false }) as Tensor[])[0] as Tensor3D;
  }
  const attend = tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    const [q3, k3, v3] = args as Tensor3D[];
    const [o, stats] = tf.engine().runKernel(ATTENTION, { q: q3, k: k3, v: v3, mask }, { scale, withStats: true }) as Tensor[];
    (args[3] as GradSaveFunc)([q3, k3, v3, mask, o, stats]);
    // stats is this pass's own: the tape keeps its saved clone, the forward's tidy drops this one
    return {
      value: o,
      gradFunc: (dy: Tensor, saved: Tensor[]) => {
        const [qs, ks, vs, maskSaved, os, statsSaved] = saved;
        return tf.engine().runKernel(ATTENTION_GRAD, { q: qs, k: ks, v: vs, mask: maskSaved, o: os, stats: statsSaved, dy },
            { scale, withStats: false }) as Tensor[];
      },
    };
  });
  return attend(q, k, v) as Tensor3D;
}
