/**
 * The dense products (MoEDenseMatMul, MoEPackedDenseMatMul) and tensor cores, where there are none
 * (Mesa): the choice (denseTensorCores: flag, registered device, workgroup memory, width), that with
 * the flag off or on-but-unavailable the same kernels and programs run with the same numbers bit for
 * bit, that a backend's override takes dy·W into MoEDenseMatMul whatever WEBGPU_MOE_DENSE_PROGRAM
 * says, and maxAbsCodeInKernel (the gradient operand's scale, from inside the kernel). The products on
 * tensor cores themselves are checked on the GPU machine (tools/webgpu_tc/check.ts, dense cases);
 * their programs' WGSL in tensor_cores.spec.ts. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import {
  denseTensorCores, type KernelArgs, MAX_ABS_ONE_PASS_FLAG, maxAbsCodeInKernel, webgpuDenseKernelOverride,
} from '../../../src/backends/webgpu/kernels.js';
import { subgroupMatrixWorkgroupBytes } from '../../../src/backends/webgpu/programs/subgroup_matrix_program.js';
import { registerTensorCoreDevice, TENSOR_CORES_FLAG } from '../../../src/backends/webgpu/tensor_cores.js';
import {
  DENSE_MATMUL, DENSE_PROGRAM_FLAG, denseWeightMatMul, PACKED_DENSE_MATMUL, packDenseWeight, registerDenseKernelOverride,
} from '../../../src/ops/packed.js';
import { expectedMaxAbsCode, expectNoLeakAsync, profileKernels, withEnvFlag, withShaderKeys } from './helpers.js';

/** The kernels (tf.profile) and the programs' shader keys of one call, and its values. */
async function dispatchOf(fn: () => tf.Tensor): Promise<{ kernels: string[]; programs: string[]; values: number[] }> {
  const { kernels } = await profileKernels(fn);
  const { y, programs } = await withShaderKeys(async keys => ({ y: fn(), programs: [...keys] }));
  const values = Array.from(await y.data());
  y.dispose();
  return { kernels, programs, values };
}

describe('webgpu: dense products and tensor cores (choice and fall back, on a device without them)', function () {
  this.timeout(120_000);
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    for (const k of [DENSE_MATMUL, PACKED_DENSE_MATMUL]) expect(tf.getKernel(k, 'webgpu'), k).to.not.equal(undefined);
  });

  it('denseTensorCores: the flag on, a registered device with the slabs\' workgroup memory, both output sides >= 32 and the reduction >= 16', async () => {
    const support = { config: { componentType: 'f16', resultComponentType: 'f32', M: 16, N: 16, K: 16 }, subgroupSize: 32 };
    const device = (storage: number) => ({
      limits: { maxComputeWorkgroupStorageSize: storage }, createShaderModule: () => ({}),
    }) as unknown as GPUDevice;
    const [roomy, small, unregistered] = [device(49152), device(subgroupMatrixWorkgroupBytes() - 4), device(49152)];
    expect(registerTensorCoreDevice(roomy, support)).to.equal(undefined);
    expect(registerTensorCoreDevice(small, support)).to.equal(undefined);
    // OLMoE's q projection and LM head, both directions; LoRA's rank-8 products are not wide enough
    const wide: Array<[number, number, number]> = [[2048, 2048, 2048], [2048, 50304, 2048], [2048, 2048, 50304], [5, 2048, 2048]];
    await withEnvFlag(TENSOR_CORES_FLAG, true, async () => {
      for (const [rows, cols, inner] of wide) {
        expect(denseTensorCores(roomy, rows, cols, inner), `${rows}×${cols}×${inner}`).to.deep.equal(
            rows >= 32 ? support : undefined);
      }
      expect(denseTensorCores(roomy, 2048, 8, 2048), 'x·Aᵀ, rank 8').to.equal(undefined);
      expect(denseTensorCores(roomy, 2048, 2048, 8), 'u·Bᵀ, rank 8').to.equal(undefined);
      expect(denseTensorCores(roomy, 32, 32, 16)).to.deep.equal(support);
      expect(denseTensorCores(small, 2048, 2048, 2048), 'workgroup memory below the slabs').to.equal(undefined);
      expect(denseTensorCores(unregistered, 2048, 2048, 2048), 'not registered').to.equal(undefined);
    });
    await withEnvFlag(TENSOR_CORES_FLAG, false, async () => {
      expect(denseTensorCores(roomy, 2048, 2048, 2048), 'flag off').to.equal(undefined);
    });
  });

  it('flag off and on-but-unavailable: x·Wᵀ the f32 grouped program, dy·W tfjs\'s product under \'forward\', packed W the f32 grouped program; values bit for bit', async () => {
    const [n, out, inSize] = [130, 96, 72];
    const w = tf.randomNormal([out, inSize], 0, 1, 'float32', 21) as tf.Tensor2D;
    const packed = packDenseWeight(w, 'bf16');
    const x = tf.randomNormal([n, inSize], 0, 1, 'float32', 22) as tf.Tensor2D;
    const dy = tf.randomNormal([n, out], 0, 1e-6, 'float32', 23) as tf.Tensor2D;
    const calls: Array<[string, () => tf.Tensor, string, RegExp]> = [
      ['x·Wᵀ', () => denseWeightMatMul(x, w, true, null), DENSE_MATMUL, /^moeGroupedMatMul_rows_.*_single$/],
      ['dy·W', () => denseWeightMatMul(dy, w, false, null, 'gradient'), 'BatchMatMul', /^(?!moe)/],
      ['x·Wᵀ, bf16 W', () => denseWeightMatMul(x, packed, true, null), PACKED_DENSE_MATMUL, /^moeGroupedMatMul_rows_.*_bf16.*_single$/],
      ['dy·W, bf16 W', () => denseWeightMatMul(dy, packed, false, null, 'gradient'), PACKED_DENSE_MATMUL, /^moeGroupedMatMul_rows_.*_single$/],
    ];
    await expectNoLeakAsync(async () => {
      for (const [label, fn, kernel, program] of calls) {
        const off = await withEnvFlag(TENSOR_CORES_FLAG, false, () => dispatchOf(fn));
        const on = await withEnvFlag(TENSOR_CORES_FLAG, true, () => dispatchOf(fn));
        expect(off.kernels, label).to.deep.equal([kernel]);
        expect(on.kernels, label).to.deep.equal([kernel]);
        expect(on.programs, label).to.deep.equal(off.programs);
        expect(on.programs.length, label).to.be.at.least(1);
        for (const key of on.programs) {
          expect(key, label).to.match(program);
          expect(key, label).to.not.match(/^moeSubgroup/);
        }
        expect(on.values, label).to.deep.equal(off.values);
      }
    });
    tf.dispose([w, packed.packed, x, dy]);
  });

  it('a backend\'s override takes a float32 product into MoEDenseMatMul under every WEBGPU_MOE_DENSE_PROGRAM choice, told rows, outCols and inner', async () => {
    const w = tf.randomNormal([40, 24], 0, 1, 'float32', 24) as tf.Tensor2D;   // [out, in]
    const x = tf.randomNormal([70, 24], 0, 1, 'float32', 25) as tf.Tensor2D;
    const dy = tf.randomNormal([70, 40], 0, 1, 'float32', 26) as tf.Tensor2D;
    const asked: Array<[number, number, number]> = [];
    const kernelsOf = async () => [
      (await profileKernels(() => denseWeightMatMul(x, w, true, null))).kernels,
      (await profileKernels(() => denseWeightMatMul(dy, w, false, null, 'gradient'))).kernels,
    ];
    try {
      registerDenseKernelOverride('webgpu', (rows, outCols, inner) => { asked.push([rows, outCols, inner]); return true; });
      await expectNoLeakAsync(async () => {
        for (const choice of ['forward', 'grouped', 'tfjs']) {
          expect(await withEnvFlag(DENSE_PROGRAM_FLAG, choice, kernelsOf), choice).to.deep.equal([[DENSE_MATMUL], [DENSE_MATMUL]]);
        }
      });
      // profileKernels runs each call once: x·Wᵀ reduces over in (24) into out (40) columns, dy·W the other way
      expect(asked).to.deep.equal([[70, 40, 24], [70, 24, 40], [70, 40, 24], [70, 24, 40], [70, 40, 24], [70, 24, 40]]);
      registerDenseKernelOverride('webgpu', () => false);
      expect(await withEnvFlag(DENSE_PROGRAM_FLAG, 'tfjs', kernelsOf), 'an override that declines').to.deep.equal([['BatchMatMul'], ['BatchMatMul']]);
    } finally {
      registerDenseKernelOverride('webgpu', webgpuDenseKernelOverride);
    }
    // the webgpu override, restored: this device has no tensor cores, so the flag decides again
    expect(await withEnvFlag(TENSOR_CORES_FLAG, true, kernelsOf)).to.deep.equal([[DENSE_MATMUL], ['BatchMatMul']]);
    tf.dispose([w, x, dy]);
  });

  it('maxAbsCodeInKernel: max |t|\'s exponent code as a [1] int32 tensor, exactly, its intermediates freed (one pass and two)', async () => {
    const backend = tf.backend() as unknown as { numDataIds(): number };
    const args = { inputs: {}, attrs: {}, backend: tf.backend() } as unknown as KernelArgs;
    let seed = 11;
    const rand = () => { seed = (seed * 1103515245 + 12345) % 2 ** 31; return seed / 2 ** 31 - 0.5; };
    for (const onePass of [true, false]) {
      await withEnvFlag(MAX_ABS_ONE_PASS_FLAG, onePass, async () => {
        for (const [rows, cols, at] of [[300, 70, 20999], [1, 513, 0], [513, 1, 512], [2, 2, 3], [1500, 2048, 3071999]]) {
          const values = Float32Array.from({ length: rows * cols }, rand);
          values[at] = -3.25;  // the largest magnitude is negative: abs before the maximum
          const t = tf.tensor2d(values, [rows, cols]);
          const before = backend.numDataIds();
          const info = maxAbsCodeInKernel(args, t);
          expect(backend.numDataIds(), 'the result only').to.equal(before + 1);
          const m = tf.engine().makeTensorFromTensorInfo(info);
          expect([m.shape, m.dtype]).to.deep.equal([[1], 'int32']);
          expect((await m.data())[0] & 511, `[${rows}, ${cols}]`).to.equal(expectedMaxAbsCode(3.25));
          tf.dispose([t, m]);
        }
      });
    }
  });
});
