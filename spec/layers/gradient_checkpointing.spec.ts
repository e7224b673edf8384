/**
 * Gradient checkpointing (setGradientCheckpointing): on fixture models with LoRA on the experts,
 * the router and attention, a training pass's loss and every trainable's gradient are the plain
 * pass's bit for bit (the same kernels run on the same inputs, dropout seeded, packed rows); frozen
 * weights get no gradient; nothing leaks; and the step's peak memory no longer grows by a
 * layer's activations per decoder layer.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { gradientCheckpointingEnabled, setGradientCheckpointing } from '../../src/layers/gradient_checkpointing.js';
import { buildMoECausalLM, trainableVariables } from '../../src/layers/moe_causal_lm.js';
import { estimateTrainingMemory } from '../../src/models/memory.js';
import { withSequenceContext } from '../../src/layers/sequence_context.js';
import type { HFConfig } from '../../src/models/families.js';
import { register } from '../../src/plugin.js';
import { batchLoss, IGNORE_INDEX, type TrainingBatch } from '../../src/train/loss.js';
import { fixtureDir } from '../io/checkpoint_helpers.js';
import { Rng } from '../helpers/numeric.js';

/** OLMoE's layer (full attention, 8 experts top-2) at a size a spec builds in a moment */
const OLMOE_SHAPE: HFConfig = {
  model_type: 'olmoe', vocab_size: 32, hidden_size: 64, intermediate_size: 32, num_attention_heads: 4,
  num_key_value_heads: 4, num_experts: 8, num_experts_per_tok: 2, rms_norm_eps: 1e-5,
};

const TARGETS = ['experts.gate_up', 'experts.down', 'router', 'q_proj', 'k_proj', 'v_proj', 'o_proj'];

/** Two rows, the second packed with two samples (segment and position ids), a padded tail, some ignored labels. */
function packedBatch(vocab: number, seq: number): TrainingBatch {
  const rng = new Rng(29);
  const ids = Array.from({ length: 2 * seq }, () => rng.int(vocab));
  const labels = ids.map((id, i) => (i % 5 === 3 ? IGNORE_INDEX : (id + 1) % vocab));
  const half = seq / 2;
  const segments = [...Array(seq).fill(1), ...Array.from({ length: seq }, (_, t) => (t < half ? 1 : t < seq - 2 ? 2 : 0))];
  const positions = [...Array.from({ length: seq }, (_, t) => t), ...Array.from({ length: seq }, (_, t) => (t < half ? t : t - half))];
  for (let t = seq - 2; t < seq; t++) labels[seq + t] = IGNORE_INDEX;
  return {
    inputIds: tf.tensor2d(ids, [2, seq], 'int32'), labels: tf.tensor2d(labels, [2, seq], 'int32'),
    segmentIds: tf.tensor2d(segments, [2, seq], 'int32'), positionIds: tf.tensor2d(positions, [2, seq], 'int32'),
    targetCount: labels.filter(l => l !== IGNORE_INDEX).length,
  };
}

/** The loss and every trainable's gradient of one training pass, as bytes. */
function lossAndGrads(model: tfl.LayersModel, batch: TrainingBatch, dropoutSeed: number) {
  const vars = trainableVariables(model);
  const { value, grads } = tf.variableGrads(() => batchLoss(model, batch, { dropoutSeed }), vars);
  const bytes = (t: tf.Tensor) => Buffer.from((t.dataSync() as Float32Array).slice().buffer);
  const out = { loss: bytes(value), grads: new Map(vars.map(v => [v.name, bytes(grads[v.name])])) };
  tf.dispose([value, ...Object.values(grads)]);
  return out;
}

describe('layers: gradient checkpointing', () => {
  // olmoe with LoRA dropout (seeded: the recomputed layer draws the masks again), qwen3_moe's grouped KV
  // heads and q/k norms, deepseek_v3's MLA (no LoRA there yet) and dense first layer, qwen3_next's GatedDeltaNet
  const cases = [
    ['olmoe', 0.1, TARGETS], ['qwen3_moe', 0, TARGETS], ['deepseek_v3', 0, ['experts.gate_up', 'experts.down', 'router', 'gate_proj', 'up_proj', 'down_proj']],
    ['qwen3_next', 0, TARGETS],
  ] as const;
  for (const [arch, dropout, targets] of cases) {
    it(`${arch}: the loss and every LoRA gradient (experts, router, attention${dropout ? ', dropout' : ''}) equal the plain pass's bit for bit`, async () => {
      const model = await loadHFCheckpoint(fixtureDir(arch), { expertKernel: 'fused' });
      const handle = register({ models: [model], lora: { r: 4, alpha: 8, dropout, targets: [...targets] } });
      const vocab = model.outputs[0].shape[2] as number;
      const batch = packedBatch(vocab, 8);
      try {
        // B starts at 0 (PEFT): move every factor off its init so each gradient is non-trivial
        const rng = new Rng(5);
        for (const v of trainableVariables(model)) v.assign(tf.tidy(() => tf.add(v, tf.mul(tf.randomNormal(v.shape, 0, 1, 'float32', rng.int(1e6)), 0.05))));
        const plain = lossAndGrads(model, batch, 7);
        setGradientCheckpointing(model, true);
        expect(gradientCheckpointingEnabled(model)).to.equal(true);
        const before = tf.memory().numTensors;
        const checkpointed = lossAndGrads(model, batch, 7);
        expect(tf.memory().numTensors, 'tensors left by a checkpointed step').to.equal(before);
        expect(checkpointed.loss.equals(plain.loss), 'loss').to.equal(true);
        expect(plain.grads.size).to.be.above(0);
        for (const [name, grad] of plain.grads) {
          expect(grad.some(b => b !== 0), `${name}: a non-zero gradient`).to.equal(true);
          expect(checkpointed.grads.get(name)!.equals(grad), `${name}: the same gradient`).to.equal(true);
        }
        // a frozen base weight is no input of the layer ops: no gradient reaches it
        // (the embedding and the head are outside the checkpointed layers: plain autodiff reaches them as before)
        const decoderFrozen = model.weights.filter(w => !w.trainable && w.name.startsWith('model.layers.'));
        const frozen = decoderFrozen.map(w => w.read());
        const { value, grads } = withSequenceContext({ training: true }, () =>
          tf.engine().gradients(() => batchLoss(model, batch), frozen, undefined, true));
        expect(frozen.length).to.be.above(0);
        const reached = decoderFrozen.filter((_, i) => grads[i] !== undefined).map(w => w.name);
        expect(reached, 'frozen decoder-layer weights that got a gradient').to.deep.equal([]);
        value.dispose();
        setGradientCheckpointing(model, false);
        expect(gradientCheckpointingEnabled(model)).to.equal(false);
        expect(Object.hasOwn(model, 'call'), 'the plain call is back').to.equal(false);
      } finally {
        tf.dispose(Object.values(batch).filter(t => t instanceof tf.Tensor));
        handle.unregister();
        model.dispose();
      }
    });
  }

  it("the step's peak memory grows per decoder layer by the layer's LoRA gradients and one [B, S, H] tensor, not its activations", async () => {
    const [B, S, H] = [2, 32, 64];
    /** bytes above what was allocated before, at the peak of one training pass of a model with `layers` layers */
    const peak = async (layers: number, checkpointing: boolean) => {
      const model = buildMoECausalLM({ ...OLMOE_SHAPE, num_hidden_layers: layers }, { expertKernel: 'fused' });
      const handle = register({ models: [model], lora: { r: 4, alpha: 8, targets: TARGETS } });
      const batch = packedBatch(32, S);
      try {
        setGradientCheckpointing(model, checkpointing);
        const vars = trainableVariables(model);
        const before = tf.memory().numBytes;
        let step: { value: tf.Scalar; grads: tf.NamedTensorMap } | null = null;
        const info = await tf.profile(() => { step = tf.variableGrads(() => batchLoss(model, batch), vars); });
        tf.dispose([step!.value, ...Object.values(step!.grads)]);
        const estimate = estimateTrainingMemory(model, { batch: B, seq: S, gradientCheckpointing: checkpointing });
        return { bytes: info.peakBytes - before, loraBytes: vars.reduce((s, v) => s + 4 * v.size, 0), estimate };
      } finally {
        tf.dispose(Object.values(batch).filter(t => t instanceof tf.Tensor));
        handle.unregister();
        model.dispose();
      }
    };
    const [plain2, plain3, ckpt2, ckpt3] = [await peak(2, false), await peak(3, false), await peak(2, true), await peak(3, true)];
    const plainSlope = plain3.bytes - plain2.bytes;
    const ckptSlope = ckpt3.bytes - ckpt2.bytes;
    // per layer, what a checkpointed step still holds at its peak (the end of the backward pass):
    // the layer's LoRA gradients (the result) and the gradient of its input, which tfjs's tape frees
    // only when the whole backward pass ends; the layer's input copy is freed once its backward ran
    expect(ckptSlope).to.equal(plain3.loraBytes - plain2.loraBytes + B * S * H * 4);
    // the plain step keeps every layer's activations (attention probabilities, expert rows, ...)
    expect(plainSlope, `plain ${plainSlope} B/layer vs checkpointed ${ckptSlope} B/layer`).to.be.above(10 * ckptSlope);
    expect(ckpt3.bytes).to.be.below(plain3.bytes);
    // the memory estimate (trainLoop's check before the first step) counts the same way: one layer's
    // activations (8·H + 2·heads·S per token, K·(2·I + H) per routed token) and 2·H per token per layer
    const tokens = B * S;
    const oneLayer = tokens * (8 * H + 2 * 4 * S) * 4 + tokens * 2 * (2 * 32 + H) * 4;
    // the loss: 3 chunks of logits (linearCrossEntropy), the chunk all B·S rows at V 32
    expect(ckpt3.estimate.activationBytes).to.equal(3 * tokens * 32 * 4 + oneLayer + 3 * tokens * 2 * H * 4);
    expect(ckpt3.estimate.activationBytes).to.be.below(plain3.estimate.activationBytes);
  });
});
