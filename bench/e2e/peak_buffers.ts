/**
 * What is alive at the high-water mark of tfjs-webgpu's buffers: the BufferManager's acquire and
 * release are followed (on its prototype, so limitWebGPUBufferPool's bound still applies), each
 * buffer labelled with the WebGPU program that asked for it ('upload' for tensor data written from
 * the host: tensor1d of a plan, uniforms of ops), and at every new peak of bytes in use the live
 * buffers are summed by (label, bytes). memory_narrow.ts `--peak-buffers on` prints the largest
 * groups: at the narrow shapes a size names its tensor (e.g. capacity·2I·4 bytes is the experts' h).
 */
import * as tf from '@tensorflow/tfjs-core';

interface Live { size: number; label: string }

/** One group of buffers alive at the peak: count × bytes, made by `label`. */
export interface PeakGroup { label: string; bytes: number; count: number; totalBytes: number }

interface ManagerProto {
  acquireBuffer(this: { numBytesUsed: number }, size: number, usage: number, ...rest: unknown[]): GPUBuffer;
  releaseBuffer(this: { numBytesUsed: number }, buffer: GPUBuffer, ...rest: unknown[]): void;
}

/**
 * Starts following the webgpu backend's buffers; `peak()` returns the bytes in use at the highest
 * point since start (or `reset()`) and the groups alive then, largest first; `stop()` undoes it.
 */
export function followPeakBuffers(): { peak(): { usedBytes: number; groups: PeakGroup[] }; reset(): void; stop(): void } {
  const backend = tf.backend() as unknown as {
    bufferManager: object; runWebGPUProgram: (program: { constructor: { name: string }; shaderKey?: string }, ...rest: unknown[]) => unknown;
  };
  const proto = Object.getPrototypeOf(backend.bufferManager) as ManagerProto;
  const { acquireBuffer, releaseBuffer } = proto;
  const run = backend.runWebGPUProgram;
  const live = new Map<GPUBuffer, Live>();
  let label = 'upload';
  let peakUsed = 0;
  let peakGroups: PeakGroup[] = [];
  const snapshot = () => {
    const groups = new Map<string, PeakGroup>();
    for (const { size, label: l } of live.values()) {
      const key = `${l} ${size}`;
      const g = groups.get(key) ?? { label: l, bytes: size, count: 0, totalBytes: 0 };
      g.count++;
      g.totalBytes += size;
      groups.set(key, g);
    }
    peakGroups = [...groups.values()].sort((a, b) => b.totalBytes - a.totalBytes);
  };
  proto.acquireBuffer = function (size, usage, ...rest) {
    const buffer = acquireBuffer.call(this, size, usage, ...rest);
    live.set(buffer, { size, label });
    if (this.numBytesUsed > peakUsed) {
      peakUsed = this.numBytesUsed;
      snapshot();
    }
    return buffer;
  };
  proto.releaseBuffer = function (buffer, ...rest) {
    live.delete(buffer);
    releaseBuffer.call(this, buffer, ...rest);
  };
  backend.runWebGPUProgram = function (program, ...rest) {
    const outer = label;
    label = program.constructor.name;
    try { return run.call(this, program, ...rest); } finally { label = outer; }
  };
  return {
    peak: () => ({ usedBytes: peakUsed, groups: peakGroups }),
    reset: () => { peakUsed = 0; peakGroups = []; },
    stop: () => {
      proto.acquireBuffer = acquireBuffer;
      proto.releaseBuffer = releaseBuffer;
      backend.runWebGPUProgram = run;
    },
  };
}
