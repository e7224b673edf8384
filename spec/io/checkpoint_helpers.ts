/** Test helpers: fixture paths and temporary, edited copies of fixture checkpoints and adapters. */
import * as tf from '@tensorflow/tfjs-core';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readSafetensorsFile, writeSafetensorsFile, type SafetensorsFile } from '../../src/io/safetensors.js';
import type { HFConfig } from '../../src/models/families.js';

export const WHOLE_ARCHS = [
  'mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'gpt_oss', 'glm4_moe', 'deepseek_v3',
  'ernie4_5_moe', 'hunyuan_v1_moe', 'minimax_m2',
] as const;
export type WholeArch = typeof WHOLE_ARCHS[number];

export const fixtureDir = (arch: string) => `spec/fixtures/hf/${arch}`;

export async function fixtureConfig(arch: string): Promise<HFConfig> {
  return JSON.parse(await readFile(join(fixtureDir(arch), 'config.json'), 'utf8')) as HFConfig;
}

export function golden(arch: string): Promise<SafetensorsFile> {
  return readSafetensorsFile(join(fixtureDir(arch), 'golden.safetensors'));
}

/** Every tensor of a safetensors file as new tensors (the caller disposes them). */
export async function readAll(path: string): Promise<Record<string, tf.Tensor>> {
  const file = await readSafetensorsFile(path);
  const all: Record<string, tf.Tensor> = {};
  for (const n of file.names()) all[n] = await file.tensor(n);
  return all;
}

/** A fresh temporary folder; `cleanup()` removes every folder made so far. */
const made: string[] = [];
export async function tempDir(prefix = 'moe-lora-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  made.push(dir);
  return dir;
}
export async function cleanup(): Promise<void> {
  while (made.length > 0) await rm(made.pop()!, { recursive: true, force: true });
}

/** Writes config.json + model.safetensors (or, with `shards`, sharded files and the index). */
export async function writeCheckpoint(
    dir: string, config: HFConfig, tensors: Record<string, tf.Tensor>, shards = 1): Promise<void> {
  await writeFile(join(dir, 'config.json'), JSON.stringify(config));
  if (shards === 1) {
    await writeSafetensorsFile(join(dir, 'model.safetensors'), tensors, { format: 'pt' });
    return;
  }
  const names = Object.keys(tensors).sort();
  const weightMap: Record<string, string> = {};
  for (let s = 0; s < shards; s++) {
    const file = `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`;
    const part = names.filter((_, i) => i % shards === s);
    part.forEach(n => { weightMap[n] = file; });
    await writeSafetensorsFile(join(dir, file), Object.fromEntries(part.map(n => [n, tensors[n]])), { format: 'pt' });
  }
  await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
}
