/**
 * The generation settings of a model folder, read as transformers reads them: generation_config.json
 * (GenerationConfig.from_pretrained) when the folder has one, else the generation keys of config.json
 * (GenerationConfig.from_model_config). No Node dependency; generation_config_file.ts reads the files.
 */
import { MoELoraError } from '../errors.js';
import { describeValue } from '../util/describe.js';

export const GENERATION_CONFIG_FILE = 'generation_config.json';

/** A generation_config.json (or config.json) that does not hold usable settings. */
export class GenerationConfigError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'GenerationConfigError';
    Object.setPrototypeOf(this, GenerationConfigError.prototype);
  }
}

/** The settings `generate` takes from a model folder; absent keys are absent here too. */
export interface GenerationConfig {
  /** the ids that end a generation (eos_token_id: one id or a list) */
  eosTokenIds?: number[];
  doSample?: boolean;
  temperature?: number;
  topK?: number;
  topP?: number;
  maxNewTokens?: number;
}

const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);

/**
 * The generation settings of a parsed generation_config.json or config.json (`source` names it in
 * messages). Keys transformers would not use for these settings are ignored; a key present with a
 * value of the wrong kind is an error.
 *
 * ```js
 * generationConfigFromJSON({eos_token_id: [151645, 151643], do_sample: true, temperature: 0.6, top_k: 20, top_p: 0.95}, 'q');
 * // {eosTokenIds: [151645, 151643], doSample: true, temperature: 0.6, topK: 20, topP: 0.95}
 * ```
 */
export function generationConfigFromJSON(json: unknown, source: string): GenerationConfig {
  if (!isObject(json)) throw new GenerationConfigError(`${source} must hold a JSON object but holds ${describeValue(json)}`);
  const bad = (key: string, expected: string): never => {
    throw new GenerationConfigError(`${source}: '${key}' must be ${expected} but is ${describeValue(json[key])}`);
  };
  const config: GenerationConfig = {};
  const eos = json['eos_token_id'];
  if (eos != null) {
    const ids = Array.isArray(eos) ? eos : [eos];
    if (ids.some(id => !Number.isInteger(id) || (id as number) < 0)) bad('eos_token_id', 'a token id or a list of token ids');
    config.eosTokenIds = ids as number[];
  }
  if (json['do_sample'] != null) {
    if (typeof json['do_sample'] !== 'boolean') bad('do_sample', 'a boolean');
    config.doSample = json['do_sample'] as boolean;
  }
  const number = (key: string, field: 'temperature' | 'topP', ok: (v: number) => boolean, expected: string) => {
    const v = json[key];
    if (v == null) return;
    if (typeof v !== 'number' || !Number.isFinite(v) || !ok(v)) bad(key, expected);
    config[field] = v as number;
  };
  number('temperature', 'temperature', v => v >= 0, 'a number >= 0');
  number('top_p', 'topP', v => v > 0 && v <= 1, 'a number in (0, 1]');
  const integer = (key: string, field: 'topK' | 'maxNewTokens', min: number) => {
    const v = json[key];
    if (v == null) return;
    if (!Number.isInteger(v) || (v as number) < min) bad(key, `an integer >= ${min}`);
    config[field] = v as number;
  };
  integer('top_k', 'topK', 0);
  integer('max_new_tokens', 'maxNewTokens', 1);
  return config;
}
