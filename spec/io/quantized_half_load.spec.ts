/**
 * Quantizing 16-bit experts on load: the loader reads their stored halves and decodes them into
 * one reused block (no float32 tensor per expert tensor, the next expert's reads under way while
 * one is quantized). The words must be those of the float32 weight (the same checkpoint read
 * with expertDtype 'float32') quantized whole, for BF16 and F16, every kind, per-expert (OLMoE)
 * tensors, on this thread and on worker threads (quantizeWorkerPool, what loadHFCheckpoint uses
 * in Node); a tensor source in memory, so the halves are known.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { loadMoEBlockWeights, moeBlockTensorPlan, type TensorSource } from '../../src/io/hf_block.js';
import { disposeMoEBlockWeights } from '../../src/models/weight_fields.js';
import { planTensors } from '../../src/io/hf_checkpoint_core.js';
import { olmoeConfig } from '../../src/bench/load_bench.js';
import { isPackedExpertWeight, packExpertWeight, type PackedExpertWeight } from '../../src/ops/packed.js';
import { quantizeWorkerPool } from '../../src/io/quantize_pool.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { QUANTIZED_KINDS } from '../../src/ops/quantized.js';
import { decodeBFloat16, decodeFloat16, encodeBFloat16, encodeFloat16 } from '../../src/util/half.js';
import { Rng } from '../helpers/numeric.js';

/** Every tensor of `config`'s layer 0 MoE block, random, stored as `dtype` halves. */
function halfSource(config: ReturnType<typeof olmoeConfig>, dtype: 'BF16' | 'F16'): TensorSource {
  const rng = new Rng(11);
  const halves = new Map<string, { shape: number[]; bits: Uint16Array }>();
  for (const { name, shape } of planTensors(moeBlockTensorPlan(config, 0))) {
    const values = Float32Array.from(rng.array(shape.reduce((a, b) => a * b, 1), 0.05));
    values[3] = 0;
    halves.set(name, { shape, bits: dtype === 'BF16' ? encodeBFloat16(values) : encodeFloat16(values) });
  }
  const decode = (bits: Uint16Array) => dtype === 'BF16' ? decodeBFloat16(bits) : decodeFloat16(bits);
  return {
    has: name => halves.has(name),
    info: name => ({ dtype, shape: [...halves.get(name)!.shape] }),
    tensor: async name => tf.tensor(decode(halves.get(name)!.bits), halves.get(name)!.shape, 'float32'),
    halfBits: async name => halves.get(name)!.bits.slice(),
  };
}

describe('quantizing 16-bit experts on load (from their stored halves)', () => {
  // 4 experts, H 64, I 40: down's rows of 40 inputs end in a partial group for every kind
  const config = { ...olmoeConfig(1), hidden_size: 64, intermediate_size: 40, moe_intermediate_size: 40, num_experts: 4, num_experts_per_tok: 2 };
  for (const [dtype, threads] of [['BF16', 0], ['F16', 0], ['BF16', 2], ['F16', 3]] as const) {
    it(`${dtype}, ${threads ? `${threads} worker threads` : 'this thread'}: every kind's words equal the float32 weight quantized whole`, async () => {
      const before = tf.memory().numTensors;
      const file = halfSource(config, dtype);
      const plain = await loadMoEBlockWeights(file, config, 0, { expertDtype: 'float32' });
      const quantizer = threads ? quantizeWorkerPool(threads) : undefined;
      for (const kind of QUANTIZED_KINDS) {
        const quantized = await loadMoEBlockWeights(file, config, 0, { expertDtype: kind, quantizer });
        for (const w of ['gateUp', 'down'] as const) {
          const got = quantized.experts[w];
          const f32 = plain.experts[w];
          if (!isPackedExpertWeight(got) || isPackedExpertWeight(f32)) throw new Error(`${kind} ${w}: expected packed words from float32`);
          expect(got.kind).to.equal(kind);
          const whole = packExpertWeight(f32, kind);
          expect(Array.from(got.packed.dataSync()), `${dtype} ${kind} ${w}`).to.deep.equal(Array.from(whole.packed.dataSync()));
          whole.dispose();
        }
        disposeMoEBlockWeights(quantized);
      }
      if (quantizer) expect(quantizer.counts, 'every expert on a worker').to.deep.equal({ onWorkers: 4 * 2 * QUANTIZED_KINDS.length, onThisThread: 0 });
      await quantizer?.close();
      disposeMoEBlockWeights(plain);
      expect(tf.memory().numTensors).to.equal(before);
    });
  }

  it('on worker threads, a NaN in an expert fails the load with the error of this thread, naming its tensors; nothing leaks', async () => {
    const before = tf.memory().numTensors;
    const file = halfSource(config, 'BF16');
    const name = 'model.layers.0.mlp.experts.2.up_proj.weight';
    const bits = await file.halfBits!(name);
    bits[5] = 0x7fc0;   // NaN
    const poisoned: typeof file = { ...file, halfBits: async n => n === name ? bits.slice() : file.halfBits!(n) };
    const quantizer = quantizeWorkerPool(2);
    for (const q of [quantizer, undefined]) {
      let error: unknown = null;
      try {
        await loadMoEBlockWeights(poisoned, config, 0, { expertDtype: 'nf4', quantizer: q });
      } catch (e) {
        error = e;
      }
      expect(error).to.be.instanceOf(OpArgumentError);
      expect((error as Error).message).to.equal("`loadMoEBlockWeights()`: 'model.layers.0.mlp.experts.2.gate_proj.weight', " +
          "'model.layers.0.mlp.experts.2.up_proj.weight' must be finite to be quantized (nf4) but holds NaN");
    }
    expect(quantizer.counts.onThisThread, 'the poisoned expert, again on this thread').to.equal(1);
    await quantizer.close();
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('a pool whose workers cannot start quantizes on this thread: the same words', async () => {
    const file = halfSource(config, 'BF16');
    const broken = quantizeWorkerPool(2, new URL('./no_such_worker.js', import.meta.url));
    const [a, b] = [await loadMoEBlockWeights(file, config, 0, { expertDtype: 'int4', quantizer: broken }),
      await loadMoEBlockWeights(file, config, 0, { expertDtype: 'int4' })];
    for (const w of ['gateUp', 'down'] as const) {
      expect(Array.from((a.experts[w] as PackedExpertWeight).packed.dataSync()), w).to.deep.equal(Array.from((b.experts[w] as PackedExpertWeight).packed.dataSync()));
    }
    expect(broken.counts).to.deep.equal({ onWorkers: 0, onThisThread: 8 });
    await broken.close();
    disposeMoEBlockWeights(a);
    disposeMoEBlockWeights(b);
  });
});
