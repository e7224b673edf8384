/**
 * The checkpoint and the bound of the load-memory specs (spec/io/load_memory.spec.ts on cpu,
 * spec/backends/webgpu/load_memory.spec.ts on Mesa): OLMoE's layout at smaller widths, 275 MB of
 * bf16 in one shard, written at run time by the load bench's own writer.
 */
import { narrowOlmoeConfig } from '../../src/bench/load_bench.js';

/** the checkpoint of the specs: narrowOlmoeConfig (the embedding, 65.5 MB as float32, is the largest tensor) */
export const loadMemoryConfig = narrowOlmoeConfig;

/**
 * What a load may hold on the host beyond the weights' own memory, for a largest tensor of
 * `largest` bytes (as loaded, float32): that tensor as stored (bf16: half its size) and a 16 MiB
 * piece of it decoded, plus slack for arrays V8 frees at its next collection and pages the
 * allocator keeps: 1.5 x largest + 64 MiB in all. Measured on Mesa (webgpu, sampled): 91-118 MB
 * for a 65.5 MB embedding against this bound of 165 MB; the whole model, 349 MB, before the loader
 * wrote to the device.
 */
export const hostBound = (largest: number) => 1.5 * largest + 64 * 2 ** 20;
