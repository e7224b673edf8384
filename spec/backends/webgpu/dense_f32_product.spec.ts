/**
 * Float32 dense weights through the grouped program on WebGPU (MoEDenseMatMul): x·Wᵀ (+ b) and
 * dy·W equal a float64 reference and tfjs's tf.matMul within float32 rounding over odd shapes, rows
 * that are not whole tiles and both tile presets (2×4 below 64 rows, 4×4 vec4 from 64); the flag
 * WEBGPU_MOE_DENSE_PROGRAM picks which products run it ('forward' by default, 'grouped', 'tfjs');
 * loraLinear's output and dx on the new route equal float64's within rounding, and on tfjs's tape (a
 * trained W or bias) the kernel's gradient gives d(input), dW and db as float64 does; 'grouped' also
 * runs MoEMatMulAdd (loraLinear's LoRA sums) through the grouped program; no leaks.
 * Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { packedDenseTile } from '../../../src/backends/webgpu/kernels.js';
import { loraLinear } from '../../../src/ops/lora/linear.js';
import { matMulAdd } from '../../../src/ops/matmul_add.js';
import { DENSE_MATMUL, DENSE_PROGRAM_FLAG, type DenseProductTail, denseWeightMatMul } from '../../../src/ops/packed.js';
import { MoELoraError } from '../../../src/errors.js';
import { maxRelativeError } from '../../../src/util/numeric.js';
import { expectCloseAsync, expectNoLeakAsync, productFloat64, profileKernels } from './helpers.js';

/** Runs `fn` with the flag set to `choice`, restoring the flag after. */
async function withDenseProgram<T>(choice: unknown, fn: () => Promise<T>): Promise<T> {
  const previous = tf.env().get(DENSE_PROGRAM_FLAG);
  tf.env().set(DENSE_PROGRAM_FLAG, choice as string);
  try {
    return await fn();
  } finally {
    tf.env().set(DENSE_PROGRAM_FLAG, previous);
  }
}

describe('webgpu: float32 dense products through the grouped program (MoEDenseMatMul)', function () {
  this.timeout(60_000);
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    expect(tf.getKernel(DENSE_MATMUL, 'webgpu'), DENSE_MATMUL).to.not.equal(undefined);
  });

  it('the tile: 4×4 vec4 from 64 rows, 2×4 below', () => {
    expect(packedDenseTile(63)).to.deep.equal({ tm: 2, tn: 4, bk: 16 });
    expect(packedDenseTile(64)).to.deep.equal({ tm: 4, tn: 4, bk: 16, vec4: true });
    expect(packedDenseTile(4096)).to.deep.equal({ tm: 4, tn: 4, bk: 16, vec4: true });
  });

  /** A LoRA tail of random factors: a [N, r] and b [out, r] (transposeB) or [r, in]. */
  function tailOf(aShape: [number, number], bShape: [number, number], transposeB: boolean): DenseProductTail {
    return { a: tf.randomNormal(aShape, 0, 1, 'float32', 11) as tf.Tensor2D, b: tf.randomNormal(bShape, 0, 1, 'float32', 12) as tf.Tensor2D, transposeB };
  }

  // (n, in, out): 2×4 tile for n = 5, 4×4 vec4 for the others; none a whole tile, out not a multiple of 4
  const shapes: Array<[number, number, number]> = [[5, 7, 6], [70, 33, 19], [300, 65, 130], [129, 300, 67]];
  for (const [n, inSize, out] of shapes) {
    it(`[${n}, ${inSize}] · W[${out}, ${inSize}]ᵀ + b and dy·W: float64's values and tf.matMul's within rounding, one program each`, async () => {
      const w = tf.randomUniform([out, inSize], -2, 2, 'float32', n) as tf.Tensor2D;
      const x = tf.randomNormal([n, inSize], 0, 1, 'float32', 1) as tf.Tensor2D;
      const dy = tf.randomNormal([n, out], 0, 1, 'float32', 2) as tf.Tensor2D;
      const bias = tf.randomNormal([out], 0, 1, 'float32', 3) as tf.Tensor1D;
      const [wv, xv, dyv, bv] = await Promise.all([w.data(), x.data(), dy.data(), bias.data()]) as Float32Array[];
      await withDenseProgram('grouped', () => expectNoLeakAsync(async () => {
        const cases = [
          { label: 'x·Wᵀ + b', got: denseWeightMatMul(x, w, true, bias), tfjs: tf.tidy(() => tf.add(tf.matMul(x, w, false, true), bias)),
            ref: productFloat64(xv, n, wv, out, inSize, true, bv), shape: [n, out] },
          { label: 'x·Wᵀ', got: denseWeightMatMul(x, w, true, null), tfjs: tf.matMul(x, w, false, true),
            ref: productFloat64(xv, n, wv, out, inSize, true, null), shape: [n, out] },
          { label: 'dy·W', got: denseWeightMatMul(dy, w, false, null), tfjs: tf.matMul(dy, w),
            ref: productFloat64(dyv, n, wv, out, inSize, false, null), shape: [n, inSize] },
        ];
        for (const c of cases) {
          await expectCloseAsync(c.got, c.ref, 1e-6, `${c.label} vs float64`, c.shape);
          await expectCloseAsync(c.got, await c.tfjs.data(), 1e-6, `${c.label} vs tf.matMul`);
        }
        for (const [fn, label] of [[() => denseWeightMatMul(x, w, true, bias), 'forward'], [() => denseWeightMatMul(dy, w, false, null), 'dx']] as const) {
          const { kernels, peakBytes } = await profileKernels(fn);
          expect(kernels, `${label}: one program`).to.deep.equal([DENSE_MATMUL]);
          expect(peakBytes, `${label}: peak bytes, the result only`).to.equal(4 * n * (label === 'dx' ? inSize : out));
        }
        // loraLinear's LoRA tails: + down·Bᵀ (B [out, 3]) forward and + g·A (A [3, in]) backward, inside the same kernel
        const tails = [
          { label: 'x·Wᵀ + b + down·Bᵀ', a: x, transposeWeight: true, bias, tail: tailOf([n, 3], [out, 3], true), outCols: out, ref: productFloat64(xv, n, wv, out, inSize, true, bv) },
          { label: 'dy·W + g·A', a: dy, transposeWeight: false, bias: null, tail: tailOf([n, 3], [3, inSize], false), outCols: inSize, ref: productFloat64(dyv, n, wv, out, inSize, false, null) },
        ];
        for (const t of tails) {
          const [tav, tbv] = await Promise.all([t.tail.a.data(), t.tail.b.data()]) as Float32Array[];
          const [rowsB, colsB] = t.tail.b.shape;
          const branch = productFloat64(tav, n, tbv, rowsB, colsB, t.tail.transposeB, null);
          const run = () => denseWeightMatMul(t.a, w, t.transposeWeight, t.bias, 'activation', t.tail);
          const got = run();
          await expectCloseAsync(got, t.ref.map((v, i) => v + branch[i]), 1e-6, `${t.label} vs float64`, [n, t.outCols]);
          got.dispose();
          const { kernels } = await profileKernels(run);
          expect(kernels, `${t.label}: one kernel`).to.deep.equal([DENSE_MATMUL]);
          tf.dispose([t.tail.a, t.tail.b]);
        }
        tf.dispose(cases.flatMap(c => [c.got, c.tfjs]));
      }));
      tf.dispose([w, x, dy, bias]);
    });
  }

  it("the flag: 'forward' (the default) runs x·Wᵀ only, 'tfjs' neither (tf.matMul's values bit for bit), 'grouped' both", async () => {
    expect(tf.env().get(DENSE_PROGRAM_FLAG)).to.equal('forward');
    const w = tf.randomNormal([40, 24], 0, 1, 'float32', 4) as tf.Tensor2D;
    const x = tf.randomNormal([70, 24], 0, 1, 'float32', 5) as tf.Tensor2D;
    const dy = tf.randomNormal([70, 40], 0, 1, 'float32', 6) as tf.Tensor2D;
    const uses = async () => [
      (await profileKernels(() => denseWeightMatMul(x, w, true, null))).kernels.includes(DENSE_MATMUL),
      (await profileKernels(() => denseWeightMatMul(dy, w, false, null))).kernels.includes(DENSE_MATMUL),
    ];
    await expectNoLeakAsync(async () => {
      expect(await uses(), 'forward').to.deep.equal([true, false]);
      expect(await withDenseProgram('grouped', uses), 'grouped').to.deep.equal([true, true]);
      expect(await withDenseProgram('tfjs', uses), 'tfjs').to.deep.equal([false, false]);
      await withDenseProgram('tfjs', async () => {
        const [got, want] = [denseWeightMatMul(x, w, true, null), tf.matMul(x, w, false, true)];
        expect(Array.from(await got.data())).to.deep.equal(Array.from(await want.data()));
        tf.dispose([got, want]);
      });
    });
    tf.dispose([w, x, dy]);
  });

  it('an unknown flag value throws, naming the flag, the choices and the value', async () => {
    const [w, x] = [tf.zeros([3, 5]) as tf.Tensor2D, tf.zeros([2, 5]) as tf.Tensor2D];
    await withDenseProgram('fast', async () => {
      expect(() => denseWeightMatMul(x, w, true, null)).to.throw(MoELoraError,
          /denseWeightMatMul.*WEBGPU_MOE_DENSE_PROGRAM must be one of 'forward', 'grouped', 'tfjs' but got "fast"/);
    });
    tf.dispose([w, x]);
  });

  it('an empty batch gives an empty product', async () => {
    const w = tf.ones([3, 5]) as tf.Tensor2D;
    await withDenseProgram('grouped', () => expectNoLeakAsync(async () => {
      const x = tf.zeros([0, 5]) as tf.Tensor2D;
      const dy = tf.zeros([0, 3]) as tf.Tensor2D;
      const [y, dx] = [denseWeightMatMul(x, w, true, null), denseWeightMatMul(dy, w, false, null)];
      expect([y.shape, dx.shape]).to.deep.equal([[0, 3], [0, 5]]);
      expect(Array.from(await y.data())).to.deep.equal([]);
      tf.dispose([x, dy, y, dx]);
    }));
    w.dispose();
  });

  for (const transposeWeight of [true, false]) {
    it(`on tfjs's tape (W and b trained), ${transposeWeight ? 'x·Wᵀ + b' : 'x·W + b'}: d(input), dW, db as float64 gives them`, async () => {
      const [n, rows, cols] = [70, 19, 33];
      const [inner, outCols] = transposeWeight ? [cols, rows] : [rows, cols];
      const w = tf.randomNormal([rows, cols], 0, 1, 'float32', 13) as tf.Tensor2D;
      const x = tf.randomNormal([n, inner], 0, 1, 'float32', 14) as tf.Tensor2D;
      const bias = tf.randomNormal([outCols], 0, 1, 'float32', 15) as tf.Tensor1D;
      const dy = tf.randomNormal([n, outCols], 0, 1, 'float32', 16) as tf.Tensor2D;
      const [wv, xv, dyv] = await Promise.all([w.data(), x.data(), dy.data()]) as Float32Array[];
      // float64: d(input) = dy·W (a·Wᵀ) or dy·Wᵀ (a·W); dW = dyᵀ·x or xᵀ·dy; db = Σ_rows dy
      const dxRef = productFloat64(dyv, n, wv, rows, cols, !transposeWeight, null);
      const dwRef = new Float64Array(rows * cols);
      for (let i = 0; i < n; i++) {
        for (let p = 0; p < rows; p++) {
          for (let q = 0; q < cols; q++) {
            dwRef[p * cols + q] += transposeWeight ? dyv[i * outCols + p] * xv[i * inner + q] : xv[i * inner + p] * dyv[i * outCols + q];
          }
        }
      }
      const dbRef = Float64Array.from({ length: outCols }, (_, j) => Array.from({ length: n }, (_, i) => dyv[i * outCols + j]).reduce((s, v) => s + v, 0));
      await withDenseProgram('grouped', () => expectNoLeakAsync(async () => {
        const grads = tf.grads((xs: tf.Tensor, ws: tf.Tensor, bs: tf.Tensor) =>
          denseWeightMatMul(xs as tf.Tensor2D, ws as tf.Tensor2D, transposeWeight, bs as tf.Tensor1D))([x, w, bias], dy);
        await expectCloseAsync(grads[0], dxRef, 1e-6, 'd(input)', [n, inner]);
        await expectCloseAsync(grads[1], dwRef, 1e-6, 'dW', [rows, cols]);
        await expectCloseAsync(grads[2], dbRef, 1e-6, 'db', [outCols]);
        tf.dispose(grads);
      }));
      tf.dispose([w, x, bias, dy]);
    });
  }

  /** The classes of the programs `fn` runs on the webgpu backend (its runWebGPUProgram, wrapped for the call). */
  function programsOf(fn: () => tf.Tensor): { out: tf.Tensor; programs: string[] } {
    const backend = tf.backend() as unknown as { runWebGPUProgram: (...args: unknown[]) => unknown };
    const run = backend.runWebGPUProgram;
    const programs: string[] = [];
    backend.runWebGPUProgram = function (this: unknown, ...args: unknown[]) {
      programs.push((args[0] as object).constructor.name);
      return run.apply(this, args);
    };
    try {
      return { out: fn(), programs };
    } finally {
      backend.runWebGPUProgram = run;
    }
  }

  for (const transposeB of [true, false]) {
    it(`matMulAdd (transposeB ${transposeB}): 'grouped' runs the grouped program, float64's values within rounding; 'forward' tfjs's`, async () => {
      // k above NARROW_MAX_COLS: a reduction ≤ 16 deep goes to the narrow program whatever the choice
      const [m, k, n] = [70, 20, 37];
      const a = tf.randomNormal([m, k], 0, 1, 'float32', 17) as tf.Tensor2D;
      const b = tf.randomNormal(transposeB ? [n, k] : [k, n], 0, 1, 'float32', 18) as tf.Tensor2D;
      const addend = tf.randomNormal([m, n], 0, 1, 'float32', 19) as tf.Tensor2D;
      const [av, bv, cv] = await Promise.all([a.data(), b.data(), addend.data()]) as Float32Array[];
      // b as W [rows, cols]: a·bᵀ is a·Wᵀ with W = b [n, k]; a·b is a·W with W = b [k, n]
      const ref = productFloat64(av, m, bv, transposeB ? n : k, transposeB ? k : n, transposeB, null).map((v, i) => v + cv[i]);
      await expectNoLeakAsync(async () => {
        for (const choice of ['grouped', 'forward']) {
          await withDenseProgram(choice, async () => {
            const { out, programs } = programsOf(() => matMulAdd(a, b, false, transposeB, addend));
            expect(programs, choice).to.deep.equal([choice === 'grouped' ? 'GroupedMatMulProgram' : programs[0]]);
            if (choice !== 'grouped') expect(programs[0]).to.not.equal('GroupedMatMulProgram');
            await expectCloseAsync(out, ref, 1e-6, `${choice} vs float64`, [m, n]);
            out.dispose();
          });
        }
      });
      tf.dispose([a, b, addend]);
    });
  }

  it('loraLinear on the grouped route: y and dx as float64 gives them, dA and dB as the tfjs route, W read by MoEDenseMatMul both ways', async () => {
    const [n, inSize, out, r, s] = [70, 48, 36, 4, 2];
    const w = tf.randomNormal([out, inSize], 0, 0.2, 'float32', 7) as tf.Tensor2D;
    const bias = tf.randomNormal([out], 0, 1, 'float32', 8) as tf.Tensor1D;
    const x = tf.randomNormal([n, inSize], 0, 1, 'float32', 9) as tf.Tensor2D;
    const A = tf.randomNormal([r, inSize], 0, 0.2, 'float32', 10) as tf.Tensor2D;
    const B = tf.randomNormal([out, r], 0, 0.2, 'float32', 11) as tf.Tensor2D;
    const dy = tf.randomNormal([n, out], 0, 1, 'float32', 12) as tf.Tensor2D;
    const [wv, bv, xv, av, bBv, dyv] = await Promise.all([w, bias, x, A, B, dy].map(t => t.data())) as Float32Array[];
    // float64: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, dx = dy·W + s·(dy·B)·A
    const down = productFloat64(xv, n, av, r, inSize, true, null);          // [n, r]
    const lora = productFloat64(Float32Array.from(down), n, bBv, out, r, true, null);
    const yRef = productFloat64(xv, n, wv, out, inSize, true, bv).map((v, i) => v + s * lora[i]);
    const g = productFloat64(dyv, n, bBv, out, r, false, null);             // [n, r]
    const gA = productFloat64(Float32Array.from(g), n, av, r, inSize, false, null);
    const dxRef = productFloat64(dyv, n, wv, out, inSize, false, null).map((v, i) => v + s * gA[i]);
    const run = (choice: string) => withDenseProgram(choice, async () => {
      const f = (xs: tf.Tensor, a: tf.Tensor, b: tf.Tensor) =>
        loraLinear(xs as tf.Tensor2D, w, bias, [{ A: a as tf.Tensor2D, B: b as tf.Tensor2D, scaling: s }]);
      const { kernels } = await profileKernels(() => tf.tidy(() => {
        const { value, grads } = tf.valueAndGrads(f)([x, A, B], dy);
        tf.dispose(grads);
        return value;
      }));
      const { value, grads } = tf.valueAndGrads(f)([x, A, B], dy);
      const values = await Promise.all([value, ...grads].map(t => t.data()));
      tf.dispose([value, ...grads]);
      return { values, denseRuns: kernels.filter(k => k === DENSE_MATMUL).length };
    });
    await expectNoLeakAsync(async () => {
      const ours = await run('grouped');
      const theirs = await run('tfjs');
      expect([ours.denseRuns, theirs.denseRuns], 'MoEDenseMatMul runs, grouped / tfjs').to.deep.equal([2, 0]);
      for (const [label, i, ref] of [['y', 0, yRef], ['dx', 1, dxRef]] as const) {
        const err = maxRelativeError(ours.values[i], ref);
        expect(err, `${label} vs float64: ${err.toExponential(2)}`).to.be.at.most(1e-6);
      }
      for (const [label, i] of [['dA', 2], ['dB', 3]] as const) {
        const err = maxRelativeError(ours.values[i], theirs.values[i]);
        expect(err, `${label} vs the tfjs route: ${err.toExponential(2)}`).to.be.at.most(1e-6);
      }
    });
    tf.dispose([w, bias, x, A, B, dy]);
  });
});
