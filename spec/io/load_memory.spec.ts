/**
 * Peak RSS of a checkpoint load on cpu, measured by the load bench in a child process: on cpu the
 * weights are host memory, so the bound is the model's bytes plus the largest tensor and a stated
 * margin (spec/helpers/load_memory.ts); fused expert stacks are filled in place, never copied.
 */
import { expect } from 'chai';
import { benchLoad } from '../../src/bench/load_bench.js';
import { estimateLoadMemory } from '../../src/models/memory.js';
import { hostBound, loadMemoryConfig } from '../helpers/load_memory.js';

describe('io: host memory of a checkpoint load on cpu', function () {
  this.timeout(120_000);

  it('170 MB of bf16 with packed experts: peak RSS within the model plus the largest tensor and a margin', async () => {
    const config = loadMemoryConfig(2);
    const [c] = await benchLoad({ config, backend: 'cpu', expertDtypes: ['stored'] });
    const mb = (b: number) => (b / 1e6).toFixed(1);
    console.log(`# cpu load: ${mb(c.checkpointBytes)} MB bf16, weights ${mb(c.numBytes)} MB, largest ${mb(c.largestWeightBytes)} MB, ` +
        `peak RSS ${mb(c.loadPeakBytes)} MB (bound ${mb(c.numBytes + hostBound(c.largestWeightBytes))}), ${c.seconds.toFixed(1)} s`);
    const estimate = estimateLoadMemory(config, { expertBytesPerElement: 2 });
    expect(c.numBytes).to.equal(estimate.bytes);
    expect(c.largestWeightBytes).to.equal(estimate.largest.bytes);
    const bound = c.numBytes + hostBound(c.largestWeightBytes);
    expect(c.loadPeakBytes, `peak RSS ${c.loadPeakBytes} > ${bound}`).to.be.at.most(bound);
    expect(c.peakHostBytes, `sampled peak ${c.peakHostBytes} > ${bound}`).to.be.at.most(bound);
  });
});
