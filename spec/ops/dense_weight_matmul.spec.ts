/**
 * denseWeightMatMul on a float32 W where MoEDenseMatMul is not registered (cpu, wasm): tf.matMul
 * (+ tf.add) bit for bit, with no MoEDenseMatMul, whatever WEBGPU_MOE_DENSE_PROGRAM says (the
 * flag is webgpu's: these backends keep the path they had). The webgpu route:
 * spec/backends/webgpu/dense_f32_product.spec.ts.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { DENSE_MATMUL, DENSE_PROGRAM_FLAG, denseWeightMatMul } from '../../src/ops/packed.js';

function bitsOf(t: tf.Tensor): number[] {
  const v = t.dataSync() as Float32Array;
  return Array.from(new Int32Array(v.buffer, v.byteOffset, v.length));
}

describe(`denseWeightMatMul, float32 W, without ${DENSE_MATMUL} registered`, () => {
  for (const choice of ['forward', 'grouped', 'tfjs', 'not a choice']) {
    it(`flag '${choice}': x·Wᵀ + b, x·Wᵀ and dy·W, with and without a LoRA tail, are tf.matMul's (+ tf.add's) bits, no leak`, () => {
      expect(tf.getKernel(DENSE_MATMUL, tf.getBackend())).to.equal(undefined);
      const previous = tf.env().get(DENSE_PROGRAM_FLAG);
      tf.env().set(DENSE_PROGRAM_FLAG, choice);
      try {
        const w = tf.randomNormal([19, 33], 0, 1, 'float32', 1) as tf.Tensor2D;
        const x = tf.randomNormal([70, 33], 0, 1, 'float32', 2) as tf.Tensor2D;
        const dy = tf.randomNormal([70, 19], 0, 1, 'float32', 3) as tf.Tensor2D;
        const bias = tf.randomNormal([19], 0, 1, 'float32', 4) as tf.Tensor1D;
        // a LoRA branch's tail (loraLinear's first): + down·Bᵀ forward, + g·A backward, added after the product
        const [down, B, g, A] = ([[70, 3], [19, 3], [70, 3], [3, 33]] as Array<[number, number]>).map((shape, i) => tf.randomNormal(shape, 0, 1, 'float32', 5 + i) as tf.Tensor2D);
        const before = tf.memory().numTensors;
        const pairs: Array<[string, tf.Tensor, tf.Tensor]> = [
          ['x·Wᵀ + b', denseWeightMatMul(x, w, true, bias), tf.tidy(() => tf.add(tf.matMul(x, w, false, true), bias))],
          ['x·Wᵀ', denseWeightMatMul(x, w, true, null), tf.matMul(x, w, false, true)],
          ['dy·W', denseWeightMatMul(dy, w, false, null), tf.matMul(dy, w)],
          ['x·Wᵀ + b + down·Bᵀ', denseWeightMatMul(x, w, true, bias, 'activation', { a: down, b: B, transposeB: true }),
            tf.tidy(() => tf.add(tf.matMul(down, B, false, true), tf.add(tf.matMul(x, w, false, true), bias)))],
          ['dy·W + g·A', denseWeightMatMul(dy, w, false, null, 'gradient', { a: g, b: A, transposeB: false }),
            tf.tidy(() => tf.add(tf.matMul(g, A), tf.matMul(dy, w)))],
        ];
        for (const [label, got, want] of pairs) expect(bitsOf(got), label).to.deep.equal(bitsOf(want));
        tf.dispose(pairs.flatMap(([, got, want]) => [got, want]));
        expect(tf.memory().numTensors).to.equal(before);
        tf.dispose([w, x, dy, bias, down, B, g, A]);
      } finally {
        tf.env().set(DENSE_PROGRAM_FLAG, previous);
      }
    });
  }
});
