/**
 * bench/e2e/step_profile.ts on webgpu, on a tiny LoRA-registered MoE model: a training step reads
 * nothing back to the host before its loss (no GPU→host sync inside forward, backward or the
 * optimizer), Adam's update is 2 programs per variable, the per-name counts add up to the phase
 * totals, and the record-only step leaves every submit to the loss read. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { E2E_LORA_TARGETS } from '../../../bench/e2e/ours.js';
import { profileTrainingStep, STEP_PHASES } from '../../../bench/e2e/step_profile.js';
import { GROUPED_ADAM_PROGRAM, groupedAdamCapacity } from '../../../src/backends/webgpu/grouped_adam.js';
import { buildMoECausalLM, trainableVariables } from '../../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../../src/models/families.js';
import { register } from '../../../src/plugin.js';
import { nextTokenLoss } from '../../../src/train/loss.js';
import { Adam } from '../../../src/train/optimizer.js';

const TINY: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: 11, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
  norm_topk_prob: true, rms_norm_eps: 1e-6,
};

describe('webgpu: the training step profile', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it('no host read inside the step, Adam in ceil(variables / K) grouped dispatches, counts that add up', async () => {
    const model = buildMoECausalLM(TINY);
    const handle = register({ models: [model], lora: { r: 2, alpha: 4, targets: [...E2E_LORA_TARGETS] } });
    const windows = tf.tensor2d([[1, 5, 2, 7, 3, 9, 4, 0, 6], [8, 2, 2, 5, 1, 10, 3, 3, 7]], [2, 9], 'int32');
    try {
      const variables = trainableVariables(model);
      const adam = new Adam(variables);
      const before = tf.memory().numTensors;
      const { profile, losses } = await profileTrainingStep({ loss: () => nextTokenLoss(model, windows), variables, apply: g => adam.apply(g, 1e-2) });
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
      adam.dispose();
      for (const phase of ['forward', 'backward', 'optimizer'] as const) {
        expect(profile.phases[phase], phase).to.include({ reads: 0, mapReads: 0 });
        expect(Object.values(profile.programCounts[phase]).reduce((a, b) => a + b, 0), `${phase} programs`).to.equal(profile.phases[phase].dispatches);
        expect(Object.values(profile.kernelCounts[phase]).reduce((a, b) => a + b, 0), `${phase} kernels`).to.equal(profile.phases[phase].kernels);
      }
      expect(profile.phases.lossRead).to.include({ reads: 1, mapReads: 1, dispatches: 0 });
      // the model's variables have buffers of their own: all in place, no MoEAdamUpdate kernel
      const groups = Math.ceil(variables.length / groupedAdamCapacity((tf.backend() as unknown as { device: GPUDevice }).device.limits));
      expect(profile.programCounts.optimizer).to.deep.equal({ [GROUPED_ADAM_PROGRAM]: groups });
      expect(profile.kernelCounts.optimizer).to.deep.equal({});
      expect(profile.phases.forward.dispatches).to.be.above(20);
      expect(profile.phases.backward.dispatches).to.be.above(profile.phases.forward.dispatches);
      expect(profile.total.dispatches).to.equal(STEP_PHASES.reduce((s, p) => s + profile.phases[p].dispatches, 0));
      expect(Object.keys(profile.recordOnlyMs!)).to.deep.equal([...STEP_PHASES]);
      // the counted step, the record-only one, and one under GPU timestamps where the adapter has them
      expect(losses).to.have.length(profile.gpuMsByProgram === null ? 2 : 3);
      losses.forEach(l => expect(l).to.be.within(0.5, 5));
      if (profile.gpuMsByProgram !== null) {
        expect(profile.gpuMs).to.be.closeTo(Object.values(profile.gpuMsByProgram).reduce((s, e) => s + e.ms, 0), 1e-9);
        expect(profile.gpuMsByProgram[GROUPED_ADAM_PROGRAM]?.count).to.equal(groups);
        // the same timestamps by site: every program accounted for once
        const sites = Object.values(profile.gpuMsBySite!);
        expect(sites.reduce((s, e) => s + e.ms, 0)).to.be.closeTo(profile.gpuMs!, 1e-6);
        expect(sites.reduce((s, e) => s + e.count, 0)).to.equal(
            Object.values(profile.gpuMsByProgram).reduce((s, e) => s + e.count, 0));
      } else {
        expect(profile.gpuMsBySite).to.equal(null);
      }
    } finally {
      windows.dispose();
      handle.unregister();
      model.dispose();
    }
  });
});
