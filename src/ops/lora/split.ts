/**
 * Split LoRA on fused expert weights: for rows routed to expert e, y = x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ,
 * never building W_eff. The base weight is captured, not an input: it gets no gradient and no
 * gradient memory; backward gives dx, dA and dB in PEFT's layouts. An adapter with `dropout`
 * reads dropout(x) as its branch input (PEFT's lora_dropout), one mask drawn [N, in] over x's rows
 * in their order; the base product sees x.
 */
import * as tf from '@tensorflow/tfjs-core';
import { groupedMatMulBackward, groupedMatMulForward, type GroupedWeight } from '../experts/grouped_matmul.js';
import type { LoRAFactors } from '../types.js';
import { assertInteger, assertShape, assertTensor, fail } from '../validate.js';
import { hasDropout, loraDropoutMask } from './dropout.js';
import { assertAdapterList, checkExpertFactors } from './validate_lora.js';

export interface SplitExpertLoRAOptions {
  /** W stored [E, in, out] (gpt-oss) instead of [E, out, in] */
  transposed?: boolean;
}

/**
 * Grouped product with LoRA over expert-sorted rows x [N, in] (rows of expert e are the
 * groupSizes[e] rows after those of experts < e). Several adapters add up; none gives x·W_eᵀ.
 *
 * ```js
 * const y = splitExpertLoRA(xSorted, [3, 0, 5], W, [{A, B, scaling: 2}]);  // [8, out]
 * ```
 */
export function splitExpertLoRA(
    x: tf.Tensor2D, groupSizes: number[], W: tf.Tensor3D, adapters: LoRAFactors[],
    options: SplitExpertLoRAOptions = {}): tf.Tensor2D {
  const op = 'splitExpertLoRA';
  assertTensor(op, 'x', x, 2);
  assertTensor(op, 'W', W, 3);
  const transposed = options.transposed ?? false;
  const [e, a, b] = W.shape;
  const [inSize, outSize] = transposed ? [a, b] : [b, a];
  assertShape(op, 'x', x, [null, inSize], `W is [${W.shape}]${transposed ? ', transposed' : ''}`);
  if (!Array.isArray(groupSizes) || groupSizes.length !== e) {
    fail(op, `'groupSizes' must be an array of ${e} (num experts) row counts but got ${JSON.stringify(groupSizes)}`);
  }
  groupSizes.forEach((n, i) => assertInteger(op, `groupSizes[${i}]`, n, 0));
  const total = groupSizes.reduce((s, n) => s + n, 0);
  if (total !== x.shape[0]) fail(op, `'groupSizes' must sum to the rows of x (${x.shape[0]}) but sum to ${total}`);
  assertAdapterList(op, 'adapters', adapters);
  adapters.forEach((f, i) => checkExpertFactors(op, `adapters[${i}].`, f, e, outSize, inSize, `W is [${W.shape}]`));

  // the masks are drawn once here: backward drops what forward dropped (they are saved with x)
  const masks = adapters.map(f => hasDropout(f) ? loraDropoutMask(x.shape, f.dropout!.p, f.dropout!.seed) as tf.Tensor2D : undefined);
  const drawn = masks.filter((m): m is tf.Tensor2D => m !== undefined);
  const run = tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
    const save = args[args.length - 1] as tf.GradSaveFunc;
    const factors = args.slice(1, -1) as tf.Tensor2D[];
    const lora = adapters.map((f, i) => ({ A: factors[2 * i], B: factors[2 * i + 1], scaling: f.scaling, rowMask: masks[i] }));
    const weight: GroupedWeight = { weight: W, transposed, lora };
    const value = groupedMatMulForward(args[0] as tf.Tensor2D, groupSizes, weight);  // [N, out]
    save([args[0] as tf.Tensor, ...factors, ...drawn]);  // W is frozen and read through the closure
    const gradFunc = (dy: tf.Tensor, saved: tf.Tensor[]): tf.Tensor[] => {
      const [xS, ...fS] = saved;
      let at = 2 * adapters.length;
      const savedLoRA = adapters.map((f, i) => ({ A: fS[2 * i] as tf.Tensor2D, B: fS[2 * i + 1] as tf.Tensor2D, scaling: f.scaling,
        rowMask: masks[i] === undefined ? undefined : fS[at++] as tf.Tensor2D }));
      const g = groupedMatMulBackward(dy as tf.Tensor2D, xS as tf.Tensor2D, groupSizes,
          { weight: W, transposed, lora: savedLoRA }, false);
      return [g.dx, ...g.dA.flatMap((dA, i) => [dA, g.dB[i]])];
    };
    return { value, gradFunc };
  });
  const y = run(x, ...adapters.flatMap(f => [f.A, f.B])) as tf.Tensor2D;
  tf.dispose(drawn);  // saved by customGrad as copies
  return y;
}
