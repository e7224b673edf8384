/**
 * Hugging Face checkpoint export, the inverse of loadHFCheckpoint: config.json (the HF config the
 * model was built from, `hfConfigOf`) and model.safetensors in the Hub layout of the model's
 * family (src/models/families.ts). The fused expert weights of each SparseMoE are split back into
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
import { decoderLayerIndex, hfConfigOf } from '../layers/moe_causal_lm.js';
import { SparseMoE, variableFloat32, variableShape } from '../layers/sparse_moe.js';
import type { HFConfig } from '../models/families.js';
import { moeBlockTensorPlan } from './hf_block.js';
import { CheckpointError, checkpointError, hfWeightName } from './hf_checkpoint_core.js';
import { writeArtifactFolder } from '../util/atomic.js';
import { describeValue } from '../util/describe.js';
import { writeSafetensorsFile } from './safetensors.js';

const OP = 'saveHFCheckpoint';

interface Expected { name: string; shape: number[] }

const sameShape = (a: readonly number[], b: readonly number[]) =>
  a.length === b.length && a.every((d, i) => d === b[i]);

/** What goes into model.safetensors: a variable as is, or one expert's row block of a fused weight. */
type Entry =
  | { kind: 'whole'; name: string; variable: tfl.LayerVariable }
  | { kind: 'expertRows'; name: string; variable: tfl.LayerVariable; expert: number; rowStart: number; shape: [number, number] };

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
    if (!sameShape(variableShape(variable), expected.shape)) {
      problems.push(`'${layer.name}/${weight}' has shape [${variableShape(variable)}] but '${expected.name}' needs [${expected.shape}]`);
      return;
    }
    entries.push({ kind: 'whole', name: expected.name, variable });
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
    const split = (weight: string, parts: Expected[][]) => {
      const variable = safeVariable(layer, weight);
      const [rows, cols] = parts[0][0].shape;
      const want = [parts[0].length, parts.length * rows, cols];
      if (variable === undefined || !sameShape(variableShape(variable), want)) {
        problems.push(`'${layer.name}/${weight}' has shape [${variable ? variableShape(variable) : 'none'}] but the per-expert ` +
            `tensors ${parts.map(p => `'${p[0].name}'`).join(', ')}… need [${want}]`);
        return;
      }
      parts.forEach((part, p) => part.forEach((expected, e) => entries.push({
        kind: 'expertRows', name: expected.name, variable, expert: e, rowStart: p * rows, shape: [rows, cols],
      })));
    };
    split('gate_up', [ex.gate, ex.up]);
    split('down', [ex.down]);
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
    for (const variable of layer.weights) entries.push({ kind: 'whole', name: hfWeightName(layer, variable), variable });
  }
  const seen = new Set<string>();
  for (const { name } of entries) {
    if (seen.has(name)) problems.push(`two weights map to the checkpoint name '${name}'`);
    seen.add(name);
  }
  if (problems.length > 0) {
    throw checkpointError(OP, `model '${model.name}'`, problems, ` does not fit its config.json ('${String(config['model_type'])}')`);
  }

  const tensors: Record<string, tf.Tensor> = {};
  const values = new Map<tfl.LayerVariable, Float32Array>();
  try {
    for (const entry of entries) {
      if (entry.kind === 'whole') {
        tensors[entry.name] = variableFloat32(entry.variable);  // packed experts decoded
        continue;
      }
      let data = values.get(entry.variable);
      if (data === undefined) {
        const decoded = variableFloat32(entry.variable);  // packed experts decoded
        data = decoded.dataSync() as Float32Array;
        decoded.dispose();
        values.set(entry.variable, data);
      }
      const [rows, cols] = entry.shape;
      const perExpert = variableShape(entry.variable)[1] * cols;
      const start = entry.expert * perExpert + entry.rowStart * cols;
      tensors[entry.name] = tf.tensor2d(data.slice(start, start + rows * cols), [rows, cols]);  // [rows, cols]
    }
  } catch (e) {
    tf.dispose(Object.values(tensors));
    throw e;
  }
  return { config: JSON.parse(JSON.stringify(config)) as HFConfig, tensors };
}

/** The files of an HF checkpoint folder that a save replaces even when it does not write them (old shards, an old index). */
const isCheckpointFile = (name: string) =>
  name === 'config.json' || name.endsWith('.safetensors') || name === 'model.safetensors.index.json';

export interface SaveHFCheckpointOptions {
  /**
   * More files of the same artifact (file name → contents), e.g. `{'tokenizer.json': text}`: they
   * are written in the same atomic save, so the folder never holds new weights with an old
   * tokenizer. Names are plain file names.
   */
  extraFiles?: Record<string, string | Uint8Array>;
}

/**
 * Writes the model as an HF checkpoint folder (config.json + model.safetensors, created or
 * replaced) that loadHFCheckpoint and transformers' from_pretrained read. Merged LoRA adapters
 * are saved as part of the weights; unmerged ones are not (savePeftAdapter writes those).
 *
 * The folder is saved atomically (writeArtifactFolder): a process killed at any instant leaves the
 * previous checkpoint or the new one. Old shards and an old index go; other files (a README) stay.
 *
 * ```js
 * await saveHFCheckpoint(model, './my-model', {extraFiles: {'tokenizer.json': tokenizerText}});
 * const again = await loadHFCheckpoint('./my-model');  // the same weights, bit for bit
 * ```
 */
export async function saveHFCheckpoint(
    model: tfl.LayersModel, dir: string, options: SaveHFCheckpointOptions = {}): Promise<void> {
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
  const { config, tensors } = hfCheckpointTensors(model);
  try {
    await writeArtifactFolder(dir, async tmp => {
      await writeSafetensorsFile(join(tmp, 'model.safetensors'), tensors, { format: 'pt' });
      await writeFile(join(tmp, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
      for (const [name, data] of extraFiles) await writeFile(join(tmp, name), data);
    }, { owns: isCheckpointFile, what: `\`${OP}()\`` });
  } finally {
    tf.dispose(Object.values(tensors));
  }
}
