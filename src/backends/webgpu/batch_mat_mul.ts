/**
 * tfjs-backend-webgpu's 'BatchMatMul' and '_FusedMatMul', with the one product they get wrong
 * sent to another of their own programs.
 *
 * For a product of batch 1 with a long reduction (K ≥ 2000) and a small output (few 32×32 tiles),
 * tfjs-webgpu 4.22 picks MatMulSplitKProgram. That program decides to read in vec4 from K and the
 * output width alone, ignoring transposeB, and then reads a transposed B four elements along the
 * wrong axis: x·Aᵀ for a LoRA A of [8, 2048] on 32 rows comes out wrong by ~50 (not rounding).
 * LoRA meets exactly that shape: the branch x·Aᵀ of every adapted projection whose input is
 * 2048 wide (OLMoE, Qwen3-MoE), on the short inputs of evaluation, generation and prompts; in
 * training at 512 tokens the product has more tiles and takes the (right) packed program, so
 * training looked fine while the adapter's logits were wrong. This wrapper asks tfjs-webgpu for
 * MatMulSmallOutputSizeProgram (its choice for the same shapes when K < 2000) in that one case,
 * through its own WEBGPU_MATMUL_PROGRAM_TYPE flag for the duration of the call.
 */
import * as tf from '@tensorflow/tfjs-core';
import { replaceWebGPUKernel } from './kernel_replacement.js';

type KernelArgs = Parameters<tf.KernelFunc>[0];

/** What is used of tfjs-backend-webgpu's WebGPUBackend here. */
interface WebGPUBackendLike {
  thresholdToIncreaseWorkgroups: number;
}

/** tfjs-backend-webgpu's MatMulProgramType values (webgpu_util.ts). */
const SMALL_OUTPUT_SIZE_PROGRAM = 2;
const PROGRAM_TYPE_FLAG = 'WEBGPU_MATMUL_PROGRAM_TYPE';
const THRESHOLD_FLAG = 'WEBGPU_THRESHOLD_TO_INCREASE_WORKGROUPS_FOR_MATMUL';

const batchOf = (t: tf.TensorInfo) => t.shape.slice(0, -2).reduce((s, n) => s * n, 1);

/**
 * Whether tfjs-webgpu's batchMatMulImpl would run MatMulSplitKProgram with a transposed B for
 * these operands (its own choice, BatchMatMul_impl.ts, restated).
 */
export function picksTransposedSplitK(a: tf.TensorInfo, b: tf.TensorInfo, transposeA: boolean, transposeB: boolean,
    backend: WebGPUBackendLike): boolean {
  if (!transposeB || tf.env().getNumber(PROGRAM_TYPE_FLAG) >= 0) return false;
  if (Math.max(batchOf(a), batchOf(b)) !== 1) return false;
  const outerA = transposeA ? a.shape.at(-1)! : a.shape.at(-2)!;
  const [outerB, inner] = [b.shape.at(-2)!, b.shape.at(-1)!];
  if (inner < 2000 || outerA * outerB <= 128) return false;
  const flag = tf.env().getNumber(THRESHOLD_FLAG);
  const threshold = flag > 0 ? flag : backend.thresholdToIncreaseWorkgroups;
  const tiles = Math.ceil(outerA / 32) * Math.ceil(outerB / 32);
  return tiles <= threshold || (outerA <= 8 && tiles <= threshold * 2);
}

/**
 * A 'BatchMatMul' or '_FusedMatMul' kernelFunc for webgpu that runs `original` with the small-output
 * program where `original` would pick its split-K program on a transposed B; other calls go to
 * `original` unchanged.
 *
 * ```js
 * const safe = splitKSafeMatMul(tf.getKernel('BatchMatMul', 'webgpu'));
 * ```
 */
export function splitKSafeMatMul(original: tf.KernelConfig): tf.KernelFunc {
  const kernelFunc = (args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] => {
    const { a, b } = args.inputs as { a: tf.TensorInfo; b: tf.TensorInfo };
    const { transposeA, transposeB } = args.attrs as unknown as { transposeA: boolean; transposeB: boolean };
    if (!picksTransposedSplitK(a, b, transposeA, transposeB, args.backend as unknown as WebGPUBackendLike)) {
      return original.kernelFunc(args);
    }
    const env = tf.env();
    const before = env.getNumber(PROGRAM_TYPE_FLAG);
    env.set(PROGRAM_TYPE_FLAG, SMALL_OUTPUT_SIZE_PROGRAM);
    try {
      return original.kernelFunc(args);
    } finally {
      env.set(PROGRAM_TYPE_FLAG, before);
    }
  };
  return kernelFunc as unknown as tf.KernelFunc;
}

/**
 * Replaces webgpu's registered 'BatchMatMul' and '_FusedMatMul' with splitKSafeMatMul of them
 * (once each); returns the names replaced now.
 */
export function useSplitKSafeMatMul(): string[] {
  return [tf.BatchMatMul, tf._FusedMatMul].filter(name => replaceWebGPUKernel(name, splitKSafeMatMul));
}
