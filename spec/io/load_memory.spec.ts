/**
 * Peak RSS of a checkpoint load on cpu, measured by the load bench in a child process: on cpu the
 * weights are host memory, so the bound is the model's bytes plus the largest tensor and a stated
 * margin (spec/helpers/load_memory.ts); fused expert stacks are filled in place, never copied. The
 * child's peak is its own: a parent holding more than the bound does not show in it (on Linux
 * getrusage's maxRSS of a child starts at its parent's RSS).
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

  it("reports the child's own peak, not its parent's RSS at the spawn", async () => {
    const config = loadMemoryConfig(1);
    const estimate = estimateLoadMemory(config, { expertBytesPerElement: 2 });
    const bound = estimate.bytes + hostBound(estimate.largest.bytes);
    // resident in this process while the child is spawned (dropped after it): more than the child may reach
    const held = [Buffer.alloc(bound + 256 * 2 ** 20, 1)];
    const parentRss = process.memoryUsage().rss;
    const [c] = await benchLoad({ config, backend: 'cpu', expertDtypes: ['stored'] });
    held.length = 0;
    expect(parentRss - c.rssBefore, 'the parent above the child by more than the bound (else the check shows nothing)').to.be.above(bound);
    expect(c.loadPeakBytes, `peak ${c.loadPeakBytes} > ${bound}`).to.be.at.most(bound);
  });
});
