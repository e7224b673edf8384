/**
 * Merge and export: a PEFT adapter folded into its base model and written as a Hub checkpoint,
 * as PEFT's `merge_and_unload()` followed by `save_pretrained()`. A composition of the loaders,
 * SparseMoE.mergeAdapter (W += scaling·B·A, the one deltaWeight) and saveHFCheckpoint.
 */
import * as tf from '@tensorflow/tfjs-core';
import { RotaryAttention } from '../layers/attention.js';
import { sparseMoELayers } from '../layers/moe_causal_lm.js';
import { SwiGLUMLP } from '../layers/swiglu_mlp.js';
import { variableFloat32 } from '../layers/sparse_moe.js';
import { HOST_BACKENDS } from '../layers/embedding.js';
import { isQuantizedKind, packExpertWeightAsync, unpackExpertWeight } from '../ops/packed.js';
import { describeValue } from '../util/describe.js';
import type { ExpertDtype } from './hf_block.js';
import { CheckpointError } from './hf_checkpoint_core.js';
import { saveHFCheckpoint, type SavedHFCheckpoint, type SaveHFCheckpointOptions } from './hf_save.js';
import { loadModelDir, type ModelDirFormat } from './model_dir.js';
import type { LoadedPeftAdapter } from './peft.js';
import { loadPeftAdapter } from './peft_files.js';

const OP = 'mergeAdapterIntoCheckpoint';

export interface MergeAdapterOptions extends Pick<SaveHFCheckpointOptions, 'dtype' | 'maxShardSize' | 'extraFiles'> {
  /** the name the adapter gets while it is merged (only in messages); default 'default' */
  adapterName?: string;
  /**
   * The routed experts the adapter was trained on (loadHFCheckpoint's expertDtype): default
   * 'stored'. A quantized one ('int8', 'int4', 'nf4', 'mxfp4') merges into the values the
   * quantized experts stand for (quantized on load as training did, then decoded: float32), so
   * the written model is the trained one: the dequantized base plus the whole delta, in bf16
   * unless `dtype` says otherwise.
   */
  expertDtype?: ExpertDtype;
  /** with expertDtype 'int4': its group size (as in training) */
  int4GroupSize?: number;
  /**
   * With a quantized expertDtype: quantize the merged experts again to that format (the written
   * values are what the re-quantized experts decode to) and report the largest change that made
   * to any merged value in `requantizeMaxChange`. Default false.
   */
  requantize?: boolean;
}

/** What a merge read and wrote. */
export interface MergeResult {
  /** the model folder's format */
  format: ModelDirFormat;
  /** the adapter that was merged */
  adapter: LoadedPeftAdapter;
  /** what saveHFCheckpoint wrote */
  saved: SavedHFCheckpoint;
  /** with `requantize`: max |re-quantized − (dequantized base + ΔW)| over the merged experts */
  requantizeMaxChange?: number;
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
  const quantized = options.expertDtype !== undefined && isQuantizedKind(options.expertDtype) ? options.expertDtype : null;
  if (options.requantize !== undefined && typeof options.requantize !== 'boolean') {
    throw new CheckpointError(`\`${OP}()\`: 'requantize' must be a boolean but got ${describeValue(options.requantize)}`);
  }
  if (options.requantize === true && quantized === null) {
    throw new CheckpointError(`\`${OP}()\`: 'requantize' needs a quantized 'expertDtype' (int8, int4, nf4, nf4-dq, mxfp4) ` +
        `but got ${describeValue(options.expertDtype)}`);
  }
  // 16-bit experts stay packed (merged, then rounded to their own dtype once) only when they are
  // written back in it; any other output dtype merges in float32, so nothing is rounded twice.
  // Quantized experts merge as the float32 values they stand for, written in bf16 by default.
  // Re-packing reads the experts synchronously, which a GPU backend (webgpu) cannot: there they
  // merge in float32 and are rounded to their dtype once, when written: the same bits.
  const keepsSourceDtype = (options.dtype === undefined || options.dtype === 'source') && HOST_BACKENDS.includes(tf.getBackend());
  const { model, format } = await loadModelDir(modelDir, quantized !== null ?
    { expertDtype: quantized, dequantizeExperts: true, ...(options.int4GroupSize !== undefined ? { int4GroupSize: options.int4GroupSize } : {}) } : { expertDtype: options.expertDtype ?? (keepsSourceDtype ? 'stored' : 'float32') });
  try {
    const adapter = await loadPeftAdapter(model, adapterDir, { name });
    let requantizeMaxChange: number | undefined;
    for (const layer of sparseMoELayers(model)) {
      if (!layer.adapterNames().includes(name)) continue;
      layer.mergeAdapter(name);
      if (options.requantize !== true || layer.expertStorage !== 'float32') continue;
      const targets = layer.adapterConfig(name)!.targets;
      for (const [weight, target] of [['gate_up', 'experts.gate_up'], ['down', 'experts.down']] as const) {
        if (!targets.includes(target)) continue;   // untouched experts: written as they were trained on
        const variable = layer.weightVariable(weight);
        const merged = variableFloat32(variable) as tf.Tensor3D;
        // read asynchronously (webgpu too); packing itself runs on the host
        const packed = await packExpertWeightAsync(merged, quantized!, {
          inputAxis: layer.expertLayout === 'outIn' ? 2 : 1, ...(quantized === 'int4' ? { groupSize: options.int4GroupSize } : {}),
        });
        const requantized = unpackExpertWeight(packed);
        packed.dispose();
        const largest = tf.tidy(() => tf.max(tf.abs(tf.sub(requantized, merged))));
        const change = (await largest.data())[0];
        tf.dispose([largest, merged]);
        requantizeMaxChange = Math.max(requantizeMaxChange ?? 0, change);
        variable.write(requantized);
        requantized.dispose();
      }
    }
    // attention and dense-MLP projections (LinearLoRA.merge: W += s·B·A, the one linearDeltaWeight)
    for (const layer of model.layers) {
      if ((layer instanceof RotaryAttention || layer instanceof SwiGLUMLP) && layer.lora.names().includes(name)) layer.lora.merge(name);
    }
    const saved = await saveHFCheckpoint(model, outDir, {
      dtype: options.dtype ?? (quantized !== null ? 'bfloat16' : undefined),
      maxShardSize: options.maxShardSize, extraFiles: options.extraFiles, sourceFolder: modelDir,
    });
    return { format, adapter, saved, ...(requantizeMaxChange !== undefined ? { requantizeMaxChange } : {}) };
  } finally {
    model.dispose();
  }
}
