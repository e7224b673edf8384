/**
 * The decoder's fused layer ops (rmsNorm, applyRotary) on webgpu: their op specs read
 * asynchronously, so they run here unchanged (and on cpu and wasm from spec/ops/).
 */
import '../../ops/rms_norm.spec.js';
import '../../ops/rotary.spec.js';
