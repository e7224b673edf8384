/**
 * Activation recomputation (gradient checkpointing, torch.utils.checkpoint): `recompute(fn, x,
 * trainables)` is fn(x) as one op that keeps nothing for the backward pass but x, and runs fn
 * again in the backward pass, on a tape of its own, to get the gradients. One forward more per
 * step; the activations fn makes stay alive only while its own backward runs.
 */
import * as tf from '@tensorflow/tfjs-core';
import { describeValue } from '../util/describe.js';
import { fail } from './validate.js';

const OP = 'recompute';

/** What the backward pass runs fn under (e.g. the forward pass's sequence context), or nothing. */
export type RecomputeScope = <T>(run: () => T) => T;

/**
 * tfjs-core's engine state (4.22): the tape of the gradient pass running now. A gradient pass
 * started inside another's backward (ours) would replace it (startTape makes a new one at depth 0)
 * and leave null behind, where the outer pass then disposes its saved tensors. Kept and put back.
 */
interface TapeState { gradientDepth: number; activeTape: unknown[] | null }

function tapeState(): TapeState {
  const state = (tf.engine() as unknown as { state?: Partial<TapeState> }).state;
  if (state === undefined || typeof state.gradientDepth !== 'number' || !('activeTape' in state)) {
    fail(OP, `tfjs-core's engine (${tf.version_core}) must keep its gradient tape in state.gradientDepth and ` +
        `state.activeTape (as 4.22 does) but its state has ${state === undefined ? 'neither' : `gradientDepth ${describeValue(state.gradientDepth)}${'activeTape' in state ? '' : ' and no activeTape'}`}`);
  }
  return state as TapeState;
}

/**
 * fn(x), its gradients for x and every tensor of `trainables` computed by running fn(x) again in
 * the backward pass. fn must be deterministic (the same kernels on the same input give the same
 * bits: in training, dropout is seeded) and read the trainables itself (layers read their
 * variables); any other tensor it reads is a constant (a frozen weight gets no gradient and costs
 * no gradient memory). The backward pass runs fn under `scope`, which must give it what the
 * forward had (the sequence context: masks, positions, the dropout seed).
 *
 * ```js
 * const w = tf.variable(tf.randomNormal([4, 4]));
 * const y = recompute(x => tf.tanh(tf.matMul(tf.tanh(tf.matMul(x, w)), w)), x, [w]);
 * // tf.grads gives the gradients of x and w; the two tanh outputs are not kept for them
 * ```
 */
export function recompute(
    fn: (x: tf.Tensor) => tf.Tensor, x: tf.Tensor, trainables: readonly tf.Tensor[],
    scope: RecomputeScope = run => run()): tf.Tensor {
  if (typeof fn !== 'function') fail(OP, `'fn' must be a function (x) => tensor but got ${describeValue(fn)}`);
  assertFloatTensor('x', x);
  if (!Array.isArray(trainables)) fail(OP, `'trainables' must be an array of float32 tensors but got ${describeValue(trainables)}`);
  trainables.forEach((t, i) => assertFloatTensor(`trainables[${i}]`, t));
  const ids = new Set<number>([x.id]);
  trainables.forEach((t, i) => {
    if (ids.has(t.id)) fail(OP, `'trainables[${i}]' is given twice (or is 'x'): each input gets one gradient`);
    ids.add(t.id);
  });
  if (typeof scope !== 'function') fail(OP, `'scope' must be a function (run) => run() but got ${describeValue(scope)}`);
  tapeState();  // the backward pass needs it: refused now, not in the middle of a gradient
  const op = tf.customGrad((...args: unknown[]) => {
    const save = args[args.length - 1] as tf.GradSaveFunc;
    const input = args[0] as tf.Tensor;
    // the forward runs as a kernel: the tape is off, so fn's own ops save nothing for backward
    const value = fn(input);
    if (!(value instanceof tf.Tensor)) fail(OP, `'fn' must return a tensor but returned ${describeValue(value)}`);
    save([input]);
    return {
      value,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        try {
          return recomputeBackward(fn, saved[0], trainables, scope, dy);
        } finally {
          // tfjs frees what a backward pass saved only when the whole pass ends: the layer inputs
          // would all be alive at its peak. This op's copy of x has no other reader once used.
          saved[0].dispose();
        }
      },
    };
  });
  return op(x, ...trainables);
}

/** A live float32 tensor of any shape (what gets a gradient). */
function assertFloatTensor(arg: string, value: unknown): void {
  if (!(value instanceof tf.Tensor)) fail(OP, `'${arg}' must be a float32 tensor but got ${describeValue(value)}`);
  if (value.isDisposed) fail(OP, `'${arg}' was already disposed`);
  if (value.dtype !== 'float32') fail(OP, `'${arg}' must be float32 but got ${value.dtype} (shape [${value.shape}])`);
}

/** Runs fn(x) again on a tape of its own and returns [dx, ...d(trainables)]. */
function recomputeBackward(
    fn: (x: tf.Tensor) => tf.Tensor, x: tf.Tensor, trainables: readonly tf.Tensor[], scope: RecomputeScope,
    dy: tf.Tensor): tf.Tensor[] {
  const state = tapeState();
  const outer = state.activeTape;
  if (state.gradientDepth === 0) state.activeTape = null;
  try {
    return scope(() => {
      const xs = [x, ...trainables];
      // allowNoGradients: a trainable fn does not reach (an adapter disabled for now) gets zeros
      const { value, grads } = tf.engine().gradients(() => fn(x), xs, dy, true);
      value.dispose();
      return grads.map((g, i) => g ?? tf.zerosLike(xs[i]));
    });
  } finally {
    // a gradient pass that threw midway left its tape (and what it saved) behind
    const inner = state.activeTape;
    if (inner !== outer && Array.isArray(inner)) {
      for (const node of inner as Array<{ saved?: unknown }>) {
        if (Array.isArray(node.saved)) for (const t of node.saved) if (t instanceof tf.Tensor) t.dispose();
      }
    }
    state.activeTape = outer;
  }
}
