/**
 * flatDispatch (src/backends/webgpu/programs/shared.ts): the one-thread-per-element programs'
 * grids stay within WebGPU's default 65535 workgroups per dimension, which browsers give, by
 * going two-dimensional past one row; a program over more elements than one row holds computes
 * every one of them (applyRotary's MoERotary at 65536 workgroups' worth, against JS float64).
 * Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { FLAT_THREADS, flatDispatch, MAX_WORKGROUPS_PER_DIMENSION } from '../../../src/backends/webgpu/programs/shared.js';
import { registerMoEKernels } from '../../../src/backends/register_all_kernels.js';
import { applyRotary } from '../../../src/ops/rotary.js';
import { expectNoLeakAsync } from './helpers.js';

describe('webgpu: flat programs\' grids within 65535 workgroups a dimension (flatDispatch)', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    registerMoEKernels('webgpu');
  });

  it('one row up to 65535 workgroups, then rows of at most that many covering every element', () => {
    expect(flatDispatch(0)).to.deep.equal([1, 1, 1]);
    expect(flatDispatch(65)).to.deep.equal([2, 1, 1]);
    expect(flatDispatch(MAX_WORKGROUPS_PER_DIMENSION * FLAT_THREADS)).to.deep.equal([65535, 1, 1]);
    expect(flatDispatch(MAX_WORKGROUPS_PER_DIMENSION * FLAT_THREADS + 1)).to.deep.equal([32768, 2, 1]);
    // OLMoE's activation gradient at batch 4 × 512: [24576, 1024] elements
    for (const size of [24576 * 1024, 24576 * 2048 * 4, 1e9]) {
      const [x, y, z] = flatDispatch(size);
      expect(x, `${size}`).to.be.at.most(MAX_WORKGROUPS_PER_DIMENSION);
      expect(y, `${size}`).to.be.at.most(MAX_WORKGROUPS_PER_DIMENSION);
      expect(z).to.equal(1);
      expect(x * y * FLAT_THREADS, `${size}`).to.be.at.least(size);
      expect((x * (y - 1)) * FLAT_THREADS, `${size}: no row wasted`).to.be.lessThan(size);
    }
  });

  it('a program over two rows of workgroups computes every element (applyRotary, 4 194 246 elements)', async () => {
    // many rows of one position: the tables stay one row, the arrays two of ~17 MB; D 6, one element a
    // thread (a D that is a multiple of 8 takes quads, a quarter of the threads)
    const [n, s, d] = [699041, 1, 6];
    expect(flatDispatch(n * s * d)[1], 'two rows').to.equal(2);
    await expectNoLeakAsync(async () => {
      const xv = Float32Array.from({ length: n * s * d }, (_, i) => ((i * 7919) % 1009) / 1009 - 0.5);
      const cv = Float32Array.from({ length: s * d }, (_, i) => Math.fround(Math.cos(i * 1e-3)));
      const sv = Float32Array.from({ length: s * d }, (_, i) => Math.fround(Math.sin(i * 1e-3)));
      const x = tf.tensor3d(xv, [n, s, d]);
      const cos = tf.tensor2d(cv, [s, d]);
      const sin = tf.tensor2d(sv, [s, d]);
      const y = applyRotary(x, cos, sin);
      const got = await y.data();
      let worst = 0;
      const half = d / 2;
      for (let i = 0; i < n * s * d; i++) {
        const c = i % d;
        const t = i % (s * d);
        const rotated = c < half ? -xv[i + half] : xv[i - half];
        const want = xv[i] * cv[t] + rotated * sv[t];
        worst = Math.max(worst, Math.abs(got[i] - want));
      }
      // two float32 products and a sum of values below 1: a few units in the last place
      expect(worst).to.be.at.most(4e-7);
      expect(got.length).to.equal(n * s * d);
      tf.dispose([x, cos, sin, y]);
    });
  });
});
