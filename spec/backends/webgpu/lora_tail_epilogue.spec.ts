/**
 * GroupedMatMulProgram's LoRA tail (off tensor cores, WEBGPU_MOE_F32_LORA_TAIL, off by default: each
 * spec turns it on): a product's result plus tailAlpha·T·V_e added in its epilogue, T and V staged in
 * the slabs, one dispatch where the expansion took a second. Against float64 JS: the experts' grouped
 * product (x gathered, act(h), plain rows; W along n or along k; the tail's V in PEFT's B layout; the
 * tail's alpha apart from the product's) over a routing with empty experts and padding rows (which stay
 * 0), at ranks 1, 8 and 16, and ranks 9 on 8-deep slabs and 17 (past the epilogue: the expansion
 * apart); a dense projection's (denseWeightMatMul) forward with a bias and its gradient direction on a
 * packed bf16 weight, at 1, 17 and 333 rows; with the flag off the expansion apart, agreeing
 * (register_tiles.spec.ts reads the epilogue's WGSL). Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import {
  deviceDispatchPlan, F32_LORA_TAIL_FLAG, groupedMatMul, type GroupedMatMulArgs,
} from '../../../src/backends/webgpu/kernels.js';
import type { RowSource } from '../../../src/backends/webgpu/programs/shared.js';
import { denseWeightMatMul, packDenseWeight, unpackDenseWeight } from '../../../src/ops/packed.js';
import { asF32, Rng, tensorOf } from '../../helpers/numeric.js';
import { chooseExperts, expectCloseAsync, expectNoLeakAsync, withEnvFlag, withShaderKeys } from './helpers.js';

const silu = (v: number) => v / (1 + Math.exp(-v));
const tailKeys = (keys: string[]) => keys.filter(k => k.startsWith('moeGroupedMatMul_') && k.endsWith('_loraTail')).length;

describe('webgpu: LoRA tails in GroupedMatMulProgram\'s epilogue (issue 15: fewer dispatches off tensor cores)', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  // 29 tokens, top 2 of 6 experts, experts 0 and 5 empty; 16-row tiles (padding rows in each segment)
  const [T, K, E, rowTile, inner, outCols] = [29, 2, 6, 16, 24, 40];
  const experts = chooseExperts(new Rng(3), T, K, E, 'skip');
  for (const source of ['gather', 'act', 'rows'] as RowSource[]) {
    for (const kContiguous of [false, true]) {
      // the tail's T and V are staged in the tile's bk-deep slabs: a rank past min(bk, 16) goes apart
      for (const [rank, bk] of [[1, 16], [8, 8], [8, 16], [16, 16], [9, 8], [17, 16]]) {
        const folds = rank <= Math.min(bk, 16);
        it(`grouped, A ${source}, W along ${kContiguous ? 'k' : 'n'}, rank ${rank}, slabs ${bk} deep: as float64 gives it, ` +
            `${folds ? 'in one GroupedMatMulProgram' : 'the expansion apart (past the epilogue)'}; the flag off agrees`, async () => {
          const rng = new Rng(rank * 7 + bk + (kContiguous ? 1 : 0) + source.length);
          const ex = tf.tensor2d(experts, [T, K], 'int32');
          const plan = deviceDispatchPlan(ex, E, rowTile);
          const pairOfRow = Array.from(await plan.pairOfRow.data());
          const cap = plan.capacity;
          const aRows = source === 'gather' ? T : cap;
          const aCols = source === 'act' ? 2 * inner : inner;
          const a = asF32(rng.array(aRows * aCols));
          const w = asF32(rng.array(E * inner * outCols, 0.3));
          const t = asF32(rng.array(cap * rank));
          const v = asF32(rng.array(outCols * rank * E, 0.3));
          const strides = kContiguous ? { sE: outCols * inner, sN: inner, sK: 1 } : { sE: inner * outCols, sN: 1, sK: outCols };
          // the tail's V_e(k, n) in PEFT's B [out, r·E]: at n·r·E + e·r + k
          const tailStrides = { sE: rank, sN: rank * E, sK: 1 };
          const [alpha, tailAlpha] = [0.75, 2.5];
          const A = (r: number, k: number) => {
            if (source === 'gather') return a[Math.floor(pairOfRow[r] / K) * inner + k];
            if (source === 'rows') return a[r * inner + k];
            return silu(a[r * 2 * inner + k]) * a[r * 2 * inner + inner + k];
          };
          const want = new Float64Array(cap * outCols);
          for (let r = 0; r < cap; r++) {
            const pair = pairOfRow[r];
            if (pair < 0) continue;
            const e = experts[pair];
            for (let n = 0; n < outCols; n++) {
              let product = 0;
              for (let k = 0; k < inner; k++) product += A(r, k) * w[e * strides.sE + n * strides.sN + k * strides.sK];
              let tail = 0;
              for (let k = 0; k < rank; k++) tail += t[r * rank + k] * v[e * tailStrides.sE + n * tailStrides.sN + k * tailStrides.sK];
              want[r * outCols + n] = alpha * product + tailAlpha * tail;
            }
          }
          const [at, wt, tt, vt] = [tensorOf(a, [aRows, aCols]), tf.tensor1d(Float32Array.from(w)), tensorOf(t, [cap, rank]),
            tf.tensor1d(Float32Array.from(v))] as [tf.Tensor2D, tf.Tensor, tf.Tensor2D, tf.Tensor];
          const args: GroupedMatMulArgs = {
            a: at, source, w: wt, strides, inner, outCols, plan, tile: { tm: 1, tn: 2, bk }, alpha,
            activation: source === 'act' ? { kind: 'swiglu' } : undefined,
            loraTail: { a: tt, w: vt, strides: tailStrides, rank, alpha: tailAlpha },
          };
          await expectNoLeakAsync(async () => {
            const { keys, out } = await withEnvFlag(F32_LORA_TAIL_FLAG, true, () =>
              withShaderKeys(async recorded => ({ out: groupedMatMul(args), keys: recorded })));
            expect(keys.length, `shader keys: ${keys.join(', ')}`).to.equal(folds ? 1 : 2);
            expect(tailKeys(keys), `shader keys: ${keys.join(', ')}`).to.equal(folds ? 1 : 0);
            await expectCloseAsync(out, want, 1e-5, 'out', [cap, outCols]);
            // padding rows stay exactly 0
            const got = await out.data();
            for (let r = 0; r < cap; r++) {
              if (pairOfRow[r] < 0) for (let n = 0; n < outCols; n++) expect(got[r * outCols + n], `padding row ${r}`).to.equal(0);
            }
            const apart = await withEnvFlag(F32_LORA_TAIL_FLAG, false, async () =>
              withShaderKeys(async recorded => ({ out: groupedMatMul(args), keys: recorded })));
            expect(tailKeys(apart.keys), 'flag off: no tail in the product').to.equal(0);
            expect(apart.keys.length, 'flag off: the expansion apart').to.equal(2);
            await expectCloseAsync(apart.out, want, 1e-5, 'out, flag off', [cap, outCols]);
            tf.dispose([out, apart.out]);
          });
          tf.dispose([at, wt, tt, vt, ex, plan.seg, plan.rowOfPair, plan.pairOfRow]);
        });
      }
    }
  }

  for (const rows of [1, 17, 333]) {
    it(`dense, ${rows} rows: x·Wᵀ + b + u·Bᵀ (float32 W) and dy·W + g·A (bf16 W) as float64 gives them, each one program`, async () => {
      const [inSize, out, rank] = [48, 36, 8];
      const rng = new Rng(rows + 5);
      const [x, W, b, u, B, dy, g, Af] = [rows * inSize, out * inSize, out, rows * rank, out * rank, rows * out, rows * rank,
        rank * inSize].map(n => asF32(rng.array(n, 0.5)));
      const [xt, Wt, ut, Bt, dyt, gt, At] = [tensorOf(x, [rows, inSize]), tensorOf(W, [out, inSize]), tensorOf(u, [rows, rank]),
        tensorOf(B, [out, rank]), tensorOf(dy, [rows, out]), tensorOf(g, [rows, rank]), tensorOf(Af, [rank, inSize])] as tf.Tensor2D[];
      const bt = tf.tensor1d(Float32Array.from(b));
      const packed = packDenseWeight(Wt, 'bf16');
      const decodedT = unpackDenseWeight(packed);
      const decoded = await decodedT.data();
      decodedT.dispose();
      const forward = new Float64Array(rows * out);
      for (let r = 0; r < rows; r++) {
        for (let n = 0; n < out; n++) {
          let s = b[n];
          for (let k = 0; k < inSize; k++) s += x[r * inSize + k] * W[n * inSize + k];
          for (let k = 0; k < rank; k++) s += u[r * rank + k] * B[n * rank + k];
          forward[r * out + n] = s;
        }
      }
      const gradient = new Float64Array(rows * inSize);
      for (let r = 0; r < rows; r++) {
        for (let c = 0; c < inSize; c++) {
          let s = 0;
          for (let n = 0; n < out; n++) s += dy[r * out + n] * decoded[n * inSize + c];
          for (let k = 0; k < rank; k++) s += g[r * rank + k] * Af[k * inSize + c];
          gradient[r * inSize + c] = s;
        }
      }
      await expectNoLeakAsync(async () => {
        const { keys, y, dx } = await withEnvFlag(F32_LORA_TAIL_FLAG, true, () => withShaderKeys(async recorded => ({
          y: denseWeightMatMul(xt, Wt, true, bt, 'activation', { a: ut, b: Bt, transposeB: true }),
          dx: denseWeightMatMul(dyt, packed, false, null, 'gradient', { a: gt, b: At, transposeB: false }),
          keys: recorded,
        })));
        expect(keys.length, `shader keys: ${keys.join(', ')}`).to.equal(2);
        expect(tailKeys(keys), `shader keys: ${keys.join(', ')}`).to.equal(2);
        await expectCloseAsync(y, forward, 1e-5, 'x·Wᵀ + b + u·Bᵀ', [rows, out]);
        await expectCloseAsync(dx, gradient, 1e-5, 'dy·W + g·A', [rows, inSize]);
        tf.dispose([y, dx]);
      });
      tf.dispose([xt, Wt, bt, ut, Bt, dyt, gt, At, packed.packed]);
    });
  }
});
