/**
 * sumOfSquares's kernel on webgpu (MoESumOfSquares, SumOfSquaresProgram): Σ x² over many tensors
 * against float64, exactly where every square and partial sum is exact; the dispatches it records;
 * NaN and Infinity kept; the composed ops (flag off) giving the same; nothing left behind. Run with
 * TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { addNInputsPerProgram } from '../../../src/backends/webgpu/add_n.js';
import { SUM_OF_SQUARES_KERNEL_FLAG, sumOfSquares } from '../../../src/train/sum_of_squares.js';
import { Rng } from '../../helpers/numeric.js';
import { withEnvFlag, withShaderKeys } from './helpers.js';

const device = () => (tf.backend() as unknown as { device: GPUDevice }).device;

/** Σ x² in float64. */
const float64SumOfSquares = (values: Float32Array[]) => values.reduce((s, v) => s + v.reduce((t, x) => t + x * x, 0), 0);

/**
 * The together passes after `first` first-pass outputs of more than one value each, `perDispatch` inputs a dispatch:
 * groups of partial sums until one is left (an input of one workgroup alone needs none: checked apart).
 */
function togetherPasses(first: number, perDispatch: number): number {
  let passes = 0;
  for (let left = first; passes === 0 || left > 1; left = Math.ceil(left / perDispatch)) passes++;
  return passes;
}

/** The sum and the shader keys of the programs it recorded; the result is disposed. */
async function sumOf(tensors: tf.Tensor[]): Promise<{ value: number; keys: string[] }> {
  return withShaderKeys(async keys => {
    const before = tf.memory().numTensors;
    const t = sumOfSquares(tensors);
    const recorded = [...keys];
    expect(t.shape, 'a scalar').to.deep.equal([]);
    expect(tf.memory().numTensors, 'one tensor made').to.equal(before + 1);
    const value = (await t.data())[0];
    t.dispose();
    return { value, keys: recorded };
  });
}

describe('webgpu: sumOfSquares (MoESumOfSquares)', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it('exact over 40 tensors of every kind: sizes by 4 and not, ranks 0–3, empty ones, one past the parts cap; first passes then one', async () => {
    const perDispatch = addNInputsPerProgram(device().limits);
    const rng = new Rng(21);
    // values ±0.5 and ±1: every square (0.25, 1) and every partial sum (multiples of 0.25 below 2^22: the total is
    // about 0.625 · 4.2 M) is exact in float32, so any order of the additions gives float64's sum; (1 << 22) + 3
    // elements: 1024 workgroups of 4 loads a lane take 2^20 quads, so this one's lanes loop further (the parts cap)
    const shapes = [...Array.from({ length: 36 }, (_, i) => [[], [7], [2, 6], [3, 1, 5]][i % 4].map(d => d + (i % 3))),
      [0], [(1 << 22) + 3], [4, 0, 2]];
    const values = shapes.map(shape => Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => [-1, -0.5, 0.5, 1][rng.int(4)]));
    const tensors = values.map((v, i) => tf.tensor(v, shapes[i]));
    const { value, keys } = await sumOf(tensors);
    expect(value).to.equal(float64SumOfSquares(values));
    // 37 non-empty inputs in first passes of perDispatch each, then their partial sums together
    const firstPasses = Math.ceil(37 / perDispatch);
    expect(keys.filter(k => k.startsWith('moeSumOfSquares_sq_'))).to.have.length(firstPasses);
    expect(keys.filter(k => k.startsWith('moeSumOfSquares_sum_together_'))).to.have.length(togetherPasses(firstPasses, perDispatch));
    expect(keys).to.have.length(keys.filter(k => k.startsWith('moeSumOfSquares_')).length);
    tf.dispose(tensors);
  });

  it('random values within float32 rounding of float64; the composed ops (flag off) too', async () => {
    const rng = new Rng(5);
    const values = Array.from({ length: 23 }, (_, i) => Float32Array.from({ length: 1 + i * 4099 }, () => rng.normal() * (1 + i)));
    const tensors = values.map(v => tf.tensor1d(v));
    const want = float64SumOfSquares(values);
    // positive terms: a float32 running sum of n of them is within n·2^-24 of float64. The kernel's longest chain here
    // is ~40 additions (16 terms a lane, 8 tree levels, two partial sums a lane, 8 more); tfjs's Sum, one
    // workgroup of 512 lanes over a chunk of ~1 M elements, ~2000
    expect((await sumOf(tensors)).value).to.be.closeTo(want, 40 * 2 ** -24 * want);
    const composed = await withEnvFlag(SUM_OF_SQUARES_KERNEL_FLAG, false, () => sumOf(tensors));
    expect(composed.keys.some(k => k.startsWith('moeSumOfSquares_')), 'the composed ops ran').to.equal(false);
    expect(composed.value).to.be.closeTo(want, 2100 * 2 ** -24 * want);
    tf.dispose(tensors);
  });

  it('224 gradients (OLMoE\'s LoRA count) in ceil(224 / inputs a dispatch) + 1 dispatches (16 storage buffers); one element alone in one', async () => {
    const perDispatch = addNInputsPerProgram(device().limits);
    const values = Array.from({ length: 224 }, (_, i) => Float32Array.from({ length: i % 3 === 0 ? 600 : 48 }, (_, k) => Math.sin(i * 31 + k)));
    const tensors = values.map(v => tf.tensor1d(v));
    const { value, keys } = await sumOf(tensors);
    const want = float64SumOfSquares(values);
    expect(value).to.be.closeTo(want, 40 * 2 ** -24 * want);
    const firstPasses = Math.ceil(224 / perDispatch);
    expect(keys).to.have.length(firstPasses + togetherPasses(firstPasses, perDispatch));
    const one = tf.scalar(-3);
    expect(await sumOf([one])).to.deep.equal({ value: 9, keys: ['moeSumOfSquares_sq_e'] });
    tf.dispose([one, ...tensors]);
  });

  it('keeps NaN and Infinity; 0 for none and for empty tensors only', async () => {
    const finite = tf.tensor1d([1, 2, 3, 4]);
    for (const [bad, want] of [[NaN, NaN], [Infinity, Infinity], [-Infinity, Infinity]] as const) {
      const t = tf.tensor2d([[0.5, bad], [1, 2]]);
      const { value } = await sumOf([finite, t]);
      if (Number.isNaN(want)) expect(value).to.be.NaN;
      else expect(value).to.equal(want);
      t.dispose();
    }
    // 3e19² overflows float32: the sum is Infinity, as torch's norm of such a gradient
    const huge = tf.tensor1d([3e19, 1]);
    expect((await sumOf([huge])).value).to.equal(Infinity);
    const empty = tf.tensor2d([], [0, 3]);
    expect((await sumOf([])).value).to.equal(0);
    expect(await sumOf([empty])).to.deep.equal({ value: 0, keys: [] });
    tf.dispose([finite, huge, empty]);
  });

  it('names the bad argument: not an array, an int32 tensor, a disposed one', () => {
    const ints = tf.tensor1d([1, 2], 'int32');
    const one = tf.scalar(1);
    const gone = tf.tensor1d([1]);
    gone.dispose();
    const before = tf.memory().numTensors;
    expect(() => sumOfSquares(ints as unknown as tf.Tensor[])).to.throw(/sumOfSquares.*'tensors' must be an array of float32 tensors but got/);
    expect(() => sumOfSquares([one, ints])).to.throw(/sumOfSquares.*'tensors\[1\]' must be a float32 tensor but got/);
    expect(() => sumOfSquares([gone])).to.throw(/sumOfSquares.*'tensors\[0\]' must be a live float32 tensor but got a disposed one/);
    expect(tf.memory().numTensors, 'nothing made').to.equal(before);
    tf.dispose([ints, one]);
  });
});
