/**
 * Prepares the PyTorch/PEFT check of LoRA dropout on routed experts (issue 11 item 3): our fused
 * split-LoRA experts with lora_dropout against PEFT's lora.Linear on per-expert nn.Linear modules
 * (the older per-expert layout), fed the same masks. Writes OUT/case.safetensors: the inputs, the
 * masks as drawn here ([T·K, in], (token, slot) pair order), our output and gradients of
 * Σ out·G for x, A1, B1, A2, B2 (PEFT's fused layouts). Then, on the GPU machine:
 *
 *   npx tsx tools/peft_check/make_expert_dropout_check.ts OUT
 *   python tools/peft_check/check_expert_dropout.py OUT     # prints max relative errors as JSON
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-cpu';
import { join } from 'node:path';
import { writeSafetensorsFile } from '../../src/io/safetensors.js';
import { fusedExperts } from '../../src/ops/experts/fused_experts.js';
import { loraDropoutMask } from '../../src/ops/lora/dropout.js';
import { makeFolders } from '../../src/util/atomic.js';

await tf.setBackend('cpu');
const out = process.argv[2];
if (out === undefined) throw new Error('usage: make_expert_dropout_check.ts OUT');
const [T, H, I, E, K, r, p, scaling] = [7, 8, 4, 4, 2, 2, 0.3, 2];
const normal = (shape: number[], std: number, seed: number) => tf.randomNormal(shape, 0, std, 'float32', seed);
const x = normal([T, H], 1, 1) as tf.Tensor2D;
// K distinct experts per token, every expert used
const chosen = Array.from({ length: T }, (_, t) => [t % E, (t + 1 + (t % 2)) % E]);
const experts = tf.tensor2d(chosen, [T, K], 'int32');
const weights = tf.softmax(normal([T, K], 1, 2)) as tf.Tensor2D;
const gateUp = normal([E, 2 * I, H], 0.3, 3) as tf.Tensor3D;
const down = normal([E, H, I], 0.3, 4) as tf.Tensor3D;
const [A1, B1, A2, B2] = [normal([r * E, H], 0.3, 5), normal([2 * I, r * E], 0.3, 6), normal([r * E, I], 0.3, 7), normal([H, r * E], 0.3, 8)] as tf.Tensor2D[];
const G = normal([T, H], 1, 9) as tf.Tensor2D;
const [seed1, seed2] = [11, 12];
const run = (xv: tf.Tensor, a1: tf.Tensor, b1: tf.Tensor, a2: tf.Tensor, b2: tf.Tensor) => tf.sum(tf.mul(fusedExperts(xv as tf.Tensor2D,
  { weights, experts }, { gateUp, down,
    gateUpLoRA: [{ A: a1 as tf.Tensor2D, B: b1 as tf.Tensor2D, scaling, dropout: { p, seed: seed1 } }],
    downLoRA: [{ A: a2 as tf.Tensor2D, B: b2 as tf.Tensor2D, scaling, dropout: { p, seed: seed2 } }] },
  { kind: 'swiglu' }, { loraMode: 'split' }), G));
const { value, grads } = tf.valueAndGrads(run)([x, A1, B1, A2, B2]);
const outValue = fusedExperts(x, { weights, experts }, { gateUp, down,
  gateUpLoRA: [{ A: A1, B: B1, scaling, dropout: { p, seed: seed1 } }], downLoRA: [{ A: A2, B: B2, scaling, dropout: { p, seed: seed2 } }] },
  { kind: 'swiglu' }, { loraMode: 'split' });
makeFolders(out, 'the check folder');
await writeSafetensorsFile(join(out, 'case.safetensors'), {
  x, experts, weights, gate_up: gateUp, down, A1, B1, A2, B2, G,
  mask1: loraDropoutMask([T * K, H], p, seed1), mask2: loraDropoutMask([T * K, I], p, seed2),
  out: outValue, loss: value, dx: grads[0], dA1: grads[1], dB1: grads[2], dA2: grads[3], dB2: grads[4],
}, { scaling: String(scaling), p: String(p) });
console.log(`wrote ${join(out, 'case.safetensors')}`);
