/**
 * PEFT adapter folders on disk (Node): loadPeftAdapter and savePeftAdapter read and write the two
 * files of src/io/peft.ts, which does all the rest without the file system (browsers use it through
 * loadPeftAdapterFrom / encodePeftAdapter).
 */
import type * as tfl from '@tensorflow/tfjs-layers';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  ADAPTER_CONFIG, ADAPTER_WEIGHTS, isPeftAdapterFile, loadParsedPeftAdapter, peftAdapterFiles,
  type LoadedPeftAdapter, type PeftAdapterOptions,
} from './peft.js';
import { readSafetensorsFile } from './safetensors.js';
import { writeArtifactFolder } from '../util/atomic.js';
import { openArtifactFolder, readJSONFile } from '../util/files.js';

/**
 * Loads a PEFT LoRA adapter folder into a model's SparseMoE layers as adapter `name` (added and
 * active; the model's other layers are frozen, as PEFT does). Everything is checked first: an
 * adapter made for another model (unknown module paths, other shapes, missing tensors) or with
 * unsupported PEFT options throws one PeftAdapterError with a line per problem, and the model is
 * left untouched. The weights are read one tensor at a time, never the whole file at once.
 *
 * ```js
 * const model = await loadHFCheckpoint('./Qwen3-30B-A3B');
 * const {notes} = await loadPeftAdapter(model, './my-adapter');
 * ```
 */
export async function loadPeftAdapter(
    model: tfl.LayersModel, dir: string, options: PeftAdapterOptions = {}): Promise<LoadedPeftAdapter> {
  const op = 'loadPeftAdapter';
  const configPath = join(dir, ADAPTER_CONFIG);
  const readConfig = async () => {
    await openArtifactFolder(dir, `\`${op}()\`: adapter folder`);
    return readJSONFile(configPath, `\`${op}()\`: adapter config`);
  };
  return loadParsedPeftAdapter(op, model, readConfig, () => readSafetensorsFile(join(dir, ADAPTER_WEIGHTS)),
      { source: `'${dir}'`, configName: configPath }, options);
}

/**
 * Writes adapter `name` of the model's SparseMoE layers as PEFT does (adapter_config.json and
 * adapter_model.safetensors), so `PeftModel.from_pretrained(hf_model, dir)` loads it. Every layer
 * with the adapter must have the same r, alpha and rsLoRA (PEFT keeps one of each); when the
 * layers differ in targets or some have no adapter, the entries name their layers
 * ('model.layers.1.mlp.experts.gate_up_proj').
 *
 * The two files are one artifact, saved atomically (writeArtifactFolder): a process killed at any
 * instant leaves the previous adapter or the new one, never new weights with an old alpha. Other
 * files in the folder (a README) are kept; old adapter_model.* files go.
 *
 * ```js
 * await savePeftAdapter(model, './my-adapter');
 * ```
 */
export async function savePeftAdapter(
    model: tfl.LayersModel, dir: string, options: PeftAdapterOptions = {}): Promise<void> {
  const op = 'savePeftAdapter';
  const { config, weights } = await peftAdapterFiles(op, model, options, `'${dir}'`);
  await writeArtifactFolder(dir, async tmp => {
    await writeFile(join(tmp, ADAPTER_WEIGHTS), weights);
    await writeFile(join(tmp, ADAPTER_CONFIG), config);
  }, { owns: isPeftAdapterFile, what: `\`${op}()\`` });
}
