/**
 * A model folder on disk, either format: a Hugging Face checkpoint (config.json +
 * model.safetensors, or shards with model.safetensors.index.json) or a TF.js LayersModel
 * (model.json + weights, as `model.save('file://dir')` writes it). The CLI's convert and inspect
 * take either and tell them apart by their files.
 */
import * as tfl from '@tensorflow/tfjs-layers';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import '../layers/index.js';  // registers every layer class, so loadLayersModel can rebuild them
import type { MoECausalLM } from '../layers/moe_causal_lm.js';
import { passPerCall } from '../layers/sequence_context.js';
import { SparseMoE } from '../layers/sparse_moe.js';
import { FileIOError, fileIO } from './file_io_handler.js';
import { loadHFCheckpoint, type LoadHFCheckpointOptions } from './hf_checkpoint.js';
import { MoELoraError } from '../errors.js';
import { openArtifactFolder, pathKind } from '../util/files.js';

export const MODEL_DIR_FORMATS = ['hf', 'tfjs'] as const;
export type ModelDirFormat = typeof MODEL_DIR_FORMATS[number];

/** A folder that is not a model folder of the expected format. */
export class ModelDirError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'ModelDirError';
    Object.setPrototypeOf(this, ModelDirError.prototype);
  }
}

const isFile = async (path: string) => (await stat(path).catch(() => null))?.isFile() ?? false;

/** The formats whose files the folder holds (both when it holds both, none when neither). */
export async function modelDirFormats(dir: string): Promise<ModelDirFormat[]> {
  const info = await stat(dir).catch(() => null);
  if (info === null || !info.isDirectory()) return [];
  const found: ModelDirFormat[] = [];
  if (await isFile(join(dir, 'config.json')) &&
      (await isFile(join(dir, 'model.safetensors')) || await isFile(join(dir, 'model.safetensors.index.json')))) {
    found.push('hf');
  }
  if (await isFile(join(dir, 'model.json'))) found.push('tfjs');
  return found;
}

/** The files a model folder is recognised by. */
const MODEL_FILES = ['config.json', 'model.safetensors', 'model.safetensors.index.json', 'model.json'];

/**
 * The recognising names in `dir` that hold something other than a regular file (a folder named
 * model.safetensors, a FIFO named config.json), as lines for an error: otherwise the folder would
 * be reported as lacking the very file the user sees in it.
 */
async function notFiles(dir: string): Promise<string> {
  const lines: string[] = [];
  for (const name of MODEL_FILES) {
    const kind = await pathKind(join(dir, name));
    if (kind === 'missing' || kind === 'file') continue;
    lines.push(`'${join(dir, name)}' is ${kind === 'directory' ? 'a directory' : kind}, not a regular file`);
  }
  return lines.length === 0 ? '' : ` (${lines.join('; ')})`;
}

/**
 * The format of a model folder: `expected` when given (checked), else the one whose files it holds.
 * Throws a ModelDirError naming the files looked for when there is none, or two and no `expected`.
 *
 * ```js
 * await modelDirFormat('spec/fixtures/hf/mixtral');  // 'hf'
 * ```
 */
export async function modelDirFormat(dir: string, expected?: ModelDirFormat): Promise<ModelDirFormat> {
  const info = await stat(dir).catch(() => null);
  if (info === null || !info.isDirectory()) throw new ModelDirError(`'${dir}' is not a directory`);
  const found = await modelDirFormats(dir);
  const files: Record<ModelDirFormat, string> = {
    hf: 'an HF checkpoint (config.json + model.safetensors or model.safetensors.index.json)',
    tfjs: 'a TF.js LayersModel (model.json)',
  };
  if (expected !== undefined) {
    if (!found.includes(expected)) throw new ModelDirError(`'${dir}' is not ${files[expected]}${await notFiles(dir)}`);
    return expected;
  }
  if (found.length === 0) throw new ModelDirError(`'${dir}' is neither ${files.hf} nor ${files.tfjs}${await notFiles(dir)}`);
  if (found.length > 1) throw new ModelDirError(`'${dir}' holds both ${files.hf} and ${files.tfjs}; say which to read`);
  return found[0];
}

/**
 * Loads a model folder of either format (detected, or `options.format`). An HF checkpoint goes
 * through `loadHFCheckpoint` (its options apply); a TF.js folder through `tf.loadLayersModel`
 * with the file:// handler, adapters and HF config (userDefinedMetadata) included; it keeps the
 * expert storage it was saved with, so `expertDtype: 'float32'` is refused for a TF.js folder
 * saved with packed experts (convert it from the HF checkpoint with --expert-dtype float32).
 *
 * ```js
 * const {model, format} = await loadModelDir('./my-model');
 * ```
 */
export async function loadModelDir(
    dir: string, options: LoadHFCheckpointOptions & { format?: ModelDirFormat } = {}):
    Promise<{ model: MoECausalLM; format: ModelDirFormat }> {
  const { format: expected, ...hfOptions } = options;
  await openArtifactFolder(dir, 'model folder');
  const format = await modelDirFormat(dir, expected);
  if (format === 'hf') return { model: await loadHFCheckpoint(dir, hfOptions), format };
  let model: MoECausalLM;
  try {
    model = await tfl.loadLayersModel(fileIO(dir));
  } catch (e) {
    if (e instanceof FileIOError) throw e;
    // tfjs's own errors here (an unknown layer class, a topology that does not build) are about the file
    throw new ModelDirError(`cannot load the TF.js model in '${dir}': ${(e as Error).message}`);
  }
  // its own loops over model.apply share each pass's constants, as a built model's do
  passPerCall(model);
  const packed = model.layers.find((l): l is SparseMoE => l instanceof SparseMoE && l.expertStorage !== 'float32');
  if (options.expertDtype === 'float32' && packed !== undefined) {
    model.dispose();
    throw new ModelDirError(`the TF.js model in '${dir}' holds its experts packed (${packed.expertStorage}, layer ` +
        `'${packed.name}') and a TF.js folder keeps the storage it was saved with; expertDtype 'float32' applies to ` +
        'HF checkpoints: load or convert the HF checkpoint with expertDtype float32');
  }
  return { model, format };
}
