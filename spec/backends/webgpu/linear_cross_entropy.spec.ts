/**
 * linearCrossEntropy on webgpu: its op spec reads asynchronously, so it runs here unchanged (and on
 * cpu and wasm from spec/ops/): value and gradients against the composed head + tokenCrossEntropy
 * and float64, the frozen head, no leaks, and the backward pass's peak of two [chunk, V] buffers.
 */
import '../../ops/linear_cross_entropy.spec.js';
