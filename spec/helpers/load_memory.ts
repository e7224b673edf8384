/**
 * The checkpoint and the bound of the load-memory specs (spec/io/load_memory.spec.ts on cpu,
 * spec/backends/webgpu/load_memory.spec.ts on Mesa): OLMoE's layout at smaller widths, 275 MB of
 * bf16 in one shard, written at run time by the load bench's own writer.
 */
import type { HFConfig } from '../../src/models/families.js';
import { olmoeConfig } from '../../src/bench/load_bench.js';

/** hidden 512, 32 experts of 512, vocab 32000: the embedding (65.5 MB as float32) is the largest tensor. */
export function loadMemoryConfig(layers: number): HFConfig {
  return {
    ...olmoeConfig(layers), hidden_size: 512, intermediate_size: 512, num_experts: 32, vocab_size: 32000,
    num_attention_heads: 8, num_key_value_heads: 8,
  };
}

/**
 * What a load may hold on the host beyond the weights' own memory, for a largest tensor of
 * `largest` bytes (as loaded, float32): that tensor as stored (bf16: half its size) and a 16 MiB
 * piece of it decoded, plus slack for arrays V8 frees at its next collection and pages the
 * allocator keeps: 1.5 x largest + 64 MiB in all. Measured on Mesa (webgpu, sampled): 91-118 MB
 * for a 65.5 MB embedding against this bound of 165 MB; the whole model, 349 MB, before the loader
 * wrote to the device.
 */
export const hostBound = (largest: number) => 1.5 * largest + 64 * 2 ** 20;
