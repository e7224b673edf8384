/**
 * 16-bit attention, embedding and LM head weights on WebGPU: the packed dense weight decodes on the device
 * (MoEDecodePacked, one "expert" per row) to the definition's values, a row gather decodes only
 * those rows, loraLinear on a packed base (its products read the halves in place,
 * MoEPackedDenseMatMul) equals it on the decoded float32 base within float32 rounding and a float64
 * reference (value and gradients) without leaking, and a BF16 checkpoint loaded with denseDtype
 * 'stored' gives the widened model's logits, and its LoRA gradients within rounding. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { loadHFCheckpoint } from '../../../src/io/hf_checkpoint.js';
import { RotaryAttention } from '../../../src/layers/attention.js';
import { addMoEAdapter, trainableVariables } from '../../../src/layers/moe_causal_lm.js';
import { batchLoss } from '../../../src/train/loss.js';
import { loraLinear, type LinearLoRABranch } from '../../../src/ops/lora/linear.js';
import { gatherDenseRows, packedDenseWeightFromBits, unpackDenseWeight, type PackedDenseWeight } from '../../../src/ops/packed.js';
import { cleanup, fixtureDir, tempDir } from '../../io/checkpoint_helpers.js';
import { writeHalfFixture } from '../../helpers/half_checkpoint.js';
import { expectCloseAsync, expectNoLeakAsync } from './helpers.js';

describe('webgpu: packed 16-bit dense weights', function () {
  this.timeout(60_000);
  after(cleanup);

  it('decodes on the device to the bf16 values; a row gather decodes those rows only', async () => {
    // [3, 5]: odd rows, each starting on a word (the last half of each row's last word is padding)
    const bits = Uint16Array.from([0x3f80, 0xc040, 0x3f81, 0x7f7f, 0x8000, 0x3e80, 0x4049, 0xbf00, 0x0400, 0x3c00, 0x4000, 0xc000, 0x3f00, 0x0000, 0x4100]);
    const f = new Float32Array(1);
    const want = Array.from(bits, h => { new Uint32Array(f.buffer)[0] = h << 16; return f[0]; });
    await expectNoLeakAsync(async () => {
      const w = packedDenseWeightFromBits('bf16', [3, 5], bits);
      const all = unpackDenseWeight(w);
      expect(Array.from(await all.data())).to.deep.equal(want);
      const ids = tf.tensor1d([2, 0, 2], 'int32');
      const rows = gatherDenseRows(w, ids);
      expect(Array.from(await rows.data())).to.deep.equal([...want.slice(10, 15), ...want.slice(0, 5), ...want.slice(10, 15)]);
      tf.dispose([all, ids, rows, w.packed]);
    });
  });

  it('loraLinear on a packed base: value and gradients those of the decoded base and of float64 within rounding, no leak', async () => {
    const [n, inSize, out, r] = [5, 8, 6, 2];
    const halves = Uint16Array.from({ length: out * inSize }, (_, i) => 0x3c00 + ((i * 37) % 512) | (i % 3 === 0 ? 0x8000 : 0));
    const packed: PackedDenseWeight = packedDenseWeightFromBits('bf16', [out, inSize], halves);
    const W = unpackDenseWeight(packed);
    const x = tf.randomNormal([n, inSize], 0, 1, 'float32', 1) as tf.Tensor2D;
    const A = tf.randomNormal([r, inSize], 0, 1, 'float32', 2) as tf.Tensor2D;
    const B = tf.randomNormal([out, r], 0, 1, 'float32', 3) as tf.Tensor2D;
    const g = tf.randomNormal([n, out], 0, 1, 'float32', 5);
    const branches = (a: tf.Tensor, b: tf.Tensor): LinearLoRABranch[] => [{ A: a as tf.Tensor2D, B: b as tf.Tensor2D, scaling: 2 }];
    const run = (base: tf.Tensor2D | PackedDenseWeight) =>
      tf.valueAndGrads((xs: tf.Tensor, a: tf.Tensor, b: tf.Tensor) => tf.sum(tf.mul(loraLinear(xs as tf.Tensor2D, base, null, branches(a, b)), g)))([x, A, B]);
    const before = tf.memory().numTensors;
    const fromPacked = run(packed);
    expect(tf.memory().numTensors - before, 'only the value and the three gradients are left').to.equal(4);
    const fromFloat = run(W);
    // float64: L = Σ g ⊙ (x·Wᵀ + 2·(x·Aᵀ)·Bᵀ); dx = g·W + 2·(g·B)·A, dA = 2·(g·B)ᵀ·x, dB = 2·gᵀ·(x·Aᵀ)
    const [xv, wv, av, bv, gv] = await Promise.all([x, W, A, B, g].map(t => t.data())) as Float32Array[];
    const at = (m: Float32Array, cols: number) => (i: number, j: number) => m[i * cols + j];
    const [X, Wm, Am, Bm, G] = [at(xv, inSize), at(wv, inSize), at(av, inSize), at(bv, r), at(gv, out)];
    const sum = (len: number, f: (k: number) => number) => { let s = 0; for (let k = 0; k < len; k++) s += f(k); return s; };
    const table = (rows: number, cols: number, f: (i: number, j: number) => number) =>
      Array.from({ length: rows * cols }, (_, q) => f(Math.floor(q / cols), q % cols));
    const xa = (i: number, j: number) => sum(inSize, k => X(i, k) * Am(j, k));   // x·Aᵀ [n, r]
    const gb = (i: number, j: number) => sum(out, k => G(i, k) * Bm(k, j));      // g·B [n, r]
    const value = sum(n * out, q => {
      const [i, j] = [Math.floor(q / out), q % out];
      return G(i, j) * (sum(inSize, k => X(i, k) * Wm(j, k)) + 2 * sum(r, k => xa(i, k) * Bm(j, k)));
    });
    const expected = [
      [value],
      table(n, inSize, (i, j) => sum(out, k => G(i, k) * Wm(k, j)) + 2 * sum(r, k => gb(i, k) * Am(k, j))),
      table(r, inSize, (i, j) => 2 * sum(n, k => gb(k, i) * X(k, j))),
      table(out, r, (i, j) => 2 * sum(n, k => G(k, i) * xa(k, j))),
    ];
    const outputs = (v: { value: tf.Tensor; grads: tf.Tensor[] }) => [v.value, ...v.grads];
    for (const [i, t] of outputs(fromPacked).entries()) {
      await expectCloseAsync(t, expected[i], 1e-6, `output ${i} vs float64`);
      await expectCloseAsync(t, await outputs(fromFloat)[i].data(), 1e-6, `output ${i} vs the decoded base`);
    }
    tf.dispose([...outputs(fromPacked), ...outputs(fromFloat), W, x, A, B, g, packed.packed]);
  });

  it("a BF16 checkpoint with denseDtype 'stored': int32 attention, embedding and head weights, the widened model's logits", async () => {
    const dir16 = await tempDir('webgpu-dense-bf16-');
    await writeHalfFixture(fixtureDir('olmoe'), 'bf16', dir16, await tempDir('webgpu-dense-rounded-'));
    const stored = await loadHFCheckpoint(dir16, { denseDtype: 'stored', expertKernel: 'fused' });
    const widened = await loadHFCheckpoint(dir16, { denseDtype: 'float32', expertKernel: 'fused' });
    expect(stored.weights.filter(w => w.dtype === 'int32' && /([qkvo]_proj\.weight|embed_tokens|lm_head)/.test(w.originalName))).to.have.length(10);
    const ids = tf.tensor2d([[3, 17, 42, 5, 9, 60, 2, 11]], [1, 8], 'int32');
    const [a, b] = [stored, widened].map(m => m.predict(ids) as tf.Tensor);
    await expectCloseAsync(a, await b.data(), 1e-6, "logits vs the widened model's");
    tf.dispose([a, b, ids]);
    // merging re-packs on the host, synchronously: refused on webgpu before anything changed
    const attention = stored.layers.find((l): l is RotaryAttention => l instanceof RotaryAttention)!;
    attention.lora.add({ name: 'a', modules: { o_proj: { r: 2, alpha: 4 } } }, 'random');
    expect(() => attention.lora.merge('a')).to.throw(/RotaryAttention.mergeAdapter.*adapter 'a' adapts 'o_proj', whose weight is stored packed \(bf16\): re-packing it reads it synchronously, which the webgpu backend cannot do; load the model with denseDtype 'float32'/);
    expect(attention.lora.mergedAdapters).to.deep.equal([]);
    stored.dispose();
    widened.dispose();
  });

  it("denseDtype 'stored': LoRA gradients those of the widened model within rounding; a training step leaks nothing, keeps the bits", async () => {
    const dir16 = await tempDir('webgpu-dense-train-bf16-');
    await writeHalfFixture(fixtureDir('olmoe'), 'bf16', dir16, await tempDir('webgpu-dense-train-rounded-'));
    const stored = await loadHFCheckpoint(dir16, { denseDtype: 'stored', expertKernel: 'fused' });
    const widened = await loadHFCheckpoint(dir16, { denseDtype: 'float32', expertKernel: 'fused' });
    for (const model of [stored, widened]) {
      addMoEAdapter(model, { name: 'default', r: 2, alpha: 4, targets: ['router'] }, 'random');  // freezes the rest
      for (const layer of model.layers.filter((l): l is RotaryAttention => l instanceof RotaryAttention)) {
        layer.trainable = true;  // addMoEAdapter froze it; adding the adapter freezes its base weights again
        layer.lora.add({ name: 'default', modules: { q_proj: { r: 2, alpha: 4 }, k_proj: { r: 2, alpha: 4 }, v_proj: { r: 2, alpha: 4 }, o_proj: { r: 2, alpha: 4 } } }, 'random');
      }
    }
    const [vs, vw] = [stored, widened].map(m => trainableVariables(m));
    expect(vs.length, 'A and B of q/k/v/o and the router per layer').to.equal(2 * 5 * 2);
    vw.forEach((v, i) => v.assign(vs[i]));
    const ids = tf.tensor2d([[3, 17, 42, 5, 9, 60, 2, 11], [8, 1, 33, 70, 4, 25, 19, 6]], [2, 8], 'int32');
    const loss = (m: typeof stored) => tf.tidy(() => {
      const logits = m.apply(ids, { training: true }) as tf.Tensor3D;
      const vocab = logits.shape[2];
      const predict = tf.reshape(tf.slice(logits, [0, 0, 0], [2, 7, vocab]), [14, vocab]);
      const targets = tf.reshape(tf.slice(ids, [0, 1], [2, 7]), [14]) as tf.Tensor1D;
      return tf.neg(tf.mean(tf.sum(tf.mul(tf.logSoftmax(predict), tf.oneHot(targets, vocab)), 1))) as tf.Scalar;
    });
    const [gs, gw] = [[stored, vs], [widened, vw]].map(([m, vars]) => tf.variableGrads(() => loss(m as typeof stored), vars as tf.Variable[]));
    await expectCloseAsync(gs.value, await gw.value.data(), 1e-6, 'loss');
    for (const [i, v] of vs.entries()) {
      const [a, b] = [gs.grads[v.name], gw.grads[vw[i].name]];
      expect((await tf.max(tf.abs(b)).data())[0], `${v.name} is trained`).to.be.above(0);
      await expectCloseAsync(a, await b.data(), 1e-6, v.name);
    }
    tf.dispose([gs.value, gw.value, ...Object.values(gs.grads), ...Object.values(gw.grads)]);
    // batchLoss: the packed head read chunk by chunk in linearCrossEntropy (MoEPackedDenseMatMul both ways)
    const labels = tf.tensor2d([[17, 42, 5, 9, 60, 2, 11, -100], [1, 33, 70, 4, 25, 19, 6, -100]], [2, 8], 'int32');
    const batch = { inputIds: ids, labels, segmentIds: null, positionIds: null, targetCount: 14 };
    const [cs, cw] = [[stored, vs], [widened, vw]].map(([m, vars]) =>
      tf.variableGrads(() => batchLoss(m as typeof stored, batch, { chunkRows: 5 }), vars as tf.Variable[]));
    await expectCloseAsync(cs.value, await cw.value.data(), 1e-6, 'batchLoss');
    for (const [i, v] of vs.entries()) await expectCloseAsync(cs.grads[v.name], await cw.grads[vw[i].name].data(), 1e-6, `batchLoss ${v.name}`);
    tf.dispose([cs.value, cw.value, ...Object.values(cs.grads), ...Object.values(cw.grads), labels]);
    const qProj = (l: RotaryAttention) => l.weights.find(w => w.originalName.endsWith('q_proj.weight'))!;
    const attention = stored.layers.filter((l): l is RotaryAttention => l instanceof RotaryAttention);
    const packedBits = await Promise.all(attention.map(l => qProj(l).read().data()));
    const optimizer = tf.train.adam(1e-2);
    const step = () => optimizer.minimize(() => loss(stored), true, vs)?.dispose();
    step();  // Adam makes its slots on the first step
    const tensors = tf.memory().numTensors;
    step();
    expect(tf.memory().numTensors, 'a training step leaks no tensor').to.equal(tensors);
    for (const [i, l] of attention.entries()) expect(Array.from(await qProj(l).read().data())).to.deep.equal(Array.from(packedBits[i]));
    optimizer.dispose();
    ids.dispose();
    stored.dispose();
    widened.dispose();
  });
});
