/**
 * The one-kernel softmax → top-k routing on WebGPU against float64: chosen experts (tf.topk's
 * order, ties to the lower index), weights, and the logits' gradient by finite differences; and
 * that route() uses it on webgpu. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { webgpuRouteSoftmaxTopK } from '../../../src/backends/webgpu/routing.js';
import {
  gatherSelected, gatherSelectedBackward, normalizeSelectedBackward, softmaxBackward,
} from '../../../src/ops/routing/common.js';
import { route } from '../../../src/ops/routing/route.js';
import { OpArgumentError } from '../../../src/ops/validate.js';
import { Rng, asF32, finiteDifferences } from '../../helpers/numeric.js';
import { expectCloseAsync, expectNoLeakAsync } from './helpers.js';

/** Float64 softmax top-k: experts by (p desc, index asc), weights p (renormalized). */
function softmaxTopK64(logits: Float64Array, T: number, E: number, k: number, renormalize: boolean) {
  const experts: number[] = [];
  const weights: number[] = [];
  for (let t = 0; t < T; t++) {
    const row = logits.subarray(t * E, (t + 1) * E);
    const mx = Math.max(...row);
    const ex = Array.from(row, v => Math.exp(v - mx));
    const sum = ex.reduce((a, b) => a + b, 0);
    const p = ex.map(v => v / sum);
    const order = p.map((v, e) => e).sort((a, b) => p[b] - p[a] || a - b).slice(0, k);
    const denom = renormalize ? order.reduce((s, e) => s + p[e], 0) : 1;
    experts.push(...order);
    weights.push(...order.map(e => p[e] / denom));
  }
  return { experts, weights };
}

describe('webgpu: softmaxTopK routing kernel', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  const cases: Array<[string, number, number, number, boolean]> = [
    ['T=9, E=5, K=3, renormalized', 9, 5, 3, true],
    ['T=1, K = E = 4', 1, 4, 4, true],
    ['T=200, E=128, K=8, not renormalized', 200, 128, 8, false],
  ];
  for (const [name, T, E, k, renormalize] of cases) {
    it(`matches float64 selection, weights and finite-difference gradient: ${name}`, async () => {
      const rng = new Rng(T * E + k);
      const logits = asF32(rng.array(T * E, 2));
      const want = softmaxTopK64(logits, T, E, k, renormalize);
      const x = tf.tensor2d(Float32Array.from(logits), [T, E]);
      await expectNoLeakAsync(async () => {
        const r = webgpuRouteSoftmaxTopK(x, k, { renormalize });
        expect(r.logits).to.equal(x);
        expect(Array.from(await r.experts.data()), 'experts').to.deep.equal(want.experts);
        expect(r.experts.dtype).to.equal('int32');
        await expectCloseAsync(r.weights, want.weights, 1e-6, 'weights', [T, k]);
        tf.dispose([r.weights, r.experts]);
      });
      if (T * E <= 100) {
        const G = asF32(rng.array(T * k));
        const gT = tf.tensor2d(Float32Array.from(G), [T, k]);
        // the selection is piecewise constant: differentiate the weights at the fixed choice
        const loss = (l: Float64Array) => {
          let s = 0;
          for (let t = 0; t < T; t++) {
            const row = l.subarray(t * E, (t + 1) * E);
            const mx = Math.max(...row);
            const sum = Array.from(row).reduce((a, v) => a + Math.exp(v - mx), 0);
            const sel = want.experts.slice(t * k, (t + 1) * k).map(e => Math.exp(row[e] - mx) / sum);
            const denom = renormalize ? sel.reduce((a, b) => a + b, 0) : 1;
            sel.forEach((v, j) => { s += G[t * k + j] * v / denom; });
          }
          return s;
        };
        const dx = tf.grad((l: tf.Tensor) => {
          const r = webgpuRouteSoftmaxTopK(l as tf.Tensor2D, k, { renormalize });
          return tf.sum(tf.mul(r.weights, gT));
        })(x);
        await expectCloseAsync(dx, finiteDifferences(loss, logits), 1e-4, 'dlogits', [T, E]);
        tf.dispose([dx, gT]);
      } else {
        // too many logits for finite differences: the composed analytic backward of the routing ops
        const G = tf.randomNormal([T, k], 0, 1, 'float32', 9) as tf.Tensor2D;
        const chosen = tf.tensor2d(Int32Array.from(want.experts), [T, k], 'int32');
        const dx = tf.grad((l: tf.Tensor) => tf.sum(tf.mul(webgpuRouteSoftmaxTopK(l as tf.Tensor2D, k, { renormalize }).weights, G)))(x);
        const composed = tf.tidy(() => {
          const scores = tf.softmax(x) as tf.Tensor2D;
          const dSel = normalizeSelectedBackward(G, gatherSelected(scores, chosen), { renormalize, epsilon: 0, scalingFactor: 1 });
          return softmaxBackward(scores, gatherSelectedBackward(dSel, chosen, E));
        });
        await expectCloseAsync(dx, await composed.data(), 1e-5, 'dlogits vs composed', [T, E]);
        tf.dispose([G, chosen, dx, composed]);
      }
      x.dispose();
    });
  }

  it('breaks ties towards the lower expert index, as tf.topk', async () => {
    const x = tf.tensor2d([[1, 3, 3, 0, 3]]);
    const r = webgpuRouteSoftmaxTopK(x, 3);
    expect(Array.from(await r.experts.data())).to.deep.equal([1, 2, 4]);
    tf.dispose([x, r.weights, r.experts]);
  });

  it('breaks ties towards the lower index across lanes too (200 experts over 64 lanes, ties far apart)', async () => {
    // token 0: 5.0 at experts 190, 3, 130, 67 (a tie in four lanes), 4.0 at 64 and 0 (the same lane);
    // token 1: all equal (the first K indices)
    const row0 = new Float32Array(200).fill(-1);
    for (const e of [190, 3, 130, 67]) row0[e] = 5;
    for (const e of [64, 0]) row0[e] = 4;
    const x = tf.tensor2d([...row0, ...new Float32Array(200)], [2, 200]);
    const r = webgpuRouteSoftmaxTopK(x, 6, { renormalize: true });
    expect(Array.from(await r.experts.data())).to.deep.equal([3, 67, 130, 190, 0, 64, 0, 1, 2, 3, 4, 5]);
    tf.dispose([x, r.weights, r.experts]);
  });

  it("is what route() runs for 'softmaxTopK' on webgpu", async () => {
    const x = tf.tensor2d(Float32Array.from(new Rng(3).array(6 * 7)), [6, 7]);
    // count the kernel's runs through its registered config
    const config = tf.getKernel('WebGPUMoESoftmaxTopK', 'webgpu')!;
    const original = config.kernelFunc;
    let runs = 0;
    (config as { kernelFunc: tf.KernelFunc }).kernelFunc = args => { runs++; return original(args); };
    try {
      const r = route(x, { kind: 'softmaxTopK', topK: 2, renormalize: false });
      await r.weights.data();
      tf.dispose([r.weights, r.experts]);
    } finally {
      (config as { kernelFunc: tf.KernelFunc }).kernelFunc = original;
    }
    expect(runs).to.equal(1);
    x.dispose();
  });

  it('checks its arguments like routeSoftmaxTopK, and route() still rejects unused config fields', () => {
    const x = tf.zeros([2, 4]) as tf.Tensor2D;
    expect(() => webgpuRouteSoftmaxTopK(x, 5)).to.throw(OpArgumentError,
        "`routeSoftmaxTopK()`: 'k' must be <= num experts (4) but got 5");
    expect(() => route(x, { kind: 'softmaxTopK', topK: 2, nGroup: 2 })).to.throw(OpArgumentError,
        "`route()`: 'config.nGroup' is not used by routing kind 'softmaxTopK' (it uses topK, renormalize) but got 2");
    x.dispose();
  });
});
