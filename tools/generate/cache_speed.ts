/**
 * Generation speed with and without the KV cache on the example model (greedy, the same tokens):
 * the cache makes each step one token's forward pass, so the time per token stays flat as the text
 * grows instead of growing with it.
 *
 *   npx tsx tools/generate/cache_speed.ts [--backend cpu|wasm] [--tokens 200]
 */
import '@tensorflow/tfjs-layers';
import { selectBackend } from '../../src/cli/backend.js';
import { readTokenizer } from '../../src/data/tokenizer_file.js';
import { generate } from '../../src/generate/generate.js';
import { loadModelDir } from '../../src/io/model_dir.js';

const arg = (name: string, fallback: string) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
};
const backend = arg('backend', 'cpu');
const tokens = Number(arg('tokens', '200'));
await selectBackend(backend);
const dir = 'examples/models/tala-moe';
const tokenizer = await readTokenizer(dir);
const { model } = await loadModelDir(dir, { expertKernel: 'fused' });
await generate(model, 'miro ', { tokenizer, maxNewTokens: 4 });  // warm-up
const results: Record<string, { seconds: number; ids: number[] }> = {};
for (const useCache of [true, false]) {
  const start = performance.now();
  const r = await generate(model, 'miro ', { tokenizer, maxNewTokens: tokens, useCache });
  results[useCache ? 'cache' : 'no cache'] = { seconds: (performance.now() - start) / 1000, ids: Array.from(r.ids) };
}
const same = JSON.stringify(results['cache'].ids) === JSON.stringify(results['no cache'].ids);
for (const [name, r] of Object.entries(results)) {
  console.log(`${backend} ${name}: ${r.ids.length} tokens in ${r.seconds.toFixed(2)} s (${(r.ids.length / r.seconds).toFixed(1)} tok/s)`);
}
console.log(`same tokens: ${same}`);
model.dispose();
