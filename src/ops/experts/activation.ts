/**
 * Expert activations on the up projection's output h [N, 2I], as a forward/backward pair so the
 * fused op can keep only h and recompute the activation in backward.
 * 'outIn' weights give gate = first I columns, up = last I; gpt-oss interleaves them
 * (gate = even columns, up = odd).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { ExpertActivation } from '../types.js';

const GELU_C = Math.sqrt(2 / Math.PI);

/** GELU's tanh approximation (gelu_pytorch_tanh): 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))) */
function geluTanh(g: tf.Tensor): tf.Tensor {
  return tf.mul(tf.mul(0.5, g), tf.add(1, tf.tanh(tf.mul(GELU_C, tf.add(g, tf.mul(0.044715, tf.pow(g, 3)))))));
}

function splitGateUp(h: tf.Tensor2D, interleaved: boolean): [tf.Tensor2D, tf.Tensor2D] {
  const [n, twoI] = h.shape;
  const i = twoI / 2;
  if (!interleaved) return tf.split(h, 2, 1) as [tf.Tensor2D, tf.Tensor2D];
  const pairs = tf.reshape(h, [n, i, 2]);
  return [tf.reshape(tf.slice(pairs, [0, 0, 0], [n, i, 1]), [n, i]),
          tf.reshape(tf.slice(pairs, [0, 0, 1], [n, i, 1]), [n, i])];
}

function joinGateUp(dGate: tf.Tensor2D, dUp: tf.Tensor2D, interleaved: boolean): tf.Tensor2D {
  if (!interleaved) return tf.concat([dGate, dUp], 1);
  const [n, i] = dGate.shape;
  return tf.reshape(tf.stack([dGate, dUp], 2), [n, 2 * i]);
}

/** a [N, I] from h [N, 2I] */
export function activationForward(
    h: tf.Tensor2D, activation: ExpertActivation, interleaved: boolean): tf.Tensor2D {
  return tf.tidy(() => {
    const [gate, up] = splitGateUp(h, interleaved);
    if (activation.kind === 'swiglu') return tf.mul(tf.mul(gate, tf.sigmoid(gate)), up);
    if (activation.kind === 'gegluTanh') return tf.mul(geluTanh(gate), up);
    const { alpha, limit } = activation;
    const g = tf.minimum(gate, limit);
    const u = tf.clipByValue(up, -limit, limit);
    return tf.mul(tf.add(u, 1), tf.mul(g, tf.sigmoid(tf.mul(g, alpha))));
  });
}

/** dh [N, 2I] from h and da [N, I]. Clamps pass the gradient where the input is within the limits, boundaries included, as torch.clamp does. */
export function activationBackward(
    h: tf.Tensor2D, da: tf.Tensor2D, activation: ExpertActivation, interleaved: boolean): tf.Tensor2D {
  return tf.tidy(() => {
    const [gate, up] = splitGateUp(h, interleaved);
    if (activation.kind === 'swiglu') {
      const sig = tf.sigmoid(gate);
      const silu = tf.mul(gate, sig);
      // silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
      const dSilu = tf.mul(sig, tf.add(1, tf.mul(gate, tf.sub(1, sig))));
      return joinGateUp(tf.mul(tf.mul(da, up), dSilu) as tf.Tensor2D, tf.mul(da, silu) as tf.Tensor2D, interleaved);
    }
    if (activation.kind === 'gegluTanh') {
      // d gelu/dg = 0.5·(1 + t) + 0.5·g·(1 − t²)·c·(1 + 3·0.044715·g²), t = tanh(c·(g + 0.044715·g³))
      const t = tf.tanh(tf.mul(GELU_C, tf.add(gate, tf.mul(0.044715, tf.pow(gate, 3)))));
      const dGelu = tf.add(tf.mul(0.5, tf.add(1, t)),
          tf.mul(tf.mul(tf.mul(0.5, gate), tf.sub(1, tf.square(t))), tf.mul(GELU_C, tf.add(1, tf.mul(3 * 0.044715, tf.square(gate))))));
      return joinGateUp(tf.mul(tf.mul(da, up), dGelu) as tf.Tensor2D, tf.mul(da, geluTanh(gate)) as tf.Tensor2D, interleaved);
    }
    const { alpha, limit } = activation;
    const g = tf.minimum(gate, limit);
    const u = tf.clipByValue(up, -limit, limit);
    const sig = tf.sigmoid(tf.mul(g, alpha));
    const glu = tf.mul(g, sig);
    // d(g·σ(αg))/dg = σ(αg)·(1 + αg·(1 − σ(αg)))
    const dGlu = tf.mul(sig, tf.add(1, tf.mul(tf.mul(g, alpha), tf.sub(1, sig))));
    const dGate = tf.mul(tf.mul(tf.mul(da, tf.add(u, 1)), dGlu), tf.cast(tf.lessEqual(gate, limit), 'float32'));
    const inRange = tf.logicalAnd(tf.greaterEqual(up, -limit), tf.lessEqual(up, limit));
    const dUp = tf.mul(tf.mul(da, glu), tf.cast(inRange, 'float32'));
    return joinGateUp(dGate as tf.Tensor2D, dUp as tf.Tensor2D, interleaved);
  });
}
