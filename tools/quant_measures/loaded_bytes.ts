/**
 * Issue 14's loaded bytes per expert format, for a checkpoint of OLMoE-1B-7B's shapes and one of
 * Qwen3-30B-A3B's (their config.json values; nothing is read or allocated): the routed experts,
 * the whole model and the load's peak as `estimateLoadMemory` computes them (the numbers the
 * loaders check a model against), in bytes, GB (10^9) and GiB, one markdown table.
 *
 *   npx tsx tools/quant_measures/loaded_bytes.ts
 */
import { olmoeConfig } from '../../src/bench/load_bench.js';
import type { HFConfig } from '../../src/models/config.js';
import { estimateLoadMemory, type LoadMemoryOptions } from '../../src/models/memory.js';

/** Qwen/Qwen3-30B-A3B's config.json (the values that size the weights). */
const QWEN3_30B_A3B: HFConfig = {
  architectures: ['Qwen3MoeForCausalLM'], model_type: 'qwen3_moe', hidden_size: 2048, intermediate_size: 6144,
  moe_intermediate_size: 768, num_hidden_layers: 48, num_attention_heads: 32, num_key_value_heads: 4, head_dim: 128,
  num_experts: 128, num_experts_per_tok: 8, norm_topk_prob: true, decoder_sparse_step: 1, mlp_only_layers: [],
  vocab_size: 151936, tie_word_embeddings: false, rms_norm_eps: 1e-6, rope_theta: 1e6, max_position_embeddings: 40960,
  attention_bias: false, hidden_act: 'silu',
};

const SHAPES: Array<[string, HFConfig]> = [
  ['OLMoE-1B-7B (16 layers, 64 experts, H 2048, I 1024, vocab 50304)', olmoeConfig(16)],
  ['Qwen3-30B-A3B (48 layers, 128 experts, H 2048, I 768, vocab 151936)', QWEN3_30B_A3B],
];
const FORMATS: Array<[string, LoadMemoryOptions]> = [
  ['float32', { expertStorage: 'float32' }], ['bf16', { expertStorage: 'bf16' }], ['int8', { expertStorage: 'int8' }],
  ['int4 (g32)', { expertStorage: 'int4', expertGroupSize: 32 }], ['int4 (g64)', { expertStorage: 'int4' }],
  ['int4 (g128)', { expertStorage: 'int4', expertGroupSize: 128 }], ['nf4', { expertStorage: 'nf4' }], ['nf4-dq', { expertStorage: 'nf4-dq' }],
  ['mxfp4', { expertStorage: 'mxfp4' }],
];
const both = (b: number) => `${b.toLocaleString('en-US').replace(/,/g, ' ')} B (${(b / 1e9).toFixed(2)} GB, ${(b / 2 ** 30).toFixed(2)} GiB)`;
console.log('| model shape | experts as | routed experts | whole model | load peak |');
console.log('|---|---|---|---|---|');
for (const [shape, config] of SHAPES) {
  FORMATS.forEach(([format, options], i) => {
    const e = estimateLoadMemory(config, options);
    console.log(`| ${i === 0 ? shape : ''} | ${format} | ${both(e.expertBytes)} | ${both(e.bytes)} | ` +
        `${(e.peakBytes / 1e9).toFixed(2)} GB (${(e.peakBytes / 2 ** 30).toFixed(2)} GiB) |`);
  });
}
