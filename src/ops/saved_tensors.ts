/**
 * What a customGrad keeps for its backward, kept without tfjs's clone kernel.
 *
 * tfjs's `save` (the customGrad forward's last argument) keeps a clone of each tensor, made by
 * engine.clone: the Identity kernel run through the whole kernel path, then a tape node for the
 * clone. A decoder layer's training forward saves about 70 tensors (the LoRA linears, the norms,
 * rotary, attention, routing, the MoE block), so an OLMoE-1B-7B step made ~1100 such clones and
 * tape nodes, host time that the step waits on where recording, not the GPU, sets its pace (on
 * Mesa, a narrow 2-layer model: ~10 % of the forward's and the backward's recording). No gradient
 * flows through a saved tensor, so its tape node is never used; and every backend's Identity only
 * shares the input's data (cpu and webgpu increment the data's reference count, wasm too with
 * this package's Identity). saveForBackward makes each clone that way directly.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Tensor } from '@tensorflow/tfjs-core';

/** The parts of tfjs-core's Engine this file uses (4.22): a tensor's backend, and clone. */
interface EngineInternals {
  clone(x: Tensor): Tensor;
  state?: { tensorInfo?: { get(dataId: object): { backend: tf.KernelBackend } | undefined } };
}

/**
 * Calls `save(tensors)` (a customGrad's), with each kept tensor a new tensor sharing the data of
 * the one given instead of an Identity kernel's output on tfjs's tape. tfjs keeps and later
 * disposes them as its own clones; outside a gradient tape `save` keeps nothing, as before.
 *
 * ```js
 * tf.customGrad((x, save) => { const y = tf.square(x); saveForBackward(save, [x]); return { value: y, gradFunc: ... }; });
 * ```
 */
export function saveForBackward(save: GradSaveFunc, tensors: Tensor[]): void {
  const engine = tf.engine() as unknown as EngineInternals;
  const own = Object.getOwnPropertyDescriptor(engine, 'clone');
  const clone = engine.clone.bind(engine);
  engine.clone = (x: Tensor) => sharedClone(engine, x) ?? clone(x);
  try {
    save(tensors);
  } finally {
    if (own === undefined) delete (engine as Partial<EngineInternals>).clone;
    else Object.defineProperty(engine, 'clone', own);
  }
}

/** x's data as a new tensor (what Identity does), or null where that is not plain numbers on a known backend. */
function sharedClone(engine: EngineInternals, x: Tensor): Tensor | null {
  if (x.dtype === 'string' || x.dtype === 'complex64') return null;
  const backend = engine.state?.tensorInfo?.get(x.dataId)?.backend;
  if (backend === undefined || typeof backend.incRef !== 'function') return null;
  backend.incRef(x.dataId);
  return tf.engine().makeTensorFromTensorInfo({ dataId: x.dataId, shape: x.shape, dtype: x.dtype }, backend);
}
