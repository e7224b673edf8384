/**
 * Rotate-half rotary embedding as one op with its own gradient. Composed on tfjs's tape
 * (`applyRotaryReference`), rotate-half is a split, a negation and a concat, and every kernel
 * saves its inputs and gets tfjs's gradient (slices, a concat, casts): 24 kernel calls per call
 * with its backward, two calls (q and k) per layer. Here rotate-half is a reverse of the two halves
 * times a signed sin, x·cos + reverse(x)·sin±, and its gradient is the same shape:
 * dy·cos + reverse(dy·sin±): 17 kernel calls, 9 of them GPU programs against 14. A backend may
 * register MoERotary to do either in one pass over x (webgpu: one program; 2 GPU programs per call
 * with its backward instead of 9, issue 15); elsewhere the composed ops run.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Tensor, Tensor2D, Tensor3D, Tensor4D } from '@tensorflow/tfjs-core';
import { describeValue } from '../util/describe.js';
import { insidePass, passConstant } from './pass_constants.js';
import { fail } from './validate.js';

/**
 * MoERotary: inputs x [N, S, D], cos and sin ([S, D] or [B, S, D], B dividing N; row n reads
 * sample n / (N / B)); attrs `transposed`, `heads`. Output [N, S, D], in float32:
 *   transposed false: x·cos + rotateHalf(x)·sin, rotateHalf((x1, x2)) = (−x2, x1);
 *   transposed true:  x·cos − rotateHalf(x·sin)  (the forward's gradient for x = dy).
 * With heads h > 0 the rows [N, S] = [B·h, S] are also moved between layouts: the forward takes x
 * [B, S, h, D] (the projection's) and returns [B·h, S, D], the transpose takes [B·h, S, D] and
 * returns [B, S, h, D].
 */
export const ROTARY = 'MoERotary';

/** MoERotary's attributes. */
export interface RotaryAttrs {
  transposed: boolean;
  /** h of x [B, S, h, D] to move to [B·h, S, D] (the forward) and back (the transpose); 0: x is [N, S, D] */
  heads: number;
}

function rotaryKernel(x: Tensor, cos: Tensor, sin: Tensor, transposed: boolean, heads = 0): Tensor {
  const attrs: RotaryAttrs = { transposed, heads };
  return tf.engine().runKernel(ROTARY, { x, cos, sin }, attrs as unknown as tf.NamedAttrMap) as Tensor;
}

/**
 * applyRotary's and applyRotaryToHeads' checks: float32 tensors not disposed, x of `xAxes`' rank,
 * an even D, and the tables [S, D] or [B, S, D] with B dividing the rotation's n rows.
 */
function checkRotaryArgs(op: string, x: Tensor, cos: Tensor, sin: Tensor, n: number, s: number, d: number,
    xAxes: readonly string[]): void {
  for (const [name, value] of [['x', x], ['cos', cos], ['sin', sin]] as const) {
    if (!(value instanceof tf.Tensor) || value.dtype !== 'float32') {
      fail(op, `'${name}' must be a float32 tensor but got ${describeValue(value)}`);
    }
    if (value.isDisposed) fail(op, `'${name}' was already disposed`);
  }
  const shapes = `x [${x.shape}], cos [${cos.shape}], sin [${sin.shape}]`;
  if (x.rank !== xAxes.length) fail(op, `'x' must be [${xAxes.join(', ')}] but got ${shapes}`);
  if (d % 2 !== 0) fail(op, `'x' must have an even last axis (D) but got ${shapes}`);
  const tableOk = (t: Tensor) => (t.rank === 2 || (t.rank === 3 && n % t.shape[0] === 0)) &&
      t.shape[t.rank - 2] === s && t.shape[t.rank - 1] === d;
  if (!tableOk(cos) || !tf.util.arraysEqual(cos.shape, sin.shape)) {
    fail(op, `'cos' and 'sin' must both be [S, D] = [${s}, ${d}] or [B, S, D] with B dividing N = ${n} but got ${shapes}`);
  }
}

/**
 * x · cos + rotateHalf(x) · sin, rotateHalf((x1, x2)) = (−x2, x1) on the halves of the last axis,
 * for x [N, S, D] (heads folded into N: N = B·heads) and tables [S, D] shared by every row or
 * [B, S, D] per row (rotaryTablesAt; N a multiple of B). The tables are constants (no gradient);
 * x's gradient is dy · cos − rotateHalf(dy · sin).
 *
 * ```js
 * const {cos, sin} = rotaryTables(16, 64, 10000);
 * const q = applyRotary(q3d, cos, sin);  // q3d [N, 16, 64] → [N, 16, 64]
 * ```
 */
export function applyRotary(x: Tensor3D, cos: Tensor2D | Tensor3D, sin: Tensor2D | Tensor3D): Tensor3D {
  const [n, s, d] = x instanceof tf.Tensor && x.rank === 3 ? x.shape : [0, 0, 0];
  checkRotaryArgs('applyRotary', x, cos, sin, n, s, d, ['N', 'S', 'D']);
  if (tf.getKernel(ROTARY, tf.getBackend()) != null) {
    // the tables as given: the kernel reads them in place, no signed copy
    return tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
      (args[1] as GradSaveFunc)([cos, sin]);
      return {
        value: rotaryKernel(args[0] as Tensor, cos, sin, false),
        gradFunc: (dy: Tensor, saved: Tensor[]) => [rotaryKernel(dy, saved[0], saved[1], true)],
      };
    })(x) as Tensor3D;
  }
  const half = d / 2;
  const layout = rotaryLayout(n, s, d, cos.rank === 2 ? 0 : cos.shape[0]);
  // the tables in the op's layout, sin signed: (−sin₁, sin₂), so that swapHalves((x1, x2)) · (−sin₁, sin₂)
  // = (−x2·sin₁, x1·sin₂) = rotateHalf(x) · sin. Shared tables are the same for every layer of a pass
  // (sharedRotaryTables): made once there (passConstant), not a sign upload and a product per call.
  const prepare = () => tf.tidy(() => {
    const sign = tf.tensor(Float32Array.from({ length: d }, (_, i) => (i < half ? -1 : 1)), layout.table.slice(-layout.signRank));
    return { cosRows: tf.reshape(cos, layout.table), signedSin: tf.mul(tf.reshape(sin, layout.table), sign) };
  });
  const shared = cos.rank === 2 && insidePass();
  const { cosRows, signedSin } = shared ? passConstant(`rotaryOperands/${cos.id}/${sin.id}`, prepare) : prepare();
  try {
    return tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
      const save = args[1] as GradSaveFunc;
      // kept for backward: the caller's tidy (or the pass) disposes the tables before backward runs
      save([cosRows, signedSin]);
      return {
        value: rotaryForward(args[0] as Tensor, cosRows, signedSin, layout),
        gradFunc: (dy: Tensor, saved: Tensor[]) => [rotaryBackward(dy, saved[0], saved[1], layout)],
      };
    })(x) as Tensor3D;
  } finally {
    if (!shared) tf.dispose([cosRows, signedSin]);
  }
}

/**
 * applyRotary on heads still in the projection's layout: x [B, S, h, D] → the rotated heads
 * [B·h, S, D], i.e. applyRotary(reshape(transpose(x, [0, 2, 1, 3]), [B·h, S, D]), cos, sin), with
 * the same tables ([S, D], or [B, S, D] per sample). Where the backend's MoERotary moves heads
 * (webgpu), the transpose and the rotation are one program each way (the attention's q and k: two
 * dispatches fewer a layer forward and two backward); elsewhere the transpose and applyRotary run.
 *
 * ```js
 * const q3 = applyRotaryToHeads(tf.reshape(q, [B, S, heads, D]), cos, sin);  // [B·heads, S, D]
 * ```
 */
export function applyRotaryToHeads(x: Tensor4D, cos: Tensor2D | Tensor3D, sin: Tensor2D | Tensor3D): Tensor3D {
  const [b, s, h, d] = x instanceof tf.Tensor && x.rank === 4 ? x.shape : [0, 0, 0, 0];
  checkRotaryArgs('applyRotaryToHeads', x, cos, sin, b * h, s, d, ['B', 'S', 'heads', 'D']);
  if (tf.getKernel(ROTARY, tf.getBackend()) == null) {
    return tf.tidy(() => applyRotary(tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [b * h, s, d]) as Tensor3D, cos, sin));
  }
  return tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    (args[1] as GradSaveFunc)([cos, sin]);
    return {
      value: rotaryKernel(args[0] as Tensor, cos, sin, false, h),
      gradFunc: (dy: Tensor, saved: Tensor[]) => [rotaryKernel(dy, saved[0], saved[1], true, h)],
    };
  })(x) as Tensor3D;
}

/**
 * Shapes the op works in, and how it swaps the halves of D. Shared tables: x as [N, S, 2, D/2]
 * against tables [S, 2, D/2], the halves swapped by one Reverse of axis 2 (few reshapes: each is
 * a tfjs kernel call). Per-row tables: x as [B, heads, S, D] against [B, 1, S, D], the swap on a
 * [N·S, 2, D/2] view (tfjs-webgpu's Reverse takes rank 4 at most).
 */
interface RotaryLayout {
  out: number[];
  work: number[];
  table: number[];
  /** the trailing axes of `table` that the [D] sign is reshaped to: [2, D/2] or [D] */
  signRank: number;
  swapHalves: (t: Tensor) => Tensor;
}

function rotaryLayout(n: number, s: number, d: number, b: number): RotaryLayout {
  const half = d / 2;
  if (b === 0) {
    return { out: [n, s, d], work: [n, s, 2, half], table: [s, 2, half], signRank: 2, swapHalves: t => tf.reverse(t, 2) };
  }
  const work = [b, n / b, s, d];
  return {
    out: [n, s, d], work, table: [b, 1, s, d], signRank: 1,
    swapHalves: t => tf.reshape(tf.reverse(tf.reshape(t, [n * s, 2, half]), 1), work),
  };
}

/** x·cos + swapHalves(x)·(−sin₁, sin₂) = x·cos + (−x2·sin₁, x1·sin₂). */
function rotaryForward(x: Tensor, cosRows: Tensor, signedSin: Tensor, layout: RotaryLayout): Tensor {
  return tf.tidy(() => {
    const rows = tf.reshape(x, layout.work);
    const rotated = tf.mul(layout.swapHalves(rows), signedSin);
    return tf.reshape(tf.add(tf.mul(rows, cosRows), rotated), layout.out);  // [N, S, D]
  });
}

/**
 * dx = dy·cos + swapHalves(dy·(−sin₁, sin₂)) = dy·cos + (dy2·sin₂, −dy1·sin₁): the transpose of
 * rotate-half is its negation, dy·cos − rotateHalf(dy·sin).
 */
function rotaryBackward(dy: Tensor, cosRows: Tensor, signedSin: Tensor, layout: RotaryLayout): Tensor {
  return tf.tidy(() => {
    const rows = tf.reshape(dy, layout.work);
    const rotated = layout.swapHalves(tf.mul(rows, signedSin));
    return tf.reshape(tf.add(tf.mul(rows, cosRows), rotated), layout.out);  // [N, S, D]
  });
}
