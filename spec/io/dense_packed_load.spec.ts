/**
 * The frozen non-expert weights (attention q/k/v/o_proj, the untied token embedding and LM head) of a BF16
 * checkpoint held as stored (denseDtype 'stored') against the same checkpoint widened to float32
 * ('float32'): bf16 → f32 is exact, so logits and every LoRA gradient are bit for bit equal,
 * while the weights take exactly 2 bytes an element less; training leaks nothing; save and merge
 * write the 16-bit values back.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { join } from 'node:path';
import { CheckpointError, loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { denseStorageTensorNames } from '../../src/io/hf_checkpoint_core.js';
import { saveHFCheckpoint } from '../../src/io/hf_save.js';
import { fileIO } from '../../src/io/file_io_handler.js';
import { loadModelDir } from '../../src/io/model_dir.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { RotaryAttention } from '../../src/layers/attention.js';
import { packedDenseFormat } from '../../src/layers/dense_storage.js';
import { LMHead, TokenEmbedding } from '../../src/layers/embedding.js';
import { addMoEAdapter, trainableVariables, type MoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { variableFloat32, variableShape } from '../../src/layers/sparse_moe.js';
import type { HFConfig } from '../../src/models/families.js';
import { estimateLoadMemory } from '../../src/models/memory.js';
import { generate } from '../../src/generate/generate.js';
import { batchLoss } from '../../src/train/loss.js';
import { packDenseWeight } from '../../src/ops/packed.js';
import { cleanup, fixtureDir, tempDir } from './checkpoint_helpers.js';
import { writeHalfFixture } from '../helpers/half_checkpoint.js';

const IDS = [[3, 17, 42, 5, 9, 60, 2, 11], [8, 1, 33, 70, 4, 25, 19, 6]];
const VOCAB = 97;

function nextTokenLoss(model: tfl.LayersModel, ids: tf.Tensor2D): tf.Scalar {
  return tf.tidy(() => {
    const [b, s] = ids.shape;
    const logits = model.apply(ids, { training: true }) as tf.Tensor3D;
    const predict = tf.reshape(tf.slice(logits, [0, 0, 0], [b, s - 1, VOCAB]), [b * (s - 1), VOCAB]);
    const targets = tf.reshape(tf.slice(ids, [0, 1], [b, s - 1]), [b * (s - 1)]) as tf.Tensor1D;
    return tf.neg(tf.mean(tf.sum(tf.mul(tf.logSoftmax(predict), tf.oneHot(targets, VOCAB)), 1))) as tf.Scalar;
  });
}

const attentionLayers = (m: MoECausalLM) => m.layers.filter((l): l is RotaryAttention => l instanceof RotaryAttention);
const embeddingOf = (m: MoECausalLM) => m.layers.find((l): l is TokenEmbedding => l instanceof TokenEmbedding)!;

/** Attention LoRA on q/k/v/o and expert LoRA, random B (so every gradient is non-trivial). */
function addAdapters(model: MoECausalLM): void {
  addMoEAdapter(model, { name: 'default', r: 2, alpha: 4, targets: ['experts.gate_up', 'experts.down', 'router'] }, 'random');
  for (const layer of attentionLayers(model)) {
    layer.trainable = true;  // addMoEAdapter froze it; adding the adapter freezes its base weights again
    layer.lora.add({ name: 'default', modules: { q_proj: { r: 2, alpha: 4 }, k_proj: { r: 2, alpha: 4 }, v_proj: { r: 2, alpha: 4 }, o_proj: { r: 2, alpha: 4 } } }, 'random');
  }
}

function bitsOf(t: tf.Tensor): number[] {
  const v = t.dataSync() as Float32Array;
  return Array.from(new Int32Array(v.buffer, v.byteOffset, v.length));
}

describe("denseDtype 'stored': 16-bit attention, embedding and LM head weights", function () {
  this.timeout(60_000);
  let dir16: string;
  let dir32: string;
  let config: HFConfig;

  before(async () => {
    dir16 = await tempDir('dense-bf16-');
    dir32 = await tempDir('dense-rounded-');
    await writeHalfFixture(fixtureDir('olmoe'), 'bf16', dir16, dir32);
    config = JSON.parse(await import('node:fs/promises').then(fs => fs.readFile(join(dir16, 'config.json'), 'utf8')));
  });
  after(cleanup);

  it('holds q/k/v/o, the embedding and the head packed (int32, frozen), 2 bytes an element less, as estimated; logits bit for bit', async () => {
    const before = tf.memory().numBytes;
    const stored = await loadHFCheckpoint(dir16, { denseDtype: 'stored' });
    const storedBytes = tf.memory().numBytes - before;
    const widened = await loadHFCheckpoint(dir16, { denseDtype: 'float32' });
    const widenedBytes = tf.memory().numBytes - before - storedBytes;
    // the savings computed here from the checkpoint's own shapes: every attention projection, the embedding and the untied head
    const file = await readSafetensorsFile(join(dir16, 'model.safetensors'));
    const names = file.names().filter(n => /self_attn\.[qkvo]_proj\.weight$/.test(n) || n === 'model.embed_tokens.weight' || n === 'lm_head.weight');
    expect(names).to.have.length(2 * 4 + 2);
    expect([...denseStorageTensorNames(config)].sort()).to.deep.equal([...names].sort());
    const savings = names.reduce((s, n) => s + 2 * file.info(n).shape.reduce((a, b) => a * b, 1), 0);
    expect(widenedBytes - storedBytes).to.equal(savings);
    expect(estimateLoadMemory(config, { expertStorage: 'bf16', denseStorage: 'bf16' }).bytes).to.equal(storedBytes);
    expect(estimateLoadMemory(config, { expertStorage: 'bf16' }).bytes).to.equal(widenedBytes);

    for (const layer of attentionLayers(stored)) {
      const v = layer.weights.find(w => w.originalName.endsWith('q_proj.weight'));
      expect(v!.dtype).to.equal('int32');
      expect(v!.shape).to.deep.equal([64, 32]);
      expect(v!.trainable).to.equal(false);
      expect(variableShape(v!)).to.deep.equal([64, 64]);
      expect(packedDenseFormat(v!)).to.deep.equal({ kind: 'bf16', shape: [64, 64] });
    }
    expect(embeddingOf(stored).denseStorage).to.equal('bf16');
    const head = stored.getLayer('lm_head') as LMHead;
    expect(head.denseStorage).to.equal('bf16');
    expect(head.weights[0].dtype).to.equal('int32');
    expect(head.weights[0].trainable).to.equal(false);
    expect(packedDenseFormat(head.weights[0])).to.deep.equal({ kind: 'bf16', shape: [VOCAB, 64] });
    // every weight decodes to the widened model's value exactly
    expect(stored.weights.length).to.equal(widened.weights.length);
    stored.weights.forEach(w => {
      const [a, b] = [variableFloat32(w), variableFloat32(widened.weights.find(v => v.originalName === w.originalName)!)];
      expect(bitsOf(a), w.originalName).to.deep.equal(bitsOf(b));
      tf.dispose([a, b]);
    });
    const [l1, l2] = [stored, widened].map(m => tf.tidy(() => m.predict(tf.tensor2d(IDS, [2, 8], 'int32')) as tf.Tensor));
    expect(bitsOf(l1)).to.deep.equal(bitsOf(l2));
    tf.dispose([l1, l2]);
    // generation (the KV-cache path) picks the same tokens
    const [g1, g2] = await Promise.all([stored, widened].map(m => generate(m, [3, 17, 42], { maxNewTokens: 6 })));
    expect(Array.from(g1.ids)).to.deep.equal(Array.from(g2.ids));
    stored.dispose();
    widened.dispose();
    expect(tf.memory().numBytes).to.equal(before);
  });

  it('LoRA gradients bit for bit equal to the widened model; a training step leaks no tensor and leaves the packed bits', async () => {
    const stored = await loadHFCheckpoint(dir16, { denseDtype: 'stored', expertKernel: 'fused' });
    const widened = await loadHFCheckpoint(dir16, { denseDtype: 'float32', expertKernel: 'fused' });
    addAdapters(stored);
    addAdapters(widened);
    const [vs, vw] = [trainableVariables(stored), trainableVariables(widened)];
    expect(vs.length).to.equal(vw.length);
    expect(vs.length).to.be.above(2 * 4 * 2);
    vw.forEach((v, i) => v.assign(vs[i]));
    const ids = tf.tensor2d(IDS, [2, 8], 'int32');
    const [gs, gw] = [[stored, vs], [widened, vw]].map(([m, vars]) =>
      tf.variableGrads(() => nextTokenLoss(m as MoECausalLM, ids), vars as tf.Variable[]));
    expect(bitsOf(gs.value)).to.deep.equal(bitsOf(gw.value));
    vs.forEach((v, i) => {
      const [a, b] = [gs.grads[v.name], gw.grads[vw[i].name]];
      expect(bitsOf(a), v.name).to.deep.equal(bitsOf(b));
      expect(tf.max(tf.abs(a)).dataSync()[0], `${v.name} is trained`).to.be.above(0);
    });
    tf.dispose([gs.value, gw.value, ...Object.values(gs.grads), ...Object.values(gw.grads)]);

    const qProj = (l: RotaryAttention) => l.weights.find(w => w.originalName.endsWith('q_proj.weight'))!;
    const packedBits = attentionLayers(stored).map(l => Array.from(qProj(l).read().dataSync()));
    const optimizer = tf.train.adam(1e-2);
    const step = () => optimizer.minimize(() => nextTokenLoss(stored, ids), false, vs);
    step();  // Adam makes its slots on the first step
    const tensors = tf.memory().numTensors;
    step();
    expect(tf.memory().numTensors, 'a training step leaks no tensor').to.equal(tensors);
    attentionLayers(stored).forEach((l, i) => expect(Array.from(qProj(l).read().dataSync())).to.deep.equal(packedBits[i]));
    optimizer.dispose();
    ids.dispose();
    stored.dispose();
    widened.dispose();
  });

  it('batchLoss (the chunked head + loss, linearCrossEntropy) and its hidden-side gradients bit for bit with the packed head; no leak', async () => {
    const stored = await loadHFCheckpoint(dir16, { denseDtype: 'stored', expertKernel: 'fused' });
    const widened = await loadHFCheckpoint(dir16, { denseDtype: 'float32', expertKernel: 'fused' });
    addAdapters(stored);
    addAdapters(widened);
    const [vs, vw] = [trainableVariables(stored), trainableVariables(widened)];
    vw.forEach((v, i) => v.assign(vs[i]));
    const inputIds = tf.tensor2d(IDS.map(r => r.slice(0, 7)), [2, 7], 'int32');
    const labels = tf.tensor2d(IDS.map((r, i) => r.slice(1).map((t, j) => (i === 1 && j === 2 ? -100 : t))), [2, 7], 'int32');
    const batch = { inputIds, labels, segmentIds: null, positionIds: null, targetCount: 13 };
    for (const chunkRows of [3, 64]) {  // several chunks, and one
      const [gs, gw] = [[stored, vs], [widened, vw]].map(([m, vars]) =>
        tf.variableGrads(() => batchLoss(m as MoECausalLM, batch, { chunkRows }), vars as tf.Variable[]));
      expect(bitsOf(gs.value), `chunkRows ${chunkRows}`).to.deep.equal(bitsOf(gw.value));
      vs.forEach((v, i) => expect(bitsOf(gs.grads[v.name]), `${v.name}, chunkRows ${chunkRows}`).to.deep.equal(bitsOf(gw.grads[vw[i].name])));
      expect(Object.keys(gs.grads)).to.have.length(vs.length);  // the frozen head gets none
      tf.dispose([gs.value, gw.value, ...Object.values(gs.grads), ...Object.values(gw.grads)]);
    }
    const tensors = tf.memory().numTensors;
    const { value, grads } = tf.variableGrads(() => batchLoss(stored, batch, { chunkRows: 3 }), vs);
    tf.dispose([value, ...Object.values(grads)]);
    expect(tf.memory().numTensors, 'a loss and its gradients leak no tensor').to.equal(tensors);
    tf.dispose([inputIds, labels]);
    stored.dispose();
    widened.dispose();
  });

  it('saveHFCheckpoint writes BF16 back exactly; mergeAdapter re-packs; model.save keeps the packed storage', async () => {
    const model = await loadHFCheckpoint(dir16, { denseDtype: 'stored' });
    const out = await tempDir('dense-save-');
    await saveHFCheckpoint(model, out);
    const [original, saved] = await Promise.all([dir16, out].map(d => readSafetensorsFile(join(d, 'model.safetensors'))));
    for (const name of denseStorageTensorNames(config)) {
      expect(saved.info(name).dtype, name).to.equal('BF16');
      expect(Array.from(await saved.halfBits(name)), name).to.deep.equal(Array.from(await original.halfBits(name)));
    }

    const tfjsDir = await tempDir('dense-tfjs-');
    await model.save(fileIO(tfjsDir));
    const { model: back } = await loadModelDir(tfjsDir);
    expect(attentionLayers(back)[0].denseStorage).to.equal('bf16');
    expect(embeddingOf(back).denseStorage).to.equal('bf16');
    back.weights.forEach(w => expect(Array.from(w.read().dataSync()), w.originalName)
        .to.deep.equal(Array.from(model.weights.find(v => v.originalName === w.originalName)!.read().dataSync())));
    back.dispose();

    const layer = attentionLayers(model)[0];
    layer.lora.add({ name: 'a', modules: { o_proj: { r: 2, alpha: 4 } } }, 'random');
    const o = layer.weights.find(w => w.originalName.endsWith('o_proj.weight'))!;
    const expected = tf.tidy(() => packDenseWeight(tf.add(variableFloat32(o), layer.lora.deltaWeight('a', 'o_proj')) as tf.Tensor2D, 'bf16').packed);
    const tensors = tf.memory().numTensors;
    layer.lora.merge('a');
    expect(tf.memory().numTensors).to.equal(tensors);
    expect(o.dtype).to.equal('int32');
    expect(Array.from(o.read().dataSync())).to.deep.equal(Array.from(expected.dataSync()));
    expected.dispose();
    model.dispose();
  });

  it("an F32 checkpoint stays float32 with 'stored'; a bad denseDtype or denseStorage is refused by name", async () => {
    const model = await loadHFCheckpoint(dir32, { denseDtype: 'stored' });
    expect(model.weights.every(w => w.dtype === 'float32')).to.equal(true);
    expect(attentionLayers(model)[0].denseStorage).to.equal('float32');
    model.dispose();
    await loadHFCheckpoint(dir16, { denseDtype: 'bf16' as 'stored' }).then(() => expect.fail('no error'), (e: Error) => {
      expect(e).to.be.instanceOf(CheckpointError);
      expect(e.message).to.match(/`loadHFCheckpoint\(\)`: 'denseDtype' must be one of 'stored', 'float32' but got "bf16"/);
    });
    expect(() => new RotaryAttention({ numHeads: 2, numKeyValueHeads: 2, headDim: 4, ropeTheta: 1e4, denseStorage: 'fp8' as 'bf16' }))
        .to.throw(/RotaryAttention.*'denseStorage' must be one of 'float32', 'bf16', 'f16' but got 'fp8'/);
    expect(() => new TokenEmbedding({ vocabSize: 4, hiddenSize: 2, denseStorage: 'int8' as 'bf16' }))
        .to.throw(/TokenEmbedding.*'denseStorage' must be one of 'float32', 'bf16', 'f16' but got 'int8'/);
    expect(() => estimateLoadMemory(config, { denseStorage: 'int4' as 'bf16' }))
        .to.throw(/estimateLoadMemory.*'options.denseStorage' must be one of 'float32', 'bf16', 'f16' but got "int4"/);
  });
});
