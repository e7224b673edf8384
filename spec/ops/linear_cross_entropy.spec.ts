/**
 * linearCrossEntropy against float64 and against the composed path it replaces (the head's
 * matMul, then tokenCrossEntropy): value and gradients (hidden; the head weight when it trains)
 * for chunk sizes that divide N, do not, are 1 and exceed N, with IGNORE_INDEX labels; a frozen
 * head gets no gradient (its dHidden taken in the forward pass under a tape, each chunk's logits
 * computed once); no tensors left behind; the backward pass's peak memory a couple of
 * [chunk, V] buffers instead of several [N, V] ones. Reads asynchronously: it runs on webgpu too
 * (spec/backends/webgpu/linear_cross_entropy.spec.ts).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { OpArgumentError } from '../../src/ops/validate.js';
import { defaultChunkRows, linearCrossEntropy, LOGITS_CHUNK_BYTES, LOGITS_CHUNK_BYTES_FLAG } from '../../src/ops/linear_cross_entropy.js';
import { tokenCrossEntropy } from '../../src/ops/token_cross_entropy.js';
import { packDenseWeight, unpackDenseWeight } from '../../src/ops/packed.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { asF32, Rng } from '../helpers/numeric.js';

const [N, H, V] = [10, 6, 13];
const I = -100;
const LABELS = [3, I, 12, 0, 7, I, 5, 5, 1, 11];
const NORMALIZER = 9;

/** float64: the loss and its gradients w.r.t. hidden [N, H] and weight [V, H] (row-major). */
function reference(hidden: Float64Array, weight: Float64Array, labels: number[], normalizer: number) {
  const dHidden = new Float64Array(N * H);
  const dWeight = new Float64Array(V * H);
  let loss = 0;
  for (let n = 0; n < N; n++) {
    if (labels[n] < 0) continue;
    const logits = Array.from({ length: V }, (_, j) => {
      let s = 0;
      for (let k = 0; k < H; k++) s += hidden[n * H + k] * weight[j * H + k];
      return s;
    });
    const max = Math.max(...logits);
    const sum = logits.reduce((s, l) => s + Math.exp(l - max), 0);
    loss += Math.log(sum) + max - logits[labels[n]];
    for (let j = 0; j < V; j++) {
      const g = (Math.exp(logits[j] - max) / sum - (j === labels[n] ? 1 : 0)) / normalizer;
      for (let k = 0; k < H; k++) {
        dHidden[n * H + k] += g * weight[j * H + k];
        dWeight[j * H + k] += g * hidden[n * H + k];
      }
    }
  }
  return { loss: loss / normalizer, dHidden, dWeight };
}

async function leftBehind<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const before = tf.memory().numTensors;
  const out = await fn();
  return [out, tf.memory().numTensors - before];
}

describe('ops/linearCrossEntropy', () => {
  const rng = new Rng(11);
  const hiddenData = asF32(rng.array(N * H, 1.5));
  const weightData = asF32(rng.array(V * H, 1));
  const want = reference(hiddenData, weightData, LABELS, NORMALIZER);

  for (const chunkRows of [1, 3, 4, 5, 10, 64]) {
    it(`chunks of ${chunkRows} row(s) of ${N}: value and gradients as the composed head + tokenCrossEntropy and float64`, async () => {
      const hidden = tf.tensor2d(Float32Array.from(hiddenData), [N, H]);
      const weight = tf.tensor2d(Float32Array.from(weightData), [V, H]);
      const labels = tf.tensor1d(LABELS, 'int32');
      const [[fused, composed], left] = await leftBehind(async () => {
        const fusedGrads = tf.valueAndGrads((x: tf.Tensor, w: tf.Tensor) =>
          linearCrossEntropy(x as tf.Tensor2D, w as tf.Tensor2D, labels, NORMALIZER, { chunkRows, trainHead: true }));
        const composedGrads = tf.valueAndGrads((x: tf.Tensor, w: tf.Tensor) =>
          tokenCrossEntropy(tf.matMul(x, w, false, true) as tf.Tensor2D, labels, NORMALIZER));
        const read = async (r: { value: tf.Scalar; grads: tf.Tensor[] }) => {
          const out = [await r.value.data(), ...(await Promise.all(r.grads.map(g => g.data())))];
          tf.dispose([r.value, ...r.grads]);
          return out;
        };
        return [await read(fusedGrads([hidden, weight])), await read(composedGrads([hidden, weight]))];
      });
      expect(left, 'tensors left behind').to.equal(0);
      // the same float32 products, summed over rows in chunks instead of at once: rounding only
      ['loss', 'dHidden', 'dWeight'].forEach((name, i) => {
        const err = maxRelativeError(fused[i], composed[i]);
        expect(err, `${name} vs composed: ${err.toExponential(2)}`).to.be.at.most(1e-6);
      });
      // float32 against float64 (logits of O(5)): the tolerance of tokenCrossEntropy's own spec
      expect(Math.abs(fused[0][0] - want.loss)).to.be.below(1e-5);
      expect(maxRelativeError(fused[1], want.dHidden)).to.be.below(1e-5);
      expect(maxRelativeError(fused[2], want.dWeight)).to.be.below(1e-5);
      tf.dispose([hidden, weight, labels]);
    });
  }

  it('a frozen head (a plain tensor, or a variable that does not train) is a constant: hidden alone gets a gradient', async () => {
    const hidden = tf.tensor2d(Float32Array.from(hiddenData), [N, H]);
    const weight = tf.tensor2d(Float32Array.from(weightData), [V, H]);
    const frozen = tf.variable(weight, false);
    const trained = tf.variable(weight, true);
    const labels = tf.tensor1d(LABELS, 'int32');
    const [, left] = await leftBehind(async () => {
      for (const head of [weight, frozen]) {
        const { value, grads } = tf.valueAndGrads((x: tf.Tensor) =>
          linearCrossEntropy(x as tf.Tensor2D, head as tf.Tensor2D, labels, NORMALIZER, { chunkRows: 4 }))([hidden]);
        expect(Math.abs((await value.data())[0] - want.loss)).to.be.below(1e-5);
        expect(maxRelativeError(await grads[0].data(), want.dHidden)).to.be.below(1e-5);
        tf.dispose([value, ...grads]);
      }
      expect(() => tf.grads((x: tf.Tensor, w: tf.Tensor) =>
        linearCrossEntropy(x as tf.Tensor2D, w as tf.Tensor2D, labels, NORMALIZER))([hidden, weight]))
        .to.throw(/Cannot compute gradient/);
      // a trainable variable trains by default, as tf.variableGrads expects
      const { value, grads } = tf.variableGrads(() =>
        linearCrossEntropy(hidden, trained as tf.Tensor as tf.Tensor2D, labels, NORMALIZER, { chunkRows: 3 }), [trained]);
      expect(maxRelativeError(await grads[trained.name].data(), want.dWeight)).to.be.below(1e-5);
      tf.dispose([value, ...Object.values(grads)]);
    });
    expect(left, 'tensors left behind').to.equal(0);
    tf.dispose([hidden, weight, frozen, trained, labels]);
  });

  it('a frozen head\'s dHidden is taken in the forward pass under a tape (each chunk\'s logits once), and only there', async () => {
    const hidden = tf.tensor2d(Float32Array.from(hiddenData), [N, H]);
    const weight = tf.tensor2d(Float32Array.from(weightData), [V, H]);
    const labels = tf.tensor1d(LABELS, 'int32');
    const products = async (f: () => Promise<void>) => {
      const warn = console.warn;  // tf.profile warns where a webgpu adapter has no timestamp queries (Mesa's GL)
      console.warn = () => {};
      try {
        return (await tf.profile(f)).kernels.filter(k => /MatMul/.test(k.name)).length;
      } finally {
        console.warn = warn;
      }
    };
    const [counts, left] = await leftBehind(async () => {
      // 3 chunks: forward 3 logits + 3 dHidden products, backward none (it recomputed 3 logits and took 3 dHidden)
      const training = await products(async () => {
        const { value, grads } = tf.valueAndGrads((x: tf.Tensor) =>
          tf.mul(linearCrossEntropy(x as tf.Tensor2D, weight, labels, NORMALIZER, { chunkRows: 4 }), 3))([hidden]);
        expect(Math.abs((await value.data())[0] - 3 * want.loss)).to.be.below(3e-5);
        expect(maxRelativeError(await grads[0].data(), want.dHidden.map(g => 3 * g))).to.be.below(1e-5);
        tf.dispose([value, ...grads]);
      });
      // no tape: the loss alone, 3 logits products
      const evaluation = await products(async () => {
        const value = linearCrossEntropy(hidden, weight, labels, NORMALIZER, { chunkRows: 4 });
        expect(Math.abs((await value.data())[0] - want.loss)).to.be.below(1e-5);
        value.dispose();
      });
      return { training, evaluation };
    });
    expect(counts).to.deep.equal({ training: 6, evaluation: 3 });
    expect(left, 'tensors left behind').to.equal(0);
    tf.dispose([hidden, weight, labels]);
  });

  it('a packed bf16 head (frozen): value and dHidden as the float32 head of the same bf16 values and float64', async () => {
    const hidden = tf.tensor2d(Float32Array.from(hiddenData), [N, H]);
    const weight = tf.tensor2d(Float32Array.from(weightData), [V, H]);
    const packed = packDenseWeight(weight, 'bf16');
    const rounded = unpackDenseWeight(packed);  // float32 [V, H]: the bf16 values, exactly
    const roundedData = await rounded.data();
    expect(maxRelativeError(roundedData, weightData), 'bf16 rounding moved the head').to.be.above(1e-4);
    const wantRounded = reference(hiddenData, Float64Array.from(roundedData), LABELS, NORMALIZER);
    const labels = tf.tensor1d(LABELS, 'int32');
    const exactDecode = ['cpu', 'wasm'].includes(tf.getBackend());  // decoded once per pass, then tf.matMul as for float32
    const [, left] = await leftBehind(async () => {
      for (const chunkRows of [1, 4, 64]) {
        const run = async (head: tf.Tensor2D | typeof packed) => {
          const { value, grads } = tf.valueAndGrads((x: tf.Tensor) =>
            linearCrossEntropy(x as tf.Tensor2D, head, labels, NORMALIZER, { chunkRows }))([hidden]);
          const out = [await value.data(), await grads[0].data()];
          tf.dispose([value, ...grads]);
          return out;
        };
        const [fromPacked, fromFloat] = [await run(packed), await run(rounded)];
        // cpu, wasm: the head decoded exactly, then the same products; webgpu reads the halves in its own product
        ['loss', 'dHidden'].forEach((name, i) => {
          const err = maxRelativeError(fromPacked[i], fromFloat[i]);
          expect(err, `${name}, chunks of ${chunkRows}: ${err.toExponential(2)}`).to.be.at.most(1e-6);
          if (exactDecode) expect(Array.from(fromPacked[i]), `${name} bit for bit`).to.deep.equal(Array.from(fromFloat[i]));
        });
        expect(Math.abs(fromPacked[0][0] - wantRounded.loss)).to.be.below(1e-5);
        expect(maxRelativeError(fromPacked[1], wantRounded.dHidden)).to.be.below(1e-5);
      }
    });
    expect(left, 'tensors left behind').to.equal(0);
    expect(() => linearCrossEntropy(hidden, packed, labels, NORMALIZER, { trainHead: true })).to.throw(
        "`linearCrossEntropy()`: 'trainHead' must be false for a packed (bf16) 'headWeight': packed weights are frozen");
    const zeros = tf.zeros([V, H - 1]) as tf.Tensor2D;
    const narrow = packDenseWeight(zeros, 'bf16');
    expect(() => linearCrossEntropy(hidden, narrow, labels, NORMALIZER)).to.throw(
        `\`linearCrossEntropy()\`: 'headWeight' must have shape [*,${H}] but got [${V},${H - 1}] (hidden [N,H] = [${N},${H}])`);
    tf.dispose([hidden, weight, packed.packed, rounded, labels, narrow.packed, zeros]);
  });

  it('a backward pass peaks at a couple of [chunk, V] buffers, not several [N, V] ones', async () => {
    const [n, h, v, chunkRows] = [64, 8, 20000, 8];
    const hidden = tf.randomNormal([n, h], 0, 1, 'float32', 5) as tf.Tensor2D;
    const weight = tf.randomNormal([v, h], 0, 1, 'float32', 6) as tf.Tensor2D;
    const labels = tf.tensor1d(Array.from({ length: n }, (_, i) => (i * 331) % v), 'int32');
    const peakOf = async (loss: (x: tf.Tensor) => tf.Scalar) => {
      const base = tf.memory().numBytes;
      // tf.profile warns once where a webgpu adapter has no timestamp queries (Mesa's GL): expected here
      const warn = console.warn;
      console.warn = () => {};
      try {
        const info = await tf.profile(async () => {
          const { value, grads } = tf.valueAndGrads(loss)([hidden]);
          await value.data();
          tf.dispose([value, ...grads]);
        });
        return info.peakBytes - base;
      } finally {
        console.warn = warn;
      }
    };
    const logitsBytes = n * v * 4;
    const composed = await peakOf(x => tokenCrossEntropy(tf.matMul(x, weight, false, true) as tf.Tensor2D, labels, n));
    const fused = await peakOf(x => linearCrossEntropy(x as tf.Tensor2D, weight, labels, n, { chunkRows }));
    // tfjs counts a saved clone's bytes again: the composed path's saved logits, the fused one's dHidden [n, h] (taken in forward)
    const savedClones = n * h * 4;
    // composed measured 4.0 logits (saved logits, two temporaries, the gradient); fused two [chunk, V] temporaries
    expect(composed / logitsBytes).to.be.above(3.5);
    expect((fused - savedClones) / (chunkRows * v * 4)).to.be.below(2.1);
    tf.dispose([hidden, weight, labels]);
  });

  it('defaults to chunks whose logits take at most LOGITS_CHUNK_BYTES, or what MOE_LOGITS_CHUNK_BYTES says', () => {
    expect(defaultChunkRows(151936)).to.equal(110);
    expect(defaultChunkRows(151936) * 151936 * 4).to.be.at.most(LOGITS_CHUNK_BYTES);
    expect(defaultChunkRows(2 ** 30)).to.equal(1);
    tf.env().set(LOGITS_CHUNK_BYTES_FLAG, 256 * 2 ** 20);
    try {
      expect(defaultChunkRows(151936)).to.equal(441);
      expect(defaultChunkRows(50304)).to.equal(1334);
      tf.env().set(LOGITS_CHUNK_BYTES_FLAG, 0);
      expect(() => defaultChunkRows(50304)).to.throw(OpArgumentError,
          '`defaultChunkRows()`: the tf.env() flag MOE_LOGITS_CHUNK_BYTES must be a number of bytes > 0 but is 0');
    } finally {
      tf.env().set(LOGITS_CHUNK_BYTES_FLAG, LOGITS_CHUNK_BYTES);
    }
  });

  it('refuses no rows, a head of another width, labels of another length, float labels, a bad normalizer, chunk size or trainHead', () => {
    const hidden = tf.zeros([2, 3]) as tf.Tensor2D;
    const weight = tf.zeros([5, 3]) as tf.Tensor2D;
    const wide = tf.zeros([5, 4]) as tf.Tensor2D;
    const labels = tf.tensor1d([0, 4], 'int32');
    const three = tf.tensor1d([0, 1, 2], 'int32');
    const floats = tf.tensor1d([0, 1]);
    const op = '`linearCrossEntropy()`: ';
    expect(() => linearCrossEntropy(tf.zeros([2]) as unknown as tf.Tensor2D, weight, labels, 1)).to.throw(`${op}'hidden' must be 2-D but got shape [2]`);
    const empty = tf.zeros([0, 3]) as tf.Tensor2D;
    const noLabels = tf.tensor1d([], 'int32');
    expect(() => linearCrossEntropy(empty, weight, noLabels, 1)).to.throw(`${op}'hidden' must have at least one row but got shape [0,3]`);
    tf.dispose([empty, noLabels]);
    expect(() => linearCrossEntropy(hidden, wide, labels, 1)).to.throw(
        `${op}'headWeight' must have shape [*,3] but got [5,4] (hidden [N,H] = [2,3])`);
    expect(() => linearCrossEntropy(hidden, weight, three, 1)).to.throw(
        `${op}'labels' must have shape [2] but got [3] (hidden [N,H] = [2,3], headWeight [V,H] = [5,3])`);
    expect(() => linearCrossEntropy(hidden, weight, floats as tf.Tensor1D, 1)).to.throw(`${op}'labels' must be int32 but got float32 (shape [2])`);
    expect(() => linearCrossEntropy(hidden, weight, labels, 0)).to.throw(`${op}'normalizer' must be >= 1 but got 0`);
    expect(() => linearCrossEntropy(hidden, weight, labels, 1, { chunkRows: 0 })).to.throw(`${op}'chunkRows' must be >= 1 but got 0`);
    expect(() => linearCrossEntropy(hidden, weight, labels, 1, { trainHead: 'yes' as unknown as boolean })).to.throw(
        `${op}'trainHead' must be a boolean but got yes (string)`);
    tf.dispose([hidden, weight, wide, labels, three, floats]);
  });
});
