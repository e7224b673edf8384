/**
 * Quantized experts (int8, int4, NF4, MXFP4) on WebGPU: the device decode (MoEDecodePacked) gives
 * the formats' values bit for bit; the composed fusedExperts (host plan) decodes one expert group
 * at a time; webgpuFusedExperts passes the words to the grouped products, whose WGSL decodes each
 * element as it loads it (no decode kernel, no float32 copy). Each equals the float32 computation
 * on the dequantized values (≤ 1e-5). Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { setWebGPUMoETuning, webgpuFusedExperts } from '../../../src/backends/webgpu/experts.js';
import { GROUPED_MATMUL } from '../../../src/backends/webgpu/kernels.js';
import { buildDispatchPlanAsync } from '../../../src/ops/experts/dispatch_plan.js';
import { fusedExperts } from '../../../src/ops/experts/fused_experts.js';
import { DECODE_PACKED, PackedExpertWeight, unpackExpertWeight } from '../../../src/ops/packed.js';
import { QUANTIZED_KINDS, quantizedLayout, quantizeExpertValues } from '../../../src/ops/quantized.js';
import { makePackedCase, PACKED_CASE_GRAD_NAMES, packedCaseGrads, type PackedCase } from '../../helpers/packed_case.js';
import { Rng } from '../../helpers/numeric.js';
import { referenceDecode } from '../../helpers/quantized_reference.js';
import { expectCloseAsync, expectNoLeakAsync } from './helpers.js';

type Experts = typeof fusedExperts;

async function expectSame(c: PackedCase, impl: Experts, options: Parameters<Experts>[4], label: string): Promise<void> {
  const quantized = packedCaseGrads(c, impl, c.gateUp, c.down, options);
  const plain = packedCaseGrads(c, impl, c.gateUp32, c.down32, options);
  for (const [i, t] of quantized.entries()) await expectCloseAsync(t, await plain[i].data(), 1e-5, `${label} ${PACKED_CASE_GRAD_NAMES[i]}`);
  tf.dispose([...quantized, ...plain]);
}

describe('webgpu: quantized expert weights', () => {
  const dims = { T: 9, H: 64, I: 40, E: 4, K: 2, r: 2 };

  it('the device decode gives the formats\' values bit for bit, both input axes, a ragged last group', async () => {
    const rng = new Rng(41);
    for (const kind of QUANTIZED_KINDS) {
      // nf4-dq also over 3 nested blocks of 256 groups (24 × 2048: 768 groups an expert)
      const cases = kind === 'nf4-dq' ? [[2, [3, 10, 72]], [1, [3, 72, 10]], [2, [3, 24, 2048]], [1, [3, 2048, 24]]] as const :
        [[2, [3, 10, 72]], [1, [3, 72, 10]]] as const;
      for (const [axis, shape] of cases) {
        const n = shape[0] * shape[1] * shape[2];
        const layout = quantizedLayout(kind, shape, axis);
        const words = quantizeExpertValues(layout, 3, Float32Array.from(rng.array(n, 0.8), (v, k) => v * (1 + Math.floor(k / 64) % 7)));
        const w = new PackedExpertWeight(kind, [...shape], tf.tensor2d(words, [3, layout.wordsPerExpert], 'int32'), { inputAxis: axis });
        const decoded = unpackExpertWeight(w);
        const got = await decoded.data();
        const expected = referenceDecode(layout, 3, words);
        for (let i = 0; i < expected.length; i++) {
          if (!Object.is(got[i], expected[i])) expect.fail(`${kind} axis ${axis} element ${i}: ${got[i]} but the formula gives ${expected[i]}`);
        }
        tf.dispose([w.packed, decoded]);
      }
    }
  });

  for (const kind of QUANTIZED_KINDS) {
    it(`${kind}: the composed fusedExperts with a host plan, and webgpuFusedExperts in both LoRA modes`, async () => {
      const c = makePackedCase(kind, dims, 42);
      const plan = await buildDispatchPlanAsync(c.experts, dims.E);
      await expectNoLeakAsync(() => expectSame(c, fusedExperts, { plan, loraMode: 'split' }, `${kind} composed`));
      for (const loraMode of ['split', 'materialize'] as const) {
        await expectNoLeakAsync(() => expectSame(c, webgpuFusedExperts, { loraMode }, `${kind} ${loraMode}`));
      }
      c.dispose();
    });
  }

  it('webgpuFusedExperts: gpt-oss layout (input on axis 1) and the vec4 8×8 tiles', async () => {
    for (const kind of ['mxfp4', 'int4', 'nf4-dq'] as const) {
      const c = makePackedCase(kind, { ...dims, I: 32 }, 43, 'inOutInterleaved');
      await expectNoLeakAsync(() => expectSame(c, webgpuFusedExperts, { loraMode: 'split' }, `${kind} gpt-oss`));
      c.dispose();
    }
    const previous = setWebGPUMoETuning({ rowTile: 128, tile: { tm: 8, tn: 8, bk: 16, vec4: true } });
    try {
      const c = makePackedCase('nf4', dims, 44);
      await expectNoLeakAsync(() => expectSame(c, webgpuFusedExperts, { loraMode: 'split' }, 'nf4 vec4'));
      c.dispose();
    } finally {
      setWebGPUMoETuning(previous);
    }
  });

  it('webgpuFusedExperts decodes in the products: no decode kernel, no float32 copy of the experts', async () => {
    const big = { T: 4, H: 1024, I: 512, E: 4, K: 2, r: 2 };
    const c = makePackedCase('int4', big, 45);
    const downFloat32Bytes = 4 * big.E * big.H * big.I;
    const bytesBefore = tf.memory().numBytes;
    const warn = console.warn;
    console.warn = () => {};   // tf.profile warns where the adapter has no timestamp queries (Mesa)
    let info: Awaited<ReturnType<typeof tf.profile>>;
    try {
      info = await tf.profile(() => tf.dispose(packedCaseGrads(c, webgpuFusedExperts, c.gateUp, c.down, { loraMode: 'split' })));
    } finally {
      console.warn = warn;
    }
    expect(info.kernelNames).to.include(GROUPED_MATMUL);
    expect(info.kernelNames).to.not.include(DECODE_PACKED);
    expect(info.peakBytes - bytesBefore).to.be.below(downFloat32Bytes);
    expect(tf.memory().numBytes).to.equal(bytesBefore);
    c.dispose();
  });
});
