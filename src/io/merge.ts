/**
 * Merge and export: a PEFT adapter folded into its base model and written as a Hub checkpoint,
 * as PEFT's `merge_and_unload()` followed by `save_pretrained()`. A composition of the loaders,
 * SparseMoE.mergeAdapter (W += scaling·B·A, the one deltaWeight) and saveHFCheckpoint.
 */
import { RotaryAttention } from '../layers/attention.js';
import { sparseMoELayers } from '../layers/moe_causal_lm.js';
import { SwiGLUMLP } from '../layers/swiglu_mlp.js';
import { describeValue } from '../util/describe.js';
import { CheckpointError } from './hf_checkpoint_core.js';
import { saveHFCheckpoint, type SavedHFCheckpoint, type SaveHFCheckpointOptions } from './hf_save.js';
import { loadModelDir, type ModelDirFormat } from './model_dir.js';
import type { LoadedPeftAdapter } from './peft.js';
import { loadPeftAdapter } from './peft_files.js';

const OP = 'mergeAdapterIntoCheckpoint';

export interface MergeAdapterOptions extends Pick<SaveHFCheckpointOptions, 'dtype' | 'maxShardSize' | 'extraFiles'> {
  /** the name the adapter gets while it is merged (only in messages); default 'default' */
  adapterName?: string;
}

/** What a merge read and wrote. */
export interface MergeResult {
  /** the model folder's format */
  format: ModelDirFormat;
  /** the adapter that was merged */
  adapter: LoadedPeftAdapter;
  /** what saveHFCheckpoint wrote */
  saved: SavedHFCheckpoint;
}

/**
 * Loads the model in `modelDir` (an HF checkpoint or a TF.js folder), loads the PEFT adapter in
 * `adapterDir` into it, merges it into the base weights of every layer it adapts, and writes the
 * result to `outDir` as an HF checkpoint: in the source dtype by default (a bf16 model is written
 * in bf16, the merged weights rounded to nearest even), sharded like save_pretrained, with the
 * model folder's tokenizer and generation files. The merged checkpoint's logits equal those of
 * the model with the adapter (up to the rounding of the written dtype).
 *
 * ```js
 * await mergeAdapterIntoCheckpoint('./OLMoE-1B-7B', './my-adapter', './OLMoE-1B-7B-merged');
 * const merged = await loadHFCheckpoint('./OLMoE-1B-7B-merged');  // no adapter, same outputs
 * ```
 */
export async function mergeAdapterIntoCheckpoint(
    modelDir: string, adapterDir: string, outDir: string, options: MergeAdapterOptions = {}): Promise<MergeResult> {
  for (const [name, value] of [['modelDir', modelDir], ['adapterDir', adapterDir], ['outDir', outDir]] as const) {
    if (typeof value !== 'string' || value.length === 0) {
      throw new CheckpointError(`\`${OP}()\`: '${name}' must be a folder path but got ${describeValue(value)}`);
    }
  }
  const name = options.adapterName ?? 'default';
  // 16-bit experts stay packed (merged, then rounded to their own dtype once) only when they are
  // written back in it; any other output dtype merges in float32, so nothing is rounded twice
  const keepsSourceDtype = options.dtype === undefined || options.dtype === 'source';
  const { model, format } = await loadModelDir(modelDir, { expertDtype: keepsSourceDtype ? 'stored' : 'float32' });
  try {
    const adapter = await loadPeftAdapter(model, adapterDir, { name });
    for (const layer of sparseMoELayers(model)) {
      if (layer.adapterNames().includes(name)) layer.mergeAdapter(name);
    }
    // attention and dense-MLP projections (LinearLoRA.merge: W += s·B·A, the one linearDeltaWeight)
    for (const layer of model.layers) {
      if ((layer instanceof RotaryAttention || layer instanceof SwiGLUMLP) && layer.lora.names().includes(name)) layer.lora.merge(name);
    }
    const saved = await saveHFCheckpoint(model, outDir, {
      dtype: options.dtype, maxShardSize: options.maxShardSize, extraFiles: options.extraFiles, sourceFolder: modelDir,
    });
    return { format, adapter, saved };
  } finally {
    model.dispose();
  }
}
