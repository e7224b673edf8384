/**
 * 16-bit attention and embedding weights on WebGPU: the packed dense weight decodes on the device
 * (MoEDecodePacked, one "expert" per row) to the definition's values, a row gather decodes only
 * those rows, loraLinear on a packed base equals it on the decoded float32 base bit for bit (value
 * and gradients) without leaking, and a BF16 checkpoint loaded with denseDtype 'stored' gives the
 * widened model's logits bit for bit. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { loadHFCheckpoint } from '../../../src/io/hf_checkpoint.js';
import { RotaryAttention } from '../../../src/layers/attention.js';
import { loraLinear, type LinearLoRABranch } from '../../../src/ops/lora/linear.js';
import { gatherDenseRows, packedDenseWeightFromBits, unpackDenseWeight, type PackedDenseWeight } from '../../../src/ops/packed.js';
import { cleanup, fixtureDir, tempDir } from '../../io/checkpoint_helpers.js';
import { writeHalfFixture } from '../../helpers/half_checkpoint.js';
import { expectNoLeakAsync } from './helpers.js';

async function bitsOf(t: tf.Tensor): Promise<number[]> {
  const v = await t.data() as Float32Array;
  return Array.from(new Int32Array(v.buffer, v.byteOffset, v.length));
}

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

  it('loraLinear on a packed base: value and gradients bit for bit those of the decoded base, no leak', async () => {
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
      tf.grads((xs: tf.Tensor, a: tf.Tensor, b: tf.Tensor) => tf.sum(tf.mul(loraLinear(xs as tf.Tensor2D, base, null, branches(a, b)), g)))([x, A, B]);
    const before = tf.memory().numTensors;
    const fromPacked = run(packed);
    expect(tf.memory().numTensors - before, 'only the three gradients are left').to.equal(3);
    const fromFloat = run(W);
    for (const [i, t] of fromPacked.entries()) expect(await bitsOf(t), `gradient ${i}`).to.deep.equal(await bitsOf(fromFloat[i]));
    tf.dispose([...fromPacked, ...fromFloat, W, x, A, B, g, packed.packed]);
  });

  it("a BF16 checkpoint with denseDtype 'stored': int32 attention weights, the widened model's logits bit for bit", async () => {
    const dir16 = await tempDir('webgpu-dense-bf16-');
    await writeHalfFixture(fixtureDir('olmoe'), 'bf16', dir16, await tempDir('webgpu-dense-rounded-'));
    const stored = await loadHFCheckpoint(dir16, { denseDtype: 'stored', expertKernel: 'fused' });
    const widened = await loadHFCheckpoint(dir16, { denseDtype: 'float32', expertKernel: 'fused' });
    expect(stored.weights.filter(w => w.dtype === 'int32' && /([qkvo]_proj\.weight|embed_tokens)/.test(w.originalName))).to.have.length(9);
    const ids = tf.tensor2d([[3, 17, 42, 5, 9, 60, 2, 11]], [1, 8], 'int32');
    const [a, b] = [stored, widened].map(m => m.predict(ids) as tf.Tensor);
    expect(await bitsOf(a)).to.deep.equal(await bitsOf(b));
    tf.dispose([a, b, ids]);
    // merging re-packs on the host, synchronously: refused on webgpu before anything changed
    const attention = stored.layers.find((l): l is RotaryAttention => l instanceof RotaryAttention)!;
    attention.lora.add({ name: 'a', modules: { o_proj: { r: 2, alpha: 4 } } }, 'random');
    expect(() => attention.lora.merge('a')).to.throw(/RotaryAttention.mergeAdapter.*adapter 'a' adapts 'o_proj', whose weight is stored packed \(bf16\): re-packing it reads it synchronously, which the webgpu backend cannot do; load the model with denseDtype 'float32'/);
    expect(attention.lora.mergedAdapters).to.deep.equal([]);
    stored.dispose();
    widened.dispose();
  });
});
