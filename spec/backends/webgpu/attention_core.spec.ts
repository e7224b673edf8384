/**
 * scaledDotProductAttention on webgpu: the op's spec (spec/ops/attention_core.spec.ts: value and
 * gradients against float64 and the composed tape version, every mask the layers build, grouped KV
 * heads, no leaks) run on this backend. Run with TFJS_BACKEND=webgpu.
 */
import '../../ops/attention_core.spec.js';
