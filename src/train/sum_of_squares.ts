/**
 * Σ g² over many tensors as one op: the training loop's global gradient norm (globalNorm,
 * optimizer.ts), read every step. Composed from tfjs ops it is a square and a sum per chunk of
 * gradients; on webgpu tfjs's Sum gives a whole reduction to one workgroup, so at OLMoE's 224 LoRA
 * gradients that was 184 dispatches a step, most of them one SM reading 4 MB (issue 15). A backend
 * may register MoESumOfSquares to do it in a few dispatches over all of its cores (webgpu:
 * SumOfSquaresProgram); elsewhere the composed ops run, so cpu and wasm compute exactly what they
 * always did.
 */
import * as tf from '@tensorflow/tfjs-core';
import { fail } from '../ops/validate.js';
import { describeValue } from '../util/describe.js';

/**
 * MoESumOfSquares: inputs the tensors (an array, as AddN's), float32, any shapes; output a float32
 * scalar, Σ over every element of every input of x², accumulated in float32 in any order (0 for
 * none; NaN or Infinity where an element is, or where the sum overflows).
 */
export const SUM_OF_SQUARES = 'MoESumOfSquares';

/** tf.env() flag: false runs the composed ops even where MoESumOfSquares is registered (A/B runs). */
export const SUM_OF_SQUARES_KERNEL_FLAG = 'MOE_SUM_OF_SQUARES_KERNEL';
tf.env().registerFlag(SUM_OF_SQUARES_KERNEL_FLAG, () => true);

/**
 * The composed path squares and sums the tensors a chunk at a time, concatenated: at most this many
 * of them and this many elements (4 MB of float32, freed before the next chunk; no longer than
 * OLMoE's largest LoRA gradient, so that tfjs-wasm's Sum, one float32 running total, adds no more
 * terms in a row than it did per gradient). A square and a sum per tensor were ~2 programs each to
 * record, a chunk is 1–3 concatenations (by the device's storage-buffer limit), a square and a sum.
 */
const CHUNK_TENSORS = 32;
const CHUNK_ELEMENTS = 1 << 20;

/**
 * Σ x² over every element of `tensors` (float32, any shapes), as a float32 scalar on their device,
 * not read.
 *
 * ```js
 * const norm = tf.sqrt(sumOfSquares(grads));   // the gradients' global L2 norm
 * ```
 */
export function sumOfSquares(tensors: readonly tf.Tensor[]): tf.Scalar {
  const op = 'sumOfSquares';
  if (!Array.isArray(tensors)) fail(op, `'tensors' must be an array of float32 tensors but got ${describeValue(tensors)}`);
  tensors.forEach((t, i) => {
    if (!(t instanceof tf.Tensor) || t.dtype !== 'float32') fail(op, `'tensors[${i}]' must be a float32 tensor but got ${describeValue(t)}`);
    if (t.isDisposed) fail(op, `'tensors[${i}]' must be a live float32 tensor but got a disposed one`);
  });
  if (tensors.length === 0) return tf.scalar(0);
  if (tf.env().getBool(SUM_OF_SQUARES_KERNEL_FLAG) && tf.getKernel(SUM_OF_SQUARES, tf.getBackend()) != null) {
    return tf.engine().runKernel(SUM_OF_SQUARES, tensors as unknown as tf.NamedTensorMap) as tf.Scalar;
  }
  const partials: tf.Scalar[] = [];
  try {
    for (let start = 0; start < tensors.length;) {
      let end = start + 1;
      let elements = tensors[start].size;
      while (end < tensors.length && end - start < CHUNK_TENSORS && elements + tensors[end].size <= CHUNK_ELEMENTS) {
        elements += tensors[end].size;
        end++;
      }
      const chunk = tensors.slice(start, end);
      partials.push(tf.tidy(() => tf.sum(tf.square(chunk.length === 1 ? chunk[0] : tf.concat(chunk.map(g => tf.reshape(g, [-1])))))));
      start = end;
    }
    return partials.length === 1 ? partials.pop()! : tf.addN(partials);
  } finally {
    tf.dispose(partials);
  }
}
