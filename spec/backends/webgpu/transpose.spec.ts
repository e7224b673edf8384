/**
 * The Transpose wrapper (src/backends/webgpu/transpose.ts): float32 transposes that keep the last
 * axis (a multiple of 4) run TransposeQuadsProgram and give exactly tfjs's values (a transpose
 * moves values, so equal means bit-equal), for every permutation of ranks 2–4 that keeps it,
 * attention's [B, S, heads, D] ↔ [B, heads, S, D] included; other transposes (int32, the last
 * axis moved, a last axis not a multiple of 4, rank 5) still go to tfjs's program; the flag turns
 * the wrapper off. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { registerMoEKernels } from '../../../src/backends/register_all_kernels.js';
import { TRANSPOSE_QUADS_FLAG, transposeKeepsQuads } from '../../../src/backends/webgpu/transpose.js';
import { TransposeQuadsProgram } from '../../../src/backends/webgpu/programs/transpose_quads_program.js';
import { expectNoLeakAsync, withEnvFlag } from './helpers.js';

/** Every permutation of 0..n−1. */
function permutations(n: number): number[][] {
  if (n === 0) return [[]];
  return permutations(n - 1).flatMap(p => Array.from({ length: n }, (_, i) => [...p.slice(0, i), n - 1, ...p.slice(i)]));
}

/** The names of the programs `fn` runs on the backend. */
async function programsOf(fn: () => tf.Tensor): Promise<{ values: Float32Array | Int32Array; programs: string[] }> {
  const backend = tf.backend() as unknown as { runWebGPUProgram: (...args: unknown[]) => tf.TensorInfo };
  const run = backend.runWebGPUProgram;
  const programs: string[] = [];
  backend.runWebGPUProgram = function (this: unknown, ...args: unknown[]) {
    programs.push((args[0] as { constructor: { name: string } }).constructor.name);
    return run.apply(this, args);
  };
  try {
    const y = fn();
    const values = await y.data() as Float32Array | Int32Array;
    y.dispose();
    return { values, programs };
  } finally {
    backend.runWebGPUProgram = run;
  }
}

/** x transposed by perm, from x's values in JS. */
function transposed(values: ArrayLike<number>, shape: number[], perm: number[]): number[] {
  const strides = shape.map((_, i) => shape.slice(i + 1).reduce((a, b) => a * b, 1));
  const outShape = perm.map(p => shape[p]);
  const out: number[] = [];
  const total = values.length;
  for (let index = 0; index < total; index++) {
    let rest = index;
    let source = 0;
    for (let axis = outShape.length - 1; axis >= 0; axis--) {
      source += (rest % outShape[axis]) * strides[perm[axis]];
      rest = Math.floor(rest / outShape[axis]);
    }
    out.push(values[source]);
  }
  return out;
}

describe('webgpu: float32 transposes keeping the last axis in vec4 copies (transpose.ts)', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    registerMoEKernels('webgpu');
  });

  for (const shape of [[3, 8], [2, 5, 4], [2, 3, 5, 8], [4, 7, 3, 12]]) {
    it(`every permutation of [${shape}] that keeps the last axis: tfjs's values, on TransposeQuadsProgram`, async () => {
      const rank = shape.length;
      const values = Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => i * 0.5 - 7.25);
      const x = tf.tensor(values, shape);
      await expectNoLeakAsync(async () => {
        for (const perm of permutations(rank - 1).map(p => [...p, rank - 1])) {
          const ours = await programsOf(() => tf.transpose(x, perm));
          expect(ours.programs, `[${perm}]`).to.deep.equal(['TransposeQuadsProgram']);
          expect(Array.from(ours.values), `[${perm}]`).to.deep.equal(transposed(values, shape, perm));
          const theirs = await withEnvFlag(TRANSPOSE_QUADS_FLAG, false, () => programsOf(() => tf.transpose(x, perm)));
          expect(theirs.programs, `[${perm}] flag off`).to.not.include('TransposeQuadsProgram');
          expect(Array.from(theirs.values), `[${perm}] flag off`).to.deep.equal(Array.from(ours.values));
        }
      });
      x.dispose();
    });
  }

  it('attention\'s head move at OLMoE\'s shape ([4, 512, 16, 128] ↔ [4, 16, 512, 128]) and its gradient', async () => {
    const shape = [4, 512, 16, 128];
    const values = Float32Array.from({ length: 4 * 512 * 16 * 128 }, (_, i) => (i % 9973) / 97 - 50);
    const x = tf.tensor4d(values, shape as [number, number, number, number]);
    await expectNoLeakAsync(async () => {
      const { values: there, programs } = await programsOf(() => tf.transpose(x, [0, 2, 1, 3]));
      expect(programs).to.deep.equal(['TransposeQuadsProgram']);
      expect(Array.from(there)).to.deep.equal(transposed(values, shape, [0, 2, 1, 3]));
      // tf.grads of a transpose runs the inverse transpose
      const [g] = tf.grads((t: tf.Tensor) => tf.mul(tf.transpose(t, [0, 2, 1, 3]), tf.range(0, 128, 1, 'float32')))([x]);
      const want = Float32Array.from({ length: values.length }, (_, i) => i % 128);
      expect(Array.from(await g.data())).to.deep.equal(Array.from(want));
      g.dispose();
    });
    x.dispose();
  });

  it('int32, the last axis moved, a last axis no multiple of 4 and rank 5 stay on tfjs\'s program', async () => {
    const cases: Array<[tf.Tensor, number[]]> = [
      [tf.tensor3d(Int32Array.from({ length: 2 * 3 * 4 }, (_, i) => i), [2, 3, 4], 'int32'), [1, 0, 2]],
      [tf.tensor3d(Float32Array.from({ length: 2 * 3 * 4 }, (_, i) => i), [2, 3, 4]), [0, 2, 1]],
      [tf.tensor3d(Float32Array.from({ length: 2 * 3 * 6 }, (_, i) => i), [2, 3, 6]), [1, 0, 2]],
      [tf.tensor5d(Float32Array.from({ length: 2 * 2 * 2 * 2 * 4 }, (_, i) => i), [2, 2, 2, 2, 4]), [1, 0, 2, 3, 4]],
    ];
    for (const [x, perm] of cases) {
      expect(transposeKeepsQuads(x, perm), `${x.dtype} [${x.shape}] by [${perm}]`).to.equal(false);
      const { values, programs } = await programsOf(() => tf.transpose(x, perm));
      expect(programs, `${x.dtype} [${x.shape}] by [${perm}]`).to.not.include('TransposeQuadsProgram');
      if (x.dtype === 'float32') expect(Array.from(values)).to.deep.equal(transposed(await x.data(), x.shape, perm));
      x.dispose();
    }
  });

  it('the program refuses what it does not take, naming it', () => {
    expect(() => new TransposeQuadsProgram([2, 3, 4], [0, 2, 1])).to.throw(
        'TransposeQuadsProgram: a shape of rank 1–4 whose last axis stays last and is a multiple of 4, but got shape [2,3,4] and perm [0,2,1]');
    expect(() => new TransposeQuadsProgram([2, 3, 6], [1, 0, 2])).to.throw(/but got shape \[2,3,6\] and perm \[1,0,2\]/);
  });
});
