/** Generation: sampling as transformers samples, a KV cache, EOS and stop strings, generation_config.json. */
export {
  generate, type GenerationOptions, type GenerationPrompt, type GenerationResult, type FinishReason,
} from './generate.js';
export { KVCache, type CachedKeys } from './kv_cache.js';
export { processLogits, drawToken, type SamplingSettings } from './sampling.js';
export {
  generationConfigFromJSON, GenerationConfigError, GENERATION_CONFIG_FILE, type GenerationConfig,
} from './generation_config.js';
export { readGenerationConfig } from './generation_config_file.js';
