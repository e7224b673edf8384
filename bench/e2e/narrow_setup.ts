/**
 * What the narrow-model measurements on Mesa (profile_narrow.ts, memory_narrow.ts) share: their
 * `--name value` flags, the webgpu backend through Dawn with the package's kernels, and their
 * inputs (a short text, narrow OLMoE-shaped random checkpoints).
 */
import * as tf from '@tensorflow/tfjs-core';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { registerMoEKernels } from '../../src/backends/register_all_kernels.js';
import { setupDawnWebGPU } from '../../src/backends/webgpu/dawn.js';
import { narrowOlmoeConfig, writeRandomBF16Checkpoint } from '../../src/bench/load_bench.js';

/** `--name value` from the command line, or `fallback` where absent. */
export function commandLineFlag(name: string, fallback: string): string {
  const args = process.argv.slice(2);
  const i = args.indexOf(`--${name}`);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
}

/** Dawn's webgpu (f32 kernels, no tensor cores) as tfjs's backend, the package's kernels registered. */
export async function setUpNarrowWebGPU(): Promise<void> {
  await setupDawnWebGPU({ tensorCores: 'off' });
  if (!(await tf.setBackend('webgpu'))) throw new Error('webgpu could not be set up');
  registerMoEKernels('webgpu');
}

/** A two-line jsonl training text in `dir`; returns its path. */
export async function writeNarrowData(dir: string): Promise<string> {
  const data = join(dir, 'data.jsonl');
  await writeFile(data, ['Experts are chosen per token by a router.', 'LoRA trains two small factors beside each frozen weight.']
      .map(text => JSON.stringify({ text })).join('\n') + '\n');
  return data;
}

/** A random bf16 checkpoint of load_bench's narrowOlmoeConfig with `layers` layers in `dir`/ckpt-LAYERS; returns its folder. */
export async function writeNarrowCheckpoint(dir: string, layers: number): Promise<string> {
  const model = join(dir, `ckpt-${layers}`);
  await mkdir(model);
  await writeRandomBF16Checkpoint(model, narrowOlmoeConfig(layers), { seed: 1 });
  return model;
}
