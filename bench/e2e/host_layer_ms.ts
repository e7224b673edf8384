/**
 * The host's milliseconds per decoder layer of a LoRA training step (issue 15: on the H100 the host
 * records a step about as long as the GPU runs it), measured where the GPU's part is negligible: a
 * tiny OLMoE-shaped model (kernel_sites.ts's: hidden 64, 8 experts) with 1 and `--layers` layers,
 * LoRA on E2E_LORA_TARGETS, on webgpu with no submit before the loss read (as step_profile.ts's
 * recordOnlyMs), the two models' steps interleaved. The tfjs kernels and GPU dispatches a layer are
 * those of the real shapes (the same ops; only the sizes differ), so the JS per layer is too; Mesa's
 * Dawn calls are not the H100's. Prints one JSON line: per phase the median wall and CPU ms
 * (process.cpuUsage: steadier on a shared host) per layer, (L-layer minus 1-layer) / (L − 1), and the
 * losses of both models' steps (they must not change with a host-side change).
 *   EGL_PLATFORM=surfaceless npx tsx bench/e2e/host_layer_ms.ts [--layers 3] [--steps 15] [--cpu-profile FILE]
 * --cpu-profile FILE: the L-layer model's recorded steps under V8's sampler, summarized (cpu_profile.ts) into FILE.
 * --uniform-arena off: tfjs-webgpu's own uniform buffers (UNIFORM_ARENA_FLAG false), the comparison in one checkout.
 * --bind-group-cache off: a bind group created per dispatch, tfjs's pool order (BIND_GROUP_CACHE_FLAG false), likewise.
 * --tf-flags 'NAME=VALUE,...': tf.env() flags set after the ones above (bench/tf_flags.ts), e.g.
 * WEBGPU_MOE_WEIGHT_GRAD_PAIRS=false for the LoRA factors' gradients apart.
 * --native-timing on: the recorded steps' native WebGPU calls timed (native_timing.ts) into the line's nativeCalls
 * (calls and ms over all of them), and bindGroupsMade, the bind groups the cache made in them (the rest of
 * device.createBindGroup's calls were answered from it); the wrappers cost a little, so not with the timings quoted.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { writeFile } from 'node:fs/promises';
import { E2E_LORA_TARGETS } from './ours.js';
import { STEP_PHASES, type StepPhase, trainingStep } from './step_profile.js';
import { summarizeCpuProfile, withCpuProfile } from './cpu_profile.js';
import { SUBMIT_FLOPS_FLAG } from '../../src/backends/webgpu/kernels.js';
import { UNIFORM_ARENA_FLAG } from '../../src/backends/webgpu/uniform_arena.js';
import { BIND_GROUP_CACHE_FLAG, bindGroupCacheCounts } from '../../src/backends/webgpu/bind_groups.js';
import { withNativeTiming, type NativeCallTimes } from './native_timing.js';
import { buildMoECausalLM, trainableVariables } from '../../src/layers/moe_causal_lm.js';
import { narrowOlmoeConfig } from '../../src/bench/load_bench.js';
import { register } from '../../src/plugin.js';
import { nextTokenLoss } from '../../src/train/loss.js';
import { Adam } from '../../src/train/optimizer.js';
import { seedAdapterInit, seedModelInit } from '../../src/train/seeded_init.js';
import { commandLineFlag, setUpNarrowWebGPU } from './narrow_setup.js';
import { parseTfFlags, setTfFlags } from '../tf_flags.js';

await setUpNarrowWebGPU();
const layers = Number(commandLineFlag('layers', '3'));
const steps = Number(commandLineFlag('steps', '15'));
const cpuProfileFile = commandLineFlag('cpu-profile', '');

tf.env().set('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE', Number.MAX_SAFE_INTEGER);
tf.env().set(SUBMIT_FLOPS_FLAG, Infinity);
tf.env().set(UNIFORM_ARENA_FLAG, commandLineFlag('uniform-arena', 'on') !== 'off');
tf.env().set(BIND_GROUP_CACHE_FLAG, commandLineFlag('bind-group-cache', 'on') !== 'off');
const tfFlags = commandLineFlag('tf-flags', '');
if (tfFlags !== '') setTfFlags(parseTfFlags(tfFlags));

async function tinyModel(n: number) {
  const cfg = { ...narrowOlmoeConfig(n), hidden_size: 64, intermediate_size: 32, moe_intermediate_size: 32, num_experts: 8, vocab_size: 50, num_attention_heads: 4, num_key_value_heads: 4 };
  const model = buildMoECausalLM(cfg);
  await seedModelInit(model, 1, 0.02);
  const handle = register({ models: [model], lora: { r: 2, alpha: 4, targets: [...E2E_LORA_TARGETS] } });
  seedAdapterInit(model, 'default', 2);  // seeded, so the losses compare between runs and builds
  const variables = trainableVariables(model);
  const adam = new Adam(variables);
  return { model, handle, variables, adam };
}

const ids = tf.tensor2d(Int32Array.from({ length: 16 }, (_, i) => (i * 7) % 50), [1, 16], 'int32');
const models = [await tinyModel(1), await tinyModel(layers)];
const cpuNow = () => { const { user, system } = process.cpuUsage(); return (user + system) / 1000; };
const samples = models.map(() => ({
  wall: Object.fromEntries(STEP_PHASES.map(p => [p, [] as number[]])) as Record<StepPhase, number[]>,
  cpu: Object.fromEntries(STEP_PHASES.map(p => [p, [] as number[]])) as Record<StepPhase, number[]>,
  losses: [] as number[],
}));
const step = async (i: number, record: boolean) => {
  const m = models[i];
  let wall = performance.now();
  let cpu = cpuNow();
  const loss = await trainingStep({ loss: () => nextTokenLoss(m.model, ids), variables: m.variables, apply: g => m.adam.apply(g, 1e-3) }, phase => {
    const w = performance.now();
    const c = cpuNow();
    if (record) {
      samples[i].wall[phase].push(w - wall);
      samples[i].cpu[phase].push(c - cpu);
    }
    wall = w;
    cpu = c;
  });
  samples[i].losses.push(loss);
};
for (let s = 0; s < 3; s++) for (let i = 0; i < 2; i++) await step(i, false);  // warm-up: pipelines, JIT
const recordSteps = async () => { for (let s = 0; s < steps; s++) for (let i = 0; i < 2; i++) await step(i, true); };
let nativeCalls: NativeCallTimes | undefined;
let bindGroupsMade: number | undefined;
const run = commandLineFlag('native-timing', 'off') !== 'on' ? recordSteps : async () => {
  const backend = tf.backend() as unknown as { device: GPUDevice; queue: GPUQueue };
  const before = bindGroupCacheCounts(backend).made;
  nativeCalls = (await withNativeTiming(backend, recordSteps)).calls;
  bindGroupsMade = bindGroupCacheCounts(backend).made - before;
};
if (cpuProfileFile) {
  const { profile } = await withCpuProfile(run);
  await writeFile(cpuProfileFile, JSON.stringify(summarizeCpuProfile(profile, 80), null, 1));
} else {
  await run();
}
const median = (xs: number[]) => { const s = [...xs].sort((a, b) => a - b); return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };
const perLayer = (kind: 'wall' | 'cpu') => Object.fromEntries(STEP_PHASES.filter(p => p !== 'lossRead').map(p =>
  [p, Math.round(1000 * (median(samples[1][kind][p]) - median(samples[0][kind][p])) / (layers - 1)) / 1000]));
const medians = (kind: 'wall' | 'cpu') => samples.map(s => Object.fromEntries(STEP_PHASES.map(p => [p, Math.round(1000 * median(s[kind][p])) / 1000])));
process.stdout.write(`${JSON.stringify({ layers, steps, perLayerCpuMs: perLayer('cpu'), perLayerWallMs: perLayer('wall'), cpuMs: medians('cpu'), wallMs: medians('wall'), nativeCalls, bindGroupsMade,
  losses: samples.map(s => s.losses) })}\n`);
for (const m of models) { m.handle.unregister(); m.model.dispose(); m.adam.dispose(); }
ids.dispose();
process.exit(0);
