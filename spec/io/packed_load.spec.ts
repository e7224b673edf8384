/**
 * Loading 16-bit checkpoints with the experts kept packed ('stored', the default) against the
 * same rounded values loaded as float32: same weights, same logits and LoRA training, half the
 * expert memory, the packed bits untouched by training; saving and merging decode them.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { join } from 'node:path';
import { fileIO } from '../../src/io/file_io_handler.js';
import { loadMoEBlockWeights, type TensorSource } from '../../src/io/hf_block.js';
import { CheckpointError, loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { CheckpointSource } from '../../src/io/hf_checkpoint_core.js';
import { saveHFCheckpoint } from '../../src/io/hf_save.js';
import { loadModelDir } from '../../src/io/model_dir.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { addMoEAdapter, sparseMoELayers, trainableVariables, type MoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { SparseMoE, variableFloat32 } from '../../src/layers/sparse_moe.js';
import type { HFConfig } from '../../src/models/families.js';
import { inspectModel } from '../../src/models/inspect.js';
import { disposeMoEBlockWeights } from '../../src/models/weight_fields.js';
import { isPackedExpertWeight, packExpertWeight, unpackExpertWeight } from '../../src/ops/packed.js';
import { cleanup, fixtureDir, tempDir } from './checkpoint_helpers.js';
import { writeHalfFixture } from '../helpers/half_checkpoint.js';
import { expectClose } from '../helpers/numeric.js';

const IDS = [[3, 17, 42, 5, 9, 60, 2, 11], [8, 1, 33, 70, 4, 25, 19, 6]];

function logitsOf(model: MoECausalLM): Float32Array {
  return tf.tidy(() => (model.predict(tf.tensor2d(IDS, [2, 8], 'int32')) as tf.Tensor).dataSync() as Float32Array);
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

/** Bytes of the routed-expert weights as float32, over every SparseMoE. */
function expertFloat32Bytes(model: MoECausalLM): number {
  return sparseMoELayers(model).reduce((sum, l) => sum + 4 * ['gate_up', 'down']
      .map(n => variableFloat32(l.weightVariable(n))).reduce((s, t) => { const b = t.size; t.dispose(); return s + b; }, 0), 0);
}

describe('16-bit checkpoints with packed experts', function () {
  this.timeout(60_000);
  let dir16: Record<string, string>;
  let dir32: Record<string, string>;

  before(async () => {
    dir16 = {};
    dir32 = {};
    for (const kind of ['bf16', 'f16'] as const) {
      dir16[kind] = await tempDir(`packed-${kind}-`);
      dir32[kind] = await tempDir(`rounded-${kind}-`);
      await writeHalfFixture(fixtureDir('olmoe'), kind, dir16[kind], dir32[kind]);
    }
    dir16.gptOss = await tempDir('packed-gpt-oss-');
    dir32.gptOss = await tempDir('rounded-gpt-oss-');
    await writeHalfFixture(fixtureDir('gpt_oss'), 'bf16', dir16.gptOss, dir32.gptOss);
  });
  after(cleanup);

  for (const kind of ['bf16', 'f16'] as const) {
    it(`${kind}: loads packed (int32, half the expert bytes), same logits as the rounded float32 model, fused and reference`, async () => {
      const before = tf.memory().numBytes;
      const packed = await loadHFCheckpoint(dir16[kind], { expertKernel: 'fused' });
      const packedBytes = tf.memory().numBytes - before;
      const plain = await loadHFCheckpoint(dir32[kind], { expertKernel: 'fused' });
      const plainBytes = tf.memory().numBytes - before - packedBytes;
      for (const layer of sparseMoELayers(packed)) {
        expect(layer.expertStorage).to.equal(kind);
        const v = layer.weightVariable('gate_up');
        expect(v.dtype).to.equal('int32');
        expect(v.shape).to.deep.equal([8, 48 * 64]);   // E, 2I·H / 2
        expect(v.trainable).to.equal(false);
      }
      const expertBytes = expertFloat32Bytes(plain);
      // only the experts differ: exactly half their float32 bytes (2I·H and H·I are even: no padding)
      expect(plainBytes - packedBytes, 'bytes saved').to.equal(expertBytes / 2);
      const otherBytes = plainBytes - expertBytes;
      expect((packedBytes - otherBytes) / expertBytes, 'packed experts / float32 experts').to.equal(0.5);
      for (const [a, b] of sparseMoELayers(packed).map((l, i) => [l, sparseMoELayers(plain)[i]] as const)) {
        const [wa, wb] = [variableFloat32(a.weightVariable('down')), b.weightVariable('down').read()];
        expect(Array.from(wa.dataSync())).to.deep.equal(Array.from(wb.dataSync()));
        wa.dispose();
      }
      const [reportPacked, reportPlain] = [inspectModel(packed).totals, inspectModel(plain).totals];
      // counted by their logical shapes; the packed experts are frozen
      expect(reportPacked.params, 'params').to.equal(reportPlain.params);
      expect(reportPacked.moeParams, 'moeParams').to.equal(reportPlain.moeParams);
      expect(reportPacked.trainableParams, 'trainableParams').to.equal(reportPlain.trainableParams - expertBytes / 4);
      expectClose(logitsOf(packed), logitsOf(plain), 1e-6, 'fused logits');
      for (const m of [packed, plain]) for (const l of sparseMoELayers(m)) l.expertKernel = 'reference';
      expectClose(logitsOf(packed), logitsOf(plain), 1e-6, 'reference logits');
      packed.dispose();
      plain.dispose();
    });
  }

  it("expertDtype 'float32' widens 16-bit experts: the rounded float32 model exactly", async () => {
    const wide = await loadHFCheckpoint(dir16.bf16, { expertDtype: 'float32' });
    const plain = await loadHFCheckpoint(dir32.bf16);
    expect(sparseMoELayers(wide).map(l => l.expertStorage)).to.deep.equal(['float32', 'float32']);
    wide.weights.forEach((w, i) => {
      expect(w.dtype, w.name).to.equal('float32');
      expect(Array.from(w.read().dataSync()), w.name).to.deep.equal(Array.from(plain.weights[i].read().dataSync()));
    });
    wide.dispose();
    plain.dispose();
  });

  it('an F32 checkpoint loads as float32 with the default', async () => {
    const model = await loadHFCheckpoint(fixtureDir('olmoe'));
    expect(sparseMoELayers(model).map(l => l.expertStorage)).to.deep.equal(['float32', 'float32']);
    model.dispose();
  });

  it('loadMoEBlockWeights: gpt-oss experts (stored whole, transposed) come back packed and decode to the rounded values', async () => {
    const config = JSON.parse(await import('node:fs/promises').then(fs => fs.readFile(join(dir16.gptOss, 'config.json'), 'utf8'))) as HFConfig;
    const file16 = CheckpointSource.single(await readSafetensorsFile(join(dir16.gptOss, 'model.safetensors')));
    const file32 = CheckpointSource.single(await readSafetensorsFile(join(dir32.gptOss, 'model.safetensors')));
    const packed = await loadMoEBlockWeights(file16, config, 0);
    const wide = await loadMoEBlockWeights(file16, config, 0, { expertDtype: 'float32' });
    const plain = await loadMoEBlockWeights(file32, config, 0);
    expect(isPackedExpertWeight(packed.experts.gateUp)).to.equal(true);
    expect(isPackedExpertWeight(wide.experts.gateUp)).to.equal(false);
    for (const key of ['gateUp', 'down'] as const) {
      const decoded = unpackExpertWeight(packed.experts[key]);
      expect(Array.from(decoded.dataSync()), key).to.deep.equal(Array.from((plain.experts[key] as tf.Tensor).dataSync()));
      expect(Array.from((wide.experts[key] as tf.Tensor).dataSync()), key).to.deep.equal(Array.from(decoded.dataSync()));
      decoded.dispose();
    }
    expect((packed.router.weight).dtype).to.equal('float32');
    [packed, wide, plain].forEach(disposeMoEBlockWeights);
    await loadMoEBlockWeights(file16, config, 0, { expertDtype: 'f64' as 'stored' }).then(
        () => expect.fail('no error'),
        (e: Error) => expect(e.message).to.match(/`loadMoEBlockWeights\(\)`: 'options.expertDtype' must be one of 'stored', 'float32', 'int8', 'int4', 'nf4', 'nf4-dq', 'mxfp4' but got 'f64'/));
  });

  it('a source that reads whole tensors only (no halfBitsInto) gives the same packed words and float32 stacks, per-expert (olmoe) and fused (gpt-oss)', async () => {
    for (const dir of [dir16.bf16, dir16.gptOss]) {
      const config = JSON.parse(await import('node:fs/promises').then(fs => fs.readFile(join(dir, 'config.json'), 'utf8'))) as HFConfig;
      const file = CheckpointSource.single(await readSafetensorsFile(join(dir, 'model.safetensors')));
      const wholeOnly: TensorSource = {
        has: name => file.has(name), info: name => file.info(name), tensor: name => file.tensor(name), halfBits: name => file.halfBits(name),
      };
      const before = tf.memory().numTensors;
      for (const layer of [0, 1]) {
        for (const expertDtype of ['stored', 'float32'] as const) {
          const [into, whole] = [await loadMoEBlockWeights(file, config, layer, { expertDtype }), await loadMoEBlockWeights(wholeOnly, config, layer, { expertDtype })];
          for (const key of ['gateUp', 'down'] as const) {
            const [a, b] = [into.experts[key], whole.experts[key]];
            const valuesOf = (w: typeof a) => Array.from(isPackedExpertWeight(w) ? w.packed.dataSync() : (w as tf.Tensor).dataSync());
            expect(isPackedExpertWeight(a), `${expertDtype} ${key}`).to.equal(expertDtype === 'stored');
            expect(valuesOf(b), `${dir} layer ${layer} ${expertDtype} ${key}`).to.deep.equal(valuesOf(a));
          }
          [into, whole].forEach(disposeMoEBlockWeights);
        }
      }
      expect(tf.memory().numTensors).to.equal(before);
    }
  });

  it('LoRA training on the packed model: the packed bits stay identical, losses match the float32 model', async () => {
    const packed = await loadHFCheckpoint(dir16.bf16, { expertKernel: 'fused' });
    const plain = await loadHFCheckpoint(dir32.bf16, { expertKernel: 'fused' });
    const lora = { name: 'default', r: 4, alpha: 8, targets: ['experts.gate_up', 'experts.down', 'router'] as const };
    addMoEAdapter(packed, { ...lora, targets: [...lora.targets] }, 'random');
    addMoEAdapter(plain, { ...lora, targets: [...lora.targets] }, 'random');
    // the same starting adapters on both
    trainableVariables(plain).forEach((v, i) => v.assign(trainableVariables(packed)[i]));
    const bits = sparseMoELayers(packed).map(l => Int32Array.from(l.weightVariable('gate_up').read().dataSync() as Int32Array));
    const ids = tf.tensor2d(IDS, [2, 8], 'int32');
    const losses = [packed, plain].map(model => {
      const optimizer = tf.train.adam(1e-2);
      const out: number[] = [];
      for (let step = 0; step < 4; step++) {
        const cost = optimizer.minimize(() => nextTokenLoss(model, ids, 97), true, trainableVariables(model))!;
        out.push(cost.dataSync()[0]);
        cost.dispose();
      }
      optimizer.dispose();
      return out;
    });
    expectClose(losses[0], losses[1], 1e-4, 'losses');
    expect(losses[0][3]).to.be.below(losses[0][0]);
    sparseMoELayers(packed).forEach((l, i) =>
      expect(Array.from(l.weightVariable('gate_up').read().dataSync()), `layer ${i} packed bits`).to.deep.equal(Array.from(bits[i])));
    ids.dispose();
    packed.dispose();
    plain.dispose();
  });

  it('mergeAdapter re-packs (rounded to bf16); saveHFCheckpoint and model.save decode / keep the packed experts', async () => {
    const model = await loadHFCheckpoint(dir16.bf16);
    addMoEAdapter(model, { name: 'a', r: 2, alpha: 4, targets: ['experts.down'] }, 'random');
    const layer = sparseMoELayers(model)[0];
    const expected = tf.tidy(() => {
      const sum = tf.add(variableFloat32(layer.weightVariable('down')), layer.deltaWeight('a', 'experts.down')) as tf.Tensor3D;
      const p = packExpertWeight(sum, 'bf16');
      return p.packed;
    });
    layer.mergeAdapter('a');
    expect(Array.from(layer.weightVariable('down').read().dataSync())).to.deep.equal(Array.from(expected.dataSync()));
    expected.dispose();

    const out = await tempDir('packed-save-');
    await saveHFCheckpoint(model, out);
    const again = await loadHFCheckpoint(out);   // BF16 on disk (the source dtype): packed again, the same values
    const againLayer = sparseMoELayers(again)[0];
    expect(againLayer.expertStorage).to.equal('bf16');
    const [w0, w1] = [variableFloat32(layer.weightVariable('down')), variableFloat32(againLayer.weightVariable('down'))];
    expect(Array.from(w1.dataSync())).to.deep.equal(Array.from(w0.dataSync()));
    tf.dispose([w0, w1]);
    again.dispose();

    const tfjsDir = await tempDir('packed-tfjs-');
    await model.save(fileIO(tfjsDir));
    const { model: back } = await loadModelDir(tfjsDir);
    const backLayer = sparseMoELayers(back)[0] as SparseMoE;
    expect(backLayer.expertStorage).to.equal('bf16');
    expect(Array.from(backLayer.weightVariable('down').read().dataSync())).to.deep.equal(Array.from(layer.weightVariable('down').read().dataSync()));
    back.dispose();
    await loadModelDir(tfjsDir, { expertDtype: 'float32' }).then(() => expect.fail('no error'), (e: Error) =>
      expect(e.message).to.match(/the TF.js model in '.*' holds its experts packed \(bf16, layer 'model.layers.0.mlp'\) and a TF.js folder keeps the storage it was saved with; expertDtype 'float32' applies to HF checkpoints/));
    model.dispose();
  });

  it('refuses a bad expertDtype, training packed experts, and halfBits of a non-16-bit tensor', async () => {
    await loadHFCheckpoint(dir16.bf16, { expertDtype: 'bf16' as 'stored' }).then(() => expect.fail('no error'), (e: Error) => {
      expect(e).to.be.instanceOf(CheckpointError);
      expect(e.message).to.match(/`loadHFCheckpoint\(\)`: 'expertDtype' must be one of 'stored', 'float32', 'int8', 'int4', 'nf4', 'nf4-dq', 'mxfp4' but got "bf16"/);
    });
    const file = await readSafetensorsFile(join(dir32.bf16, 'model.safetensors'));
    await file.halfBits('lm_head.weight').then(() => expect.fail('no error'), (e: Error) =>
      expect(e.message).to.match(/tensor 'lm_head.weight' has dtype F32; halfBits reads BF16 and F16 tensors only/));
    expect(() => new SparseMoE({ numExperts: 2, intermediateSize: 2, routing: { kind: 'softmaxTopK', topK: 1 }, expertStorage: 'fp8' as 'bf16' }))
        .to.throw(/'expertStorage' must be one of 'float32', 'bf16', 'f16', 'int8', 'int4', 'nf4', 'nf4-dq', 'mxfp4' but got 'fp8'/);
    const model = await loadHFCheckpoint(dir16.bf16, { expertKernel: 'fused' });
    sparseMoELayers(model)[0].weightVariable('gate_up').trainable = true;
    expect(() => tf.tidy(() => model.predict(tf.tensor2d([[1, 2]], [1, 2], 'int32'))))
        .to.throw(/'options.trainExpertWeights' is true but the expert weights are packed \(bf16\), which are frozen; load the model with expertDtype 'float32'/);
    model.dispose();
  });
});
