/**
 * scaledDotProductAttention on webgpu: the op's spec (spec/ops/attention_core.spec.ts: value and
 * gradients against float64 and the composed tape version, every mask the layers build, grouped KV
 * heads, no leaks) run on this backend, and batchProduct's (spec/ops/batch_product.spec.ts: its
 * composed path's products, here through MoEBatchProduct). Run with TFJS_BACKEND=webgpu.
 */
import '../../ops/attention_core.spec.js';
import '../../ops/batch_product.spec.js';
