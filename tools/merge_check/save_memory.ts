/**
 * Peak RSS of saveHFCheckpoint above the loaded model (a random qwen3_moe of 674 MiB in float32,
 * cpu backend), written as bfloat16 or float32 in 200MB shards: the save streams one tensor at a
 * time, so this stays near the largest tensor or below, never the checkpoint's size.
 *
 *   node --expose-gc --import tsx tools/merge_check/save_memory.ts bfloat16
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs-layers';
import { rmSync } from 'node:fs';
import { buildMoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { saveHFCheckpoint } from '../../src/io/hf_save.js';
await tf.setBackend('cpu');
const model = buildMoECausalLM({ model_type: 'qwen3_moe', vocab_size: 32000, hidden_size: 1024, num_hidden_layers: 4,
  num_attention_heads: 8, num_key_value_heads: 2, head_dim: 128, num_experts: 16, num_experts_per_tok: 2,
  moe_intermediate_size: 512, norm_topk_prob: true, rms_norm_eps: 1e-6, tie_word_embeddings: false });
const bytes = model.weights.reduce((s, w) => s + 4 * w.shape.reduce((a, b) => a! * b!, 1)!, 0);
global.gc?.();
const base = process.memoryUsage().rss;
let peak = base;
const timer = setInterval(() => { peak = Math.max(peak, process.memoryUsage().rss); }, 5);
const t0 = Date.now();
const saved = await saveHFCheckpoint(model, '/tmp/mem-save', { dtype: process.argv[2] as 'bfloat16', maxShardSize: '200MB' });
clearInterval(timer);
console.log(`model ${(bytes / 2 ** 20).toFixed(0)} MiB f32; wrote ${saved.shards.length} shards, ${(saved.totalSize / 2 ** 20).toFixed(0)} MiB ${saved.dtype} in ${((Date.now() - t0) / 1000).toFixed(1)} s; peak RSS above the loaded model ${((peak - base) / 2 ** 20).toFixed(0)} MiB`);
rmSync('/tmp/mem-save', { recursive: true });
