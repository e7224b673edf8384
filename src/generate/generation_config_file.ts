/** The generation settings of a model folder on disk (Node): generation_config.json, else config.json. */
import { join } from 'node:path';
import { confinedPath, openArtifactFolder, pathKind, readJSONFile } from '../util/files.js';
import { GENERATION_CONFIG_FILE, generationConfigFromJSON, type GenerationConfig } from './generation_config.js';

/**
 * What `generate` takes from the folder `dir`: generation_config.json's settings when the folder has
 * one (transformers uses it alone then), else config.json's eos_token_id, else none.
 *
 * ```js
 * const config = await readGenerationConfig('./Qwen3-30B-A3B');  // {eosTokenIds: [151645, 151643], doSample: true, ...}
 * await generate(model, 'Hello', {tokenizer, generationConfig: config});
 * ```
 */
export async function readGenerationConfig(dir: string): Promise<GenerationConfig> {
  await openArtifactFolder(dir, 'model folder');
  for (const name of [GENERATION_CONFIG_FILE, 'config.json']) {
    if (await pathKind(join(dir, name)) === 'missing') continue;
    const what = `'${join(dir, name)}'`;
    const json = await readJSONFile(await confinedPath(dir, name, what), what);
    const config = generationConfigFromJSON(json, what);
    // config.json carries the model's settings too: only its eos_token_id is a generation default
    return name === GENERATION_CONFIG_FILE ? config : (config.eosTokenIds === undefined ? {} : { eosTokenIds: config.eosTokenIds });
  }
  return {};
}
