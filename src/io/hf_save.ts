/**
 * Hugging Face checkpoint export, the inverse of loadHFCheckpoint, as the Hub's save_pretrained
 * writes it: config.json (the HF config the model was built from, `hfConfigOf`, its `dtype` the
 * one written) and model.safetensors, or shards `model-00001-of-0000N.safetensors` with
 * model.safetensors.index.json, in the Hub layout of the model's family (src/models/families.ts);
 * each tensor in the dtype it had on disk (bf16 stays bf16); the source folder's tokenizer and
 * generation files beside them. The fused expert weights of each SparseMoE are split back into
 * per-expert tensors: gate_up [E, 2I, H] → `experts.{e}.gate_proj` (rows 0..I) and `up_proj` (rows
 * I..2I), down [E, H, I] → `experts.{e}.down_proj` (Mixtral: w1, w3, w2), so loading the folder
 * gives the same weights bit for bit.
 *
 * LoRA: an adapter merged into the base weights (SparseMoE.mergeAdapter) is saved as part of
 * them, like PEFT's merge_and_unload; an unmerged adapter is not saved here at all: save it with
 * savePeftAdapter.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { RotaryAttention } from '../layers/attention.js';
import { decoderLayerIndex, hfConfigOf } from '../layers/moe_causal_lm.js';
import { isMXFP4Config } from './mxfp4.js';
import { SparseMoE, variableExpertFloat32, variableFloat32, variableShape } from '../layers/sparse_moe.js';
import { SwiGLUMLP } from '../layers/swiglu_mlp.js';
import type { HFConfig } from '../models/families.js';
import { hfConfigText, sourceDtypeOf, sourceFolderOf } from './checkpoint_source.js';
import { moeBlockTensorPlan } from './hf_block.js';
import { CheckpointError, checkpointError, hfWeightName } from './hf_checkpoint_core.js';
import { writeArtifactFolder } from '../util/atomic.js';
import { describeValue } from '../util/describe.js';
import { confinedPath, openArtifactFolder, pathKind, readRegularFile } from '../util/files.js';
import { writeSafetensorsStream, type WritableDtype } from './safetensors.js';

const OP = 'saveHFCheckpoint';

interface Expected { name: string; shape: number[] }

const sameShape = (a: readonly number[], b: readonly number[]) =>
  a.length === b.length && a.every((d, i) => d === b[i]);

/**
 * What goes into model.safetensors: a variable as is, or one expert's row block of a fused weight.
 * `fusedName` is the name of the weight in transformers 5's model (the fused
 * `<block>.experts.gate_up_proj` for a per-expert gate or up tensor): save_pretrained orders
 * tensors by it. `part` is the part of the fused weight (gate 0, up 1): save_pretrained shards the
 * per-expert tensors of one part as one unit (all experts' gates in one shard).
 */
type Entry =
  | { kind: 'whole'; name: string; fusedName: string; variable: tfl.LayerVariable; storedShape?: number[] }
  | { kind: 'expertRows'; name: string; fusedName: string; part: number; variable: tfl.LayerVariable; expert: number;
      rowStart: number; shape: [number, number] };

/** The checkpoint entries of one SparseMoE, with a problem for every weight whose shape the config contradicts. */
function sparseMoEEntries(layer: SparseMoE, config: HFConfig, problems: string[]): Entry[] {
  const index = decoderLayerIndex(layer.name);
  if (index === null) {
    problems.push(`cannot tell the decoder layer of the MoE layer '${layer.name}' (expected a name like 'model.layers.0.mlp')`);
    return [];
  }
  const plan = moeBlockTensorPlan(config, index);
  const entries: Entry[] = [];
  const whole = (expected: Expected | undefined, weight: string) => {
    if (expected === undefined) return;
    const variable = safeVariable(layer, weight);
    if (variable === undefined) {
      problems.push(`'${layer.name}' has no weight '${weight}' for '${expected.name}'`);
      return;
    }
    // ERNIE stores its [E] correction bias as [1, E]: the same values, written in the stored shape
    const asRow = expected.shape.length === 2 && expected.shape[0] === 1 &&
        sameShape(variableShape(variable), [expected.shape[1]]);
    if (!asRow && !sameShape(variableShape(variable), expected.shape)) {
      problems.push(`'${layer.name}/${weight}' has shape [${variableShape(variable)}] but '${expected.name}' needs [${expected.shape}]`);
      return;
    }
    entries.push({ kind: 'whole', name: expected.name, fusedName: expected.name, variable, ...(asRow ? { storedShape: expected.shape } : {}) });
  };
  whole(plan.router.weight, 'router_weight');
  whole(plan.router.bias, 'router_bias');
  whole(plan.router.correctionBias, 'correction_bias');
  const ex = plan.experts;
  if (ex.kind === 'fusedInterleaved') {
    whole(ex.gateUp, 'gate_up');
    whole(ex.gateUpBias, 'gate_up_bias');
    whole(ex.down, 'down');
    whole(ex.downBias, 'down_bias');
  } else {
    // the fused [E, parts·rows, cols] weight holds expert e's parts one after the other (hf_block.ts fuseRows)
    const split = (weight: string, fusedName: string, parts: Expected[][]) => {
      const variable = safeVariable(layer, weight);
      const [rows, cols] = parts[0][0].shape;
      const want = [parts[0].length, parts.length * rows, cols];
      if (variable === undefined || !sameShape(variableShape(variable), want)) {
        problems.push(`'${layer.name}/${weight}' has shape [${variable ? variableShape(variable) : 'none'}] but the per-expert ` +
            `tensors ${parts.map(p => `'${p[0].name}'`).join(', ')}… need [${want}]`);
        return;
      }
      // transformers 5 splits a fused weight part by part, each expert by expert (all gates, then all ups)
      parts.forEach((part, p) => part.forEach((expected, e) => entries.push({
        kind: 'expertRows', name: expected.name, fusedName: `${layer.name}.experts.${fusedName}`, part: p, variable, expert: e,
        rowStart: p * rows, shape: [rows, cols],
      })));
    };
    split('gate_up', 'gate_up_proj', [ex.gate, ex.up]);
    split('down', 'down_proj', [ex.down]);
  }
  if (plan.shared) {
    whole(plan.shared.gate, 'shared_gate');
    whole(plan.shared.up, 'shared_up');
    whole(plan.shared.down, 'shared_down');
    whole(plan.shared.sigmoidGate, 'shared_expert_gate');
  }
  return entries;
}

/** The layer's weight `name`, or undefined (weightVariable throws for a missing one). */
function safeVariable(layer: SparseMoE, name: string): tfl.LayerVariable | undefined {
  try {
    return layer.weightVariable(name);
  } catch {
    return undefined;
  }
}

/** One checkpoint tensor of a model: its Hub name, shape, and how to read it. */
export interface CheckpointTensor {
  name: string;
  shape: number[];
  /**
   * The tensors save_pretrained keeps in one shard share this: one part of one fused expert weight
   * over all experts (e.g. every expert's gate_proj of a layer), else the tensor alone
   */
  shardUnit: string;
  /** the tensor's float32 values as a new tensor (the caller disposes it) */
  read(): tf.Tensor;
}

/**
 * @internal The model's checkpoint tensors in the order transformers 5's save_pretrained writes
 * them (sorted by the names of its own, fused, weights), read lazily: the one place that reads a model's weights for saving, so a save holds one
 * tensor at a time. Throws a CheckpointError when the model has no HF config or a weight does not
 * fit the config.
 */
export function hfCheckpointEntries(model: tfl.LayersModel): { config: HFConfig; tensors: CheckpointTensor[] } {
  const config = hfConfigOf(model);
  if (config === null) {
    throw new CheckpointError(`\`${OP}()\`: the model '${model?.name}' has no HF config; build it with ` +
        'buildMoECausalLM(config) or load it with loadHFCheckpoint(dir)');
  }
  const problems: string[] = [];
  const entries: Entry[] = [];
  for (const layer of model.layers) {
    if (layer instanceof SparseMoE) {
      entries.push(...sparseMoEEntries(layer, config, problems));
      continue;
    }
    for (const variable of layer.weights) {
      // adapters of attention / dense-MLP projections: saved by savePeftAdapter, or merged first
      if ((layer instanceof RotaryAttention || layer instanceof SwiGLUMLP) && layer.lora.owns(variable)) continue;
      const name = hfWeightName(layer, variable);
      entries.push({ kind: 'whole', name, fusedName: name, variable });
    }
  }
  // save_pretrained's order (its shards fill in it): by the fused names; a stable sort keeps the
  // parts and experts of one fused weight in the order transformers splits them
  entries.sort((a, b) => a.fusedName < b.fusedName ? -1 : a.fusedName > b.fusedName ? 1 : 0);
  const seen = new Set<string>();
  for (const { name } of entries) {
    if (seen.has(name)) problems.push(`two weights map to the checkpoint name '${name}'`);
    seen.add(name);
  }
  if (problems.length > 0) {
    throw checkpointError(OP, `model '${model.name}'`, problems, ` does not fit its config.json ('${String(config['model_type'])}')`);
  }
  const tensors = entries.map((entry): CheckpointTensor => {
    if (entry.kind === 'whole') {
      const stored = entry.storedShape;
      return {
        name: entry.name, shape: stored ?? variableShape(entry.variable), shardUnit: entry.name,
        read: stored === undefined ? () => variableFloat32(entry.variable) :  // packed experts decoded
          () => tf.tidy(() => tf.reshape(variableFloat32(entry.variable), stored)),
      };
    }
    const [rows, cols] = entry.shape;
    return {
      name: entry.name, shape: [rows, cols], shardUnit: `${entry.fusedName}#${entry.part}`,
      // one expert's row block: a slice, so the fused weight is never copied whole
      read: () => tf.tidy(() => tf.slice(
          variableExpertFloat32(entry.variable, entry.expert), [entry.rowStart, 0], [rows, cols])),  // [rows, cols]
    };
  });
  return { config: JSON.parse(JSON.stringify(config)) as HFConfig, tensors };
}

/**
 * The model's HF config and its weights under their Hub checkpoint names (new tensors the caller
 * disposes), as saveHFCheckpoint writes them. Throws a CheckpointError when the model has no HF
 * config or a weight does not fit the config.
 *
 * ```js
 * const {config, tensors} = hfCheckpointTensors(model);
 * Object.keys(tensors);  // ['model.embed_tokens.weight', 'model.layers.0.mlp.experts.0.gate_proj.weight', ...]
 * tf.dispose(Object.values(tensors));
 * ```
 */
export function hfCheckpointTensors(model: tfl.LayersModel): { config: HFConfig; tensors: Record<string, tf.Tensor> } {
  const { config, tensors: entries } = hfCheckpointEntries(model);
  const tensors: Record<string, tf.Tensor> = {};
  try {
    for (const entry of entries) tensors[entry.name] = entry.read();
  } catch (e) {
    tf.dispose(Object.values(tensors));
    throw e;
  }
  return { config, tensors };
}

/** The files of an HF checkpoint folder that a save replaces even when it does not write them (old shards, an old index). */
const isCheckpointFile = (name: string) =>
  name === 'config.json' || name.endsWith('.safetensors') || name === 'model.safetensors.index.json';

/**
 * The files of a Hub model folder besides config and weights that a saved checkpoint keeps from
 * its source folder: tokenizer, chat template, generation settings.
 */
export const CHECKPOINT_COMPANION_FILES = [
  'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json',
  'vocab.json', 'merges.txt', 'tokenizer.model', 'chat_template.jinja',
] as const;

/**
 * @internal The CHECKPOINT_COMPANION_FILES present in `folder` (name → bytes), each read through
 * the confinement and regular-file helpers: a link out of the folder or a FIFO by one of these
 * names is an error, not a file copied.
 */
export async function readCompanionFiles(folder: string, what: string): Promise<Record<string, Uint8Array>> {
  await openArtifactFolder(folder, what);
  const files: Record<string, Uint8Array> = {};
  for (const name of CHECKPOINT_COMPANION_FILES) {
    if (await pathKind(join(folder, name)) === 'missing') continue;
    files[name] = await readRegularFile(await confinedPath(folder, name, `${what}: '${name}'`), `${what}: '${name}'`);
  }
  return files;
}

/** The dtypes a checkpoint can be saved in: 'source' keeps each tensor's dtype on disk. */
export const HF_SAVE_DTYPES = ['source', 'float32', 'bfloat16', 'float16'] as const;
export type HFSaveDtype = typeof HF_SAVE_DTYPES[number];

const FILE_DTYPE: Readonly<Record<Exclude<HFSaveDtype, 'source'>, WritableDtype>> = {
  float32: 'F32', bfloat16: 'BF16', float16: 'F16',
};
const TORCH_DTYPE: Readonly<Record<string, string>> = { F32: 'float32', BF16: 'bfloat16', F16: 'float16' };
const BYTES: Readonly<Record<string, number>> = { F32: 4, BF16: 2, F16: 2 };

/** transformers 5.17's save_pretrained default (it was 5GB before v5). */
export const DEFAULT_MAX_SHARD_SIZE = '50GB';

const SIZE_UNITS: Readonly<Record<string, number>> = {
  KB: 1e3, MB: 1e6, GB: 1e9, TB: 1e12, KIB: 2 ** 10, MIB: 2 ** 20, GIB: 2 ** 30, TIB: 2 ** 40,
};

/**
 * A maximum shard size in bytes: a positive integer, or a string as transformers takes it
 * ('5GB' = 5·10⁹ bytes, '500MB', '2GiB' = 2·2³⁰).
 *
 * ```js
 * parseShardSize('5GB');  // 5000000000
 * ```
 */
export function parseShardSize(size: unknown): number {
  if (typeof size === 'number' && Number.isSafeInteger(size) && size > 0) return size;
  const match = typeof size === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*$/i.exec(size) : null;
  const bytes = match === null ? NaN : Math.floor(Number(match[1]) * SIZE_UNITS[match[2].toUpperCase()]);
  if (!(bytes > 0) || !Number.isSafeInteger(bytes)) {
    throw new CheckpointError(`\`${OP}()\`: 'maxShardSize' must be a positive whole number of bytes or a size like ` +
        `'5GB', '500MB' or '2GiB' but got ${describeValue(size)}`);
  }
  return bytes;
}

/**
 * Splits tensors (in order) into shards as save_pretrained does (huggingface_hub's
 * split_state_dict_into_shards, on transformers 5's fused weights): the tensors of one shardUnit
 * stay together; a unit that would take the current shard over `maxBytes` starts a new one, and a
 * unit larger than `maxBytes` gets a shard of its own at once.
 */
function planShards<T extends { bytes: number; shardUnit: string }>(tensors: T[], maxBytes: number): T[][] {
  const units: T[][] = [];
  for (const t of tensors) {
    const last = units[units.length - 1];
    if (last !== undefined && last[0].shardUnit === t.shardUnit) last.push(t);
    else units.push([t]);
  }
  const shards: T[][] = [];
  let current: T[] = [];
  let size = 0;
  for (const unit of units) {
    const bytes = unit.reduce((sum, t) => sum + t.bytes, 0);
    if (bytes > maxBytes) {
      shards.push(unit);
      continue;
    }
    if (size + bytes > maxBytes) {
      shards.push(current);
      current = [];
      size = 0;
    }
    current.push(...unit);
    size += bytes;
  }
  if (current.length > 0) shards.push(current);
  return shards;
}

const shardName = (i: number, n: number) =>
  `model-${String(i + 1).padStart(5, '0')}-of-${String(n).padStart(5, '0')}.safetensors`;

/** JSON with every object's keys sorted, indented by 2: Python's json.dumps(indent=2, sort_keys=True), as transformers writes the index. */
function sortedJSON(value: unknown): string {
  const sortKeys = (v: unknown): unknown => {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) return v;
    return Object.fromEntries(Object.keys(v).sort().map(k => [k, sortKeys((v as Record<string, unknown>)[k])]));
  };
  return JSON.stringify(sortKeys(value), null, 2);
}

export interface SaveHFCheckpointOptions {
  /**
   * More files of the same artifact (file name → contents), e.g. `{'tokenizer.json': text}`: they
   * are written in the same atomic save, so the folder never holds new weights with an old
   * tokenizer. Names are plain file names. They win over the source folder's files of the same name.
   */
  extraFiles?: Record<string, string | Uint8Array>;
  /**
   * The dtype of the written tensors: 'source' (default) each tensor's dtype in the checkpoint the
   * model was loaded from (float32 for a model built from a config), or one dtype for all.
   * float32 weights are rounded to bfloat16 / float16 to nearest even, as torch's `.to()` does.
   */
  dtype?: HFSaveDtype;
  /**
   * The largest shard, in bytes or as '5GB' / '2GiB'; default '50GB' (transformers 5's
   * save_pretrained). A checkpoint that fits is one model.safetensors.
   */
  maxShardSize?: number | string;
  /**
   * The folder whose tokenizer and generation files (CHECKPOINT_COMPANION_FILES) are copied into
   * the checkpoint; default the folder loadHFCheckpoint read the model from (skipped when it is
   * gone); null copies none.
   */
  sourceFolder?: string | null;
}

/** What saveHFCheckpoint wrote. */
export interface SavedHFCheckpoint {
  /** the weight files, in order, with their sizes in bytes */
  shards: Array<{ name: string; bytes: number }>;
  /** the sum of the tensors' bytes (the index's metadata.total_size) */
  totalSize: number;
  /** config.json's `dtype`: the dtype of most of the weights written */
  dtype: string;
  /** the files copied from the source folder */
  copied: string[];
}

/**
 * Writes the model as an HF checkpoint folder (config.json + model.safetensors, or shards and
 * model.safetensors.index.json above `maxShardSize`; created or replaced) that loadHFCheckpoint
 * and transformers' from_pretrained read. Each tensor is written in its source dtype (see
 * `dtype`), streamed through a file handle one tensor at a time; config.json's `dtype` (and
 * `torch_dtype` where the config has it) names the dtype of most weights. The source folder's
 * tokenizer and generation files are copied. Merged LoRA adapters are saved as part of the
 * weights; unmerged ones are not (savePeftAdapter writes those).
 *
 * The folder is saved atomically (writeArtifactFolder): a process killed at any instant leaves the
 * previous checkpoint or the new one. Old shards and an old index go; other files (a README) stay.
 *
 * ```js
 * const model = await loadHFCheckpoint('./OLMoE-1B-7B');  // bf16 on disk
 * await saveHFCheckpoint(model, './my-model', {maxShardSize: '5GB'});  // bf16 shards, tokenizer files copied
 * const again = await loadHFCheckpoint('./my-model');  // the same weights, bit for bit
 * ```
 */
export async function saveHFCheckpoint(
    model: tfl.LayersModel, dir: string, options: SaveHFCheckpointOptions = {}): Promise<SavedHFCheckpoint> {
  if (typeof dir !== 'string' || dir.length === 0) {
    throw new CheckpointError(`\`${OP}()\`: 'dir' must be a folder path but got ${JSON.stringify(dir)}`);
  }
  const given: unknown = options.extraFiles === undefined ? {} : options.extraFiles;
  if (given === null || typeof given !== 'object' || Array.isArray(given)) {
    throw new CheckpointError(`\`${OP}()\`: 'extraFiles' must be an object of file name → contents but got ${describeValue(given)}`);
  }
  const extraFiles = Object.entries(given);
  for (const [name, data] of extraFiles) {
    if (!/^[^/\\]+$/.test(name) || name === '.' || name === '..' || isCheckpointFile(name)) {
      throw new CheckpointError(`\`${OP}()\`: extraFiles names must be plain file names other than the checkpoint's ` +
          `own (config.json, *.safetensors, model.safetensors.index.json) but got ${JSON.stringify(name)}`);
    }
    if (typeof data !== 'string' && !(data instanceof Uint8Array)) {
      throw new CheckpointError(`\`${OP}()\`: extraFiles['${name}'] must be a string or a Uint8Array but got ${describeValue(data)}`);
    }
  }
  const dtype = options.dtype ?? 'source';
  if (!(HF_SAVE_DTYPES as readonly string[]).includes(dtype)) {
    throw new CheckpointError(`\`${OP}()\`: 'dtype' must be one of ${HF_SAVE_DTYPES.join(', ')} but got ${describeValue(dtype)}`);
  }
  const maxShardSize = parseShardSize(options.maxShardSize ?? DEFAULT_MAX_SHARD_SIZE);
  const sourceFolder = options.sourceFolder;
  if (sourceFolder !== undefined && sourceFolder !== null && (typeof sourceFolder !== 'string' || sourceFolder.length === 0)) {
    throw new CheckpointError(`\`${OP}()\`: 'sourceFolder' must be a folder path or null but got ${describeValue(sourceFolder)}`);
  }

  const { config, tensors } = hfCheckpointEntries(model);
  const written = tensors.map(t => {
    const fileDtype: WritableDtype = dtype === 'source' ?
      (sourceDtypeOf(model, t.name) as WritableDtype | undefined) ?? 'F32' : FILE_DTYPE[dtype];
    return { ...t, dtype: fileDtype, bytes: BYTES[fileDtype] * t.shape.reduce((a, b) => a * b, 1) };
  });
  const elements = new Map<string, number>();
  for (const t of written) elements.set(t.dtype, (elements.get(t.dtype) ?? 0) + t.bytes / BYTES[t.dtype]);
  const mainDtype = TORCH_DTYPE[[...elements].sort((a, b) => b[1] - a[1])[0]?.[0] ?? 'F32'];
  config['dtype'] = mainDtype;
  if ('torch_dtype' in config) config['torch_dtype'] = mainDtype;
  // MXFP4 experts were decoded on load and are written as plain weights: a quantization_config
  // left in would make transformers look for *_blocks / *_scales
  if (isMXFP4Config(config)) delete config['quantization_config'];

  let companions: Record<string, Uint8Array> = {};
  if (typeof sourceFolder === 'string') {
    companions = await readCompanionFiles(sourceFolder, `\`${OP}()\`: sourceFolder`);
  } else if (sourceFolder === undefined) {
    const recorded = sourceFolderOf(model);
    if (recorded !== undefined && await pathKind(recorded) === 'directory') {
      companions = await readCompanionFiles(recorded, `\`${OP}()\`: the folder the model was loaded from`);
    }
  }
  for (const [name] of extraFiles) delete companions[name];

  const shards = planShards(written, maxShardSize);
  const names = shards.length === 1 ? ['model.safetensors'] : shards.map((_, i) => shardName(i, shards.length));
  const totalSize = written.reduce((sum, t) => sum + t.bytes, 0);
  const saved: SavedHFCheckpoint['shards'] = [];
  await writeArtifactFolder(dir, async tmp => {
    for (const [i, shard] of shards.entries()) {
      const bytes = await writeSafetensorsStream(join(tmp, names[i]), shard.map(t => ({
        name: t.name, dtype: t.dtype, shape: t.shape,
        values: async () => {
          const value = t.read();
          try {
            return await value.data() as Float32Array;
          } finally {
            value.dispose();
          }
        },
      })), { format: 'pt' });
      saved.push({ name: names[i], bytes });
    }
    if (shards.length > 1) {
      const weightMap: Record<string, string> = {};
      shards.forEach((shard, i) => shard.forEach(t => { weightMap[t.name] = names[i]; }));
      const totalParameters = written.reduce((sum, t) => sum + t.shape.reduce((a, b) => a * b, 1), 0);
      const index = { metadata: { total_parameters: totalParameters, total_size: totalSize }, weight_map: weightMap };
      await writeFile(join(tmp, 'model.safetensors.index.json'), `${sortedJSON(index)}\n`);
    }
    await writeFile(join(tmp, 'config.json'), hfConfigText(model, config));
    for (const [name, data] of Object.entries(companions)) await writeFile(join(tmp, name), data);
    for (const [name, data] of extraFiles) await writeFile(join(tmp, name), data);
  }, { owns: isCheckpointFile, what: `\`${OP}()\`` });
  return { shards: saved, totalSize, dtype: mainDtype, copied: Object.keys(companions) };
}
