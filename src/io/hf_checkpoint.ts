/**
 * Hugging Face checkpoint import: config.json + model.safetensors (or sharded
 * model-XXXXX-of-YYYYY.safetensors with model.safetensors.index.json) into a MoECausalLM.
 * Every tensor is checked (present, expected shape, a float dtype) before any is read, and all
 * problems are reported together in one error.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { readFile, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import {
  buildMoECausalLM, decoderLayerIndex, type MoECausalLM, type MoECausalLMOptions,
} from '../layers/moe_causal_lm.js';
import { SparseMoE } from '../layers/sparse_moe.js';
import { familyOf, type HFConfig } from '../models/families.js';
import { disposeMoEBlockWeights, getWeightField, type WeightField } from '../models/weight_fields.js';
import { loadMoEBlockWeights, moeBlockTensorPlan, type BlockTensorPlan, type TensorSource } from './hf_block.js';
import { readSafetensorsFile, type SafetensorsFile } from './safetensors.js';

/** A checkpoint that does not match its config (or is not there): the message lists every problem. */
export class CheckpointError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CheckpointError';
    Object.setPrototypeOf(this, CheckpointError.prototype);
  }
}

const OP = 'loadHFCheckpoint';

function checkpointError(dir: string, problems: string[], context = ''): CheckpointError {
  return new CheckpointError(`\`${OP}()\`: '${dir}'${context}: ${problems.length} problem${problems.length > 1 ? 's' : ''}:\n  ` +
      problems.join('\n  '));
}

/** Reads tensors by name from one file or from the shards an index maps them to. */
class CheckpointSource implements TensorSource {
  constructor(private readonly fileOf: Map<string, SafetensorsFile>) {}
  names(): string[] { return [...this.fileOf.keys()]; }
  has(name: string): boolean { return this.fileOf.has(name); }
  info(name: string): { dtype: string; shape: number[] } { return this.fileOf.get(name)!.info(name); }
  tensor(name: string): tf.Tensor { return this.fileOf.get(name)!.tensor(name); }
}

async function exists(path: string): Promise<boolean> {
  return (await stat(path).catch(() => null))?.isFile() ?? false;
}

async function readJSON(path: string, what: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new CheckpointError(`\`${OP}()\`: cannot read ${what} '${path}': ${(e as Error).message}`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new CheckpointError(`\`${OP}()\`: ${what} '${path}' is not valid JSON: ${(e as Error).message}`);
  }
}

/** The single file, or the shards of model.safetensors.index.json (checked against the index). */
async function openCheckpoint(dir: string): Promise<CheckpointSource> {
  const single = join(dir, 'model.safetensors');
  const indexPath = join(dir, 'model.safetensors.index.json');
  if (await exists(single)) {
    const file = await readSafetensorsFile(single);
    return new CheckpointSource(new Map(file.names().map(n => [n, file])));
  }
  if (!(await exists(indexPath))) {
    const bin = await exists(join(dir, 'pytorch_model.bin'));
    throw new CheckpointError(`\`${OP}()\`: '${dir}' has neither model.safetensors nor model.safetensors.index.json` +
        (bin ? ' (PyTorch .bin checkpoints are not supported; save with safe_serialization=True)' : ''));
  }
  const index = await readJSON(indexPath, 'index') as { weight_map?: unknown };
  const map = index?.weight_map;
  if (map == null || typeof map !== 'object' || Array.isArray(map)) {
    throw new CheckpointError(`\`${OP}()\`: '${indexPath}' must have a 'weight_map' object {tensor name: shard file}`);
  }
  const entries = Object.entries(map as Record<string, unknown>);
  const problems: string[] = [];
  const shardNames = new Set<string>();
  for (const [name, shard] of entries) {
    if (typeof shard !== 'string' || shard !== basename(shard) || !shard.endsWith('.safetensors')) {
      problems.push(`weight_map['${name}'] must be a .safetensors file name in the same folder but is ${JSON.stringify(shard)}`);
    } else {
      shardNames.add(shard);
    }
  }
  const shards = new Map<string, SafetensorsFile>();
  for (const shard of [...shardNames].sort()) {
    const path = join(dir, shard);
    if (!(await exists(path))) {
      problems.push(`shard '${shard}' named in the index is missing`);
      continue;
    }
    shards.set(shard, await readSafetensorsFile(path));
  }
  const fileOf = new Map<string, SafetensorsFile>();
  for (const [name, shard] of entries) {
    const file = typeof shard === 'string' ? shards.get(shard) : undefined;
    if (file === undefined) continue;
    if (!file.has(name)) {
      problems.push(`the index puts '${name}' in '${shard}' but that shard does not hold it`);
      continue;
    }
    fileOf.set(name, file);
  }
  if (problems.length > 0) throw checkpointError(dir, problems);
  return new CheckpointSource(fileOf);
}

const FLOAT_DTYPES = ['F32', 'F16', 'BF16'];

interface Expected { name: string; shape: number[] }

/** The MoE block's checkpoint tensors with expected shapes. */
function planTensors(plan: BlockTensorPlan): Expected[] {
  const out: Array<Expected | undefined> = [plan.router.weight, plan.router.bias, plan.router.correctionBias];
  const ex = plan.experts;
  if (ex.kind === 'perExpert') out.push(...ex.gate, ...ex.up, ...ex.down);
  else out.push(ex.gateUp, ex.gateUpBias, ex.down, ex.downBias);
  if (plan.shared) out.push(plan.shared.gate, plan.shared.up, plan.shared.down, plan.shared.sigmoidGate);
  return out.filter((e): e is Expected => e !== undefined);
}

/** SparseMoE weight names of the fields of `MoEBlockWeights`. */
const SPARSE_MOE_WEIGHT: Readonly<Record<WeightField, string>> = {
  'router.weight': 'router_weight',
  'router.bias': 'router_bias',
  'router.correctionBias': 'correction_bias',
  'experts.gateUp': 'gate_up',
  'experts.down': 'down',
  'experts.gateUpBias': 'gate_up_bias',
  'experts.downBias': 'down_bias',
  'shared.gate': 'shared_gate',
  'shared.up': 'shared_up',
  'shared.down': 'shared_down',
  'shared.sigmoidGate': 'shared_expert_gate',
};

/** The checkpoint name of a plain layer weight: `<layer name>.<weight name>` (see moe_causal_lm.ts). */
export function hfWeightName(layer: tfl.layers.Layer, weight: tfl.LayerVariable): string {
  const scope = `${layer.name}/`;
  const short = weight.originalName.startsWith(scope) ? weight.originalName.slice(scope.length) : weight.originalName;
  return `${layer.name}.${short}`;
}

function sameShape(a: readonly number[], b: readonly (number | null)[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

export interface LoadHFCheckpointOptions extends MoECausalLMOptions {}

/**
 * Reads an HF checkpoint folder into a MoECausalLM (a functional tf.LayersModel).
 * Whole models: mixtral, qwen2_moe, qwen3_moe, olmoe; other MoE families are an error that says
 * they are block-only. Extra tensors in the checkpoint are ignored (as transformers does with
 * unexpected keys); missing, misshapen or non-float tensors are one CheckpointError listing all.
 *
 * ```js
 * const model = await loadHFCheckpoint('./Qwen3-30B-A3B', {expertKernel: 'fused'});
 * const logits = model.predict(tf.tensor2d([[1, 2, 3]], [1, 3], 'int32'));
 * ```
 */
export async function loadHFCheckpoint(dir: string, options: LoadHFCheckpointOptions = {}): Promise<MoECausalLM> {
  if (typeof dir !== 'string' || dir.length === 0) {
    throw new CheckpointError(`\`${OP}()\`: 'dir' must be a folder path but got ${JSON.stringify(dir)}`);
  }
  const config = await readJSON(join(dir, 'config.json'), 'config') as HFConfig;
  familyOf(config);  // unknown model types fail here, before any weights are read
  const source = await openCheckpoint(dir);
  const model = buildMoECausalLM(config, options);
  try {
    fillWeights(model, config, source, dir);
  } catch (e) {
    model.dispose();
    throw e;
  }
  return model;
}

function fillWeights(model: MoECausalLM, config: HFConfig, source: CheckpointSource, dir: string): void {
  const problems: string[] = [];
  const check = ({ name, shape }: Expected) => {
    if (!source.has(name)) {
      problems.push(`missing '${name}' (expected shape [${shape}])`);
      return;
    }
    const info = source.info(name);
    if (!sameShape(info.shape, shape)) problems.push(`'${name}' must have shape [${shape}] but has [${info.shape}]`);
    if (!FLOAT_DTYPES.includes(info.dtype)) {
      problems.push(`'${name}' must be a float tensor (${FLOAT_DTYPES.join(', ')}) but is ${info.dtype}`);
    }
  };
  const plain: Array<[tfl.LayerVariable, string]> = [];
  const blocks: Array<[SparseMoE, number]> = [];
  for (const layer of model.layers) {
    if (layer instanceof SparseMoE) {
      const index = decoderLayerIndex(layer.name);
      if (index === null) throw new CheckpointError(`\`${OP}()\`: cannot tell the decoder layer of '${layer.name}'`);
      planTensors(moeBlockTensorPlan(config, index)).forEach(check);
      blocks.push([layer, index]);
      continue;
    }
    for (const w of layer.weights) {
      const name = hfWeightName(layer, w);
      check({ name, shape: w.shape as number[] });
      plain.push([w, name]);
    }
  }
  if (problems.length > 0) {
    throw checkpointError(dir, problems, ` does not hold the weights its config.json ('${String(config['model_type'])}') describes`);
  }
  for (const [variable, name] of plain) {
    const t = source.tensor(name);
    try {
      variable.write(t);
    } finally {
      t.dispose();
    }
  }
  for (const [layer, index] of blocks) {
    const weights = loadMoEBlockWeights(source, config, index);
    try {
      for (const [field, weightName] of Object.entries(SPARSE_MOE_WEIGHT) as Array<[WeightField, string]>) {
        const t = getWeightField(weights, field);
        if (t !== undefined) layer.weightVariable(weightName).write(t);
      }
    } finally {
      disposeMoEBlockWeights(weights);
    }
  }
}
