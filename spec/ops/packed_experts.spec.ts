import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { fusedExperts } from '../../src/ops/experts/fused_experts.js';
import { GROUPED_MATMUL } from '../../src/ops/experts/kernels.js';
import {
  bfloat16Bits, float16Bits, PackedExpertWeight, packedExpertWeightFromBits, packExpertWeight, unpackExpertWeight,
} from '../../src/ops/packed.js';
import { referenceExperts } from '../../src/ops/reference/moe_block.js';
import type { ExpertWeights, LoRAMode } from '../../src/ops/types.js';
import { makePackedCase, PACKED_CASE_GRAD_NAMES, packedCaseGrads, type PackedCase } from '../helpers/packed_case.js';
import { expectClose, expectNoLeak } from '../helpers/numeric.js';

function expectSameAsFloat32(c: PackedCase, loraMode: LoRAMode, label: string): void {
  const packed = packedCaseGrads(c, fusedExperts, c.gateUp, c.down, { loraMode });
  const plain = packedCaseGrads(c, fusedExperts, c.gateUp32, c.down32, { loraMode });
  // the decode is exact: the packed run sees the very values of the float32 run
  packed.forEach((t, i) => expectClose(t, plain[i], 1e-6, `${label} ${PACKED_CASE_GRAD_NAMES[i]}`));
  tf.dispose([...packed, ...plain]);
}

describe('packed 16-bit expert weights', () => {
  describe('the 16-bit formats', () => {
    it('rounds float32 to bf16 and f16 to nearest even, as torch does', () => {
      expect(bfloat16Bits(1)).to.equal(0x3f80);
      expect(bfloat16Bits(-2)).to.equal(0xc000);
      // 1 + 2^-8 is half-way between bf16 1 and 1 + 2^-7: ties to the even mantissa (1)
      expect(bfloat16Bits(1 + 2 ** -8)).to.equal(0x3f80);
      expect(bfloat16Bits(1 + 3 * 2 ** -8)).to.equal(0x3f82);
      expect(bfloat16Bits(NaN) & 0x7fc0).to.equal(0x7fc0);
      expect(float16Bits(1)).to.equal(0x3c00);
      expect(float16Bits(65504)).to.equal(0x7bff);
      expect(float16Bits(1e6)).to.equal(0x7c00);
      expect(float16Bits(2 ** -24)).to.equal(0x0001);
      expect(float16Bits(-(2 ** -14))).to.equal(0x8400);
      expect(float16Bits(1 / 3)).to.equal(0x3555);
      expect(float16Bits(2 ** -26)).to.equal(0);
    });

    it('packs two halves per int32 word, even elements in the low half, each expert on a word', () => {
      // [E=2, 1, 3]: three halves per expert, so each expert ends with a padding half
      const w = packedExpertWeightFromBits('bf16', [2, 1, 3], new Uint16Array([0x3f80, 0x4000, 0x4040, 0xbf80, 0xc000, 0xc040]));
      expect(w.packed.dtype).to.equal('int32');
      expect(w.packed.shape).to.deep.equal([2, 2]);
      const words = Array.from(w.packed.dataSync() as Int32Array, v => v >>> 0);
      expect(words).to.deep.equal([0x40003f80, 0x4040, 0xc000bf80, 0xc040]);
      const back = unpackExpertWeight(w);
      expect(Array.from(back.dataSync())).to.deep.equal([1, 2, 3, -1, -2, -3]);
      tf.dispose(back);
      w.dispose();
    });

    it('decodes exactly what it packed, bf16 and f16, subnormals included', () => {
      const values = new Float32Array([0, -0, 1.5, -3.25, 2 ** -20, 65504, -(2 ** -24), 0.1]);
      for (const kind of ['bf16', 'f16'] as const) {
        const encode = kind === 'bf16' ? bfloat16Bits : float16Bits;
        const w32 = tf.tensor3d(values, [2, 2, 2]);
        const packed = packExpertWeight(w32, kind);
        const decoded = unpackExpertWeight(packed);
        const expected = unpackExpertWeight(packedExpertWeightFromBits(kind, [2, 2, 2], Uint16Array.from(values, v => encode(v))));
        expect(Array.from(decoded.dataSync()), kind).to.deep.equal(Array.from(expected.dataSync()));
        expect(decoded.dataSync()[2], kind).to.equal(1.5);
        tf.dispose([w32, decoded, expected]);
        packed.dispose();
      }
    });

    it('refuses a bad kind, shape or packed tensor, naming the argument', () => expectNoLeak(() => {
      const t = tf.zeros([2, 3], 'int32');
      expect(() => new PackedExpertWeight('fp8' as 'bf16', [2, 2, 3], t)).to.throw(/'kind' must be one of 'bf16', 'f16', 'int8', 'int4', 'nf4', 'nf4-dq', 'mxfp4' but got "fp8"/);
      expect(() => new PackedExpertWeight('bf16', [2, 2], t)).to.throw(/'shape' must be \[E, rows, cols\] of positive integers but got \[2,2\]/);
      expect(() => new PackedExpertWeight('bf16', [2, 4, 3], t))
          .to.throw(/'packed' must be an int32 tensor \[2, 6\] \(bf16 halves of \[2,4,3\]\) but got a int32 tensor of shape \[2,3\]/);
      const f = tf.zeros([2, 3]);
      expect(() => new PackedExpertWeight('f16', [2, 2, 3], f)).to.throw(/but got a float32 tensor of shape \[2,3\]/);
      expect(() => packedExpertWeightFromBits('bf16', [1, 2, 2], new Uint16Array(3)))
          .to.throw(/'halves' must be a Uint16Array of 4 values \(shape \[1,2,2\]\) but got 3 values/);
      expect(() => new PackedExpertWeight('bf16', [2, 2, 3], [1, 2] as unknown as tf.Tensor))
          .to.throw(/'packed' must be an int32 tensor \[2, 3\] but got 1,2/);
      expect(() => packedExpertWeightFromBits('f16', [1, 0, 2], new Uint16Array(0)))
          .to.throw(/`packedExpertWeightFromBits\(\)`: 'shape' must be \[E, rows, cols\] of positive integers but got \[1,0,2\]/);
      const z = tf.zeros([1, 2, 2]) as tf.Tensor3D;
      expect(() => packExpertWeight(z, 'fp16' as 'f16')).to.throw(/`packExpertWeight\(\)`: 'kind' must be one of 'bf16', 'f16', 'int8', 'int4', 'nf4', 'nf4-dq', 'mxfp4' but got "fp16"/);
      const z2 = tf.zeros([2, 2]);
      expect(() => packExpertWeight(z2 as unknown as tf.Tensor3D, 'bf16')).to.throw(/'weight' must be 3-D but got shape \[2,2\]/);
      const i3 = tf.zeros([1, 2, 2], 'int32') as tf.Tensor3D;
      expect(() => unpackExpertWeight(i3)).to.throw(/'weight' must be float32 or a PackedExpertWeight but got int32 \(shape \[1,2,2\]\)/);
      z.dispose();
      expect(() => unpackExpertWeight(z)).to.throw(/`unpackExpertWeight\(\)`: 'weight' was already disposed/);
      tf.dispose([i3, z2]);
      const z3 = tf.zeros([1, 2, 2]) as tf.Tensor3D;
      const w = packExpertWeight(z3, 'bf16');
      z3.dispose();
      expect(() => packExpertWeight(w as unknown as tf.Tensor3D, 'bf16')).to.throw(/'weight' is already packed \(bf16\)/);
      w.dispose();
      expect(() => unpackExpertWeight(w)).to.throw(/'weight.packed' was already disposed/);
      tf.dispose([t, f]);
    }));
  });

  describe('fusedExperts on packed weights equals the float32 block on the decoded values', () => {
    const dims = { T: 9, H: 5, I: 3, E: 4, K: 2, r: 2 };   // H·I odd: the down experts end mid-word
    for (const kind of ['bf16', 'f16'] as const) {
      for (const loraMode of ['split', 'materialize'] as const) {
        it(`${kind}, LoRA ${loraMode}: output and the gradients of x and of every LoRA factor`, () => {
          const c = makePackedCase(kind, dims, 11);
          expectNoLeak(() => expectSameAsFloat32(c, loraMode, `${kind} ${loraMode}`));
          c.dispose();
        });
      }
    }

    it('gpt-oss layout (transposed, biases, clamped activation), bf16', () => {
      const c = makePackedCase('bf16', dims, 12, 'inOutInterleaved');
      expectNoLeak(() => expectSameAsFloat32(c, 'split', 'gpt-oss'));
      c.dispose();
    });

    it('the composed fallback (no grouped-product kernel) decodes one expert group at a time, same results', () => {
      const c = makePackedCase('bf16', dims, 13);
      const backend = tf.getBackend();
      const config = tf.getKernel(GROUPED_MATMUL, backend);
      if (config) tf.unregisterKernel(GROUPED_MATMUL, backend);
      try {
        expectNoLeak(() => expectSameAsFloat32(c, 'split', 'fallback'));
      } finally {
        if (config) tf.registerKernel(config);
      }
      c.dispose();
    });

    it('the reference block (the oracle) decodes them too', () => {
      const c = makePackedCase('f16', dims, 14);
      const base = { layout: c.layout, gateUpLoRA: [c.upLoRA], downLoRA: [c.downLoRA] };
      const routing = { weights: c.routingWeights, experts: c.experts };
      const packed = referenceExperts(c.x, routing, { ...base, gateUp: c.gateUp, down: c.down }, c.activation);
      const plain = referenceExperts(c.x, routing, { ...base, gateUp: c.gateUp32, down: c.down32 }, c.activation);
      const fused = fusedExperts(c.x, routing, { ...base, gateUp: c.gateUp, down: c.down }, c.activation);
      expectClose(packed, plain, 1e-6, 'reference packed vs float32');
      expectClose(fused, plain, 1e-5, 'fused packed vs reference float32');
      tf.dispose([packed, plain, fused]);
      c.dispose();
    });

    it('without adapters the packed base is frozen: gradients of x only; training it is refused', () => {
      const c = makePackedCase('bf16', dims, 15);
      const routing = { weights: c.routingWeights, experts: c.experts };
      const loss = (w: ExpertWeights) => (x: tf.Tensor) => tf.sum(tf.square(fusedExperts(x as tf.Tensor2D, routing, w, c.activation)));
      const dx = tf.grad(loss({ gateUp: c.gateUp, down: c.down }))(c.x);
      const dx32 = tf.grad(loss({ gateUp: c.gateUp32, down: c.down32 }))(c.x);
      expectClose(dx, dx32, 1e-6, 'dx');
      expect(() => fusedExperts(c.x, routing, { gateUp: c.gateUp, down: c.down }, c.activation, { trainExpertWeights: true }))
          .to.throw(/`fusedExperts\(\)`: 'options.trainExpertWeights' is true but the expert weights are packed \(bf16\), which are frozen; load the model with expertDtype 'float32'/);
      tf.dispose([dx, dx32]);
      c.dispose();
    });

    it('refuses a packed weight of the wrong logical shape or a disposed one', () => {
      const c = makePackedCase('bf16', dims, 16);
      const routing = { weights: c.routingWeights, experts: c.experts };
      expect(() => fusedExperts(c.x, routing, { gateUp: c.down, down: c.down }, c.activation))
          .to.throw(/'weights.gateUp' must have an even gate\+up size \(2I\) but got shape \[4,5,3\]/);
      const zeros = tf.zeros([4, 6, 4]) as tf.Tensor3D;
      const wrong = packExpertWeight(zeros, 'bf16');
      zeros.dispose();
      expect(() => fusedExperts(c.x, routing, { gateUp: wrong, down: c.down }, c.activation))
          .to.throw(/'weights.gateUp' must have shape \[4,6,5\] but got \[4,6,4\]/);
      wrong.dispose();
      expect(() => fusedExperts(c.x, routing, { gateUp: c.gateUp, down: wrong }, c.activation))
          .to.throw(/'weights.down.packed' was already disposed/);
      expect(() => fusedExperts(c.x, routing, { gateUp: c.gateUp, down: 'w' as unknown as tf.Tensor3D }, c.activation))
          .to.throw(/'weights.down' must be a 3-D float32 tensor or a PackedExpertWeight but got string/);
      c.dispose();
    });
  });
});
