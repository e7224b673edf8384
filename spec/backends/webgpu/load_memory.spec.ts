/**
 * Peak host memory of a checkpoint load on webgpu (Mesa), measured by the load bench in a child
 * process: 275 MB of bf16 loaded with packed experts holds on the host at most the largest tensor
 * and a stated margin (spec/helpers/load_memory.ts) beyond the device's buffers, and nothing of
 * the model is left on the host afterwards. Mesa's software GPU keeps the device's buffers in the
 * process's memory, so the host figure is RSS minus the bytes the backend allocated on the device.
 * Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { benchLoad } from '../../../src/bench/load_bench.js';
import { estimateLoadMemory } from '../../../src/models/memory.js';
import { hostBound, loadMemoryConfig } from '../../helpers/load_memory.js';

describe('webgpu: host memory of a checkpoint load', function () {
  this.timeout(120_000);

  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it('275 MB of bf16 with packed experts: the host holds the largest tensor plus a margin, the device the model', async () => {
    const config = loadMemoryConfig(4);
    const [c] = await benchLoad({ config, backend: 'webgpu', expertDtypes: ['stored'] });
    const mb = (b: number) => (b / 1e6).toFixed(1);
    console.log(`# webgpu load: ${mb(c.checkpointBytes)} MB bf16, weights ${mb(c.numBytes)} MB, largest ${mb(c.largestWeightBytes)} MB, ` +
        `peak host ${mb(c.peakHostBytes)} MB (bound ${mb(hostBound(c.largestWeightBytes))}), peak RSS ${mb(c.loadPeakBytes)} MB, ` +
        `left on host ${mb(c.hostValueBytesAfter)} MB, ${c.seconds.toFixed(1)} s`);
    const estimate = estimateLoadMemory(config, { expertBytesPerElement: 2 });
    expect(c.checkpointBytes).to.equal(275_399_680);
    expect(c.numBytes).to.equal(estimate.bytes);
    expect(c.largestWeightBytes).to.equal(estimate.largest.bytes);  // the embedding as float32, 65.5 MB
    expect(c.hostValueBytesAfter, 'bytes of weights left on the host').to.equal(0);
    const bound = hostBound(c.largestWeightBytes);
    expect(c.peakHostBytes, `peak host ${c.peakHostBytes} > ${bound}`).to.be.at.most(bound);
    // all of RSS, the device's buffers included (Mesa): the model plus the same margin
    expect(c.loadPeakBytes, `peak RSS ${c.loadPeakBytes} > ${c.numBytes + bound}`).to.be.at.most(c.numBytes + bound);
  });
});
