/**
 * Host values uploaded by queue.writeBuffer (src/backends/webgpu/written_uploads.ts): float32 (also
 * one holding bytes), int32 and bool tensors reach the GPU exactly, a buffer that recorded commands still read is never the
 * one written (the write runs before those commands), no staging buffer is created per upload
 * (tfjs's own path, the flag off, creates one each time), and nothing leaks. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { installWrittenUploads, WRITTEN_UPLOADS_FLAG } from '../../../src/backends/webgpu/written_uploads.js';

const BATCH_FLAG = 'WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE';
// GPUBufferUsage.MAP_WRITE: tfjs's staging buffers
const MAP_WRITE = 0x0002;
/**
 * Elements per tensor: more than tfjs-webgpu's WEBGPU_CPU_HANDOFF_SIZE_THRESHOLD (1000), under which
 * an elementwise op on host values runs on the CPU and uploads nothing; not a multiple of 4.
 */
const N = 4099;

/** The buffers the backend's device creates with MAP_WRITE while `fn` runs. */
async function countStagingBuffers<T>(fn: () => Promise<T>): Promise<{ value: T; staging: number }> {
  const device = (tf.backend() as unknown as { device: GPUDevice }).device;
  const create = device.createBuffer;
  let staging = 0;
  device.createBuffer = function (this: GPUDevice, descriptor: GPUBufferDescriptor) {
    if ((descriptor.usage & MAP_WRITE) !== 0) staging++;
    return create.call(this, descriptor);
  } as GPUDevice['createBuffer'];
  try {
    return { value: await fn(), staging };
  } finally {
    device.createBuffer = create;
  }
}

const floats = (n: number, seed: number) => Float32Array.from({ length: n }, (_, i) => Math.fround(Math.sin(i * 1.7 + seed) * 1e3));
// within ±2^24: exact through the float arithmetic of tfjs-webgpu's int32 Neg
const ints = (n: number, seed: number) => Int32Array.from({ length: n }, (_, i) => ((i * 2654435761 + seed) | 0) % 9999991);

const bits = (seed: number) => Uint8Array.from({ length: 64 }, (_, i) => (i * 5 + seed) % 3 === 0 ? 1 : 0);

/** −values of each upload, computed on the GPU (so each tensor is uploaded), then read. */
async function negatedOnGPU(n: number, rounds: number): Promise<Array<{ f: Float32Array; i: Int32Array; b: Int32Array; c: Float32Array }>> {
  const out = [];
  for (let r = 0; r < rounds; r++) {
    const results = tf.tidy(() => {
      const f = tf.neg(tf.tensor1d(floats(n, r)));
      const i = tf.neg(tf.tensor1d(ints(n, r), 'int32'));
      const b = tf.cast(tf.logicalNot(tf.tensor1d(Uint8Array.from(ints(n, r), v => v & 1), 'bool')), 'int32');
      // a small cast runs on the host, which leaves a float32 tensor holding a Uint8Array; concat uploads it
      const c = tf.concat([tf.cast(tf.tensor1d(bits(r), 'bool'), 'float32'), tf.tensor1d(floats(n, r))]);
      return [f, i, b, c];
    });
    const [f, i, b, c] = await Promise.all(results.map(t => t.data()));
    tf.dispose(results);
    out.push({ f: f as Float32Array, i: i as Int32Array, b: b as Int32Array, c: c as Float32Array });
  }
  return out;
}

describe('webgpu written uploads', () => {
  before(() => {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    expect(installWrittenUploads(tf.backend())).to.equal(true);
  });
  after(() => tf.env().set(WRITTEN_UPLOADS_FLAG, true));

  it('uploads float32, int32 and bool values exactly, with no staging buffer once the pool is warm', async () => {
    const n = N;
    const before = tf.memory().numTensors;
    await negatedOnGPU(n, 1);  // the pool gets its buffers of these sizes
    const { value, staging } = await countStagingBuffers(() => negatedOnGPU(n, 3));
    value.forEach(({ f, i, b, c }, r) => {
      expect(Array.from(f)).to.deep.equal(Array.from(floats(n, r), v => -v), `float32, round ${r}`);
      expect(Array.from(i)).to.deep.equal(Array.from(ints(n, r), v => 0 - v), `int32, round ${r}`);
      expect(Array.from(b)).to.deep.equal(Array.from(ints(n, r), v => 1 - (v & 1)), `bool, round ${r}`);
      expect(Array.from(c)).to.deep.equal([...bits(r), ...floats(n, r)], `float32 holding bytes, round ${r}`);
    });
    expect(staging).to.equal(0);
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('gives the same values as tfjs-webgpu\'s staging uploads (the flag off), which create a staging buffer per upload', async () => {
    const n = N;
    const written = await negatedOnGPU(n, 2);
    tf.env().set(WRITTEN_UPLOADS_FLAG, false);
    const { value: staged, staging } = await countStagingBuffers(() => negatedOnGPU(n, 2));
    tf.env().set(WRITTEN_UPLOADS_FLAG, true);
    expect(staged).to.deep.equal(written);
    expect(staging).to.be.at.least(2 * 4);  // four uploads a round: the path this replaces
  });

  it('never writes a buffer that commands recorded before the upload still read', async () => {
    const batch = tf.env().getNumber(BATCH_FLAG);
    tf.env().set(BATCH_FLAG, 1000);  // everything below in one command buffer, submitted at the read
    try {
      const n = N;
      const a = tf.tensor1d(floats(n, 1));
      const negA = tf.neg(a);          // recorded, reads a's buffer
      a.dispose();                     // a's buffer is not free before the submit
      const c = tf.tensor1d(floats(n, 2));
      const negC = tf.neg(c);          // c's upload takes a pooled buffer of the same size
      const [va, vc] = await Promise.all([negA.data(), negC.data()]);
      expect(Array.from(va)).to.deep.equal(Array.from(floats(n, 1), v => -v));
      expect(Array.from(vc)).to.deep.equal(Array.from(floats(n, 2), v => -v));
      tf.dispose([negA, c, negC]);
    } finally {
      tf.env().set(BATCH_FLAG, batch);
    }
  });
});
