/**
 * The decoder's fused layer ops (rmsNorm, applyRotary, loraLinear) on webgpu: their op specs read
 * asynchronously, so they run here unchanged (and on cpu and wasm from spec/ops/); applyRotary
 * runs webgpu's MoERotary there, a frozen-weight rmsNorm MoERMSNorm(GradX), loraLinear MoEMatMulAdd. Here: what those kernels
 * save, counted.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { StepCounter } from '../../../bench/e2e/step_profile.js';
import { applyRotary, applyRotaryToHeads, ROTARY } from '../../../src/ops/rotary.js';
import { rotaryTables } from '../../../src/layers/rotary.js';
import { RMS_NORM, RMS_NORM_GRAD_X, rmsNorm } from '../../../src/ops/rms_norm.js';
import { loraLinear } from '../../../src/ops/lora/linear.js';
import { MATMUL_ADD } from '../../../src/ops/matmul_add.js';
import { routerLogits } from '../../../src/ops/lora/router_logits.js';
import '../../ops/rms_norm.spec.js';
import '../../ops/softmax_grad.spec.js';
import '../../ops/masked_softmax.spec.js';
import { MASKED_SOFTMAX, maskedSoftmax } from '../../../src/ops/masked_softmax.js';
import { SOFTMAX_GRAD, softmaxGrad } from '../../../src/ops/softmax_grad.js';
import '../../ops/router_logits_frozen.spec.js';
import '../../ops/scaled_matmul.spec.js';
import { scaledMatMul64 } from '../../ops/scaled_matmul.spec.js';
import { SCALED_MATMUL } from '../../../src/ops/scaled_matmul.js';
import { ScaledMatMulProgram } from '../../../src/backends/webgpu/programs/scaled_matmul_program.js';
import { asF32, expectClose, Rng, tensorOf } from '../../helpers/numeric.js';
import { DENSE_NARROW_PRODUCTS_FLAG, F32_LORA_TAIL_FLAG } from '../../../src/backends/webgpu/kernels.js';
import { NARROW_GRAD_PAIR_SUM_PROGRAM } from '../../../src/backends/webgpu/weight_grad_pairs.js';
import { withEnvFlag } from '../../../tools/webgpu_tc/scoped.js';
import '../../ops/rotary.spec.js';
import '../../ops/lora_linear.spec.js';

/** What `run` dispatches: its result (not read yet) and the counter that saw its kernels and programs. */
function counted<T>(run: () => T): { result: T; counter: StepCounter } {
  const counter = new StepCounter();
  counter.install();
  try {
    return { result: run(), counter };
  } finally {
    counter.uninstall();
  }
}

describe('webgpu: applyRotary runs MoERotary (issue 15)', () => {
  it('one program forward and one for the gradient, instead of a Reverse, two products and a sum each', async () => {
    expect(tf.getKernel(ROTARY, 'webgpu'), 'MoERotary is registered on webgpu').to.not.equal(undefined);
    const { cos, sin } = rotaryTables(5, 8, 100);
    const x = tf.randomNormal([6, 5, 8]) as tf.Tensor3D;
    const before = tf.memory().numTensors;
    const { result: dx, counter } = counted(() => tf.grad((a: tf.Tensor) => tf.sum(applyRotary(a as tf.Tensor3D, cos, sin)))(x));
    await dx.data();
    const { RotaryProgram, ...others } = counter.programCounts;
    expect(RotaryProgram, 'rope and its transpose').to.equal(2);
    // what the sum and its gradient add around the op: no Reverse, no BinaryOp of the rotation's
    expect(others).to.not.have.any.keys('ReverseProgram');
    expect(others.BinaryOpProgram ?? 0, `the other programs: ${JSON.stringify(others)}`).to.equal(0);
    dx.dispose();
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    tf.dispose([cos, sin, x]);
  });
});

describe('webgpu: applyRotaryToHeads moves the heads inside MoERotary (issue 15)', () => {
  it('one program forward and one for the gradient, and no transpose either way', async () => {
    const { cos, sin } = rotaryTables(5, 8, 100);
    const x = tf.randomNormal([2, 5, 3, 8]) as tf.Tensor4D;  // [B, S, heads, D]
    const before = tf.memory().numTensors;
    const { result: dx, counter } = counted(() =>
      tf.grad((a: tf.Tensor) => tf.sum(applyRotaryToHeads(a as tf.Tensor4D, cos, sin)))(x));
    await dx.data();
    const { RotaryProgram, ...others } = counter.programCounts;
    expect(RotaryProgram, 'rope with the heads moved, and its transpose').to.equal(2);
    const transposes = Object.keys(others).filter(name => name.startsWith('Transpose'));
    expect(transposes, `the other programs: ${JSON.stringify(others)}`).to.deep.equal([]);
    dx.dispose();
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    tf.dispose([cos, sin, x]);
  });
});

describe('webgpu: a frozen-weight rmsNorm runs MoERMSNorm and MoERMSNormGradX (issue 15)', () => {
  for (const zeroCentered of [false, true]) {
    it(`one program forward and one for dx, instead of six each${zeroCentered ? ' (zero-centred)' : ''}`, async () => {
      for (const name of [RMS_NORM, RMS_NORM_GRAD_X]) expect(tf.getKernel(name, 'webgpu'), `${name} is registered on webgpu`).to.not.equal(undefined);
      // 3 rows of 200: more than a workgroup's lanes per row, and a row count that is no power of 2
      const x = tf.randomNormal([3, 200]);
      const weight = tf.randomNormal([200]);
      const before = tf.memory().numTensors;
      const { result: dx, counter } = counted(() =>
        tf.grad((a: tf.Tensor) => tf.sum(rmsNorm(a, weight, 1e-6, { trainWeight: false, zeroCentered })))(x));
      await dx.data();
      const { RMSNormProgram, ...others } = counter.programCounts;
      expect(RMSNormProgram, 'the norm and its dx').to.equal(2);
      // around the op: the sum (its gradient's ones are a fill on the host); the zero-centred 1 + w of
      // a host-resident [D] weight runs on the host too (tfjs-webgpu's CPU forwarding)
      expect(others, 'the other programs').to.deep.equal({ ReduceProgram: 1 });
      dx.dispose();
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
      tf.dispose([x, weight]);
    });
  }
});

describe('webgpu: the composed attention\'s row ops are one program each (issue 15)', () => {
  // softmax(scores + mask) instead of an Add and a Softmax; dS = P ⊙ (dP − Σ dP ⊙ P) instead of four programs
  const cases: Array<[string, string, string, () => tf.Tensor[], (inputs: tf.Tensor[]) => tf.Tensor]> = [
    ['maskedSoftmax', MASKED_SOFTMAX, 'MaskedSoftmaxProgram', () => [tf.randomNormal([2, 3, 6, 12]), tf.zeros([2, 1, 6, 12])],
      ([scores, mask]) => maskedSoftmax(scores, mask)],
    ['softmaxGrad', SOFTMAX_GRAD, 'SoftmaxGradProgram', () => [tf.softmax(tf.randomNormal([2, 6, 12])), tf.randomNormal([2, 6, 12])],
      ([p, dP]) => softmaxGrad(p, dP)],
  ];
  for (const [op, kernel, program, make, run] of cases) {
    it(`${op}: ${kernel}, one ${program} and nothing else`, async () => {
      expect(tf.getKernel(kernel, 'webgpu'), `${kernel} is registered on webgpu`).to.not.equal(undefined);
      const inputs = make();
      const { result: out, counter } = counted(() => run(inputs));
      await out.data();
      expect(counter.programCounts).to.deep.equal({ [program]: 1 });
      tf.dispose([out, ...inputs]);
    });
  }
});

describe('webgpu: loraLinear adds each branch in its product (MoEMatMulAdd, issue 15)', () => {
  it('two adapters: no Add kernel forward or backward, the four sums inside products', async () => {
    expect(tf.getKernel(MATMUL_ADD, 'webgpu'), 'MoEMatMulAdd is registered on webgpu').to.not.equal(undefined);
    const [n, inSize, out, r] = [5, 12, 7, 3];
    const x = tf.randomNormal([n, inSize]) as tf.Tensor2D;
    const weight = tf.randomNormal([out, inSize]) as tf.Tensor2D;
    const factors = [0, 1].map(() => ({ A: tf.randomNormal([r, inSize]) as tf.Tensor2D, B: tf.randomNormal([out, r]) as tf.Tensor2D }));
    const before = tf.memory().numTensors;
    const { result: grads, counter } = counted(() => tf.grads((...args: tf.Tensor[]) => tf.sum(loraLinear(args[0] as tf.Tensor2D, weight, null, [
      { A: args[1] as tf.Tensor2D, B: args[2] as tf.Tensor2D, scaling: 2 }, { A: args[3] as tf.Tensor2D, B: args[4] as tf.Tensor2D, scaling: 0.5 },
    ])))([x, ...factors.flatMap(f => [f.A, f.B])]));
    await Promise.all(grads.map(g => g.data()));
    // forward: y + each branch; backward: dx + each branch's part. The forward's first branch goes to
    // MoEDenseMatMul as its LoRA tail (added inside that kernel; on tensor cores inside its reduction)
    expect(counter.kernelCounts[MATMUL_ADD], 'sums inside products').to.equal(3);
    expect(counter.kernelCounts.MoEDenseMatMul, 'the forward\'s product with its tail').to.equal(1);
    expect(counter.kernelCounts.Add ?? 0, `the kernels: ${JSON.stringify(counter.kernelCounts)}`).to.equal(0);
    // forward s·(x·Aᵀ), backward s·(dy·B), per adapter: the scales inside the products
    expect(counter.kernelCounts[SCALED_MATMUL], 'scales inside products').to.equal(4);
    // the one Multiply left is tf.sum's gradient (dy ⊙ ones), outside the op
    expect(counter.kernelCounts.Multiply ?? 0, `the kernels: ${JSON.stringify(counter.kernelCounts)}`).to.equal(1);
    tf.dispose(grads);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    tf.dispose([x, weight, ...factors.flatMap(f => [f.A, f.B])]);
  });
});

describe('webgpu: a frozen router\'s LoRA runs as loraLinear (issue 15)', () => {
  it('one adapter: 2 programs forward (the tail in the base product, WEBGPU_MOE_F32_LORA_TAIL on; 3 by default) and 5 backward (dA and dB a pair), no Transpose, sums and scales inside products; a trainable weight composes 7 and 9', async () => {
    const [t, h, e, r] = [6, 16, 8, 2];
    const x = tf.randomNormal([t, h]) as tf.Tensor2D;
    const A = tf.randomNormal([r, h]) as tf.Tensor2D;
    const B = tf.randomNormal([e, r]) as tf.Tensor2D;
    const programs = async (trainable: boolean) => {
      const weight = tf.variable(tf.randomNormal([e, h]), trainable) as tf.Variable<tf.Rank.R2>;
      const before = tf.memory().numTensors;
      const counter = new StepCounter();
      counter.install();
      let y: tf.Tensor, grads: tf.Tensor[];
      const forward: Record<string, number> = {};
      try {
        grads = tf.grads((...v: tf.Tensor[]) => {
          y = routerLogits(v[0] as tf.Tensor2D, { weight, lora: [{ A: v[1] as tf.Tensor2D, B: v[2] as tf.Tensor2D, scaling: 2 }] });
          Object.assign(forward, counter.programCounts, { total: counter.current.dispatches });
          counter.reset();
          return y;
        })([x, A, B]);
      } finally {
        counter.uninstall();
      }
      await Promise.all(grads.map(g => g.data()));
      const backward: Record<string, number> = { ...counter.programCounts, total: counter.current.dispatches };
      tf.dispose(grads);
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
      weight.dispose();
      return { forward, backward };
    };
    // the programs before the narrow ones took the dense rank-r products (DENSE_NARROW_PRODUCTS_FLAG off)
    const folded = (fn: () => ReturnType<typeof programs>) => withEnvFlag(F32_LORA_TAIL_FLAG, true, fn);
    const frozen = await folded(() => withEnvFlag(DENSE_NARROW_PRODUCTS_FLAG, false, () => programs(false)));
    // forward s·(x·Aᵀ), then x·Wᵀ with the branch's u·Bᵀ added in its epilogue; backward dy·W, s·(dy·B), dB, dA,
    // and the branch's dx added in its product (the ones of tf.grads' dy are a host fill)
    expect(frozen.forward.total, `forward: ${JSON.stringify(frozen.forward)}`).to.equal(2);
    expect(frozen.forward.GroupedMatMulProgram, 'the base product with its tail').to.equal(1);
    expect(frozen.backward.total, `backward: ${JSON.stringify(frozen.backward)}`).to.equal(5);
    expect(frozen.forward.ScaledMatMulProgram, 'the scaled product forward').to.equal(1);
    expect(frozen.backward.ScaledMatMulProgram, 'the scaled product backward').to.equal(1);
    for (const phase of [frozen.forward, frozen.backward]) {
      expect(phase, JSON.stringify(phase)).to.not.have.any.keys('TransposeProgram', 'TransposeSharedProgram');
    }
    // the narrow programs (the default) for the same products (s·x·Aᵀ, s·dy·B DenseNarrowMatMulProgram), dA and dB
    // together: one chunked pass for both and one own dispatch adding each one's chunks
    const narrow = await folded(() => programs(false));
    expect(narrow.forward, 'forward, narrow').to.deep.include({ total: 2, DenseNarrowMatMulProgram: 1, GroupedMatMulProgram: 1 });
    expect(narrow.backward, 'backward, narrow').to.deep.include({ total: 5, DenseNarrowMatMulProgram: 1, NarrowInnerGroupedMatMulProgram: 1,
      NarrowWeightGradPairProgram: 1, [NARROW_GRAD_PAIR_SUM_PROGRAM]: 1 });
    for (const phase of [narrow.forward, narrow.backward]) {
      expect(phase, JSON.stringify(phase)).to.not.have.any.keys('TransposeProgram', 'TransposeSharedProgram', 'ScaledMatMulProgram');
    }
    // the default, the tail apart (F32_LORA_TAIL_FLAG off): the expansion and its sum one more program forward
    const apart = await programs(false);
    expect(apart.forward, 'forward, tail apart').to.deep.include({ total: 3, DenseNarrowMatMulProgram: 1, NarrowInnerGroupedMatMulProgram: 1 });
    const trainable = await folded(() => withEnvFlag(DENSE_NARROW_PRODUCTS_FLAG, false, () => programs(true)));
    expect([trainable.forward.total, trainable.backward.total], JSON.stringify(trainable)).to.deep.equal([7, 9]);
    tf.dispose([x, A, B]);
  });
});

describe('webgpu: ScaledMatMulProgram past its dispatch bound', () => {
  // 300 rows: 5 blocks of 64 (4 rows per thread) on 2 workgroups, 19 blocks of 16 (1 row per thread) on 3
  for (const [rowsPerThread, workgroups] of [[4, 2], [1, 3]] as const) {
    it(`${rowsPerThread} row(s) per thread, ${workgroups} workgroups of rows: each takes every ${workgroups}th block; equals float64`, async () => {
      expect(tf.getKernel(SCALED_MATMUL, 'webgpu'), 'MoEScaledMatMul is registered on webgpu').to.not.equal(undefined);
      const [m, k, n] = [300, 20, 3];
      const rng = new Rng(8);
      const a = asF32(rng.array(m * k));
      const b = asF32(rng.array(n * k));
      const [at, bt] = [tensorOf(a, [m, k]), tensorOf(b, [n, k])];
      const before = tf.memory().numTensors;
      const backend = tf.backend() as unknown as { runWebGPUProgram: (...args: unknown[]) => tf.TensorInfo };
      const program = new ScaledMatMulProgram(m, n, true, rowsPerThread, workgroups);
      expect(program.dispatch).to.deep.equal([1, workgroups, 1]);
      const info = backend.runWebGPUProgram(program, [at, bt], 'float32', program.uniformsFor(k, 3));
      const y = tf.engine().makeTensorFromTensorInfo(info);
      expectClose(Float64Array.from(await y.data()), scaledMatMul64(a, b, m, k, n, true, 3), 1e-5, 'value vs float64');
      y.dispose();
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
      tf.dispose([at, bt]);
    });
  }
});
