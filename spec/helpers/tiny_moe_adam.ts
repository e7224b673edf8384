/**
 * Four Adam steps of LoRA training on a tiny Qwen3-MoE model, the same ids every run: what the
 * webgpu Adam specs (adam_update.spec, grouped_adam.spec) compare between their paths.
 */
import * as tf from '@tensorflow/tfjs-core';
import { E2E_LORA_TARGETS } from '../../bench/e2e/ours.js';
import { StepCounter, trainingStep } from '../../bench/e2e/step_profile.js';
import { SeededRandom } from '../../src/data/random.js';
import { buildMoECausalLM, trainableVariables } from '../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../src/models/families.js';
import { register } from '../../src/plugin.js';
import { nextTokenLoss } from '../../src/train/loss.js';
import { Adam } from '../../src/train/optimizer.js';

export const TINY_MOE: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: 11, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
  norm_topk_prob: true, rms_norm_eps: 1e-6,
};

const STEPS = 4;

/** The model with LoRA registered, its trainable variables and their first values. */
export interface TinyMoETraining {
  variables: tf.Variable[];
  /**
   * Resets the variables to their first values (assign shares the clones' buffers) and trains
   * STEPS steps with a fresh Adam at lr 2e-2, counting the optimizer's programs only: the losses,
   * each variable read by `read`, and the counter.
   */
  run<P>(read: (v: tf.Variable) => Promise<P>): Promise<{ losses: number[]; params: P[]; counter: StepCounter }>;
}

/**
 * Builds TINY_MOE with LoRA on E2E_LORA_TARGETS, hands `body` the training, then unregisters and
 * disposes everything it made.
 *
 * ```js
 * await withTinyMoETraining(async ({ run }) => { const { losses } = await run(v => v.data()); });
 * ```
 */
export async function withTinyMoETraining(body: (training: TinyMoETraining) => Promise<void>): Promise<void> {
  const model = buildMoECausalLM(TINY_MOE);
  const handle = register({ models: [model], lora: { r: 2, alpha: 4, targets: [...E2E_LORA_TARGETS] } });
  const variables = trainableVariables(model);
  const initial = variables.map(v => tf.clone(v));
  try {
    const rng = new SeededRandom(3);
    const ids = Int32Array.from({ length: STEPS * 2 * 9 }, () => rng.int(TINY_MOE.vocab_size as number));
    const run = async <P>(read: (v: tf.Variable) => Promise<P>) => {
      variables.forEach((v, i) => v.assign(initial[i]));
      const adam = new Adam(variables);
      const counter = new StepCounter();
      const losses: number[] = [];
      for (let step = 0; step < STEPS; step++) {
        const windows = tf.tensor2d(ids.subarray(step * 18, (step + 1) * 18), [2, 9], 'int32');
        losses.push(await trainingStep({
          loss: () => nextTokenLoss(model, windows), variables,
          apply: grads => {
            counter.install();
            try {
              adam.apply(grads, 2e-2);
            } finally {
              counter.uninstall();
            }
          },
        }));
        windows.dispose();
      }
      adam.dispose();
      return { losses, params: await Promise.all(variables.map(read)), counter };
    };
    await body({ variables, run });
  } finally {
    tf.dispose(initial);
    handle.unregister();
    model.dispose();
  }
}
