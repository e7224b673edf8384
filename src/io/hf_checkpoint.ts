/**
 * Hugging Face checkpoint import: config.json + model.safetensors (or sharded
 * model-XXXXX-of-YYYYY.safetensors with model.safetensors.index.json) into a MoECausalLM.
 * Every tensor is checked (present, expected shape, a float dtype) before any is read, and all
 * problems are reported together in one error. This file reads the folder (Node);
 * hf_checkpoint_core.ts checks and loads what it read.
 */
import { join } from 'node:path';
import type { MoECausalLM } from '../layers/moe_causal_lm.js';
import { quantizeWorkerPool } from './quantize_pool.js';
import { familyOf, type HFConfig } from '../models/families.js';
import { confinedPath, openArtifactFolder, parseJSONText, pathKind, readJSONFile, readTextFile } from '../util/files.js';
import { integralFloatPaths, recordConfigFloats, recordSourceFolder } from './checkpoint_source.js';
import {
  CheckpointError, CheckpointSource, indexedCheckpointSource, modelFromCheckpoint,
  type LoadHFCheckpointOptions,
} from './hf_checkpoint_core.js';
import { readSafetensorsFile } from './safetensors.js';

export {
  CheckpointError, hfWeightName, loadHFCheckpointFrom, type LoadHFCheckpointOptions, type HFCheckpointFiles,
} from './hf_checkpoint_core.js';

const OP = 'loadHFCheckpoint';

/**
 * The single file, or the shards of model.safetensors.index.json (checked against the index).
 * Whatever is at either name is read through the file helpers, so a folder or a FIFO named
 * model.safetensors is reported as what it is; shard names from the index stay in `dir`.
 */
async function openCheckpoint(dir: string): Promise<CheckpointSource> {
  const single = join(dir, 'model.safetensors');
  const indexPath = join(dir, 'model.safetensors.index.json');
  if (await pathKind(single) !== 'missing') return CheckpointSource.single(await readSafetensorsFile(single));
  if (await pathKind(indexPath) === 'missing') {
    const bin = await pathKind(join(dir, 'pytorch_model.bin')) !== 'missing';
    throw new CheckpointError(`\`${OP}()\`: '${dir}' has neither model.safetensors nor model.safetensors.index.json` +
        (bin ? ' (PyTorch .bin checkpoints are not supported; save with safe_serialization=True)' : ''));
  }
  const index = await readJSONFile(indexPath, `\`${OP}()\`: index`);
  return indexedCheckpointSource(OP, `'${dir}'`, indexPath, index, async shard => {
    if (await pathKind(join(dir, shard)) === 'missing') return null;
    return readSafetensorsFile(await confinedPath(dir, shard, `\`${OP}()\`: shard named in '${indexPath}'`));
  });
}

/**
 * Reads an HF checkpoint folder into a MoECausalLM (a functional tf.LayersModel).
 * Whole models: every family but gemma4_text (mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, glm4_moe,
 * deepseek_v3, ernie4_5_moe, hunyuan_v1_moe, minimax_m2, llama4_text, mistral4, glm_moe_dsa,
 * qwen3_next, qwen3_5_moe_text);
 * FP8, MXFP4 and bitsandbytes 4-/8-bit checkpoints load (NF4 / int8 experts kept as stored, the
 * rest decoded: docs/quantized.md). Extra tensors in the checkpoint are ignored (as
 * transformers does with unexpected keys); missing, misshapen or non-float tensors are one
 * CheckpointError listing all.
 * The model remembers each tensor's dtype on disk and the folder (checkpoint_source.ts), so
 * saveHFCheckpoint writes bf16 back as bf16 and copies the tokenizer files.
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
  await openArtifactFolder(dir, `\`${OP}()\`: checkpoint folder`);
  const configWhat = `\`${OP}()\`: config`;
  const configText = await readTextFile(join(dir, 'config.json'), configWhat);
  const config = parseJSONText(configText, join(dir, 'config.json'), configWhat) as HFConfig;
  familyOf(config);  // unknown model types fail here, before any weights are read
  // FP8 and MXFP4 weights are decoded (and their dtypes recorded) once, in modelFromCheckpoint
  const source = await openCheckpoint(dir);
  // experts quantized on load use every core (started only if some are)
  const quantizer = quantizeWorkerPool();
  let model: MoECausalLM;
  try {
    model = await modelFromCheckpoint(OP, `'${dir}'`, config, source, options, quantizer);
  } finally {
    await quantizer.close();
  }
  recordSourceFolder(model, dir);
  // which of its numbers are floats (JSON.parse turns 0.0 into 0), for writing it back
  recordConfigFloats(model, integralFloatPaths(configText));
  return model;
}
