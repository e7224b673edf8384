/**
 * Host milliseconds spent in each native WebGPU call a piece of work makes (issue 15: on the H100
 * the host is busy for nearly all of an OLMoE step, and run Y3's V8 profile put about 66 ms a step
 * in native frames it cannot name: Dawn's calls, each reached through npm `webgpu`'s bindings).
 * withNativeTiming wraps the device's, its queue's and, for the encoders and passes created during
 * the work, their recording methods with a performance.now() pair, and puts every method back
 * after: createBindGroup against setBindGroup, dispatchWorkgroups and queue.submit says whether a
 * bind-group cache, fewer dispatches or fewer submits is the lever. The wrappers' own cost (two
 * clock reads and a closure a call) is counted in each call's ms.
 */

/** One native method: calls and the host ms inside them. */
export interface NativeCallTime { count: number; ms: number }
/** By method, named `owner.method` (device, queue, encoder, pass). */
export type NativeCallTimes = Record<string, NativeCallTime>;

const DEVICE_METHODS = ['createBindGroup', 'createBuffer', 'createCommandEncoder'] as const;
const QUEUE_METHODS = ['submit', 'writeBuffer'] as const;
const ENCODER_METHODS = ['beginComputePass', 'finish', 'copyBufferToBuffer', 'clearBuffer', 'resolveQuerySet'] as const;
const PASS_METHODS = ['setPipeline', 'setBindGroup', 'dispatchWorkgroups', 'end'] as const;

type Wrapped = (...args: unknown[]) => unknown;

/**
 * Replaces `names` of `target` (those it has) by timed calls that record under `owner.name` and
 * hand the result to `then`; returns what puts them back. A method the object does not let be
 * replaced is left untimed.
 */
function timeMethods(target: object, owner: string, names: readonly string[], times: NativeCallTimes,
    then: (name: string, result: unknown) => unknown = (_, r) => r): () => void {
  const methods = target as Record<string, unknown>;
  const restores: Array<() => void> = [];
  for (const name of names) {
    const original = methods[name];
    if (typeof original !== 'function') continue;
    const bound = (original as Wrapped).bind(target);
    const key = `${owner}.${name}`;
    const own = Object.prototype.hasOwnProperty.call(target, name);
    const timed: Wrapped = (...args) => {
      const started = performance.now();
      const result = bound(...args);
      const entry = times[key] ??= { count: 0, ms: 0 };
      entry.count++;
      entry.ms += performance.now() - started;
      return then(name, result);
    };
    try {
      methods[name] = timed;
    } catch {
      continue;
    }
    if (methods[name] !== timed) continue;
    // a method from the prototype comes back by deleting the own property that shadows it
    restores.push(() => { if (own) methods[name] = original; else delete methods[name]; });
  }
  return () => restores.forEach(r => r());
}

/**
 * Runs `work` with the native calls of a WebGPUBackend's device and queue timed (the queue the
 * backend holds: it may be another wrapper object than a fresh `device.queue`); every method is put
 * back when the work ends (or throws).
 *
 * ```js
 * const { value, calls } = await withNativeTiming(tf.backend(), () => trainingStep(step));
 * calls['device.createBindGroup'];  // { count: 2512, ms: 31.4 }
 * ```
 */
export async function withNativeTiming<T>(backend: { device: GPUDevice; queue: GPUQueue }, work: () => Promise<T>): Promise<{ value: T; calls: NativeCallTimes }> {
  const calls: NativeCallTimes = {};
  const timePass = (pass: unknown) => { timeMethods(pass as object, 'pass', PASS_METHODS, calls); return pass; };
  const timeEncoder = (encoder: unknown) => {
    timeMethods(encoder as object, 'encoder', ENCODER_METHODS, calls, (name, r) => name === 'beginComputePass' ? timePass(r) : r);
    return encoder;
  };
  const restoreDevice = timeMethods(backend.device, 'device', DEVICE_METHODS, calls, (name, r) => name === 'createCommandEncoder' ? timeEncoder(r) : r);
  const restoreQueue = timeMethods(backend.queue, 'queue', QUEUE_METHODS, calls);
  try {
    return { value: await work(), calls };
  } finally {
    restoreQueue();
    restoreDevice();
  }
}
