/**
 * The MoE block benchmark on webgpu (XS, one step): both kernels run — the reference with its
 * routing read beforehand, as dataSync is impossible here — with the same results as on other
 * backends' shape, and nothing left behind. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { benchMoEBlock } from '../../../src/bench/block_bench.js';
import { allowingNoTimestampWarning } from './helpers.js';

describe('webgpu: benchMoEBlock', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it('times the fused and the reference kernel (its routing read beforehand) and leaves no tensor behind', async () => {
    const before = tf.memory().numTensors;
    // the bench's tf.profile (peak memory) warns where the adapter has no timestamp queries
    const cases = await allowingNoTimestampWarning(() => benchMoEBlock({ config: 'XS', lora: ['none', 'split'], iters: 1, warmup: 0 }));
    expect(tf.memory().numTensors).to.equal(before);
    expect(cases.map(c => c.lora)).to.deep.equal(['none', 'split']);
    for (const c of cases) {
      expect(c.backend).to.equal('webgpu');
      for (const t of [c.fused, c.reference!]) {
        expect(t.ms).to.be.above(0);
        expect(t.enqueueMs).to.be.above(0).and.at.most(t.ms);
        expect(t.peakBytes).to.be.above(0);
      }
      expect(c.speedup).to.be.closeTo(c.reference!.ms / c.fused.ms, 1e-9);
    }
  });
});
