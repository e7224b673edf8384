/**
 * indexCounts: how often each class occurs in int32 index lists, as float32, built so that it is
 * right on every backend, where the sum of tf.oneHot over the lists is not:
 *
 * - webgpu (tfjs-backend-webgpu 4.22): a Sum/Mean/Max over an axis other than the last transposes
 *   first, and TransposeProgram does not compile for an int32 buffer (its WGSL passes an i32 to the
 *   f32 setOutputAtIndex), so tf.sum(tf.oneHot(i, n), 1) came out all zeros (deepseek_v3's group
 *   mask: experts [0,0,0,0] for every token). tf.cast to float32 first does not help: webgpu's Cast
 *   int32 → float32 only relabels the int32 buffer, and programs read the buffer's dtype. The Sum
 *   calls that transpose directly, not through the kernel registry, so no kernel override of ours
 *   could catch it.
 * - wasm (tfjs-backend-wasm 4.22): OneHot ignores its dtype attribute and writes int32 values, so
 *   tf.oneHot(i, n, 1, 0, 'float32') holds denormals (the bits of 1 read as a float).
 *
 * Here Equal compares, Select writes a float32 output on every backend, and the Sum runs over the
 * last axis (no transpose). Equal has no gradient in tfjs, so the whole is one customGrad whose
 * gradient for the indices is zeros (what OneHot's is): index lists on the tape, such as
 * Routing.experts, can go in.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Tensor } from '@tensorflow/tfjs-core';

/**
 * out[..., c] = how many of indices[..., :] equal c: float32 [...indices.shape[:-1], depth], the
 * values of tf.sum(tf.oneHot(indices, depth), -2). Top-k indices (distinct) give 0/1; a one-hot of
 * x is indexCounts(tf.expandDims(x, -1), depth).
 *
 * ```js
 * indexCounts(tf.tensor2d([[0, 2], [1, 3]], [2, 2], 'int32'), 4);   // [[1, 0, 1, 0], [0, 1, 0, 1]]
 * ```
 */
export function indexCounts(indices: Tensor, depth: number): Tensor {
  const counts = tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    const lists = args[0] as Tensor;
    const value = tf.tidy(() => {
      const classes = tf.reshape(tf.range(0, depth, 1, 'int32'), [depth, 1]);     // [depth, 1]
      const hit = tf.equal(tf.expandDims(lists, -2), classes);                     // [..., depth, n] bool
      return tf.sum(tf.where(hit, tf.scalar(1), tf.scalar(0)), -1);                // [..., depth]
    });
    return { value, gradFunc: () => tf.zeros(lists.shape, 'float32') };
  });
  return counts(indices);
}
