/**
 * tfjs-backend-wasm's 'BatchMatMul', with transposed 2-D products sent down its fast path.
 *
 * tfjs-wasm hands a product to XNNPACK only when neither operand is transposed and both have batch
 * 1; anything else runs a blocked scalar loop at ~1 GFLOP/s (about 30× slower). Training makes
 * transposed products all the time: every matMul's gradient has one (dA = dy·Bᵀ, dB = Aᵀ·dy), and
 * the MoE router's are of that kind (at config S, `dlogits·W_r` and `xᵀ·dlogits`: 6–16 ms of a
 * 60–90 ms step on the slow loop). This wrapper runs an untransposed product instead, with
 * tfjs-wasm's own Transpose (one pass) on whichever side moves fewer elements: the transposed
 * operands, or the untransposed ones and the result (Cᵀ = op(B)ᵀ·op(A)ᵀ). For batched products
 * (attention's heads) it leaves tfjs-wasm's kernel as it is.
 *
 * The sums run in XNNPACK's order instead of the loop's: results move within float32 rounding.
 *
 * A product with no inner dimension (aᵀ·b over 0 rows: a weight gradient of an empty batch) is
 * zeros: tfjs-wasm hands it to XNNPACK, which refuses k = 0 ("xnn_create_fully_connected_nc_f32 …
 * status 2") and leaves the output block as the heap held it.
 */
import * as tf from '@tensorflow/tfjs-core';

/** What is used of tfjs-backend-wasm's BackendWasm here. */
interface WasmBackendLike {
  disposeData(dataId: tf.DataId, force?: boolean): boolean;
}

type KernelArgs = Parameters<tf.KernelFunc>[0];

/** Marks the wrapper, so that registering the package's kernels twice does not wrap it twice. */
const WRAPPED = Symbol('moe-lora fast transposed BatchMatMul');

/** The product of every dimension but the last two: the batch the kernel loops over. */
function batchOf(t: tf.TensorInfo): number {
  return t.shape.slice(0, -2).reduce((s, n) => s * n, 1);
}

/**
 * A 'BatchMatMul' config for wasm that runs `original` (tfjs-wasm's) with untransposed 2-D
 * operands when a product of batch 1 has a transposed operand, moving data with `transpose`
 * (tfjs-wasm's Transpose kernel). Other calls go to `original` unchanged.
 *
 * ```js
 * const fast = fastTransposedBatchMatMul(tf.getKernel('BatchMatMul', 'wasm'), tf.getKernel('Transpose', 'wasm'),
 *     tf.getKernel('Fill', 'wasm'));
 * ```
 */
export function fastTransposedBatchMatMul(original: tf.KernelConfig, transpose: tf.KernelConfig, fill: tf.KernelConfig): tf.KernelConfig {
  const kernelFunc = (args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] => {
    const { a, b } = args.inputs as { a: tf.TensorInfo; b: tf.TensorInfo };
    const { transposeA, transposeB } = args.attrs as unknown as { transposeA: boolean; transposeB: boolean };
    if (a.dtype === 'float32' && b.dtype === 'float32' && a.shape.length >= 2 && b.shape.length >= 2 &&
        a.shape.at(transposeA ? -2 : -1) === 0) {
      const batch = tf.broadcast_util.assertAndGetBroadcastShape(a.shape.slice(0, -2), b.shape.slice(0, -2));
      const shape = [...batch, a.shape.at(transposeA ? -1 : -2)!, b.shape.at(transposeB ? -2 : -1)!];
      return fill.kernelFunc({ inputs: {}, backend: args.backend, attrs: { shape, value: 0, dtype: 'float32' } });
    }
    if ((!transposeA && !transposeB) || a.dtype !== 'float32' || b.dtype !== 'float32' ||
        a.shape.length < 2 || b.shape.length < 2 || batchOf(a) !== 1 || batchOf(b) !== 1) {
      return original.kernelFunc(args);
    }
    const backend = args.backend as unknown as WasmBackendLike;
    const temporary: tf.TensorInfo[] = [];
    const swapLast = (t: tf.TensorInfo): tf.TensorInfo => {
      const r = t.shape.length;
      const perm = [...Array(r - 2).keys(), r - 1, r - 2];
      const out = transpose.kernelFunc({ inputs: { x: t }, backend: args.backend, attrs: { perm } }) as tf.TensorInfo;
      temporary.push(out);
      return out;
    };
    const product = (left: tf.TensorInfo, right: tf.TensorInfo) => original.kernelFunc({
      inputs: { a: left, b: right }, backend: args.backend, attrs: { ...args.attrs, transposeA: false, transposeB: false },
    }) as tf.TensorInfo;
    const [m, k] = transposeA ? [a.shape.at(-1)!, a.shape.at(-2)!] : [a.shape.at(-2)!, a.shape.at(-1)!];
    const n = transposeB ? b.shape.at(-2)! : b.shape.at(-1)!;
    // Elements moved: op(A)·op(B) transposes each transposed operand; (op(B)ᵀ·op(A)ᵀ)ᵀ transposes
    // the untransposed ones and the product. The router's dW = xᵀ·dlogits ([1024, 256]ᵀ·[1024, 8])
    // moves 10 k elements the second way instead of 262 k.
    const direct = (transposeA ? m * k : 0) + (transposeB ? k * n : 0);
    const swapped = (transposeA ? 0 : m * k) + (transposeB ? 0 : k * n) + m * n;
    try {
      if (direct <= swapped) {
        return product(transposeA ? swapLast(a) : a, transposeB ? swapLast(b) : b);
      }
      const productT = product(transposeB ? b : swapLast(b), transposeA ? a : swapLast(a));   // [n, m]
      temporary.push(productT);
      const out = swapLast(productT);
      temporary.pop();
      return out;
    } finally {
      temporary.forEach(t => backend.disposeData(t.dataId));
    }
  };
  return { ...original, kernelFunc: Object.assign(kernelFunc, { [WRAPPED]: true }) as unknown as tf.KernelFunc };
}

/**
 * Replaces wasm's registered 'BatchMatMul' with fastTransposedBatchMatMul of it (once; true when
 * it did). False when tfjs-backend-wasm is not loaded or the kernel is already the wrapper.
 */
export function useFastTransposedBatchMatMul(): boolean {
  const original = tf.getKernel(tf.BatchMatMul, 'wasm');
  const transpose = tf.getKernel(tf.Transpose, 'wasm');
  const fill = tf.getKernel(tf.Fill, 'wasm');
  if (original == null || transpose == null || fill == null || (original.kernelFunc as unknown as Record<symbol, unknown>)[WRAPPED]) {
    return false;
  }
  tf.unregisterKernel(tf.BatchMatMul, 'wasm');
  tf.registerKernel(fastTransposedBatchMatMul(original, transpose, fill));
  return true;
}
