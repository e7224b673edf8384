/**
 * The MoE block benchmark on webgpu (XS, one step): both kernels run — the reference with its
 * routing read beforehand, as dataSync is impossible here — with the same results as on other
 * backends' shape, and nothing left behind. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { benchMoEBlock } from '../../../src/bench/block_bench.js';

describe('webgpu: benchMoEBlock', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it('times the fused and the reference kernel (its routing read beforehand) and leaves no tensor behind', async () => {
    const before = tf.memory().numTensors;
    // the bench's tf.profile (peak memory) makes tfjs warn once where the adapter has no
    // timestamp queries (Mesa's GL here; the H100 has them): that warning alone is expected
    const warn = console.warn;
    const warnings: string[] = [];
    console.warn = (...args: unknown[]) => { warnings.push(args.join(' ')); };
    let cases: Awaited<ReturnType<typeof benchMoEBlock>>;
    try {
      cases = await benchMoEBlock({ config: 'XS', lora: ['none', 'split'], iters: 1, warmup: 0 });
    } finally {
      console.warn = warn;
    }
    for (const w of warnings) expect(w).to.match(/^This device doesn't support timestamp-query extension/);
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
