/**
 * HalfOperandProgram (the tensor-core MatMul's left operand as f16 halves, staging 'half8'): on the
 * device, rows of f32 become the IEEE binary16 bits of each value rounded to nearest even (as
 * src/util/half.ts's encodeFloat16 computes them on the host), two per int32 word, low half first;
 * times operandScale(amax) for a gradient operand, amax from maxAbsCode (a power of two: the
 * scaled bits are exact);
 * act(gate, up) of h rows, both halves and interleaved, within f16 rounding of the float64
 * activation; more rows than a grid column holds; bad shapes rejected; no leaks. The MatMul's
 * half8 staging itself is checked by subgroup_matrix_emulator.spec.ts (index math, WGSL) and on the
 * GPU machine (tools/webgpu_tc/check.ts). Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { maxAbsCode } from '../../../src/backends/webgpu/kernels.js';
import { HalfOperandProgram } from '../../../src/backends/webgpu/programs/half_operand_program.js';
import { activationUniforms } from '../../../src/backends/webgpu/programs/shared.js';
import { halfOperandFits, matMulStaging } from '../../../src/backends/webgpu/programs/subgroup_matrix_program.js';
import { decodeFloat16, encodeFloat16 } from '../../../src/util/half.js';

type Backend = { runWebGPUProgram: (...args: unknown[]) => tf.TensorInfo };

/**
 * Runs the program on x (and, scaled, x's maxAbsCode as amax; with `rowScale`, its routing weights
 * and pairs of rows) and returns its halves in order.
 */
async function halvesOf(rows: number, cols: number, x: Float32Array, xCols: number, spec: ConstructorParameters<typeof HalfOperandProgram>[2],
    activation = activationUniforms(undefined), rowScale?: { rw: Float32Array; pr: Int32Array }): Promise<Uint16Array> {
  const xt = tf.tensor2d(x, [rows, xCols]);
  const at = spec.scaled ? maxAbsCode(xt) : undefined;
  const weights = rowScale === undefined ? [] : [tf.tensor1d(rowScale.rw), tf.tensor1d(rowScale.pr, 'int32')];
  const before = tf.memory().numTensors;
  const program = new HalfOperandProgram(rows, cols, spec);
  const info = (tf.backend() as unknown as Backend).runWebGPUProgram(program, [xt, ...(at === undefined ? [] : [at]), ...weights], 'int32',
      HalfOperandProgram.uniformsFor(rows, cols, activation));
  const words = tf.engine().makeTensorFromTensorInfo(info);
  expect(words.shape).to.deep.equal([rows, cols / 2]);
  expect(words.dtype).to.equal('int32');
  const data = await words.data() as Int32Array;
  words.dispose();
  expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  tf.dispose([xt, ...(at === undefined ? [] : [at]), ...weights]);
  return new Uint16Array(data.buffer, data.byteOffset, data.length * 2);
}

/** Values of every kind f16 meets: normal, ties of each parity, subnormal, underflow, overflow, ±0. */
function testValues(n: number, seed: number): Float32Array {
  const special = [1, -1, 1 + 2 ** -11, 1 + 3 * 2 ** -11, -(2 + 2 ** -10), 65504, 65520, 1e6, -1e6, 2 ** -20, -(2 ** -24), 2 ** -26, 0, -0,
    0.1, 1 / 3, 6.1e-5];
  let s = seed;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) % 2147483648;
    const u = s / 2147483648;
    out[i] = i < special.length ? special[i] : (u - 0.5) * 2 ** ((i % 40) - 20);
  }
  return out;
}

describe('webgpu: HalfOperandProgram (f16 left operands for the tensor-core MatMul)', function () {
  this.timeout(60_000);
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it('rows: the binary16 bits of each value rounded to nearest even, two per word', async () => {
    const [rows, cols] = [37, 48];
    const x = testValues(rows * cols, 7);
    const got = await halvesOf(rows, cols, x, cols, { source: 'rows', scaled: false });
    expect(Array.from(got)).to.deep.equal(Array.from(encodeFloat16(x)));
  });

  it('scaled: each value times operandScale(amax), the power of two that brings amax to at most 2^14, then rounded', async () => {
    const [rows, cols] = [5, 16];
    // a mean loss's cotangent: mostly below f16's smallest normal as it is
    const x = Float32Array.from(testValues(rows * cols, 3), v => Math.fround(v * 1e-6));
    const amax = x.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    const s = 2 ** Math.floor(Math.log2(16384 / amax));
    expect(s * amax).to.be.within(8192, 16384);
    const got = await halvesOf(rows, cols, x, cols, { source: 'rows', scaled: true });
    expect(Array.from(got)).to.deep.equal(Array.from(encodeFloat16(Float32Array.from(x, v => v * s))));
    // a largest magnitude that is a power of two (s·amax is 2^14 exactly), then one with an infinity (s 1)
    const power = Float32Array.from({ length: 8 }, (_, i) => (i === 3 ? -(2 ** -10) : 2 ** -12 * (i + 1) / 8));
    const gotPower = await halvesOf(1, 8, power, 8, { source: 'rows', scaled: true });
    expect(Array.from(gotPower)).to.deep.equal(Array.from(encodeFloat16(Float32Array.from(power, v => v * 2 ** 24))));
    const infinite = Float32Array.from({ length: 8 }, (_, i) => (i === 5 ? Infinity : 1e-6 * i));
    expect(Array.from(await halvesOf(1, 8, infinite, 8, { source: 'rows', scaled: true }))).to.deep.equal(Array.from(encodeFloat16(infinite)));
    // amax 0: s 1
    const zeros = await halvesOf(1, 8, new Float32Array(8), 8, { source: 'rows', scaled: true });
    expect(Array.from(zeros)).to.deep.equal(new Array(8).fill(0));
  });

  for (const interleaved of [false, true]) {
    it(`act (SwiGLU, ${interleaved ? 'interleaved gate/up pairs' : 'gate and up halves'}): silu(g)·u of each h row, within f16 rounding of float64's`, async () => {
      const [rows, cols] = [9, 24];
      const h = Float32Array.from(testValues(rows * 2 * cols, 11).map(v => Math.max(-30, Math.min(30, v))));
      const got = decodeFloat16(await halvesOf(rows, cols, h, 2 * cols,
          { source: 'act', activation: { kind: 'swiglu', interleaved }, scaled: false }, activationUniforms({ kind: 'swiglu' })));
      for (let r = 0; r < rows; r++) {
        for (let c = 0; c < cols; c++) {
          const [g, u] = interleaved ? [h[r * 2 * cols + 2 * c], h[r * 2 * cols + 2 * c + 1]] : [h[r * 2 * cols + c], h[r * 2 * cols + cols + c]];
          const want = g / (1 + Math.exp(-g)) * u;
          // half an f16 ulp of the value (its binade's, or the subnormals' 2^-24), and f32's rounding of the activation on top
          const ulp = Math.abs(want) < 2 ** -14 ? 2 ** -24 : 2 ** (Math.floor(Math.log2(Math.abs(want))) - 10);
          expect(Math.abs(got[r * cols + c] - want), `row ${r} col ${c}: ${got[r * cols + c]} against ${want}`)
              .to.be.at.most(ulp / 2 + Math.abs(want) * 2 ** -20);
        }
      }
    });
  }

  it('rowScale (the weight gradient\'s rw·act(h) or rw·dh): row r times rw[pr[r]], 0 for a padding row, scaled after, rounded once', async () => {
    const [rows, cols, pairs] = [7, 16, 10];
    const x = Float32Array.from(testValues(rows * cols, 5), v => Math.fround(v * 1e-3));
    const rw = Float32Array.from({ length: pairs }, (_, i) => Math.fround(0.05 + i / 7));
    // the plan's rows: pairs in expert order, −1 for padding rows
    const pr = Int32Array.from([3, 9, -1, 0, 7, -1, 2]);
    // a padding row's weight is 0, so its values are ±0 with x's signs (no product reads them)
    const scaledRow = (s: number) => Float32Array.from(x, (v, i) => {
      const pair = pr[Math.floor(i / cols)];
      return Math.fround(v * (pair < 0 ? 0 : Math.fround(rw[pair] * s)));
    });
    const plain = await halvesOf(rows, cols, x, cols, { source: 'rows', scaled: false, rowScale: true }, undefined, { rw, pr });
    expect(Array.from(plain)).to.deep.equal(Array.from(encodeFloat16(scaledRow(1))));
    const amax = x.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    const s = 2 ** Math.floor(Math.log2(16384 / amax));
    const scaled = await halvesOf(rows, cols, x, cols, { source: 'rows', scaled: true, rowScale: true }, undefined, { rw, pr });
    expect(Array.from(scaled)).to.deep.equal(Array.from(encodeFloat16(scaledRow(s))));
    // act(h) times the row's weight: silu(g)·u·rw within f16 rounding
    const h = Float32Array.from(testValues(rows * 2 * cols, 13).map(v => Math.max(-30, Math.min(30, v))));
    const got = decodeFloat16(await halvesOf(rows, cols, h, 2 * cols, { source: 'act', activation: { kind: 'swiglu', interleaved: false }, scaled: false,
      rowScale: true }, activationUniforms({ kind: 'swiglu' }), { rw, pr }));
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const [g, u] = [h[r * 2 * cols + c], h[r * 2 * cols + cols + c]];
        const want = pr[r] < 0 ? 0 : g / (1 + Math.exp(-g)) * u * rw[pr[r]];
        const ulp = Math.abs(want) < 2 ** -14 ? 2 ** -24 : 2 ** (Math.floor(Math.log2(Math.abs(want))) - 10);
        expect(Math.abs(got[r * cols + c] - want), `row ${r} col ${c}`).to.be.at.most(ulp / 2 + Math.abs(want) * 2 ** -20);
      }
    }
    expect(new HalfOperandProgram(rows, cols, { source: 'rows', scaled: true, rowScale: true }).variableNames).to.deep.equal(['x', 'amax', 'rw', 'pr']);
  });

  it('more rows than one grid column (65535): the grid rows loop over the rest', async () => {
    const [rows, cols] = [65540, 8];
    const x = Float32Array.from({ length: rows * cols }, (_, i) => (i % 2048) - 1024 + 0.25);
    const got = await halvesOf(rows, cols, x, cols, { source: 'rows', scaled: false });
    expect(Array.from(got.subarray((rows - 3) * cols))).to.deep.equal(Array.from(encodeFloat16(x.subarray((rows - 3) * cols))));
    expect(Array.from(got)).to.deep.equal(Array.from(encodeFloat16(x)));
  });

  it('rejects widths that are not whole runs of 8 and an activation without the act source', () => {
    expect(() => new HalfOperandProgram(4, 12, { source: 'rows', scaled: false })).to.throw(/HalfOperandProgram: cols must be a positive multiple of 8 but got 12/);
    expect(() => new HalfOperandProgram(4, 16, { source: 'rows', activation: { kind: 'swiglu', interleaved: false }, scaled: false }))
        .to.throw(/an activation goes with source 'act' and only with it, but got source 'rows' and swiglu/);
  });

  it('the MatMul takes f16 left operands (\'half8\') where asked and the reduction is whole runs of 8', () => {
    const d = { inner: 2048, outCols: 1536, sE: 1536 * 2048, sN: 2048, sK: 1 };
    expect(matMulStaging({}, d, true).left).to.equal('half8');
    expect(matMulStaging({}, d).left).to.equal('vec4');
    expect(matMulStaging({}, { ...d, inner: 2044, sN: 2044 }, true).left).to.equal('vec4');
    expect([4, 8, 12, 16, 2048].map(halfOperandFits)).to.deep.equal([false, true, false, true, true]);
  });
});
