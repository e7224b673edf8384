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

// ---------------------------------------------------------------------------------------------
// config.json as transformers writes it. JSON.parse forgets that `"router_jitter_noise": 0.0` was
// a float; written back as `0`, transformers 5's strict config classes refuse it ("expected float,
// got int"). So the loader records where the source had integral floats, and the writer formats
// numbers as Python's json.dumps does.

/** The key of the integral-float paths in userDefinedMetadata. */
const FLOATS_KEY = 'hfConfigFloats';

type JSONPath = Array<string | number>;

/**
 * The paths (keys and array indices) of the numbers in the JSON text `text` that are written as
 * floats (with '.', 'e' or 'E') but have integral values, like `0.0` or `1000000.0`. Other floats
 * are recognisable from their value; `text` must be valid JSON.
 *
 * ```js
 * integralFloatPaths('{"a": 0.0, "b": [1, 2.0], "c": 1e-5}');  // [['a'], ['b', 1]]
 * ```
 */
export function integralFloatPaths(text: string): JSONPath[] {
  const out: JSONPath[] = [];
  const stack: Array<{ key: string | null } | { index: number }> = [];
  let expectKey = false;
  for (let i = 0; i < text.length;) {
    const c = text[i];
    if (c === '{') {
      stack.push({ key: null });
      expectKey = true;
      i++;
    } else if (c === '[') {
      stack.push({ index: 0 });
      i++;
    } else if (c === '}' || c === ']') {
      stack.pop();
      i++;
    } else if (c === ',') {
      const top = stack[stack.length - 1];
      if (top !== undefined && 'index' in top) top.index++;
      else expectKey = true;
      i++;
    } else if (c === '"') {
      let j = i + 1;
      while (text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      if (expectKey) {
        (stack[stack.length - 1] as { key: string | null }).key = JSON.parse(text.slice(i, j + 1)) as string;
        expectKey = false;
      }
      i = j + 1;
    } else if (c === '-' || (c >= '0' && c <= '9')) {
      let j = i;
      while (j < text.length && /[-+0-9.eE]/.test(text[j])) j++;
      const token = text.slice(i, j);
      if (/[.eE]/.test(token) && Number.isInteger(Number(token))) {
        out.push(stack.map(s => 'index' in s ? s.index : s.key as string));
      }
      i = j;
    } else {
      i++;  // whitespace, ':', true / false / null
    }
  }
  return out;
}

/** Records where the source config.json had integral floats (integralFloatPaths), keeping the rest of the metadata. */
export function recordConfigFloats(model: tfl.LayersModel, paths: JSONPath[]): void {
  const meta = (model.getUserDefinedMetadata() ?? {}) as Record<string, unknown>;
  model.setUserDefinedMetadata({ ...meta, [FLOATS_KEY]: paths });
}

/** A number as Python's repr writes a float: shortest digits, '.0' when integral, exponent below 1e-4 and from 1e16 up. */
function pythonFloat(x: number): string {
  if (Number.isNaN(x)) return 'NaN';
  if (!Number.isFinite(x)) return x > 0 ? 'Infinity' : '-Infinity';
  const [mantissa, exponentText] = x.toExponential().split('e');
  const exponent = Number(exponentText);
  if (exponent < -4 || exponent >= 16) {
    return `${mantissa}e${exponent < 0 ? '-' : '+'}${String(Math.abs(exponent)).padStart(2, '0')}`;
  }
  const fixed = String(x);  // shortest digits, fixed notation in this range
  return fixed.includes('.') ? fixed : `${fixed}.0`;
}

/** A string as Python's json.dumps writes it (ensure_ascii: non-ASCII as \uXXXX). */
const pythonString = (s: string) =>
  JSON.stringify(s).replace(/[\u0080-\uffff]/g, ch => `\\u${ch.charCodeAt(0).toString(16).padStart(4, '0')}`);

/**
 * config.json's text as transformers writes it (`json.dumps(indent=2, sort_keys=True)` and a
 * newline), with the numbers that were floats in the model's source config written as floats
 * (`0.0`, not `0`). For a config loaded from transformers' own config.json, this gives the same
 * bytes back.
 *
 * ```js
 * hfConfigText(model, {...hfConfigOf(model), dtype: 'bfloat16'});
 * ```
 */
export function hfConfigText(model: tfl.LayersModel, config: Record<string, unknown>): string {
  const stored = (model.getUserDefinedMetadata() as Record<string, unknown> | undefined)?.[FLOATS_KEY];
  const floats = new Set(Array.isArray(stored) ? stored.map(p => JSON.stringify(p)) : []);
  const write = (value: unknown, path: JSONPath, indent: string): string => {
    if (value === null || value === undefined) return 'null';
    if (typeof value === 'boolean') return String(value);
    if (typeof value === 'number') {
      return !Number.isInteger(value) || floats.has(JSON.stringify(path)) ? pythonFloat(value) : String(value);
    }
    if (typeof value === 'string') return pythonString(value);
    const inner = `${indent}  `;
    if (Array.isArray(value)) {
      if (value.length === 0) return '[]';
      return `[\n${value.map((v, i) => inner + write(v, [...path, i], inner)).join(',\n')}\n${indent}]`;
    }
    // like JSON.stringify: a key whose value is undefined is left out
    const keys = Object.keys(value as object).filter(k => (value as Record<string, unknown>)[k] !== undefined).sort();
    if (keys.length === 0) return '{}';
    return `{\n${keys.map(k => `${inner}${pythonString(k)}: ${write((value as Record<string, unknown>)[k], [...path, k], inner)}`)
        .join(',\n')}\n${indent}}`;
  };
  return `${write(config, [], '')}\n`;
}
