/**
 * tfjs-backend-webgpu's 'Transpose', with the float32 transposes that keep the last axis in place
 * (a multiple of 4 long) sent to TransposeQuadsProgram: vec4 copies of the input's own rows
 * instead of tfjs's per-element coordinate math (attention's head moves: 52 µs a call for OLMoE's
 * [4, 512, 16, 128] on the H100, the copy's bytes ~3 µs; programs/transpose_quads_program.ts).
 * Everything else goes to tfjs's kernel unchanged. The tf.env() flag WEBGPU_MOE_TRANSPOSE_QUADS
 * (default true) is read per call: false runs tfjs's program for every transpose (A/B runs).
 */
import * as tf from '@tensorflow/tfjs-core';
import { TRANSPOSE_QUADS_MAX_RANK, TransposeQuadsProgram } from './programs/transpose_quads_program.js';
import { replaceWebGPUKernel } from './kernel_replacement.js';

export const TRANSPOSE_QUADS_FLAG = 'WEBGPU_MOE_TRANSPOSE_QUADS';
tf.env().registerFlag(TRANSPOSE_QUADS_FLAG, () => true);

type KernelArgs = Parameters<tf.KernelFunc>[0];

/** What is used of tfjs-backend-webgpu's WebGPUBackend here. */
interface WebGPUBackendLike {
  runWebGPUProgram(program: TransposeQuadsProgram, inputs: tf.TensorInfo[], dtype: tf.DataType,
      uniforms: ReturnType<TransposeQuadsProgram['uniformsFor']>): tf.TensorInfo;
}

/** Whether TransposeQuadsProgram takes x transposed by perm. */
export function transposeKeepsQuads(x: tf.TensorInfo, perm: readonly number[]): boolean {
  const rank = x.shape.length;
  return x.dtype === 'float32' && rank >= 1 && rank <= TRANSPOSE_QUADS_MAX_RANK && perm.length === rank &&
      perm[rank - 1] === rank - 1 && x.shape[rank - 1] % 4 === 0 && tf.util.sizeFromShape(x.shape) > 0;
}

/**
 * A 'Transpose' kernelFunc for webgpu that runs TransposeQuadsProgram where transposeKeepsQuads and the
 * flag say so, and `original` otherwise.
 */
export function quadTranspose(original: tf.KernelConfig): tf.KernelFunc {
  const kernelFunc = (args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] => {
    const { x } = args.inputs as { x: tf.TensorInfo };
    const { perm } = args.attrs as unknown as { perm: number[] };
    if (!tf.env().getBool(TRANSPOSE_QUADS_FLAG) || !transposeKeepsQuads(x, perm)) return original.kernelFunc(args);
    const program = new TransposeQuadsProgram(x.shape, perm);
    return (args.backend as unknown as WebGPUBackendLike).runWebGPUProgram(program, [x], 'float32', program.uniformsFor());
  };
  return kernelFunc as unknown as tf.KernelFunc;
}

/** Replaces webgpu's registered 'Transpose' with quadTranspose of it (once); returns the names replaced now. */
export function useQuadTranspose(): string[] {
  return replaceWebGPUKernel(tf.Transpose, quadTranspose) ? [tf.Transpose] : [];
}
