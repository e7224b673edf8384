/**
 * Packed 16-bit experts on WebGPU: the device decode (MoEDecodePacked) is exact, the composed
 * fusedExperts (with a host plan) decodes one expert group at a time, and webgpuFusedExperts /
 * moeBlock (no host read) pass the packed words to the grouped products, which decode each element
 * as they load it: no decode kernel runs and no float32 copy of the experts is allocated. Each
 * equals the same computation on the float32 decoded values. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { setWebGPUMoETuning, webgpuFusedExperts } from '../../../src/backends/webgpu/experts.js';
import { GROUPED_MATMUL } from '../../../src/backends/webgpu/kernels.js';
import { buildDispatchPlanAsync } from '../../../src/ops/experts/dispatch_plan.js';
import { fusedExperts } from '../../../src/ops/experts/fused_experts.js';
import { moeBlock } from '../../../src/ops/moe_block.js';
import { DECODE_PACKED, packedExpertWeightFromBits, unpackExpertWeight } from '../../../src/ops/packed.js';
import { makePackedCase, PACKED_CASE_GRAD_NAMES, packedCaseGrads, type PackedCase } from '../../helpers/packed_case.js';
import { expectCloseAsync, expectNoLeakAsync } from './helpers.js';

type Experts = typeof fusedExperts;

async function expectSame(c: PackedCase, impl: Experts, options: Parameters<Experts>[4], label: string): Promise<void> {
  const packed = packedCaseGrads(c, impl, c.gateUp, c.down, options);
  const plain = packedCaseGrads(c, impl, c.gateUp32, c.down32, options);
  for (const [i, t] of packed.entries()) await expectCloseAsync(t, await plain[i].data(), 1e-6, `${label} ${PACKED_CASE_GRAD_NAMES[i]}`);
  tf.dispose([...packed, ...plain]);
}

describe('webgpu: packed 16-bit expert weights', () => {
  const dims = { T: 9, H: 5, I: 3, E: 4, K: 2, r: 2 };   // H·I odd: down's experts end mid-word

  it('the device decode is exact, bf16 and f16, odd expert sizes included', async () => {
    const bits = Uint16Array.from([0x3f80, 0xc040, 0x0001, 0x7f7f, 0x8000, 0x3e80, 0x4049, 0xbf00, 0x0400, 0x3c00]);
    const expected = {
      bf16: [1, -3, 2 ** -133, 3.3895313892515355e38, -0, 0.25, 3.140625, -0.5, 2 ** -119 * 1.0, 0.0078125],
      f16: [1.875, -2.125, 2 ** -24, NaN, -0, 1.625, 2.142578125, -1.75, 2 ** -14, 1],   // 0x7f7f: exponent 31, a NaN
    };
    for (const kind of ['bf16', 'f16'] as const) {
      const w = packedExpertWeightFromBits(kind, [2, 1, 5], bits);   // 5 halves per expert: padded
      const decoded = unpackExpertWeight(w);
      const values = Array.from(await decoded.data());
      expect(values.map((v, i) => (Object.is(v, expected[kind][i]) || v === Math.fround(expected[kind][i]))), `${kind}: ${values}`)
          .to.deep.equal(new Array(10).fill(true));
      decoded.dispose();
      w.dispose();
    }
  });

  for (const kind of ['bf16', 'f16'] as const) {
    it(`${kind}: the composed fusedExperts with a host plan (one expert group decoded at a time)`, async () => {
      const c = makePackedCase(kind, dims, 21);
      const plan = await buildDispatchPlanAsync(c.experts, dims.E);
      await expectNoLeakAsync(() => expectSame(c, fusedExperts, { plan, loraMode: 'split' }, `${kind} composed`));
      c.dispose();
    });
  }

  it('webgpuFusedExperts without a host plan, both LoRA modes, gpt-oss layout too', async () => {
    for (const [layout, loraMode] of [['outIn', 'split'], ['outIn', 'materialize'], ['inOutInterleaved', 'split']] as const) {
      const c = makePackedCase('bf16', dims, 22, layout);
      await expectNoLeakAsync(() => expectSame(c, webgpuFusedExperts, { loraMode }, `${layout} ${loraMode}`));
      c.dispose();
    }
  });

  it('webgpuFusedExperts decodes packed words in the vec4 8×8 tiles too, f16 and bf16', async () => {
    const previous = setWebGPUMoETuning({ rowTile: 128, tile: { tm: 8, tn: 8, bk: 16, vec4: true } });
    try {
      for (const kind of ['bf16', 'f16'] as const) {
        const c = makePackedCase(kind, dims, 25);
        await expectNoLeakAsync(() => expectSame(c, webgpuFusedExperts, { loraMode: 'split' }, `${kind} vec4`));
        c.dispose();
      }
    } finally {
      setWebGPUMoETuning(previous);
    }
  });

  it('webgpuFusedExperts decodes packed experts in the products: no decode kernel, no float32 copy of the experts', async () => {
    // float32 gateUp 4·1024·1024·4 = 16 MiB, down 8 MiB; the call's padded rows (320) need far less
    const big = { T: 4, H: 1024, I: 512, E: 4, K: 2, r: 2 };
    for (const kind of ['bf16', 'f16'] as const) {
      const c = makePackedCase(kind, big, 24);
      const downFloat32Bytes = 4 * big.E * big.H * big.I;
      const bytesBefore = tf.memory().numBytes;
      // tf.profile warns once where the adapter has no timestamp queries (Mesa's GL): expected here
      const warn = console.warn;
      console.warn = () => {};
      let info: Awaited<ReturnType<typeof tf.profile>>;
      try {
        info = await tf.profile(() => tf.dispose(packedCaseGrads(c, webgpuFusedExperts, c.gateUp, c.down, { loraMode: 'split' })));
      } finally {
        console.warn = warn;
      }
      expect(info.kernelNames, kind).to.include(GROUPED_MATMUL);
      expect(info.kernelNames, kind).to.not.include(DECODE_PACKED);
      // forward and backward together stay below the smaller of the two float32 expert weights
      expect(info.peakBytes - bytesBefore, `${kind}: peak bytes above the start`).to.be.below(downFloat32Bytes);
      expect(tf.memory().numBytes, kind).to.equal(bytesBefore);
      c.dispose();
    }
  });

  it("moeBlock 'fused' runs a packed block on webgpu and refuses to train the packed experts", async () => {
    const c = makePackedCase('f16', dims, 23);
    const router = { weight: tf.randomNormal([dims.E, dims.H], 0, 0.5, 'float32', 3) as tf.Tensor2D };
    const config = { routing: { kind: 'softmaxTopK', topK: dims.K, renormalize: true }, activation: c.activation } as const;
    const packed = moeBlock(c.x, { router, experts: { gateUp: c.gateUp, down: c.down } }, config);
    const plain = moeBlock(c.x, { router, experts: { gateUp: c.gateUp32, down: c.down32 } }, config);
    await expectCloseAsync(packed.out, await plain.out.data(), 1e-6, 'block out');
    expect(() => moeBlock(c.x, { router, experts: { gateUp: c.gateUp, down: c.down } }, config, { trainExpertWeights: true }))
        .to.throw(/'options.trainExpertWeights' is true but the expert weights are packed \(f16\), which are frozen/);
    for (const r of [packed, plain]) tf.dispose([r.out, r.routing.weights, r.routing.experts, r.routing.logits]);
    router.weight.dispose();
    c.dispose();
  });
});
