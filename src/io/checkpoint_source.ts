/**
 * What a model remembers of the checkpoint it was loaded from, so that saving it again is like the
 * Hub's save_pretrained: each tensor's dtype on disk (saveHFCheckpoint writes it back in that
 * dtype: a bf16 checkpoint stays bf16) and the folder (its tokenizer and generation files are
 * copied into the saved folder).
 *
 * The dtypes live in the model's userDefinedMetadata beside the HF config, so they survive a TF.js
 * save and load; stored as the most common dtype plus the tensors that differ, so a model of
 * thousands of expert tensors adds a few bytes to model.json. The folder is kept in memory only: a
 * path means nothing on another machine or after the folder moved.
 */
import type * as tfl from '@tensorflow/tfjs-layers';

/** The key of the dtypes in userDefinedMetadata. */
const DTYPES_KEY = 'hfSourceDtypes';

interface StoredDtypes {
  /** the dtype of every tensor not in `tensors` */
  default: string;
  /** checkpoint name → dtype, for the tensors whose dtype is not `default` */
  tensors: Record<string, string>;
}

const folders = new WeakMap<tfl.LayersModel, string>();

/**
 * Records the on-disk dtype of each checkpoint tensor the model was filled from ('F32', 'BF16',
 * 'F16'), keeping the rest of the model's userDefinedMetadata.
 */
export function recordSourceDtypes(model: tfl.LayersModel, dtypes: ReadonlyMap<string, string>): void {
  const counts = new Map<string, number>();
  for (const dtype of dtypes.values()) counts.set(dtype, (counts.get(dtype) ?? 0) + 1);
  const common = [...counts].sort((a, b) => b[1] - a[1])[0]?.[0];
  if (common === undefined) return;
  const tensors: Record<string, string> = {};
  for (const [name, dtype] of dtypes) if (dtype !== common) tensors[name] = dtype;
  const stored: StoredDtypes = { default: common, tensors };
  const meta = (model.getUserDefinedMetadata() ?? {}) as Record<string, unknown>;
  model.setUserDefinedMetadata({ ...meta, [DTYPES_KEY]: stored });
}

/**
 * The dtype the checkpoint tensor `name` had on disk when the model was loaded, or undefined for a
 * model not loaded from a checkpoint (built from a config).
 *
 * ```js
 * const model = await loadHFCheckpoint('./OLMoE-1B-7B');
 * sourceDtypeOf(model, 'model.embed_tokens.weight');  // 'BF16'
 * ```
 */
export function sourceDtypeOf(model: tfl.LayersModel, name: string): string | undefined {
  const stored = (model.getUserDefinedMetadata() as Record<string, unknown> | undefined)?.[DTYPES_KEY] as
      StoredDtypes | undefined;
  if (stored == null || typeof stored !== 'object' || typeof stored.default !== 'string') return undefined;
  const own = stored.tensors?.[name];
  return typeof own === 'string' ? own : stored.default;
}

/** Records the folder the model was loaded from (in memory only). */
export function recordSourceFolder(model: tfl.LayersModel, dir: string): void {
  folders.set(model, dir);
}

/** The folder loadHFCheckpoint read the model from, or undefined. */
export function sourceFolderOf(model: tfl.LayersModel): string | undefined {
  return folders.get(model);
}
