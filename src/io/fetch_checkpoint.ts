/**
 * Hugging Face checkpoint import over HTTP (browsers, or Node's fetch): the same folder layout as
 * `loadHFCheckpoint` reads from disk (config.json + model.safetensors, or shards with
 * model.safetensors.index.json), fetched relative to a base URL.
 */
import type { MoECausalLM } from '../layers/moe_causal_lm.js';
import { familyOf, type HFConfig } from '../models/families.js';
import {
  CheckpointError, CheckpointSource, indexedCheckpointSource, modelFromCheckpoint, type LoadHFCheckpointOptions,
} from './hf_checkpoint_core.js';
import { parseSafetensors, type SafetensorsFile } from './safetensors_bytes.js';

const OP = 'fetchHFCheckpoint';

/** The part of the Fetch API the loader uses (the global `fetch` is one). */
export type FetchFunction = (url: string) => Promise<Pick<Response, 'ok' | 'status' | 'statusText' | 'arrayBuffer' | 'text'>>;

export interface FetchHFCheckpointOptions extends LoadHFCheckpointOptions {
  /** the fetch to use; default the global `fetch` */
  fetch?: FetchFunction;
  /** called once per file with its URL and size after it arrived (for a progress display) */
  onFile?: (url: string, bytes: number) => void;
}

type Fetched = { status: 'ok'; bytes: Uint8Array } | { status: 'missing' };

/** The folder URL `base` joined with a file name; `base` may be relative ('model/') or absolute. */
function fileURL(base: string, name: string): string {
  return base.endsWith('/') ? base + name : `${base}/${name}`;
}

/**
 * Fetches an HF checkpoint folder into a MoECausalLM, checking every tensor against config.json
 * before any is read (one CheckpointError lists all problems, as `loadHFCheckpoint` does).
 *
 * ```js
 * const model = await fetchHFCheckpoint('models/tiny-moe/', {expertKernel: 'fused'});
 * const logits = model.predict(tf.tensor2d([[1, 2, 3]], [1, 3], 'int32'));
 * ```
 */
export async function fetchHFCheckpoint(url: string, options: FetchHFCheckpointOptions = {}): Promise<MoECausalLM> {
  if (typeof url !== 'string' || url.length === 0) {
    throw new CheckpointError(`\`${OP}()\`: 'url' must be the checkpoint folder's URL but got ${JSON.stringify(url)}`);
  }
  const { fetch: fetchFn = globalThis.fetch as FetchFunction | undefined, onFile, ...modelOptions } = options;
  if (typeof fetchFn !== 'function') {
    throw new CheckpointError(`\`${OP}()\`: 'options.fetch' must be a function (default: the global fetch, ` +
        `which this runtime lacks) but got ${fetchFn === undefined ? 'undefined' : typeof fetchFn}`);
  }

  /** A file's bytes, or 'missing' for a 404; other failures are errors naming the file. */
  const get = async (name: string, what: string): Promise<Fetched> => {
    const where = fileURL(url, name);
    let response: Awaited<ReturnType<FetchFunction>>;
    try {
      response = await fetchFn(where);
    } catch (e) {
      throw new CheckpointError(`\`${OP}()\`: cannot fetch ${what} '${where}': ${(e as Error).message}`);
    }
    if (response.status === 404) return { status: 'missing' };
    if (!response.ok) {
      throw new CheckpointError(`\`${OP}()\`: cannot fetch ${what} '${where}': HTTP ${response.status} ${response.statusText}`.trimEnd());
    }
    const bytes = new Uint8Array(await response.arrayBuffer());
    onFile?.(where, bytes.byteLength);
    return { status: 'ok', bytes };
  };
  const getJSON = async (name: string, what: string): Promise<unknown> => {
    const file = await get(name, what);
    if (file.status === 'missing') {
      throw new CheckpointError(`\`${OP}()\`: cannot fetch ${what} '${fileURL(url, name)}': HTTP 404 (not found)`);
    }
    try {
      return JSON.parse(new TextDecoder().decode(file.bytes));
    } catch (e) {
      throw new CheckpointError(`\`${OP}()\`: ${what} '${fileURL(url, name)}' is not valid JSON: ${(e as Error).message}`);
    }
  };

  const config = await getJSON('config.json', 'config') as HFConfig;
  familyOf(config);  // unknown model types fail here, before any weights are fetched
  let source: CheckpointSource;
  const single = await get('model.safetensors', 'weights');
  if (single.status === 'ok') {
    source = CheckpointSource.single(parseSafetensors(single.bytes, fileURL(url, 'model.safetensors')));
  } else {
    const indexFile = await get('model.safetensors.index.json', 'index');
    if (indexFile.status === 'missing') {
      throw new CheckpointError(`\`${OP}()\`: '${url}' has neither model.safetensors nor model.safetensors.index.json`);
    }
    const indexURL = fileURL(url, 'model.safetensors.index.json');
    let index: unknown;
    try {
      index = JSON.parse(new TextDecoder().decode(indexFile.bytes));
    } catch (e) {
      throw new CheckpointError(`\`${OP}()\`: index '${indexURL}' is not valid JSON: ${(e as Error).message}`);
    }
    source = await indexedCheckpointSource(OP, `'${url}'`, indexURL, index, async (shard): Promise<SafetensorsFile | null> => {
      const file = await get(shard, 'shard');
      return file.status === 'ok' ? parseSafetensors(file.bytes, fileURL(url, shard)) : null;
    });
  }
  return modelFromCheckpoint(OP, `'${url}'`, config, source, modelOptions);
}
