/**
 * trainLoop's step times on webgpu for a narrow OLMoE-shaped model (load_bench's narrowOlmoeConfig at
 * hidden 256 or --hidden, 16 experts top-4), LoRA on E2E_LORA_TARGETS, gradient clipping on (maxGradNorm 1, as
 * transformers' Trainer): what a user's `tfjs-moe-lora train` step costs the host and the GPU
 * together, where bench/e2e/ours.ts times a step without clipping. Prints one JSON line: each step's
 * seconds (onStep) and the losses. On Mesa the GPU's part runs on the CPU too, so only a change of the
 * host's waits (not of the programs) compares between builds here. `--backend wasm`: the same loop on
 * tfjs-wasm (what a change to the loop's host-side work costs there), with --max-grad-norm to set or
 * turn off (`none`) the clipping.
 *   EGL_PLATFORM=surfaceless npx tsx bench/e2e/train_loop_steps.ts [--layers 2] [--steps 20] [--seq 64] [--hidden 256]
 *   npx tsx bench/e2e/train_loop_steps.ts --backend wasm --layers 16 --hidden 64 --seq 32 --steps 25
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { registerMoEKernels } from '../../src/backends/register_all_kernels.js';
import { E2E_LORA_TARGETS } from './ours.js';
import { commandLineFlag, setUpNarrowWebGPU } from './narrow_setup.js';
import { buildMoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { narrowOlmoeConfig } from '../../src/bench/load_bench.js';
import { register } from '../../src/plugin.js';
import { trainLoop } from '../../src/train/loop.js';
import { seedAdapterInit, seedModelInit } from '../../src/train/seeded_init.js';

const backend = commandLineFlag('backend', 'webgpu');
if (backend === 'wasm') {
  await import('@tensorflow/tfjs-backend-wasm');
  if (!(await tf.setBackend('wasm'))) throw new Error('the wasm backend failed to initialize');
  registerMoEKernels('wasm');
} else if (backend === 'webgpu') {
  await setUpNarrowWebGPU();
} else {
  throw new Error(`--backend: 'webgpu' or 'wasm'; got '${backend}'`);
}
const maxGradNormFlag = commandLineFlag('max-grad-norm', '1');
const maxGradNorm = maxGradNormFlag === 'none' ? null : Number(maxGradNormFlag);
const layers = Number(commandLineFlag('layers', '2'));
const steps = Number(commandLineFlag('steps', '20'));
const seq = Number(commandLineFlag('seq', '64'));
const hidden = Number(commandLineFlag('hidden', '256'));
const cfg = { ...narrowOlmoeConfig(layers), hidden_size: hidden, intermediate_size: hidden / 2, moe_intermediate_size: hidden / 2,
  num_experts: 16, num_experts_per_tok: 4, vocab_size: 1000, num_attention_heads: 4, num_key_value_heads: 4 };
const model = buildMoECausalLM(cfg);
await seedModelInit(model, 1, 0.02);
const handle = register({ models: [model], lora: { r: 8, alpha: 16, targets: [...E2E_LORA_TARGETS] } });
seedAdapterInit(model, 'default', 2);
const tokens = Int32Array.from({ length: 4096 }, (_, i) => (i * 7919) % cfg.vocab_size);
const seconds: number[] = [];
let last = 0;
const result = await trainLoop(model, tokens, {
  steps, lr: 1e-3, batch: 2, seq, seed: 1, maxGradNorm,
  onStep: report => { seconds.push(report.seconds - last); last = report.seconds; },
});
console.log(JSON.stringify({ backend, layers, steps, seq, maxGradNorm, stepSeconds: seconds.map(s => +s.toFixed(4)), losses: result.losses }));
handle.unregister();
