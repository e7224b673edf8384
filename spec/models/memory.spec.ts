/**
 * Know before you build: the load estimate equals the built model's weight bytes for every fixture
 * (so it cannot drift from the model), the training estimate follows its documented formula, and a
 * load or a training step that cannot fit is refused with the need and the limit in the message.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { open, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CheckpointError, loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { configTensorPlan } from '../../src/io/hf_checkpoint_core.js';
import { buildMoECausalLM, sparseMoELayers, trainableVariables } from '../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../src/models/families.js';
import {
  backendMemoryLimits, estimateLoadMemory, estimateTrainingMemory, memoryProblem, WASM_HEAP_LIMIT_BYTES,
} from '../../src/models/memory.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { register } from '../../src/plugin.js';
import { trainLoop } from '../../src/train/loop.js';
import { batchLoss } from '../../src/train/loss.js';
import { TrainError } from '../../src/train/errors.js';
import { cleanup, fixtureConfig, fixtureDir, tempDir, WHOLE_ARCHS } from '../io/checkpoint_helpers.js';
import { rejection } from '../helpers/rejection.js';

const bytesOf = (weights: ReadonlyArray<{ shape: readonly (number | null)[] }>) =>
  weights.reduce((n, w) => n + 4 * w.shape.reduce<number>((a, d) => a * d!, 1), 0);

/**
 * A checkpoint of `config` whose data are all holes: a real header (every tensor the config
 * implies, BF16) and a file truncated to its full size, so it costs no disk. Returns the folder
 * and the float32 bytes of its tensors.
 */
async function sparseCheckpoint(config: HFConfig): Promise<{ dir: string; float32Bytes: number }> {
  const dir = await tempDir();
  await writeFile(join(dir, 'config.json'), JSON.stringify(config));
  const header: Record<string, unknown> = {};
  let offset = 0;
  let elements = 0;
  for (const { name, shape } of configTensorPlan(config).all) {
    const n = shape.reduce((a, b) => a * b, 1);
    header[name] = { dtype: 'BF16', shape, data_offsets: [offset, offset + 2 * n] };
    offset += 2 * n;
    elements += n;
  }
  const json = Buffer.from(JSON.stringify(header));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.byteLength));
  const file = await open(join(dir, 'model.safetensors'), 'w');
  try {
    await file.write(Buffer.concat([length, json]), 0, 8 + json.byteLength, 0);
    await file.truncate(8 + json.byteLength + offset);
  } finally {
    await file.close();
  }
  return { dir, float32Bytes: 4 * elements };
}

describe('models/memory', () => {
  after(cleanup);

  it('estimates exactly the weight bytes of the model built from each fixture config, experts at any width', async () => {
    for (const arch of WHOLE_ARCHS) {
      const config = await fixtureConfig(arch);
      const model = buildMoECausalLM(config);
      try {
        const all = bytesOf(model.weights);
        const experts = sparseMoELayers(model).flatMap(l => [l.weightVariable('gate_up'), l.weightVariable('down')]);
        const largest = Math.max(...model.weights.map(w => bytesOf([w])));
        const f32 = estimateLoadMemory(config);
        expect(f32, arch).to.deep.include({ bytes: all, expertBytes: bytesOf(experts), otherBytes: all - bytesOf(experts) });
        expect(f32.largest.bytes, arch).to.equal(largest);
        // the peak: the weights, the largest MoE layer read beside them, and the largest other weight
        const blocks = sparseMoELayers(model);
        const inBlocks = new Set(blocks.flatMap(l => l.weights.map(w => w.originalName)));
        const largestPlain = Math.max(...model.weights.filter(w => !inBlocks.has(w.originalName)).map(w => bytesOf([w])));
        expect(f32.peakBytes, arch).to.equal(all + Math.max(...blocks.map(l => bytesOf(l.weights))) + largestPlain);
        const packed = estimateLoadMemory(config, { expertBytesPerElement: 2 });
        expect(packed.bytes, arch).to.equal(all - bytesOf(experts) / 2);
        expect(packed.expertBytes, arch).to.equal(bytesOf(experts) / 2);
        // denseStorage bf16: attention, an untied embedding and an untied head held packed, as the model built so holds them
        const dense = buildMoECausalLM(config, { denseStorage: 'bf16', initializeWeights: false });
        try {
          expect(estimateLoadMemory(config, { denseStorage: 'bf16' }).bytes, `${arch} denseStorage bf16`).to.equal(bytesOf(dense.weights));
          if (dense.layers.some(l => l.name === 'lm_head')) {
            expect(dense.getLayer('lm_head').weights[0].dtype, `${arch} lm_head`).to.equal('int32');
          }
        } finally {
          dense.dispose();
        }
      } finally {
        model.dispose();
      }
    }
    const olmoe = estimateLoadMemory(await fixtureConfig('olmoe'));
    expect(olmoe.largest).to.deep.equal({ name: 'model.layers.0.mlp.experts (gate_up, fused)', bytes: 4 * 8 * 2 * 48 * 64 });
    const bad = (() => { try { estimateLoadMemory({ model_type: 'olmoe' }, { expertBytesPerElement: 3 }); } catch (e) { return e as Error; } return null; })();
    expect(bad).to.be.instanceOf(OpArgumentError);
    expect(bad!.message).to.equal("`estimateLoadMemory()`: 'options.expertBytesPerElement' must be 1, 2 or 4 but got 3");
  });

  it('refuses on wasm a load whose weights exceed the heap, with the need and the limit, before anything is built', async () => {
    // OLMoE-1B-7B's widths with 3 layers: 4.84e9 bytes as float32, over wasm's 4 GiB heap; a sparse 2.4 GB file
    const config = {
      ...(await fixtureConfig('olmoe')), hidden_size: 2048, intermediate_size: 1024, num_experts: 64, num_experts_per_tok: 8,
      num_hidden_layers: 3, num_attention_heads: 16, num_key_value_heads: 16, vocab_size: 50304,
    };
    const { dir, float32Bytes } = await sparseCheckpoint(config);
    expect(estimateLoadMemory(config).bytes).to.equal(float32Bytes);
    expect(float32Bytes).to.be.greaterThan(WASM_HEAP_LIMIT_BYTES);
    const backend = tf.getBackend();
    const before = tf.memory().numTensors;
    await tf.setBackend('wasm');
    try {
      const used = tf.memory().numBytes;
      const e = await rejection(loadHFCheckpoint(dir, { expertDtype: 'float32' }));
      expect(e).to.be.instanceOf(CheckpointError);
      // the peak: the weights, one MoE layer's (experts 64 × 3 × 2048 × 1024 floats, router 64 × 2048) and the embedding's (50304 × 2048)
      const peak = float32Bytes + 4 * (64 * 3 * 2048 * 1024 + 64 * 2048) + 4 * 50304 * 2048;
      expect(estimateLoadMemory(config).peakBytes).to.equal(peak);
      expect(e.message).to.equal(`\`loadHFCheckpoint()\`: '${dir}': loading the weights (${float32Bytes} bytes) needs at its peak ${peak} bytes ` +
        `(${(peak / 2 ** 30).toFixed(2)} GiB) but the wasm backend holds at most 4294901760 bytes (4.00 GiB)` +
        (used > 0 ? `, of which tensors already take ${used} bytes (${(used / 2 ** 30).toFixed(2)} GiB)` : '') +
        '; use a backend with more memory (cpu, webgpu) or a smaller model');
      // kept packed (the file is bf16), the experts take half: still over the heap, with its own numbers
      const stored = estimateLoadMemory(config, { expertBytesPerElement: 2 });
      expect(stored.peakBytes).to.be.greaterThan(WASM_HEAP_LIMIT_BYTES);
      const p = await rejection(loadHFCheckpoint(dir));
      expect(p.message).to.equal(`\`loadHFCheckpoint()\`: '${dir}': loading the weights (${stored.bytes} bytes) needs at its peak ` +
        `${stored.peakBytes} bytes (${(stored.peakBytes / 2 ** 30).toFixed(2)} GiB) but the wasm backend holds at most 4294901760 bytes (4.00 GiB)` +
        (used > 0 ? `, of which tensors already take ${used} bytes (${(used / 2 ** 30).toFixed(2)} GiB)` : '') +
        '; use a backend with more memory (cpu, webgpu) or a smaller model');
      expect(tf.memory().numTensors).to.equal(before);
    } finally {
      await tf.setBackend(backend);
    }
    // cpu has no limit to check: the same need passes
    expect(memoryProblem('the weights need', estimateLoadMemory(config), 'x',
        { backend: 'cpu', totalBytes: null, usedBytes: 0, maxTensor: null })).to.equal(null);
    // what is already on the heap counts: 16-bit experts fit alone but not beside 1 GiB of tensors
    const packed = estimateLoadMemory(config, { expertBytesPerElement: 2 });
    const wasm = { backend: 'wasm', totalBytes: WASM_HEAP_LIMIT_BYTES, usedBytes: 0, maxTensor: null };
    expect(memoryProblem('the weights need', packed, 'x', wasm)).to.equal(null);
    expect(memoryProblem('the weights need', packed, 'x', { ...wasm, usedBytes: 2 ** 30 })).to.equal(
      `the weights need ${packed.bytes} bytes (${(packed.bytes / 2 ** 30).toFixed(2)} GiB) but the wasm backend holds at most ` +
      '4294901760 bytes (4.00 GiB), of which tensors already take 1073741824 bytes (1.00 GiB); use a backend with more memory (cpu, webgpu) or x');
    // webgpu: the largest single tensor against the device's buffer limits
    const webgpu = { backend: 'webgpu', totalBytes: null, usedBytes: 0, maxTensor: { bytes: 2 ** 28, limit: "the device's maxStorageBufferBindingSize" } };
    expect(memoryProblem('the weights need', packed, 'a smaller model', webgpu)).to.equal(
      `the weights need a tensor of ${64 * 2 * 1024 * 2048 * 2} bytes (0.50 GiB) (model.layers.0.mlp.experts (gate_up, fused)) but on the ` +
      "webgpu backend a tensor can be at most 268435456 bytes (0.25 GiB) (the device's maxStorageBufferBindingSize); use another backend (cpu, wasm) or a smaller model");
    expect(backendMemoryLimits()).to.deep.include({ backend, usedBytes: tf.memory().numBytes });
  });

  it('knows the quantized formats\' bytes (codes, scales, zero points) and refuses on wasm with those numbers', async () => {
    // OLMoE-1B-7B's widths with 12 layers: even with NF4 experts it does not fit wasm's heap
    const config = {
      ...(await fixtureConfig('olmoe')), hidden_size: 2048, intermediate_size: 1024, num_experts: 64, num_experts_per_tok: 8,
      num_hidden_layers: 12, num_attention_heads: 16, num_key_value_heads: 16, vocab_size: 50304,
    };
    // per expert, by the formats (src/ops/quantized.ts): gate_up [2048 out, 2048 in], down [2048 out, 1024 in]
    const perExpert = (bits: number, metaBytesPerGroup: number, group: (inputs: number) => number) =>
      [[2048, 2048], [2048, 1024]].reduce((n, [o, i]) => n + (o * i * bits) / 8 + o * Math.ceil(i / group(i)) * metaBytesPerGroup, 0);
    const expected = {
      int8: perExpert(8, 4, i => i),              // one f32 scale per output
      int4: perExpert(4, 8, () => 64),            // f32 scale and zero per 64 inputs
      nf4: perExpert(4, 4, () => 64),             // f32 absmax per 64
      mxfp4: perExpert(4, 1, () => 32),           // one e8m0 byte per 32 (4 a word)
      // a code byte per 64, an f32 nested absmax and offset per 256 groups, the 256 f32 of the map, per weight
      'nf4-dq': [[2048, 2048], [2048, 1024]].reduce((n, [o, i]) => n + (o * i) / 2 + (o * i) / 64 + 8 * (o * i) / 64 / 256 + 1024, 0),
    };
    const plain = estimateLoadMemory(config);
    for (const [kind, bytes] of Object.entries(expected)) {
      const e = estimateLoadMemory(config, { expertStorage: kind as 'nf4' });
      expect(e.expertBytes, kind).to.equal(12 * 64 * bytes);
      expect(e.otherBytes, kind).to.equal(plain.otherBytes);
    }
    expect(estimateLoadMemory(config, { expertStorage: 'bf16' }).expertBytes).to.equal(plain.expertBytes / 2);
    const { dir } = await sparseCheckpoint(config);
    const nf4 = estimateLoadMemory(config, { expertStorage: 'nf4' });
    expect(nf4.peakBytes).to.be.greaterThan(WASM_HEAP_LIMIT_BYTES);
    const backend = tf.getBackend();
    await tf.setBackend('wasm');
    try {
      const used = tf.memory().numBytes;
      const e = await rejection(loadHFCheckpoint(dir, { expertDtype: 'nf4' }));
      expect(e).to.be.instanceOf(CheckpointError);
      expect(e.message).to.equal(`\`loadHFCheckpoint()\`: '${dir}': loading the weights (${nf4.bytes} bytes) needs at its peak ` +
        `${nf4.peakBytes} bytes (${(nf4.peakBytes / 2 ** 30).toFixed(2)} GiB) but the wasm backend holds at most 4294901760 bytes (4.00 GiB)` +
        (used > 0 ? `, of which tensors already take ${used} bytes (${(used / 2 ** 30).toFixed(2)} GiB)` : '') +
        '; use a backend with more memory (cpu, webgpu) or a smaller model');
    } finally {
      await tf.setBackend(backend);
    }
    expect(() => estimateLoadMemory(config, { expertStorage: 'int3' as 'nf4' })).to.throw(
        "`estimateLoadMemory()`: 'options.expertStorage' must be one of 'float32', 'bf16', 'f16', 'int8', 'int4', 'nf4', 'nf4-dq', 'mxfp4' but got \"int3\"");
    expect(() => estimateLoadMemory(config, { expertStorage: 'nf4', expertBytesPerElement: 2 })).to.throw(
        "`estimateLoadMemory()`: give 'options.expertStorage' or 'options.expertBytesPerElement', not both");
  });

  it('the step estimate stays above the peak a training step really reaches (tf.profile), where the loss dominates', async () => {
    // a 20k vocabulary on a tiny model: the loss over [B·S, V] is most of the step, as with a real tokenizer
    const model = buildMoECausalLM({ model_type: 'qwen3_moe', vocab_size: 20000, hidden_size: 16, num_hidden_layers: 1,
      num_attention_heads: 2, num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2,
      moe_intermediate_size: 8, norm_topk_prob: true, rms_norm_eps: 1e-6, tie_word_embeddings: true });
    const [B, S] = [4, 32];
    const ids = tf.tensor2d(Array.from({ length: B * S }, (_, i) => (i * 7919) % 20000), [B, S], 'int32') as tf.Tensor2D;
    try {
      const vars = trainableVariables(model);
      const batch = { inputIds: ids, labels: ids, segmentIds: null, positionIds: null, targetCount: B * S };
      const base = tf.memory().numBytes;
      const info = await tf.profile(() => {
        const { value, grads } = tf.variableGrads(() => batchLoss(model, batch), vars);
        tf.dispose([value, ...Object.values(grads)]);
      });
      const measured = info.peakBytes - base;
      const estimate = estimateTrainingMemory(model, { batch: B, seq: S });
      // the chunk is all B·S rows here (default 64 MiB): the head's logits and one temporary, not the 6.8 logits of tokenCrossEntropy
      expect(measured, 'the loss dominates the step').to.be.above(2 * B * S * 20000 * 4);
      expect(measured, 'the loss holds no more than a few chunks').to.be.below(2.6 * B * S * 20000 * 4);
      expect(estimate.stepBytes, `estimate ${estimate.stepBytes} vs measured peak ${measured}`).to.be.at.least(measured);
      expect(estimate.stepBytes).to.be.below(1.5 * measured);
    } finally {
      ids.dispose();
      model.dispose();
    }
  });

  it('estimates a training step by its documented formula, and trainLoop refuses one that cannot fit the wasm heap', async () => {
    const config = await fixtureConfig('olmoe');  // H 64, I 48, E 8, K 2, 2 layers (both MoE), 4 heads, V 97
    const model = await loadHFCheckpoint(fixtureDir('olmoe'));
    const handle = register({ models: [model], lora: { r: 4, alpha: 8, targets: ['experts.gate_up', 'experts.down'] } });
    try {
      const [B, S] = [3, 5];
      const trainable = trainableVariables(model).reduce((n, v) => n + v.size, 0);
      expect(trainable).to.be.greaterThan(0);
      const logits = B * S * 97 * 4;  // the chunk: all B·S rows (linearCrossEntropy's default 64 MiB)
      const activations = 3 * logits + 2 * B * S * (8 * 64 + 2 * 4 * S) * 4 + 2 * B * S * 2 * (2 * 48 + 64) * 4;
      const estimate = estimateTrainingMemory(model, { batch: B, seq: S });
      expect(estimate).to.deep.include({
        weightBytes: bytesOf(model.weights), optimizerBytes: 12 * trainable, activationBytes: activations,
        stepBytes: 12 * trainable + activations, bytes: bytesOf(model.weights) + 12 * trainable + activations,
      });
      expect(config['vocab_size']).to.equal(97);
      const badBatch = (() => { try { estimateTrainingMemory(model, { batch: 0, seq: 4 }); } catch (e) { return e as Error; } return null; })();
      expect(badBatch!.message).to.equal("`estimateTrainingMemory()`: 'batch' must be >= 1 but got 0");

      // 4000 × 1000 tokens: 9.3e9 bytes of logits and their gradients alone; the logits themselves fit a tensor
      const backend = tf.getBackend();
      const before = tf.memory().numTensors;
      await tf.setBackend('wasm');
      try {
        const step = estimateTrainingMemory(model, { batch: 4000, seq: 1000 });
        const e = await rejection(trainLoop(model, new Int32Array(2000).fill(1), { steps: 1, lr: 1e-3, batch: 4000, seq: 1000, seed: 1 }));
        expect(e).to.be.instanceOf(TrainError);
        expect(e.message).to.match(new RegExp(`^a training step needs \\(gradients, Adam moments, activations; beyond the loaded weights\\) ` +
          `${step.stepBytes} bytes \\(${(step.stepBytes / 2 ** 30).toFixed(2)} GiB\\) but the wasm backend holds at most 4294901760 bytes \\(4\\.00 GiB\\)` +
          '(, of which tensors already take \\d+ bytes \\(\\d+\\.\\d\\d GiB\\))?; use a backend with more memory \\(cpu, webgpu\\) or a smaller batch or seq$'));
        expect(tf.memory().numTensors).to.equal(before);
      } finally {
        await tf.setBackend(backend);
      }
    } finally {
      handle.unregister();
      model.dispose();
    }
  });
});
