/**
 * What the narrow-model measurements on Mesa (profile_narrow.ts, memory_narrow.ts) share: their
 * `--name value` flags, the webgpu backend through Dawn with the package's kernels, and their
 * inputs (a short text, narrow OLMoE- or Qwen3-MoE-shaped random checkpoints: `--shape`).
 */
import * as tf from '@tensorflow/tfjs-core';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { registerMoEKernels } from '../../src/backends/register_all_kernels.js';
import { setupDawnWebGPU } from '../../src/backends/webgpu/dawn.js';
import { narrowOlmoeConfig, qwen3MoeConfig, writeRandomBF16Checkpoint } from '../../src/bench/load_bench.js';
import type { HFConfig } from '../../src/models/families.js';
import {
  ATTENTION_KERNEL_FLAG, ATTENTION_KERNEL_MIN_BYTES, ATTENTION_KERNEL_MIN_BYTES_FLAG,
} from '../../src/ops/attention_core.js';

/** `--name value` from the command line, or `fallback` where absent. */
export function commandLineFlag(name: string, fallback: string): string {
  const args = process.argv.slice(2);
  const i = args.indexOf(`--${name}`);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
}

/**
 * How the narrow tools run attention (`--attention`): 'auto' as the package picks (MoEAttention
 * from MOE_ATTENTION_KERNEL_MIN_BYTES of probabilities), 'kernels' always MoEAttention, 'composed'
 * always the composed tfjs ops.
 */
export function setAttentionPath(path: string): void {
  if (!['auto', 'kernels', 'composed'].includes(path)) throw new Error(`--attention must be auto, kernels or composed but got '${path}'`);
  tf.env().set(ATTENTION_KERNEL_FLAG, path !== 'composed');
  tf.env().set(ATTENTION_KERNEL_MIN_BYTES_FLAG, path === 'kernels' ? 0 : ATTENTION_KERNEL_MIN_BYTES);
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

/**
 * Qwen3-30B-A3B's layout (qwen3MoeConfig) narrowed for Mesa, keeping what makes its MoE layers
 * differ from OLMoE's: 128 experts, top-8, few rows per expert (at seq 512, 32 on average, as at
 * the real shape), an expert intermediate 3/8 of hidden (768 of 2048), grouped KV heads (8 on 2)
 * and a separate head_dim. Hidden 512, experts of 192, vocab 32000.
 */
export function narrowQwen3Config(layers: number): HFConfig {
  return {
    ...qwen3MoeConfig(layers), hidden_size: 512, moe_intermediate_size: 192, intermediate_size: 1536,
    vocab_size: 32000, num_attention_heads: 8, num_key_value_heads: 2, head_dim: 64,
  };
}

/** The narrow shapes by `--shape` name. */
export const NARROW_SHAPES: Record<string, (layers: number) => HFConfig> = { olmoe: narrowOlmoeConfig, qwen3: narrowQwen3Config };

/** A random bf16 checkpoint of the narrow `shape` with `layers` layers in `dir`/ckpt-SHAPE-LAYERS; returns its folder. */
export async function writeNarrowCheckpoint(dir: string, layers: number, shape = 'olmoe'): Promise<string> {
  const config = NARROW_SHAPES[shape];
  if (config === undefined) throw new Error(`--shape must be one of ${Object.keys(NARROW_SHAPES).join(', ')} but got ${shape}`);
  const model = join(dir, `ckpt-${shape}-${layers}`);
  await mkdir(model);
  await writeRandomBF16Checkpoint(model, config(layers), { seed: 1 });
  return model;
}
