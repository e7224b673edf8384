/**
 * Which line of src/ runs each tfjs kernel of one decoder layer's LoRA training step (issue 15: what
 * to fuse next): a small OLMoE-shaped model (narrowOlmoeConfig, narrower still) with LoRA on
 * E2E_LORA_TARGETS, one step with 1 layer and one with 2; prints per phase and call site (the two
 * innermost src/ frames outside src/backends/) the kernels the second layer added. On webgpu (Dawn,
 * as narrow_setup's setUpNarrowWebGPU sets it up: the MoE block takes its own path there) it counts
 * GPU programs instead, keyed by program class and the outermost tfjs kernel that dispatched it, since
 * some kernels run as no program (Reshape, Identity) and some as several.
 * --kernels on (webgpu): the tfjs kernels by call site too, as elsewhere (where the Identity and Reshape
 * kernels of issue 15's host time come from: a customGrad's save clones each tensor it keeps).
 * --shapes on (webgpu): each program's input shapes → output shape too (which product a matMul call is).
 * --tf-flags 'NAME=VALUE,...': tf.env() flags (bench/tf_flags.ts), e.g. WEBGPU_MOE_F32_LORA_TAIL=true
 *   npx tsx bench/e2e/kernel_sites.ts [--backend cpu|wasm|webgpu] [--kernels on] [--shapes on] [--tf-flags ...]
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs-backend-wasm';
import { E2E_LORA_TARGETS } from './ours.js';
import { trainingStep } from './step_profile.js';
import { buildMoECausalLM, trainableVariables } from '../../src/layers/moe_causal_lm.js';
import { narrowOlmoeConfig } from '../../src/bench/load_bench.js';
import { register } from '../../src/plugin.js';
import { nextTokenLoss } from '../../src/train/loss.js';
import { Adam } from '../../src/train/optimizer.js';
import { commandLineFlag, setUpNarrowWebGPU } from './narrow_setup.js';
import { ownDispatchListeners } from '../../src/backends/webgpu/own_dispatch.js';
import { parseTfFlags, setTfFlags } from '../tf_flags.js';

const backendName = commandLineFlag('backend', 'cpu');
const countKernels = backendName !== 'webgpu' || commandLineFlag('kernels', 'off') === 'on';
const withShapes = commandLineFlag('shapes', 'off') === 'on';
if (backendName === 'webgpu') await setUpNarrowWebGPU();
else await tf.setBackend(backendName);
const tfFlags = commandLineFlag('tf-flags', '');
if (tfFlags !== '') setTfFlags(parseTfFlags(tfFlags));
Error.stackTraceLimit = 60;  // a program is dispatched ~20 frames below the src/ call that ran it
const SRC = `${new URL('../../src/', import.meta.url).pathname}`;
/** the two innermost src/ frames of the current stack, outside the backends' kernels where there are such */
const callSite = () => {
  const frames = new Error().stack!.split('\n').slice(3).filter(l => l.includes(SRC));
  const outside = frames.filter(l => !l.includes(`${SRC}backends/`));
  return (outside.length > 0 ? outside : frames).slice(0, 2).map(l => l.slice(l.indexOf(SRC) + SRC.length - 4).replace(/\)$/, '')).join(' < ');
};
/** kernel counts by 'phase name @ call site' of the second of two steps with `layers` layers */
async function count(layers: number): Promise<Map<string, number>> {
  const cfg = { ...narrowOlmoeConfig(layers), hidden_size: 64, intermediate_size: 32, moe_intermediate_size: 32, num_experts: 8, vocab_size: 50, num_attention_heads: 4, num_key_value_heads: 4 };
  const model = buildMoECausalLM(cfg);
  const handle = register({ models: [model], lora: { r: 2, alpha: 4, targets: [...E2E_LORA_TARGETS] } });
  const variables = trainableVariables(model);
  const adam = new Adam(variables);
  const ids = tf.tensor2d(Int32Array.from({ length: 16 }, (_, i) => i % 50), [1, 16], 'int32');
  await trainingStep({ loss: () => nextTokenLoss(model, ids), variables, apply: g => adam.apply(g, 1e-3) });
  const counts = new Map<string, number>();
  const engine = tf.engine();
  const orig = engine.runKernel.bind(engine);
  let phase = 'forward';
  const add = (key: string) => counts.set(key, (counts.get(key) ?? 0) + 1);
  const kernels: string[] = [];  // the kernels running now, outermost first
  // backward runs tfjs's gradients from the tape, below no src/ frame: name them by the forward kernel
  let gradientOf = '';
  const gradients = new Map<string, { gradFunc: (...args: unknown[]) => unknown }>();
  const wrapGradient = (name: string) => {
    const config = tf.getGradient(name) as unknown as { gradFunc: (...args: unknown[]) => unknown } | undefined;
    if (config === undefined || gradients.has(name)) return;
    const gradFunc = config.gradFunc;
    gradients.set(name, { gradFunc });
    config.gradFunc = (...args: unknown[]) => {
      const grads = gradFunc(...args) as Record<string, () => unknown>;
      return Object.fromEntries(Object.entries(grads).map(([input, grad]) => [input, () => {
        gradientOf = `grad of ${name}`;
        try {
          return grad();
        } finally {
          gradientOf = '';
        }
      }]));
    };
  };
  engine.runKernel = (name: string, inputs: tf.NamedTensorMap, attrs?: tf.NamedAttrMap) => {
    if (phase === 'forward') wrapGradient(name);
    if (countKernels) add(`${phase} ${name} @ ${callSite() || gradientOf}`);
    kernels.push(name);
    try {
      return orig(name, inputs, attrs);
    } finally {
      kernels.pop();
    }
  };
  const backend = tf.backend() as unknown as { runWebGPUProgram?: (...args: unknown[]) => unknown };
  const runProgram = backend.runWebGPUProgram;
  if (runProgram !== undefined) {
    backend.runWebGPUProgram = function (this: unknown, ...args: unknown[]) {
      const program = args[0] as { outputShape: number[] };
      const shapes = withShapes ? ` [${(args[1] as tf.TensorInfo[]).map(t => t.shape.join('x')).join(', ')} -> ${program.outputShape.join('x')}]` : '';
      add(`${phase} ${program.constructor.name}${shapes} (${kernels[0] ?? '-'}) @ ${callSite() || gradientOf || (phase === 'backward' ? 'the tape (gradients summed)' : '')}`);
      return runProgram.apply(this, args);
    };
  }
  // own pipelines (the weight gradients' pair sums, the grouped Adam) dispatch outside runWebGPUProgram
  const ownDispatch = (program: string) => add(`${phase} ${program} (${kernels[0] ?? '-'}) @ ${callSite() || gradientOf}`);
  ownDispatchListeners.add(ownDispatch);
  await trainingStep({ loss: () => nextTokenLoss(model, ids), variables, apply: g => adam.apply(g, 1e-3) }, p => { phase = p === 'forward' ? 'backward' : p === 'backward' ? 'optimizer' : 'read'; });
  ownDispatchListeners.delete(ownDispatch);
  engine.runKernel = orig;
  for (const [name, { gradFunc }] of gradients) (tf.getGradient(name) as unknown as { gradFunc: unknown }).gradFunc = gradFunc;
  if (runProgram !== undefined) delete backend.runWebGPUProgram;
  handle.unregister(); model.dispose(); adam.dispose(); ids.dispose();
  return counts;
}
const one = await count(1), two = await count(2);
const keys = new Set([...one.keys(), ...two.keys()]);
const rows = [...keys].map(k => [k, (two.get(k) ?? 0) - (one.get(k) ?? 0)] as const).filter(r => r[1] !== 0).sort();
for (const [k, d] of rows) console.log(d, k);
const sum = (ph: string) => rows.filter(r => r[0].startsWith(ph)).reduce((a, r) => a + r[1], 0);
console.log('per layer: forward', sum('forward'), 'backward', sum('backward'), 'optimizer', sum('optimizer'));
