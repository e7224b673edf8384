/**
 * Loading a checkpoint with quantized experts (expertDtype int8 / int4 / nf4 / mxfp4): quantized
 * on load one expert tensor at a time, to the same words as quantizing the float32 weight whole;
 * the bytes the memory estimate says; logits equal to the float32 model holding the dequantized
 * values and close to the float32 model; LoRA trains on top with the base words untouched; merges
 * keep the delta (bf16 of the dequantized base plus ΔW) or re-quantize and report the change.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { mergeAdapterIntoCheckpoint } from '../../src/io/merge.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { addMoEAdapter, sparseMoELayers, trainableVariables, type MoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { SparseMoE, variableFloat32 } from '../../src/layers/sparse_moe.js';
import { fileIO } from '../../src/io/file_io_handler.js';
import { loadModelDir } from '../../src/io/model_dir.js';
import { loadMoEBlockWeights } from '../../src/io/hf_block.js';
import { CheckpointSource } from '../../src/io/hf_checkpoint_core.js';
import { estimateLoadMemory } from '../../src/models/memory.js';
import { packExpertWeight, unpackExpertWeight } from '../../src/ops/packed.js';
import { QUANTIZED_KINDS, quantizedLayout, type QuantizedKind } from '../../src/ops/quantized.js';
import { bfloat16Bits } from '../../src/ops/packed.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { cleanup, fixtureConfig, fixtureDir, tempDir } from './checkpoint_helpers.js';
import { expectClose } from '../helpers/numeric.js';
import { rejection } from '../helpers/rejection.js';

const IDS = [[3, 17, 42, 5, 9, 60, 2, 11], [8, 1, 33, 70, 4, 25, 19, 6]];

function logitsOf(model: MoECausalLM): Float32Array {
  return tf.tidy(() => (model.predict(tf.tensor2d(IDS, [2, 8], 'int32')) as tf.Tensor).dataSync() as Float32Array);
}

/** The float32 model with every expert weight replaced by what `quantized`'s experts decode to. */
async function dequantizedTwin(dir: string, quantized: MoECausalLM): Promise<MoECausalLM> {
  const twin = await loadHFCheckpoint(dir, { expertKernel: 'fused' });
  sparseMoELayers(twin).forEach((layer, i) => {
    for (const w of ['gate_up', 'down']) {
      tf.tidy(() => { layer.weightVariable(w).write(variableFloat32(sparseMoELayers(quantized)[i].weightVariable(w))); });
    }
  });
  return twin;
}

function nextTokenLoss(model: tfl.LayersModel, ids: tf.Tensor2D, vocab: number): tf.Scalar {
  return tf.tidy(() => {
    const [b, s] = ids.shape;
    const logits = model.apply(ids, { training: true }) as tf.Tensor3D;
    const predict = tf.reshape(tf.slice(logits, [0, 0, 0], [b, s - 1, vocab]), [b * (s - 1), vocab]);
    const targets = tf.reshape(tf.slice(ids, [0, 1], [b, s - 1]), [b * (s - 1)]) as tf.Tensor1D;
    return tf.neg(tf.mean(tf.sum(tf.mul(tf.logSoftmax(predict), tf.oneHot(targets, vocab)), 1))) as tf.Scalar;
  });
}

/**
 * How far the logits may move from the float32 model's (maxRelativeError: max |Δ| / max |logit|),
 * per fixture and format, about 1.7× what was measured (2026-12-05, cpu): olmoe int8 1.3e-3,
 * int4 1.4e-2, nf4 1.5e-2, mxfp4 2.5e-2; gpt-oss 4.2e-2, 0.41, 0.38, 0.59; nf4-dq olmoe 1.5e-2,
 * gpt-oss 0.37 (its tiny fixture's
 * logits are small beside its expert weights: io/mxfp4.spec allows its MXFP4 grid 0.5 against
 * transformers' own logits).
 */
const LOGIT_BOUND: Record<'olmoe' | 'gpt_oss', Record<QuantizedKind, number>> = {
  olmoe: { int8: 0.0025, int4: 0.025, nf4: 0.025, 'nf4-dq': 0.025, mxfp4: 0.045 },
  gpt_oss: { int8: 0.07, int4: 0.7, nf4: 0.65, 'nf4-dq': 0.65, mxfp4: 1.0 },
};

describe('quantized experts on load (expertDtype int8, int4, nf4, nf4-dq, mxfp4)', function () {
  this.timeout(60_000);
  after(cleanup);

  for (const arch of ['olmoe', 'gpt_oss'] as const) {
    for (const kind of QUANTIZED_KINDS) {
      it(`${arch} ${kind}: the estimate's bytes, the words of the whole weight quantized, logits of the dequantized model and near float32`, async () => {
        const dir = fixtureDir(arch);
        const config = await fixtureConfig(arch);
        const before = tf.memory().numBytes;
        const model = await loadHFCheckpoint(dir, { expertDtype: kind, expertKernel: 'fused' });
        expect(tf.memory().numBytes - before, 'loaded bytes').to.equal(estimateLoadMemory(config, { expertStorage: kind }).bytes);
        const plain = await loadHFCheckpoint(dir, { expertKernel: 'fused' });
        const inputAxis = arch === 'gpt_oss' ? 1 : 2;
        for (const [i, layer] of sparseMoELayers(model).entries()) {
          expect(layer.expertStorage).to.equal(kind);
          for (const w of ['gate_up', 'down']) {
            const v = layer.weightVariable(w);
            const f32 = sparseMoELayers(plain)[i].weightVariable(w).read() as tf.Tensor3D;
            expect(v.dtype).to.equal('int32');
            expect(v.trainable).to.equal(false);
            expect(v.shape).to.deep.equal([f32.shape[0], quantizedLayout(kind, f32.shape, inputAxis).wordsPerExpert]);
            // streamed per expert tensor = the whole float32 weight quantized at once
            const whole = packExpertWeight(f32, kind, { inputAxis });
            expect(Array.from(v.read().dataSync()), `${layer.name} ${w}`).to.deep.equal(Array.from(whole.packed.dataSync()));
            whole.dispose();
          }
        }
        const twin = await dequantizedTwin(dir, model);
        const [q, d, p] = [logitsOf(model), logitsOf(twin), logitsOf(plain)];
        expectClose(q, d, 1e-5, 'fused logits vs the dequantized float32 model');
        const error = maxRelativeError(q, p);
        expect(error, 'vs float32').to.be.below(LOGIT_BOUND[arch][kind]);
        expect(error, 'quantization is not a no-op').to.be.above(0);
        for (const m of [model, twin]) for (const l of sparseMoELayers(m)) l.expertKernel = 'reference';
        expectClose(logitsOf(model), logitsOf(twin), 1e-5, 'reference logits');
        for (const m of [model, plain, twin]) m.dispose();
        expect(tf.memory().numBytes).to.equal(before);
      });
    }
  }

  it('int4 groups of 32 or 128 (int4GroupSize): the words of that grouping, its bytes, kept by a TF.js save and load', async () => {
    const dir = fixtureDir('olmoe');
    const config = await fixtureConfig('olmoe');
    const plain = await loadHFCheckpoint(dir);
    for (const g of [32, 128]) {
      const before = tf.memory().numBytes;
      const model = await loadHFCheckpoint(dir, { expertDtype: 'int4', int4GroupSize: g, expertKernel: 'fused' });
      expect(tf.memory().numBytes - before, `g${g} bytes`).to.equal(estimateLoadMemory(config, { expertStorage: 'int4', expertGroupSize: g }).bytes);
      const layer = sparseMoELayers(model)[1];
      expect(layer.expertGroupSize).to.equal(g);
      const f32 = sparseMoELayers(plain)[1].weightVariable('gate_up').read() as tf.Tensor3D;
      const whole = packExpertWeight(f32, 'int4', { groupSize: g });
      expect(Array.from(layer.weightVariable('gate_up').read().dataSync())).to.deep.equal(Array.from(whole.packed.dataSync()));
      whole.dispose();
      const saved = await tempDir(`int4-g${g}-`);
      await model.save(fileIO(saved));
      const { model: back } = await loadModelDir(saved);
      expect(sparseMoELayers(back).map(l => [l.expertStorage, l.expertGroupSize])).to.deep.equal([['int4', g], ['int4', g]]);
      for (const l of sparseMoELayers(back)) l.expertKernel = 'fused';
      expect(Array.from(logitsOf(back))).to.deep.equal(Array.from(logitsOf(model)));
      back.dispose();
      model.dispose();
    }
    plain.dispose();
    const e = await rejection(loadHFCheckpoint(dir, { expertDtype: 'nf4', int4GroupSize: 32 }));
    expect(e.message).to.equal(`\`loadHFCheckpoint()\`: 'int4GroupSize' must be one of 32, 64, 128 with expertDtype 'int4' but got 32 with expertDtype 'nf4'`);
    const e2 = await rejection(loadHFCheckpoint(dir, { expertDtype: 'int4', int4GroupSize: 48 }));
    expect(e2.message).to.equal(`\`loadHFCheckpoint()\`: 'int4GroupSize' must be one of 32, 64, 128 with expertDtype 'int4' but got 48 with expertDtype 'int4'`);
    expect(() => new SparseMoE({ numExperts: 2, intermediateSize: 4, routing: { kind: 'softmaxTopK', topK: 1, renormalize: false },
      expertStorage: 'bf16', expertGroupSize: 32 })).to.throw(/`SparseMoE\(\)`: 'expertGroupSize' is for expertStorage 'int4' but expertStorage is 'bf16'/);
    expect(() => new SparseMoE({ numExperts: 2, intermediateSize: 4, routing: { kind: 'softmaxTopK', topK: 1, renormalize: false },
      expertStorage: 'int4', expertGroupSize: 16 })).to.throw(/`SparseMoE\(\)`: 'expertGroupSize' must be one of 32, 64, 128 but got 16/);
    expect(() => estimateLoadMemory(config, { expertStorage: 'nf4', expertGroupSize: 32 })).to.throw(
        "`estimateLoadMemory()`: 'options.expertGroupSize' is for expertStorage 'int4' but got expertStorage \"nf4\"");
    const file = CheckpointSource.single(await readSafetensorsFile(join(dir, 'model.safetensors')));
    const e3 = await rejection(loadMoEBlockWeights(file, config, 0, { expertDtype: 'nf4', int4GroupSize: 32 }));
    expect(e3.message).to.equal("`loadMoEBlockWeights()`: 'options.int4GroupSize' is for expertDtype 'int4' but expertDtype is 'nf4'");
    // a non-finite value cannot be quantized: the error names the expert's tensors
    const bad = 'model.layers.0.mlp.experts.1.down_proj.weight';
    const withNaN = {
      has: (n: string) => file.has(n), info: (n: string) => file.info(n),
      tensor: async (n: string) => (n === bad ? tf.fill(file.info(n).shape, NaN) : file.tensor(n)),
    };
    const before = tf.memory().numTensors;
    const e4 = await rejection(loadMoEBlockWeights(withNaN, config, 0, { expertDtype: 'int8' }));
    expect(e4.message).to.equal(`\`loadMoEBlockWeights()\`: '${bad}' must be finite to be quantized (int8) but holds NaN`);
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('int4 QLoRA: LoRA trains, the quantized words stay identical, losses match the dequantized float32 model', async () => {
    const dir = fixtureDir('olmoe');
    const model = await loadHFCheckpoint(dir, { expertDtype: 'int4', expertKernel: 'fused' });
    const twin = await dequantizedTwin(dir, model);
    const lora = { name: 'q', r: 2, alpha: 4, targets: ['experts.gate_up', 'experts.down', 'router'] } as const;
    addMoEAdapter(model, { ...lora, targets: [...lora.targets] }, 'random');
    addMoEAdapter(twin, { ...lora, targets: [...lora.targets] }, 'random');
    trainableVariables(twin).forEach((v, i) => v.assign(trainableVariables(model)[i]));
    // only the adapters train (the quantized experts are non-trainable int32 variables)
    expect(trainableVariables(model).length).to.equal(3 * 2 * sparseMoELayers(model).length);
    expect(trainableVariables(model).every(v => v.dtype === 'float32')).to.equal(true);
    const words = sparseMoELayers(model).map(l => Int32Array.from(l.weightVariable('down').read().dataSync() as Int32Array));
    const ids = tf.tensor2d(IDS, [2, 8], 'int32');
    const losses = [model, twin].map(m => {
      const optimizer = tf.train.adam(1e-2);
      const vars = trainableVariables(m);
      const out: number[] = [];
      for (let step = 0; step < 4; step++) {
        const cost = optimizer.minimize(() => nextTokenLoss(m, ids, 97), true, vars)!;
        out.push(cost.dataSync()[0]);
        cost.dispose();
      }
      optimizer.dispose();
      return out;
    });
    expectClose(losses[0], losses[1], 1e-4, 'losses');
    expect(losses[0][3]).to.be.below(losses[0][0]);
    sparseMoELayers(model).forEach((l, i) =>
      expect(Array.from(l.weightVariable('down').read().dataSync()), `layer ${i} words`).to.deep.equal(Array.from(words[i])));
    ids.dispose();
    model.dispose();
    twin.dispose();
  });

  it('SparseMoE.mergeAdapter into quantized experts: refused unless re-quantizing, which returns the largest change', async () => {
    const model = await loadHFCheckpoint(fixtureDir('olmoe'), { expertDtype: 'nf4' });
    addMoEAdapter(model, { name: 'a', r: 2, alpha: 64, targets: ['experts.down'] }, 'random');
    const layer = sparseMoELayers(model)[0];
    expect(() => layer.mergeAdapter('a')).to.throw(/`SparseMoE.mergeAdapter\(\)`: adapter 'a' targets the routed experts, which are quantized \(nf4\): merging re-quantizes them and may lose the delta; pass \{requantize: true\}/);
    const [merged, expected] = tf.tidy(() => {
      const sum = tf.add(variableFloat32(layer.weightVariable('down')), layer.deltaWeight('a', 'experts.down')) as tf.Tensor3D;
      const again = unpackExpertWeight(packExpertWeight(sum, 'nf4'));
      return [again, tf.max(tf.abs(tf.sub(again, sum)))];
    });
    const change = layer.mergeAdapter('a', { requantize: true });
    expect(change).to.equal(expected.dataSync()[0]);
    expect(change).to.be.above(0);
    const now = variableFloat32(layer.weightVariable('down'));
    expect(Array.from(now.dataSync())).to.deep.equal(Array.from(merged.dataSync()));
    tf.dispose([merged, expected, now]);
    model.dispose();
  });

  it('mergeAdapterIntoCheckpoint with a quantized expertDtype writes bf16 of the dequantized base plus ΔW; requantize reports the change', async () => {
    const dir = fixtureDir('olmoe');
    const adapter = join(dir, 'adapter');
    const out = await tempDir('merge-nf4-');
    const result = await mergeAdapterIntoCheckpoint(dir, adapter, out, { expertDtype: 'nf4' });
    expect(result.requantizeMaxChange).to.equal(undefined);
    // independently: the nf4 model with the adapter, its experts' dequantized values plus ΔW, rounded to bf16
    const model = await loadHFCheckpoint(dir, { expertDtype: 'nf4' });
    await loadPeftAdapter(model, adapter, { name: 'default' });
    const file = await readSafetensorsFile(join(out, 'model.safetensors'));
    const nameOf = (e: number) => `model.layers.0.mlp.experts.${e}.down_proj.weight`;   // [H, I] per expert
    const layer = sparseMoELayers(model)[0];
    const expected = tf.tidy(() => tf.add(variableFloat32(layer.weightVariable('down')), layer.deltaWeight('default', 'experts.down')).dataSync());
    const block = 64 * 48;
    for (let e = 0; e < 8; e++) {
      expect(file.info(nameOf(e)).dtype).to.equal('BF16');
      const bits = await file.halfBits(nameOf(e));
      expect(Array.from(bits), `expert ${e}`).to.deep.equal(Array.from(expected.subarray(e * block, (e + 1) * block), v => bfloat16Bits(v)));
    }
    // the delta is there: the merged experts differ from the dequantized base
    const base = variableFloat32(layer.weightVariable('down'));
    expect(maxRelativeError(expected, base.dataSync())).to.be.above(1e-3);
    base.dispose();
    model.dispose();

    const out2 = await tempDir('merge-nf4-requantized-');
    const again = await mergeAdapterIntoCheckpoint(dir, adapter, out2, { expertDtype: 'nf4', requantize: true, dtype: 'float32' });
    expect(again.requantizeMaxChange).to.be.above(0);
    const file2 = await readSafetensorsFile(join(out2, 'model.safetensors'));
    const written = await file2.tensor(nameOf(3));
    // the written experts are nf4 values: quantizing them again changes nothing beyond float32 rounding of the decode
    const back = unpackExpertWeight(packExpertWeight(tf.reshape(written, [1, -1, 48]) as tf.Tensor3D, 'nf4'));
    expect(maxRelativeError(back.dataSync(), written.dataSync())).to.be.below(1e-6);
    tf.dispose([written, back]);

    const bad = await rejection(mergeAdapterIntoCheckpoint(dir, adapter, await tempDir('x-'), { requantize: true }));
    expect(bad.message).to.equal("`mergeAdapterIntoCheckpoint()`: 'requantize' needs a quantized 'expertDtype' (int8, int4, nf4, nf4-dq, mxfp4) but got undefined");
    const bad2 = await rejection(mergeAdapterIntoCheckpoint(dir, adapter, await tempDir('x-'), { expertDtype: 'nf4', requantize: 'yes' as unknown as boolean }));
    expect(bad2.message).to.equal("`mergeAdapterIntoCheckpoint()`: 'requantize' must be a boolean but got \"yes\" (string)");
  });
});
