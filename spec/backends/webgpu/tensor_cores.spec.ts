/**
 * Tensor cores from WebGPU (issue 13) where they do not exist: Mesa (CI) has neither shader-f16
 * nor subgroup matrices, so this checks the setup's report and choice, the f32 fall back with the
 * flag on, the dispatch math, and that the subgroup-matrix programs' WGSL is valid apart from the
 * subgroup-matrix builtins (compiled here with those replaced by plain stand-ins). The products
 * themselves are checked on the GPU machine by tools/webgpu_tc/check.ts.
 * Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { DataType } from '@tensorflow/tfjs-core';
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { compileProgram } from '@tensorflow/tfjs-backend-webgpu/dist/webgpu_program.js';
import { MAX_ABS_CODE_EPOCHS, MaxAbsCodeProgram } from '../../../src/backends/webgpu/programs/max_abs_program.js';
import { SumSlicesProgram } from '../../../src/backends/webgpu/programs/sum_slices_program.js';
import { expect } from 'chai';
import { requestDawnDevice, TENSOR_CORE_TOGGLES, withToggles } from '../../../src/backends/webgpu/dawn.js';
import {
  batchProductTensorCoreRoute, DENSE_TC_BLOCK_ROWS_FLAG, denseTensorCoreBlockRows, deviceDispatchPlan, GROUPED_MATMUL, GROUPED_WEIGHT_GRAD,
  denseSplitK, groupedMatMul, groupedWeightGrad, MAX_ABS_CODE_SLOTS, MAX_ABS_ONE_PASS_FLAG, maxAbsCode, maxAbsCodeSlotsOf, TC_HALF_GRAD_OPERANDS_FLAG,
  tensorCoresFit, useTensorCores, weightGradHalves,
} from '../../../src/backends/webgpu/kernels.js';
import { webgpuMoETuningFor } from '../../../src/backends/webgpu/experts.js';
import type { PackedWeightSpec } from '../../../src/backends/webgpu/programs/shared.js';
import {
  ELEMENT_STAGING, matMulStaging, matMulStaging as matMulStagingV6, SUBGROUP_MATRIX_BLOCK, subgroupBlockRowsFor, subgroupMatrixDispatch,
  SubgroupMatrixMatMulProgram, type SubgroupMatMulSpec, type SubgroupStaging, SubgroupMatrixWeightGradProgram, subgroupMatrixWorkgroupBytes,
  type SubgroupWeightGradSpec, v5Structure, v6Staging, weightGradDepthFor, weightGradStaging, weightGradStaging as weightGradStagingV6,
} from '../../../src/backends/webgpu/programs/subgroup_matrix_program.js';
import {
  activeTensorCores, entryPointInlined, hoistEnableDirectives, readSubgroupMatrixConfigs, registerTensorCoreDevice, TENSOR_CORES_FLAG,
  tensorCoreDevice, tensorCoreSupport, wideEnoughForTensorCores, type SubgroupMatrixConfig,
} from '../../../src/backends/webgpu/tensor_cores.js';
import type { PackedKind } from '../../../src/ops/packed.js';
import { quantizedLayout } from '../../../src/ops/quantized.js';
import { scaledDotProductAttention } from '../../../src/ops/attention_core.js';
import { BATCH_PRODUCT } from '../../../src/ops/batch_product.js';
import { countKernels } from '../../helpers/numeric.js';
import { OpArgumentError } from '../../../src/ops/validate.js';
import { auditSubgroupControlFlow } from '../../../tools/webgpu_tc/uniformity.js';
import { standInMatrices, tfjsPreambleStandIn } from '../../../tools/webgpu_tc/variant_codes.js';
import { compileErrors, expectedMaxAbsCode, expectNoLeakAsync, withEnvFlag, withShaderKeys } from './helpers.js';

const F16_F32: SubgroupMatrixConfig = { componentType: 'f16', resultComponentType: 'f32', M: 16, N: 16, K: 16 };
const BOTH = ['shader-f16', 'chromium-experimental-subgroup-matrix'];

describe('webgpu: tensor cores (setup and choice, on a device without them)', () => {
  it('tensorCoreSupport needs both features, an f16→f32 16×16×16 config and one subgroup size', () => {
    expect(tensorCoreSupport([], [F16_F32], 32, 32)).to.deep.equal(
        { missing: 'the device lacks shader-f16 and chromium-experimental-subgroup-matrix' });
    expect(tensorCoreSupport(['shader-f16'], [F16_F32], 32, 32)).to.deep.equal(
        { missing: 'the device lacks chromium-experimental-subgroup-matrix' });
    const u8 = { componentType: 'u8', resultComponentType: 'u32', M: 16, N: 16, K: 32 };
    const f16f16 = { ...F16_F32, resultComponentType: 'f16' };
    expect(tensorCoreSupport(BOTH, [u8, f16f16], 32, 32)).to.deep.equal(
        { missing: 'no f16→f32 16×16×16 subgroup matrix config (the adapter lists u8→u32 16×16×32, f16→f16 16×16×16)' });
    expect(tensorCoreSupport(BOTH, [], 32, 32)).to.deep.equal(
        { missing: 'no f16→f32 16×16×16 subgroup matrix config (the adapter lists none)' });
    expect(tensorCoreSupport(BOTH, [{ ...F16_F32, N: 8 }], 32, 32)).to.have.property('missing');
    expect(tensorCoreSupport(BOTH, [F16_F32], 16, 32)).to.deep.equal(
        { missing: 'the subgroup size is not fixed (min 16, max 32)' });
    expect(tensorCoreSupport(BOTH, [F16_F32], undefined, undefined)).to.deep.equal(
        { missing: 'the subgroup size is not fixed (min undefined, max undefined)' });
    // the H100's list (tools/webgpu_probe's run): the f16→f32 16×16×16 entry among ten
    const h100 = [f16f16, { ...f16f16, N: 8 }, F16_F32, { ...F16_F32, N: 8 }, u8];
    expect(tensorCoreSupport([...BOTH, 'subgroups'], h100, 32, 32)).to.deep.equal(
        { device: { config: F16_F32, subgroupSize: 32 } });
  });

  it('reads subgroupMatrixConfigs from prototype getters, and none when absent', () => {
    class Config {
      get componentType() { return 'f16'; }
      get resultComponentType() { return 'f32'; }
      get M() { return 16; }
      get N() { return 8; }
      get K() { return 16; }
    }
    const info = { subgroupMatrixConfigs: [new Config()] } as unknown as GPUAdapterInfo;
    expect(readSubgroupMatrixConfigs(info)).to.deep.equal([{ ...F16_F32, N: 8 }]);
    expect(readSubgroupMatrixConfigs({} as GPUAdapterInfo)).to.deep.equal([]);
    expect(readSubgroupMatrixConfigs(undefined)).to.deep.equal([]);
  });

  it('adds the toggles to the one enable-dawn-features flag, each once', () => {
    expect(withToggles([], TENSOR_CORE_TOGGLES)).to.deep.equal(
        ['enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia']);
    expect(withToggles(['backend=opengles', 'enable-dawn-features=use_dxc,allow_unsafe_apis'], TENSOR_CORE_TOGGLES))
        .to.deep.equal(['backend=opengles', 'enable-dawn-features=use_dxc,allow_unsafe_apis,vulkan_enable_f16_on_nvidia']);
    expect(withToggles(['disable-dawn-features=timestamp_quantization'], [])).to.deep.equal(
        ['disable-dawn-features=timestamp_quantization']);
  });

  it('hoists enable and diagnostic directives to the front of the shader, each once', () => {
    const code = 'struct U { a : f32 };\n  enable f16;\nenable chromium_experimental_subgroup_matrix;\n' +
        'diagnostic(off, chromium.subgroup_matrix_uniformity);\nfn f() {}\nenable f16;\n';
    const hoisted = hoistEnableDirectives(code);
    expect(hoisted.startsWith('enable f16;\nenable chromium_experimental_subgroup_matrix;\n' +
        'diagnostic(off, chromium.subgroup_matrix_uniformity);\nstruct U')).to.equal(true);
    expect(hoisted.match(/enable/g)).to.have.length(2);
    expect(hoisted.match(/diagnostic/g)).to.have.length(1);
    expect(hoistEnableDirectives('fn f() {}')).to.equal('fn f() {}');
    // a word 'enable' inside code is no directive
    expect(hoistEnableDirectives('let enabled = 1;')).to.equal('let enabled = 1;');
  });

  it('a registered device hoists its shaders\' directives; one that refuses the wrapper stays unregistered', () => {
    const seen: string[] = [];
    const fake = { createShaderModule: (d: GPUShaderModuleDescriptor) => { seen.push(d.code); return {}; } } as unknown as GPUDevice;
    const support = { config: F16_F32, subgroupSize: 32 };
    expect(tensorCoreDevice(fake)).to.equal(undefined);
    expect(registerTensorCoreDevice(fake, support)).to.equal(undefined);
    expect(tensorCoreDevice(fake)).to.deep.equal(support);
    fake.createShaderModule({ code: 'fn f() {}\nenable f16;' });
    expect(seen).to.deep.equal(['enable f16;\nfn f() {}\n']);
    // registering twice wraps once
    expect(registerTensorCoreDevice(fake, support)).to.equal(undefined);
    fake.createShaderModule({ code: 'x\nenable f16;' });
    expect(seen[1]).to.equal('enable f16;\nx\n');

    const frozen = Object.freeze({ createShaderModule: () => ({}) }) as unknown as GPUDevice;
    expect(registerTensorCoreDevice(frozen, support)).to.match(/^the device's createShaderModule cannot be wrapped/);
    expect(tensorCoreDevice(frozen)).to.equal(undefined);
  });

  it('requestDawnDevice with tensorCores \'auto\' on Mesa: the toggles, the same report fields, no configs, the reason', async () => {
    const mesa = { flags: ['backend=opengles'], featureLevel: 'compatibility' as const };
    const off = await requestDawnDevice({ attempts: [mesa] });
    const auto = await requestDawnDevice({ attempts: [mesa], tensorCores: 'auto' });
    try {
      expect(Object.keys(auto.report).sort()).to.deep.equal(Object.keys(off.report).sort());
      expect(off.report.tensorCores).to.equal('off');
      expect(off.report.flags).to.deep.equal(['backend=opengles']);
      expect(auto.report.flags).to.deep.equal(['backend=opengles', 'enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia']);
      expect(auto.report.subgroupMatrixConfigs).to.deep.equal([]);
      expect(auto.report.features).to.not.include('shader-f16');
      expect(auto.report.tensorCores).to.match(/^the device lacks shader-f16/);
      expect(tensorCoreDevice(auto.device)).to.equal(undefined);
    } finally {
      off.device.destroy();
      auto.device.destroy();
    }
  });

  it('rejects a tensorCores value other than \'auto\' or \'off\'', async () => {
    let error: unknown;
    try {
      await requestDawnDevice({ tensorCores: 'on' as 'auto' }, 'setupDawnWebGPU');
    } catch (err) {
      error = err;
    }
    expect(error).to.be.instanceOf(OpArgumentError);
    expect((error as Error).message).to.equal(`\`setupDawnWebGPU()\`: 'tensorCores' must be 'auto' or 'off' but got "on" (string)`);
  });

  it('with the flag on, the suite\'s device (not registered) keeps the f32 kernels: same numbers, no subgroup program', async () => {
    expect(activeTensorCores()).to.equal(undefined);
    await withEnvFlag(TENSOR_CORES_FLAG, true, async () => expect(activeTensorCores()).to.equal(undefined));
    const keys = await withShaderKeys(async keys => {
      await expectNoLeakAsync(async () => {
        const [T, H, I, E, K] = [96, 64, 48, 4, 2];
        const experts = tf.tensor2d(Int32Array.from({ length: T * K }, (_, i) => (i * 7 + (i % K)) % E), [T, K], 'int32') as tf.Tensor2D;
        const plan = deviceDispatchPlan(experts, E, 64);
        const x = tf.randomNormal([T, H], 0, 1, 'float32', 1) as tf.Tensor2D;
        const w1 = tf.randomNormal([E, 2 * I, H], 0, 0.1, 'float32', 2);
        const product = () => groupedMatMul({ a: x, source: 'gather', w: w1, strides: { sE: 2 * I * H, sN: H, sK: 1 },
          inner: H, outCols: 2 * I, plan, tile: { tm: 4, tn: 4, bk: 16 }, gradient: true });
        const off = await withEnvFlag(TENSOR_CORES_FLAG, false, async () => { const y = product(); const d = await y.data(); y.dispose(); return d; });
        const on = await withEnvFlag(TENSOR_CORES_FLAG, true, async () => {
          expect(useTensorCores(plan, plan.capacity, 2 * I, H)).to.equal(false);
          const y = product();
          const d = await y.data();
          y.dispose();
          return d;
        });
        expect(Array.from(on)).to.deep.equal(Array.from(off));
        tf.dispose([experts, x, w1, plan.seg, plan.rowOfPair, plan.pairOfRow]);
      });
      return keys;
    });
    expect(keys.filter(k => k.startsWith('moeGroupedMatMul'))).to.have.length(2);
    expect(keys.filter(k => k.startsWith('moeSubgroup'))).to.deep.equal([]);
  });

  it('maxAbsCode, the gradient operands\' scale: ceil(log2 max |t|) + 150 exactly, in one MaxAbsCodeProgram dispatch of many workgroups', async () => {
    await expectNoLeakAsync(async () => {
      let seed = 7;
      const rand = () => { seed = (seed * 1103515245 + 12345) % 2 ** 31; return seed / 2 ** 31 - 0.5; };
      // the largest magnitude negative (abs before the maximum), powers of two and just above, tiny (a
      // mean loss's cotangent), subnormal; sizes of one part, many parts, a count that is no multiple of 4
      for (const [shape, at, largest] of [[[300, 70], 20999, 3.25], [[1, 513], 0, 4], [[513, 1], 512, Math.fround(4 * (1 + 2 ** -23))],
        [[6, 5, 4], 61, 2 ** -20], [[257], 3, 65504], [[2048, 2000], 4095999, 2 ** -30], [[70000], 33333, 3e-41],
        [[4099, 3], 12296, 1.5]] as Array<[number[], number, number]>) {
        const size = shape.reduce((a, b) => a * b, 1);
        const values = Float32Array.from({ length: size }, () => rand() * largest);
        values[at] = -largest;
        const t = tf.tensor(values, shape);
        const m = maxAbsCode(t);
        expect([m.shape, m.dtype]).to.deep.equal([[1], 'int32']);
        expect((await m.data())[0] & 511, JSON.stringify(shape)).to.equal(expectedMaxAbsCode(largest));
        tf.dispose([t, m]);
      }
      // an infinity or NaN: 511 (operandScale leaves the operand unscaled); zeros and an empty tensor: 0
      for (const [values, code] of [[[1, -Infinity, 2], 511], [[1, NaN, 2], 511], [new Array(40000).fill(0), 0], [[], 0]] as Array<[number[], number]>) {
        const t = tf.tensor1d(values);
        const m = maxAbsCode(t);
        expect((await m.data())[0] & 511, `${values.slice(0, 3)}`).to.equal(code);
        tf.dispose([t, m]);
      }
    });
  });

  it('maxAbsCode: one dispatch into slots that later calls reuse, each code right though the slot held a larger one', async () => {
    await expectNoLeakAsync(async () => {
      const backend = tf.backend() as unknown as { device: GPUDevice; runWebGPUProgram: (program: { shaderKey: string; dispatch: number[] }, ...rest: unknown[]) => unknown };
      const dispatchesOf = (fn: () => void) => {
        const run = backend.runWebGPUProgram;
        const dispatched: Array<[string, number[]]> = [];
        backend.runWebGPUProgram = function (this: unknown, program, ...rest) {
          dispatched.push([program.shaderKey, [...program.dispatch]]);
          return run.call(this, program, ...rest);
        };
        try {
          fn();
        } finally {
          delete (backend as { runWebGPUProgram?: unknown }).runWebGPUProgram;
          if (backend.runWebGPUProgram !== run) backend.runWebGPUProgram = run;
        }
        return dispatched;
      };
      // [2048, 2048] (dy of a dense projection): 1024 workgroups in quads, nothing else; the flag off: partial maxima, then their code
      const t = tf.randomNormal([2048, 2048]);
      expect(dispatchesOf(() => maxAbsCode(t).dispose())).to.deep.equal([['moeMaxAbsCode_v4', [1024, 1, 1]]]);
      const twoPasses = await withEnvFlag(MAX_ABS_ONE_PASS_FLAG, false, async () => {
        let m: tf.Tensor | undefined;
        const dispatched = dispatchesOf(() => { m = maxAbsCode(t); });
        const code = (await m!.data())[0];
        m!.dispose();
        return { dispatched, code };
      });
      expect(twoPasses.dispatched).to.deep.equal([['moeMaxAbs_v4', [1024, 1, 1]], ['moeMaxAbsCode', [1, 1, 1]]]);
      const largest = tf.tidy(() => tf.max(tf.abs(t)));
      expect(twoPasses.code).to.equal(expectedMaxAbsCode((await largest.data())[0]));
      largest.dispose();
      t.dispose();
      // largest magnitudes falling call after call: each slot holds a larger code from MAX_ABS_CODE_SLOTS calls before,
      // which the new epoch outranks; the last MAX_ABS_CODE_SLOTS results are all still readable
      const calls = 3 * MAX_ABS_CODE_SLOTS + 1;
      const codesOf = async (first: number) => {
        const got: number[] = [];
        const held: tf.Tensor[] = [];
        for (let i = 0; i < calls; i++) {
          const x = tf.fill([64, 1024], 2 ** (first - i));
          held.push(maxAbsCode(x));
          x.dispose();
          if (held.length === MAX_ABS_CODE_SLOTS) {
            for (const m of held) got.push((await m.data())[0] & 511);
            tf.dispose(held.splice(0));
          }
        }
        for (const m of held) got.push((await m.data())[0] & 511);
        tf.dispose(held);
        return got;
      };
      const want = Array.from({ length: calls }, (_, i) => expectedMaxAbsCode(2 ** (40 - i)));
      expect(await codesOf(40)).to.deep.equal(want);
      // past the last epoch the slots start again from new buffers: the first call takes a slot's last epoch, the next renews
      const slots = maxAbsCodeSlotsOf(backend.device)!;
      slots.epochs.fill(MAX_ABS_CODE_EPOCHS - 1);
      expect(await codesOf(40)).to.deep.equal(want);
      const renewed = maxAbsCodeSlotsOf(backend.device)!;
      expect(renewed.epochs.reduce((a, b) => a + b, 0), 'calls since the new buffers').to.equal(calls - 1);
      expect(renewed.buffers.some(b => slots.buffers.includes(b)), 'the same buffers').to.equal(false);
      // a step's codes of the same tensors (the same buffers) go to the same slots every step, whatever the calls a
      // step (7: slots taken in turn would move by 3 a step); within MAX_ABS_CODE_SLOTS calls no slot holds the codes
      // of two tensors (a tensor again keeps its slot: the same code)
      const inputs = Array.from({ length: 5 }, (_, i) => tf.fill([64, 1024], i + 1));
      const order = [0, 1, 2, 3, 4, 1, 3];
      const slotBuffer = (m: tf.Tensor) => (backend as unknown as { tensorMap: { get(id: object): { resource: unknown } } }).tensorMap.get(m.dataId).resource;
      const stepSlots = () => order.map(i => {
        const m = maxAbsCode(inputs[i]);
        const buffer = slotBuffer(m);
        m.dispose();
        return maxAbsCodeSlotsOf(backend.device)!.buffers.indexOf(buffer as GPUBuffer);
      });
      const steps = [stepSlots(), stepSlots(), stepSlots()];
      expect(steps[2], 'step 3 as step 2').to.deep.equal(steps[1]);
      const all = steps.flat().map((slot, call) => ({ slot, input: order[call % order.length] }));
      for (let i = 0; i + MAX_ABS_CODE_SLOTS <= all.length; i++) {
        const window = all.slice(i, i + MAX_ABS_CODE_SLOTS);
        for (const a of window) {
          expect(window.filter(b => b.slot === a.slot).every(b => b.input === a.input), `calls ${i}.. ${JSON.stringify(all)}`).to.equal(true);
        }
      }
      tf.dispose(inputs);
      expect(() => new MaxAbsCodeProgram(0)).to.throw('MaxAbsCodeProgram: parts must be an integer in [1, 65535] but got 0');
      expect(() => MaxAbsCodeProgram.uniformsFor(10, 2, 1, true)).to.throw('MaxAbsCodeProgram: quads need a count that is a multiple of 4 but got 10');
      expect(() => MaxAbsCodeProgram.uniformsFor(10, 2, 0)).to.throw(`MaxAbsCodeProgram: epoch must be an integer in [1, ${MAX_ABS_CODE_EPOCHS}] but got 0`);
    });
  });

  it('takes plans with 128-, 64- and 32-row tiles (batch 1 of OLMoE and Qwen3-30B-A3B too), each with its largest block', () => {
    // the block: the largest of 128, 64, 32 that divides the row tile (a block never spans two experts)
    expect([128, 256, 384].map(subgroupBlockRowsFor)).to.deep.equal([128, 128, 128]);
    expect([64, 192, 320].map(subgroupBlockRowsFor)).to.deep.equal([64, 64, 64]);
    expect([32, 96, 160].map(subgroupBlockRowsFor)).to.deep.equal([32, 32, 32]);
    expect([16, 48, 8, 1].map(subgroupBlockRowsFor)).to.deep.equal([undefined, undefined, undefined, undefined]);
    // the weight gradient's depth: 64 unless the row tile is below a multiple of it
    expect([128, 64, 192, 32, 96].map(weightGradDepthFor)).to.deep.equal([64, 64, 64, 32, 32]);
    // the automatic tuning's row tile → the block: Q's training batch (1024 rows per expert), OLMoE-1B-7B at
    // batch 1 × 512 tokens (64 per expert), Qwen3-30B-A3B at batch 1 × 512 (32 per expert)
    const blockOf = (T: number, K: number, E: number) => subgroupBlockRowsFor(webgpuMoETuningFor(T * K, E).rowTile);
    expect([blockOf(16384, 8, 128), blockOf(512, 8, 64), blockOf(512, 8, 128)]).to.deep.equal([128, 64, 32]);
    // the device's workgroup memory must hold the programs at that block (NVIDIA's Vulkan: 48 KiB)
    for (const rowTile of [128, 64, 32]) expect(tensorCoresFit(rowTile, 49152, 4096, 2048, 1024), `${rowTile}`).to.equal(true);
    expect(tensorCoresFit(16, 49152, 4096, 2048, 1024)).to.equal(false);
    expect(tensorCoresFit(48, 49152, 4096, 2048, 1024)).to.equal(false);
    expect(tensorCoresFit(32, 16384, 4096, 2048, 1024)).to.equal(false);   // WebGPU's default limit
    expect(tensorCoresFit(32, subgroupMatrixWorkgroupBytes(32), 4096, 2048, 1024)).to.equal(true);
    expect(tensorCoresFit(32, subgroupMatrixWorkgroupBytes(32) - 1, 4096, 2048, 1024)).to.equal(false);
    // still only wide products (a rank-8 LoRA side stays f32)
    expect(tensorCoresFit(64, 49152, 4096, 8, 1024)).to.equal(false);
  });

  it('dense block rows: 128, or 64 below 128 blocks of 128 rows; the flag forces 128/64/32 and refuses others by name', async () => {
    expect(denseTensorCoreBlockRows(2048, 2048)).to.equal(128);     // OLMoE's q/k/v/o: 256 blocks
    expect(denseTensorCoreBlockRows(333, 50304)).to.equal(128);     // the LM head's x·Wᵀ: 1179
    expect(denseTensorCoreBlockRows(333, 2048)).to.equal(64);       // its dy·W: 48
    expect(denseTensorCoreBlockRows(1024, 2048)).to.equal(128);     // exactly 128 blocks
    expect(denseTensorCoreBlockRows(1000, 2048)).to.equal(128);     // ceil: 8 × 16
    expect(denseTensorCoreBlockRows(896, 2048)).to.equal(64);       // 7 × 16 = 112
    for (const rows of [128, 64, 32] as const) {
      await withEnvFlag(DENSE_TC_BLOCK_ROWS_FLAG, rows, async () => expect(denseTensorCoreBlockRows(333, 2048)).to.equal(rows));
    }
    await withEnvFlag(DENSE_TC_BLOCK_ROWS_FLAG, 100, async () => expect(() => denseTensorCoreBlockRows(2048, 2048)).to.throw(
        'WEBGPU_MOE_DENSE_TC_BLOCK_ROWS must be 0 (automatic) or one of 128, 64, 32 but got 100'));
  });

  it('groupedMatMul and groupedWeightGrad hand the plan\'s block rows and slab depth to their kernels', async () => {
    const seen: Array<[string, unknown, unknown]> = [];
    const wrapped = [GROUPED_MATMUL, GROUPED_WEIGHT_GRAD].map(name => {
      const config = tf.getKernel(name, 'webgpu')!;
      const kernelFunc = config.kernelFunc;
      config.kernelFunc = (args => { seen.push([name, args.attrs!.blockRows, args.attrs!.rowDepth]); return kernelFunc(args); }) as tf.KernelFunc;
      return { config, kernelFunc };
    });
    try {
      await expectNoLeakAsync(async () => {
        const [T, H, I, E, K] = [64, 32, 32, 4, 2];
        const experts = tf.tensor2d(Int32Array.from({ length: T * K }, (_, i) => (i * 3 + (i % K)) % E), [T, K], 'int32') as tf.Tensor2D;
        const x = tf.randomNormal([T, H], 0, 1, 'float32', 1) as tf.Tensor2D;
        const w = tf.randomNormal([E, I, H], 0, 0.1, 'float32', 2);
        for (const rowTile of [128, 64, 32, 96]) {
          const plan = deviceDispatchPlan(experts, E, rowTile);
          const y = groupedMatMul({ a: x, source: 'gather', w, strides: { sE: I * H, sN: H, sK: 1 }, inner: H, outCols: I, plan,
            tile: { tm: 2, tn: 4, bk: 16 } });
          const dW = groupedWeightGrad({ l: y, left: 'rows', r: x, right: 'gather', P: I, Q: H, outShape: [E, I, H],
            outStrides: { oE: I * H, oP: H, oQ: 1 }, plan, tile: { tm: 2, tn: 4, bk: 16 } });
          await dW.data();
          tf.dispose([y, dW, plan.seg, plan.rowOfPair, plan.pairOfRow]);
        }
        tf.dispose([experts, x, w]);
      });
    } finally {
      for (const { config, kernelFunc } of wrapped) config.kernelFunc = kernelFunc;
    }
    expect(seen).to.deep.equal([128, 64, 32, 96].flatMap(rowTile => [
      [GROUPED_MATMUL, subgroupBlockRowsFor(rowTile), undefined], [GROUPED_WEIGHT_GRAD, undefined, weightGradDepthFor(rowTile)]]));
    expect(seen.map(s => s[1] ?? s[2])).to.deep.equal([128, 64, 64, 64, 32, 32, 32, 32]);
  });

  it('sends only wide products to the tensor cores: sides >= 32, reduction >= 16', () => {
    expect(wideEnoughForTensorCores(4096, 1024, 512)).to.equal(true);
    expect(wideEnoughForTensorCores(64, 32, 16)).to.equal(true);
    expect(wideEnoughForTensorCores(4096, 8, 1024)).to.equal(false);   // u = x·Aᵀ, rank 8
    expect(wideEnoughForTensorCores(4096, 1024, 8)).to.equal(false);   // u·Bᵀ, rank 8
    expect(wideEnoughForTensorCores(16, 1024, 1024)).to.equal(false);
  });

  it('batched products (MoEBatchProduct): the composed attention\'s six at OLMoE\'s shape on tensor cores, the rest f32 with the reason', () => {
    const route = batchProductTensorCoreRoute;
    const plain = { transposeA: false, transposeB: false, gradient: 'none' } as const;
    // batch 4 × 16 heads = 64 KV heads of S = 512 query rows over L = 512 keys, head 128
    const [heads, s, l, d] = [64, 512, 512, 128];
    expect(route({ ...plain, transposeB: true }, heads, s, l, d), 'scores = q·kᵀ').to.deep.equal({ program: 'matMul', blockRows: 128 });
    expect(route(plain, heads, s, d, l), 'value = P·v').to.deep.equal({ program: 'matMul', blockRows: 128 });
    expect(route({ ...plain, transposeA: true, gradient: 'b' }, heads, l, d, s), 'dV = Pᵀ·dO').to.deep.equal({ program: 'weightGrad', depth: 64 });
    expect(route({ ...plain, transposeB: true, gradient: 'a' }, heads, s, l, d), 'dP = dO·vᵀ').to.deep.equal({ program: 'matMul', blockRows: 128 });
    expect(route({ ...plain, gradient: 'a' }, heads, s, d, l), 'dQ = dS·k').to.deep.equal({ program: 'matMul', blockRows: 128 });
    expect(route({ ...plain, transposeA: true, gradient: 'a' }, heads, l, d, s), 'dK = dSᵀ·q').to.deep.equal({ program: 'weightGrad', depth: 64 });
    // a block lies in one batch: the largest block rows dividing the batch's rows, 64 where 128-row blocks would be few
    expect(route(plain, 4, 96, 128, 64)).to.deep.equal({ program: 'matMul', blockRows: 32 });
    expect(route(plain, 1, 256, 128, 64)).to.deep.equal({ program: 'matMul', blockRows: 64 });
    expect(route(plain, 128, 128, 128, 64)).to.deep.equal({ program: 'matMul', blockRows: 128 });
    // the weight gradient's reduction is a batch's rows: 32-deep slabs unless they are a multiple of 64
    expect(route({ ...plain, transposeA: true }, 2, 64, 64, 48)).to.deep.equal({ program: 'weightGrad', depth: 32 });
    expect(route(plain, 64, 80, 128, 64)).to.deep.equal({ f32: '80 rows per batch, no multiple of 32: a block would span two batches' });
    expect(route({ ...plain, transposeA: true, transposeB: true }, heads, s, l, d)).to.deep.equal({ f32: 'aᵀ·bᵀ has no subgroup-matrix form' });
    expect(route({ ...plain, gradient: 'b' }, heads, s, d, l)).to.deep.equal({ f32: 'the MatMul scales only its left operand, not a gradient b' });
    expect(route(plain, heads, s, 8, l)).to.deep.equal({ f32: 'too narrow: [512, 8] over 512 (sides >= 32, reduction >= 16)' });
    expect(route({ ...plain, transposeA: true }, heads, l, d, 8)).to.deep.equal({ f32: 'too narrow: [512, 128] over 8 (sides >= 32, reduction >= 16)' });
    expect(route(plain, 0, s, d, l)).to.deep.equal({ f32: 'an empty batch' });
  });

  it('with the flag on, the suite\'s device keeps the composed attention\'s products on tfjs\'s BatchMatMul: same numbers, no subgroup program', async () => {
    const keys = await withShaderKeys(async keys => {
      await expectNoLeakAsync(async () => {
        // 2 KV heads of 2 × 32 query rows (rep 2) over 64 keys, head 32: every product wide enough and in whole blocks
        const q = tf.randomNormal([4, 32, 32], 0, 1, 'float32', 1) as tf.Tensor3D;
        const k = tf.randomNormal([2, 64, 32], 0, 1, 'float32', 2) as tf.Tensor3D;
        const v = tf.randomNormal([2, 64, 32], 0, 1, 'float32', 3) as tf.Tensor3D;
        const mask = tf.zeros([32, 64]) as tf.Tensor2D;
        const pass = async () => {
          const [y, grads] = tf.tidy(() => {
            const { value, grads: g } = tf.valueAndGrads((a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) =>
              tf.sum(tf.square(scaledDotProductAttention(a as tf.Tensor3D, b as tf.Tensor3D, c as tf.Tensor3D, mask, 0.25))))([q, k, v]);
            return [value, g];
          });
          const out = await Promise.all([y, ...grads].map(t => t.data()));
          tf.dispose([y, ...grads]);
          return out.map(d => Array.from(d));
        };
        const off = await withEnvFlag(TENSOR_CORES_FLAG, false, pass);
        const on = await withEnvFlag(TENSOR_CORES_FLAG, true, pass);
        expect(on).to.deep.equal(off);
        // the six products, forward (q·kᵀ, P·v) and backward (Pᵀ·dO, dO·vᵀ, dS·k, dSᵀ·q), reach the kernel:
        // the composed path calls batchProduct with the tape off (customGrad's forward and backward)
        const products = await withEnvFlag(TENSOR_CORES_FLAG, true, async () => {
          let ran: tf.Tensor[] = [];
          const n = countKernels(BATCH_PRODUCT, () => {
            const { value, grads } = tf.valueAndGrads((a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) =>
              tf.sum(scaledDotProductAttention(a as tf.Tensor3D, b as tf.Tensor3D, c as tf.Tensor3D, mask, 0.25)))([q, k, v]);
            ran = [value, ...grads];
          });
          tf.dispose(ran);
          return n;
        });
        expect(products).to.equal(6);
        tf.dispose([q, k, v, mask]);
      });
      return keys;
    });
    expect(keys.filter(k => k.startsWith('moeSubgroup'))).to.deep.equal([]);
  });
});

describe('webgpu: subgroup-matrix programs (dispatch math and WGSL)', () => {
  it('one workgroup of four subgroups per 128×128 output block, per expert for the weight gradients', () => {
    expect(subgroupMatrixDispatch(256, 100)).to.deep.equal([1, 2, 1]);
    expect(subgroupMatrixDispatch(128, 128, 8)).to.deep.equal([1, 1, 8]);
    expect(subgroupMatrixDispatch(129, 1, 1)).to.deep.equal([1, 2, 1]);
    const mm = new SubgroupMatrixMatMulProgram(4224, 1536, {
      source: 'gather', hasBias: false, hasAddend: false, kContiguous: true, scaled: false }, 32);
    expect(mm.workgroupSize).to.deep.equal([128, 1, 1]);
    expect(mm.dispatch).to.deep.equal([12, 33, 1]);
    const wg = new SubgroupMatrixWeightGradProgram([128, 1536, 2048], 128, 1536, 2048, {
      left: 'rows', right: 'gather', scaleLeft: false, scaled: true }, 32);
    expect(wg.dispatch).to.deep.equal([16, 12, 128]);
    expect(wg.variableNames).to.deep.equal(['L', 'R', 'seg', 'pr', 'amax']);
    // two f16 slabs 64 deep with rows padded by 8 halves (v7's column-major Bs: 128 columns × 72 halves),
    // a 16×16 f32 slot per subgroup and the row sources with the block's expert: 40.5 KiB, within the
    // 48 KiB NVIDIA's Vulkan driver offers (the exact 97 TFLOP/s GEMM of variants v3 used 35 KiB of it);
    // useTensorCores checks the device
    expect(subgroupMatrixWorkgroupBytes()).to.equal(2 * (128 * 72 + 128 * 72) + 4 * 4 * 16 * 16 + 4 * 132);
    expect(subgroupMatrixWorkgroupBytes()).to.be.at.most(49152);
    expect(SUBGROUP_MATRIX_BLOCK.rows % 16).to.equal(0);
  });

  it('64- and 32-row MatMul blocks and the 32-deep weight gradient: their dispatch, registers, memory and a shader key each', () => {
    const spec = { source: 'gather', hasBias: false, hasAddend: false, kContiguous: true, scaled: false } as const;
    const staging = matMulStaging({}, { inner: 2048, outCols: 1024, sE: 1024 * 2048, sN: 2048, sK: 1 });
    // OLMoE at batch 1: 4096 pairs over 64 experts, 64-row tiles → capacity 8128; Qwen3-30B-A3B: 128 experts, 32-row tiles → 8096
    const [b128, b64, b32] = ([128, 64, 32] as const).map(rows => new SubgroupMatrixMatMulProgram(8192, 1024, spec, 32, staging, rows));
    expect([b128.dispatch, b64.dispatch, b32.dispatch]).to.deep.equal([[8, 64, 1], [8, 128, 1], [8, 256, 1]]);
    expect(new Set([b128, b64, b32].map(p => p.shaderKey)).size).to.equal(3);
    expect(b64.shaderKey).to.equal(b128.shaderKey.replace(/_r128$/, '_r64'));
    expect([b128, b64, b32].map(p => p.workgroupSize)).to.deep.equal([[128, 1, 1], [128, 1, 1], [128, 1, 1]]);
    // A's quads: rows × 64 / 4 over 128 invocations
    for (const [program, registers] of [[b128, 16], [b64, 8], [b32, 4]] as const) {
      const code = program.getUserCode();
      expect(code).to.contain(`var ra${registers - 1} : vec4<f16>;`);
      expect(code).to.not.contain(`var ra${registers} `);
    }
    // below 128 rows the weight gradient's slabs (Lᵀ 64 × 136, R 64 × 136 halves) are the larger: they set the bound
    expect(subgroupMatrixWorkgroupBytes(128)).to.equal(2 * (128 * 72 + 128 * 72) + 4 * 4 * 16 * 16 + 4 * 132);
    expect(subgroupMatrixWorkgroupBytes(64)).to.equal(2 * (64 * 136 + 64 * 136) + 4 * 4 * 16 * 16 + 4 * 68);
    expect(subgroupMatrixWorkgroupBytes(32)).to.equal(2 * (64 * 136 + 64 * 136) + 4 * 4 * 16 * 16 + 4 * 36);
    const grad = (depth: 32 | 64) => new SubgroupMatrixWeightGradProgram([128, 1024, 2048], 128, 1024, 2048, {
      left: 'rows', right: 'gather', scaleLeft: false, scaled: true }, 32, weightGradStaging({ P: 1024, Q: 2048 }), depth);
    const [d64, d32] = [grad(64), grad(32)];
    expect(d32.dispatch).to.deep.equal(d64.dispatch);
    expect(d32.shaderKey).to.equal(d64.shaderKey.replace(/_d64$/, '_d32'));
    expect(d32.getUserCode()).to.contain('r0 += 32)');
    expect(d64.getUserCode()).to.contain('r0 += 64)');
  });

  it('stages in quads only where every quad is aligned and decodable as a whole (matMulStaging, weightGradStaging)', () => {
    const q = { inner: 2048, outCols: 1536, sE: 1536 * 2048, sN: 2048, sK: 1 };
    const both: SubgroupStaging = { left: 'vec4', right: 'vec4' };
    // the operands' choice alone (without the whole-block structure below)
    const operands = (s: SubgroupStaging): SubgroupStaging => ({ left: s.left, right: s.right });
    const matMulStaging = (spec: { packedWeight?: PackedWeightSpec }, d: typeof q) => operands(matMulStagingV6(spec, d));
    const weightGradStaging = (d: { P: number; Q: number }) => operands(weightGradStagingV6(d));
    expect(matMulStaging({}, q)).to.deep.equal(both);
    // [E, K, N] (contiguous along n), and PEFT's rank-major factors
    expect(matMulStaging({}, { inner: 2048, outCols: 1536, sE: 1536 * 2048, sN: 1, sK: 1536 })).to.deep.equal(both);
    // K not a multiple of 4: A and a k-contiguous W per element; an n-contiguous W still in quads
    expect(matMulStaging({}, { ...q, inner: 2046, sN: 2046 })).to.deep.equal(ELEMENT_STAGING);
    expect(matMulStaging({}, { inner: 2046, outCols: 1536, sE: 1536 * 2046, sN: 1, sK: 1536 })).to.deep.equal({ left: 'element', right: 'vec4' });
    // misaligned strides or expert starts, columns not whole quads, neither stride 1
    expect(matMulStaging({}, { ...q, sN: 2050 }).right).to.equal('element');
    expect(matMulStaging({}, { ...q, sE: 1536 * 2048 + 2 }).right).to.equal('element');
    expect(matMulStaging({}, { inner: 2048, outCols: 1534, sE: 1534 * 2048, sN: 1, sK: 1534 }).right).to.equal('element');
    expect(matMulStaging({}, { ...q, sN: 4096, sK: 2 }).right).to.equal('element');
    // packed halves: the expert's words in pairs (along k, rows and expert on 16 bytes: 8 halves a load); quantized kinds always per element
    expect(matMulStaging({ packedWeight: packedSpec('bf16', 2) }, { ...q, sE: 1536 * 1024 }).right).to.equal('vec8');
    expect(matMulStaging({ packedWeight: packedSpec('bf16', 2) }, { ...q, sE: 1536 * 1024 + 2 }).right).to.equal('vec4');
    expect(matMulStaging({ packedWeight: packedSpec('bf16', 1) }, { inner: 2048, outCols: 1536, sE: 1536 * 1024, sN: 1, sK: 1536 }).right).to.equal('vec4');
    expect(matMulStaging({ packedWeight: packedSpec('f16', 2) }, { ...q, sE: 1536 * 1024 + 1 }).right).to.equal('element');
    for (const kind of ['int8', 'int4', 'nf4', 'mxfp4'] as const) {
      expect(matMulStaging({ packedWeight: packedSpec(kind, 2, kind === 'int4' ? 32 : undefined) }, q), kind)
        .to.deep.equal({ left: 'vec4', right: 'element' });
    }
    expect(weightGradStaging({ P: 1536, Q: 2048 })).to.deep.equal(both);
    expect(weightGradStaging({ P: 1538, Q: 6 })).to.deep.equal({ left: 'element', right: 'element' });
    expect(weightGradStaging({ P: 8, Q: 2 })).to.deep.equal({ left: 'vec4', right: 'element' });
    // f16 operands where asked and each side's rows are whole runs of 8
    const halves = (d: { P: number; Q: number }, left = true, right = true) => operands(weightGradStagingV6(d, { left, right }));
    expect(halves({ P: 1536, Q: 2048 })).to.deep.equal({ left: 'half8', right: 'half8' });
    expect(halves({ P: 1536, Q: 2052 })).to.deep.equal({ left: 'half8', right: 'vec4' });
    expect(halves({ P: 12, Q: 2048 })).to.deep.equal({ left: 'vec4', right: 'half8' });
    expect(halves({ P: 1536, Q: 2048 }, false, true)).to.deep.equal({ left: 'vec4', right: 'half8' });
    expect(halves({ P: 6, Q: 4 })).to.deep.equal({ left: 'element', right: 'vec4' });
    // v6: whole blocks where the shape is (the reduction's depth, the output's columns; the weight gradient's reduction never)
    expect(matMulStagingV6({}, q).v6).to.deep.equal({ whole: { depth: true, rows: true, cols: true } });
    expect(matMulStagingV6({}, { ...q, inner: 2000, sN: 2000 }).v6).to.deep.equal({ whole: { depth: false, rows: true, cols: true } });
    expect(matMulStagingV6({}, { ...q, outCols: 1000 }).v6).to.deep.equal({ whole: { depth: true, rows: true, cols: false } });
    expect(weightGradStagingV6({ P: 1536, Q: 2048 }).v6).to.deep.equal({ whole: { depth: false, rows: true, cols: true } });
    expect(weightGradStagingV6({ P: 96, Q: 2048 }).v6).to.deep.equal({ whole: { depth: false, rows: false, cols: true } });
    expect(v5Structure(weightGradStagingV6({ P: 1536, Q: 2048 }))).to.not.have.property('v6');
  });

  it('quad programs: vec4 inputs, one load per 4 elements, each slab loaded and stored before its products (v7), Bs column-major for W along k', () => {
    const spec = { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false } as const;
    const code = new SubgroupMatrixMatMulProgram(256, 128, spec, 32, { left: 'vec4', right: 'vec4' }).getUserCode().replace(/\s+/g, ' ');
    // W along k: a quad's 4 halves consecutive in Bs's column
    expect(code).to.contain('let d = (((q / 16u) * 72u) + ((q % 16u) * 4u)); Bs[d + 0u] = rb0.x; Bs[d + 1u] = rb0.y;');
    expect(code).to.contain('Bs[d + 3u] = rb0.w;');
    // inside each step: the registers, every load, every store, the barrier, then the products; nothing prefetched
    const loop = code.slice(code.indexOf('for (var k0 = 0;'));
    const [declared, load, store, barrier, product] = ['var ra0 : vec4<f16>;', 'rb15 = vec4<f16>(', 'As[d + 0u] = ra0.x;', 'workgroupBarrier();',
      'subgroupMatrixMultiplyAccumulate'].map(t => loop.indexOf(t));
    expect(declared).to.be.greaterThan(0);
    expect([load > declared, store > load, barrier > store, product > barrier]).to.deep.equal([true, true, true, true]);
    expect(code.indexOf('var ra0 : vec4<f16>;')).to.equal(code.indexOf('for (var k0 = 0;') + declared);
    expect(code).to.not.contain('let next');
  });

  it('quad programs with v6\'s staging (v6Staging, the variants\' comparison): the next slab fetched into registers during the products', () => {
    const spec = { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false } as const;
    const quad = new SubgroupMatrixMatMulProgram(256, 128, spec, 32, v6Staging({ left: 'vec4', right: 'vec4' }));
    const element = new SubgroupMatrixMatMulProgram(256, 128, spec, 32);
    expect(quad.variableComponents).to.deep.equal([4, 4, 1, 1]);
    expect(element.variableComponents).to.deep.equal([1, 1, 1, 1]);
    expect(quad.shaderKey).to.not.equal(element.shaderKey);
    const code = quad.getUserCode().replace(/\s+/g, ' ');
    // 128×64 of A and 64×128 of W in quads over 128 invocations: 16 registers each
    expect(code).to.contain('var ra15 : vec4<f16>;');
    expect(code).to.not.contain('var ra16 ');
    expect(code).to.contain('var rb15 : vec4<f16>;');
    expect(code).to.contain('return W[(wBase + n * uniforms.sN + k * uniforms.sK) / 4];');
    expect(code).to.contain('return A[(row * uniforms.inner + c) / 4];');
    // W along k: a quad's 4 halves 4 slab rows (136 halves) apart
    expect(code).to.contain('Bs[d + 408u] = rb0.w;');
    // fetch the next slab after the barrier that publishes this one, before the products
    const loop = code.slice(code.indexOf('for (var k0 = 0;'));
    const [barrier, fetch, product] = ['workgroupBarrier();', 'if (next < kEnd) {', 'subgroupMatrixMultiplyAccumulate'].map(t => loop.indexOf(t));
    expect(barrier).to.be.greaterThan(0);
    expect(fetch).to.be.greaterThan(barrier);
    expect(product).to.be.greaterThan(fetch);
    expect(element.getUserCode()).to.not.contain('vec4<f16>');
    expect(() => new SubgroupMatrixMatMulProgram(128, 96, { ...spec, packedWeight: packedSpec('int8', 2) }, 32, { left: 'vec4', right: 'vec4' }))
      .to.throw('SubgroupMatrixMatMulProgram: int8 weights are staged per element, not in quads');
    // a workgroup whose invocations do not divide the slab's quads (no real subgroup size does) is refused, not left half staged
    expect(() => new SubgroupMatrixMatMulProgram(128, 96, spec, 3, { left: 'vec4', right: 'vec4' }).getUserCode())
      .to.throw('QuadStaging: 2048 quads are not whole steps of 12 invocations');
    const grad = new SubgroupMatrixWeightGradProgram([2, 128, 128], 2, 128, 128,
        { left: 'gather', right: 'act', activation: { kind: 'swiglu', interleaved: true }, scaleLeft: true, scaled: true }, 32, weightGradStaging({ P: 128, Q: 128 }));
    expect(grad.variableComponents).to.deep.equal([4, 4, 1, 1, 1, 1]);
    const g = grad.getUserCode().replace(/\s+/g, ' ');
    expect(g).to.contain('let row = (pr[r] / uniforms.topK); return L[(row * uniforms.P + c) / 4] * rw[pr[r]];');
    expect(g).to.contain('return vec4<f32>(actForward(p.x, p.y), actForward(p.z, p.w), actForward(q.x, q.y), actForward(q.z, q.w));');
  });

  /**
   * The program's shader as tfjs's builder lays it out (the declarations the programs use, then
   * the program's code, then the entry point), with the subgroup-matrix types and builtins
   * replaced by a struct and plain functions and f16 by f32, so that Mesa's compiler checks the
   * rest: names, types, uniformity of the barriers, the staging and the epilogue.
   */
  function standIn(program: SubgroupMatrixMatMulProgram | SubgroupMatrixWeightGradProgram, intInputs: string[]): string {
    // as tfjs declares them: vec4 (vec2 for packed words) where the program stages in quads; amax an
    // exponent code (int32)
    const inputs = program.variableNames.map((name, i) => {
      const scalar = intInputs.includes(name) || name === 'amax' ? 'i32' : 'f32';
      const n = program.variableComponents[i];
      return `@group(0) @binding(${i + 1}) var<storage, read> ${name} : array<${n === 1 ? scalar : `vec${n}<${scalar}>`}>;`;
    });
    const user = program.getUserCode();
    const hoisted = hoistEnableDirectives(`${inputs.join('\n')}\n${user}`);
    expect(hoisted.startsWith('enable f16;\nenable chromium_experimental_subgroup_matrix;\n' +
        'diagnostic(off, chromium.subgroup_matrix_uniformity);\n')).to.equal(true);
    const body = user.replace(/^\s*(enable|diagnostic)\b.*$/gm, '').replace(/\bf16\b/g, 'f32')
      .replace(/subgroupMatrixLoad<subgroup_matrix_(?:left|right)<f32, 16, 16>>\(&(\w+), /g, 'smLoad_$1(')
      .replace(/subgroup_matrix_result<f32, 16, 16>\(\)/g, 'SM(0.0)')
      .replace(/subgroupMatrixMultiplyAccumulate\(/g, 'smMma(').replace(/subgroupMatrixStore\(&(\w+), /g, 'smStore_$1(')
      .replace(/subgroupMatrixScalarMultiply\(/g, 'smScale(');
    expect(body).to.not.match(/subgroup_matrix|subgroupMatrix/);
    // one function per array (the slabs differ in size, and WGSL has no generics)
    return `
      ${tfjsPreambleStandIn(program.uniforms, inputs)}
      struct SM { v : f32 }
      fn smLoad_As(offset : u32, colMajor : bool, stride : u32) -> SM { return SM(As[offset + stride]); }
      fn smLoad_Bs(offset : u32, colMajor : bool, stride : u32) -> SM { return SM(Bs[offset + stride]); }
      fn smMma(a : SM, b : SM, c : SM) -> SM { return SM(a.v * b.v + c.v); }
      fn smScale(a : SM, s : f32) -> SM { return SM(a.v * s); }
      fn smStore_Ts(offset : u32, c : SM, colMajor : bool, stride : u32) { Ts[offset + stride] = c.v; }
      fn smStore_result(offset : u32, c : SM, colMajor : bool, stride : u32) { result[offset + stride] = c.v; }
      ${body}
      @compute @workgroup_size(${program.workgroupSize.join(', ')})
      fn _start(@builtin(local_invocation_index) li : u32, @builtin(workgroup_id) wg : vec3<u32>) {
        localIndex = li;
        workgroupId = wg;
        main();
      }`;
  }


  /** The shader tfjs builds for `program` (compileProgram; a device that only records the code), as it builds it. */
  function tfjsShaderOf(program: WebGPUProgram, inputs: Array<[string, DataType, number[]]>, out: number[]): string {
    let code = '';
    const recorder = { createShaderModule: (d: { code: string }) => { code = d.code; return {}; }, createComputePipeline: () => ({}) };
    compileProgram(recorder as unknown as GPUDevice, program, inputs.map(([name, dtype, shape]) => ({ name, dtype, shape })) as never,
        { dtype: 'float32', shape: out } as never, false);
    return code;
  }

  /** tfjsShaderOf as a registered device compiles it (directives hoisted, main the entry point), the matrix builtins stood in for. */
  function shaderOf(program: WebGPUProgram, inputs: Array<[string, DataType, number[]]>, out: number[]): string {
    return standInMatrices(entryPointInlined(hoistEnableDirectives(tfjsShaderOf(program, inputs, out))));
  }

  it('a subgroup-matrix program\'s main() becomes tfjs\'s entry point _start (builtins as parameters, privates set, then shadowed): valid WGSL', async () => {
    const program = new SubgroupMatrixMatMulProgram(300, 256, { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true,
      singleGroup: true }, 32, matMulStaging({}, { inner: 192, outCols: 256, sE: 0, sN: 1, sK: 256 }, true));
    const tfjs = hoistEnableDirectives(tfjsShaderOf(program, [['A', 'int32', [300, 96]], ['W', 'float32', [192, 256]], ['amax', 'int32', [1]]], [300, 256]));
    expect(tfjs).to.match(/fn _start\([\s\S]*main\(\);/);
    const inlined = entryPointInlined(tfjs);
    expect(inlined.match(/fn _start\(/g)).to.have.length(1);
    expect(inlined).to.not.match(/\bfn main\(|\bmain\(\);/);
    const entry = inlined.slice(inlined.indexOf('@compute @workgroup_size(128, 1, 1)'));
    expect(entry.replace(/\s+/g, ' ')).to.match(/^@compute @workgroup_size\(128, 1, 1\) fn _start\(@builtin\(local_invocation_id\) LocalId : vec3<u32>, [^{]*\) \{ localId = LocalId; localIndex = LocalIndex; globalId = GlobalId; numWorkgroups = NumWorkgroups; workgroupId = WorkgroupId; let localId = LocalId; let localIndex = LocalIndex; let globalId = GlobalId; let numWorkgroups = NumWorkgroups; let workgroupId = WorkgroupId; let lid = i32\(localIndex\);/);
    // main's body whole: its last statement, then the entry point's end and nothing after
    expect(entry.trimEnd().endsWith('}')).to.equal(true);
    expect(entry).to.contain('result[r * uniforms.outCols + c] = select(0.0, v, e >= 0 && rowSrc[m] >= 0);');
    expect(await compileErrors(standInMatrices(inlined))).to.deep.equal([]);
    // code of another form is left as it is: a flat program's main(index), no tfjs entry point
    const flat = 'fn main(index : i32) { }\n@compute @workgroup_size(64, 1, 1)\nfn _start(@builtin(local_invocation_index) LocalIndex : u32) {\n' +
        '  localIndex = LocalIndex;\n  main(getGlobalIndex());;\n}';
    expect(entryPointInlined(flat)).to.equal(flat);
    expect(entryPointInlined('fn main() { }')).to.equal('fn main() { }');
  });

  /** The decode spec of a [4, 128, 96] packed weight (input on `inputAxis`), as the kernel builds it. */
  function packedSpec(kind: PackedKind, inputAxis: 1 | 2, groupSize?: number): PackedWeightSpec {
    const layout = kind === 'bf16' || kind === 'f16' ? null : quantizedLayout(kind, [4, 128, 96], inputAxis, groupSize);
    return { kind, cols: 96, layout };
  }

  const matMulSpecs: SubgroupMatMulSpec[] = [
    { source: 'gather', hasBias: false, hasAddend: false, kContiguous: true, scaled: false },
    { source: 'gather', hasBias: true, hasAddend: true, kContiguous: false, scaled: true },
    { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true },
    { source: 'act', activation: { kind: 'swiglu', interleaved: false }, hasBias: true, hasAddend: false, kContiguous: true, scaled: false },
    { source: 'act', activation: { kind: 'clampedSwiglu', interleaved: true }, hasBias: false, hasAddend: true, kContiguous: true, scaled: false },
    { source: 'gather', hasBias: false, hasAddend: false, kContiguous: true, scaled: false, packedWeight: packedSpec('bf16', 2) },
    { source: 'act', activation: { kind: 'swiglu', interleaved: true }, hasBias: false, hasAddend: false, kContiguous: false, scaled: false, packedWeight: packedSpec('f16', 1) },
    // quantized experts go through the f32 program's decode too (packedElementSnippet), on both input axes
    { source: 'gather', hasBias: false, hasAddend: false, kContiguous: true, scaled: false, packedWeight: packedSpec('int8', 2) },
    { source: 'rows', hasBias: true, hasAddend: false, kContiguous: false, scaled: true, packedWeight: packedSpec('int4', 1, 32) },
    { source: 'act', activation: { kind: 'swiglu', interleaved: false }, hasBias: false, hasAddend: true, kContiguous: true, scaled: false, packedWeight: packedSpec('nf4', 2) },
    { source: 'gather', hasBias: false, hasAddend: false, kContiguous: false, scaled: false, packedWeight: packedSpec('mxfp4', 1) },
    // the dense projections (MoEDenseMatMul / MoEPackedDenseMatMul): one group, no plan inputs; dy·W scaled
    { source: 'rows', hasBias: true, hasAddend: false, kContiguous: true, scaled: false, singleGroup: true },
    { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true, singleGroup: true },
    { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false, singleGroup: true, packedWeight: packedSpec('bf16', 2) },
    { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true, singleGroup: true, packedWeight: packedSpec('f16', 2) },
    // the composed attention's batched products (MoEBatchProduct): uniform groups, no plan; q·kᵀ and dO·vᵀ (W along k), P·v and dS·k
    { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false, uniformGroups: true },
    { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true, uniformGroups: true },
  ];
  for (const spec of matMulSpecs) {
    // per element, and in quads where the weight's kind allows (every path: A's sources and activations, f32/bf16/f16 W along k and n)
    const quadW = spec.packedWeight === undefined || spec.packedWeight.layout === null;
    const right = quadW ? 'vec4' : 'element';
    const stagings: SubgroupStaging[] = [ELEMENT_STAGING, { left: 'vec4', right }, { left: 'element', right },
      // v6: row offsets resolved per block, the direct store; whole blocks (no clamps) or not
      { left: 'vec4', right, v6: { whole: { depth: true, rows: true, cols: true } } },
      { left: 'vec4', right, v6: { whole: { depth: false, rows: true, cols: false } } },
      // v6's staging (register prefetch, Bs row-major), kept for the variants' comparison
      v6Staging({ left: 'vec4', right, v6: { whole: { depth: true, rows: true, cols: true } } }),
      // a packed 16-bit weight along k in 16-byte runs of 8, whole blocks or not
      ...(spec.packedWeight?.layout === null && spec.kContiguous ? [{ left: 'vec4', right: 'vec8' } as const,
        { left: 'vec4', right: 'vec8', v6: { whole: { depth: true, rows: true, cols: true } } } as const] : [])];
    for (const staging of stagings) {
      const program = new SubgroupMatrixMatMulProgram(128, 96, spec, 32, staging);
      it(`SubgroupMatrixMatMulProgram ${program.shaderKey}: valid WGSL around the matrix builtins`, async () => {
        const ints = ['seg', 'pr', ...(spec.packedWeight ? ['W'] : [])];
        expect(await compileErrors(standIn(program, ints))).to.deep.equal([]);
      });
    }
    // the smaller blocks: per element and the v6 quads (the structure batch-1 plans run)
    for (const staging of [stagings[0], stagings[3]]) {
      for (const rows of [64, 32] as const) {
        const program = new SubgroupMatrixMatMulProgram(128, 96, spec, 32, staging, rows);
        it(`SubgroupMatrixMatMulProgram ${program.shaderKey}: valid WGSL around the matrix builtins`, async () => {
          const ints = ['seg', 'pr', ...(spec.packedWeight ? ['W'] : [])];
          expect(await compileErrors(standIn(program, ints))).to.deep.equal([]);
        });
      }
    }
  }

  // split LoRA's expansion as the products' last reduction step (loraTail): the experts' forward (x gathered or act(h),
  // W along k, f32 or bf16) and backward (dy scaled, W along n), with the stagings those products run
  const whole = { whole: { depth: true, rows: true, cols: true } };
  const tailCases: Array<[SubgroupMatMulSpec, SubgroupStaging, string[]]> = [
    [{ source: 'gather', hasBias: false, hasAddend: false, kContiguous: true, scaled: false, packedWeight: packedSpec('bf16', 2) },
      { left: 'half8', right: 'vec8', v6: whole }, ['A', 'W']],
    [{ source: 'gather', hasBias: false, hasAddend: false, kContiguous: true, scaled: false }, ELEMENT_STAGING, []],
    [{ source: 'act', activation: { kind: 'swiglu', interleaved: false }, hasBias: false, hasAddend: false, kContiguous: true, scaled: false },
      { left: 'vec4', right: 'vec4', v6: whole }, []],
    [{ source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true, packedWeight: packedSpec('bf16', 1) },
      { left: 'half8', right: 'vec4', v6: { whole: { depth: false, rows: true, cols: false } } }, ['A', 'W']],
    [{ source: 'gather', hasBias: true, hasAddend: true, kContiguous: false, scaled: true }, { left: 'vec4', right: 'vec4' }, []],
    // the dense projections' x·Wᵀ + down·Bᵀ and dy·W + g·A (loraLinear): one group, bf16 W
    [{ source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false, singleGroup: true, packedWeight: packedSpec('bf16', 2) },
      { left: 'half8', right: 'vec8', v6: whole }, ['A', 'W']],
    [{ source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true, singleGroup: true, packedWeight: packedSpec('bf16', 1) },
      { left: 'half8', right: 'vec4', v6: whole }, ['A', 'W']],
  ];
  for (const [spec, staging, ints] of tailCases) {
    for (const rows of [128, 64, 32] as const) {
      const program = new SubgroupMatrixMatMulProgram(128, 96, { ...spec, loraTail: true }, 32, staging, rows);
      it(`SubgroupMatrixMatMulProgram ${program.shaderKey}: valid WGSL around the matrix builtins, the tail's inputs last`, async () => {
        expect(program.variableNames.slice(-2)).to.deep.equal(['tailA', 'tailW']);
        expect(program.uniforms.endsWith('tailRank : i32, tailSE : i32, tailSN : i32, tailSK : i32, tailScale : f32, ')).to.equal(true);
        expect(auditSubgroupControlFlow(program.getUserCode()), program.shaderKey).to.deep.equal([]);
        // tfjs's own shader (f16 kept: 'half8' bitcasts halves), the matrix builtins stood in for
        const inputs = program.variableNames.map(name => [name, ['seg', 'pr', 'amax', ...ints].includes(name) ? 'int32' : 'float32', [128, 96]] as
            [string, DataType, number[]]);
        expect(await compileErrors(shaderOf(program, inputs, [128, 96]))).to.deep.equal([]);
      });
    }
  }
  // split K: the LM head's dHidden = dLogits·W (one group, scaled, f16 halves, bf16 W along n)
  for (const staging of [{ left: 'half8', right: 'vec4', v6: whole } as SubgroupStaging, ELEMENT_STAGING]) {
    const spec: SubgroupMatMulSpec = { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true, singleGroup: true,
      packedWeight: packedSpec('bf16', 1), splitK: true };
    const program = new SubgroupMatrixMatMulProgram(128, 96, spec, 32, staging, 64, 6);
    it(`SubgroupMatrixMatMulProgram ${program.shaderKey}: valid WGSL, a slice of the result per split`, async () => {
      expect(program.outputShape).to.deep.equal([6 * 128, 96]);
      expect(program.dispatch).to.deep.equal([1, 2, 6]);
      expect(program.uniforms.endsWith('kChunk : i32, ')).to.equal(true);
      expect(auditSubgroupControlFlow(program.getUserCode()), program.shaderKey).to.deep.equal([]);
      const ints = staging.left === 'half8' ? ['A', 'W', 'amax'] : ['W', 'amax'];
      const inputs = program.variableNames.map(name => [name, ints.includes(name) ? 'int32' : 'float32', [128, 96]] as [string, DataType, number[]]);
      expect(await compileErrors(shaderOf(program, inputs, [6 * 128, 96]))).to.deep.equal([]);
    });
  }
  it('SumSlicesProgram: the split-K slices summed in order, in quads and not, no leak', async () => {
    await expectNoLeakAsync(async () => {
      for (const [splits, shape] of [[6, [5, 8]], [3, [7, 3]], [1, [2, 4]]] as Array<[number, number[]]>) {
        const size = shape[0] * shape[1];
        const values = Float32Array.from({ length: splits * size }, (_, i) => Math.sin(i) * 10);
        const x = tf.tensor2d(values, [splits * shape[0], shape[1]]);
        const program = new SumSlicesProgram(shape, splits);
        const backend = tf.backend() as unknown as { runWebGPUProgram: (p: SumSlicesProgram, i: tf.TensorInfo[], d: string, u: unknown) => tf.TensorInfo };
        const sum = tf.engine().makeTensorFromTensorInfo(backend.runWebGPUProgram(program, [x], 'float32', program.uniformsFor()));
        const want = Float32Array.from({ length: size }, (_, i) => {
          let v = 0;
          for (let z = 0; z < splits; z++) v = Math.fround(v + values[z * size + i]);
          return v;
        });
        expect(sum.shape).to.deep.equal(shape);
        expect(Array.from(await sum.data()), `${splits} × [${shape}]`).to.deep.equal(Array.from(want));
        tf.dispose([x, sum]);
      }
    });
  });

  it('split K: one group with nothing added; denseSplitK aims for 512 workgroups, slices at least 2048 deep', () => {
    const one: SubgroupMatMulSpec = { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true, singleGroup: true, splitK: true };
    expect(() => new SubgroupMatrixMatMulProgram(128, 96, { ...one, hasBias: true }, 32, ELEMENT_STAGING, 128, 2)).to.throw(
        'SubgroupMatrixMatMulProgram: split K takes one group with nothing added and no register prefetch, and only it takes splits ' +
        'other than 1, but got splitK true, singleGroup true, bias true, addend false, loraTail false, registerPrefetch false, splits 2');
    expect(() => new SubgroupMatrixMatMulProgram(128, 96, { ...one, splitK: false }, 32, ELEMENT_STAGING, 128, 2)).to.throw('splits 2');
    expect(() => new SubgroupMatrixMatMulProgram(128, 96, one, 32, ELEMENT_STAGING, 128, 0)).to.throw(
        'SubgroupMatrixMatMulProgram: splits must be an integer in [1, 65535] but got 0');
    // the LM head's 333-row chunks: 3·16 blocks of 128 rows (a split product's) or 6·16 of 64; the last chunk of 50
    // rows: 16 blocks, 24 slices of ≥ 2048
    expect(denseSplitK(333, 2048, 50304, 128)).to.equal(11);
    expect(denseSplitK(333, 2048, 50304, 64)).to.equal(6);
    expect(denseSplitK(50, 2048, 50304, 128)).to.equal(24);
    // q/k/v/o: one slice (256 blocks, and a reduction of one chunk)
    expect(denseSplitK(2048, 2048, 2048, 128)).to.equal(1);
    expect(denseSplitK(2048, 50304, 2048, 128)).to.equal(1);
  });

  it('a LoRA tail goes only into a planned or single-group product with no register prefetch', () => {
    const rows: SubgroupMatMulSpec = { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false, loraTail: true };
    expect(() => new SubgroupMatrixMatMulProgram(128, 96, { ...rows, uniformGroups: true }, 32)).to.throw(
        'SubgroupMatrixMatMulProgram: a LoRA tail is added to a planned or single-group product with no register prefetch, but got ' +
        'uniformGroups true, registerPrefetch false');
    expect(() => new SubgroupMatrixMatMulProgram(128, 96, rows, 32, v6Staging({ left: 'vec4', right: 'vec4' }))).to.throw(
        'registerPrefetch true');
  });

  const gradSpecs: SubgroupWeightGradSpec[] = [
    { left: 'rows', right: 'gather', scaleLeft: false, scaled: true },
    { left: 'gather', right: 'act', activation: { kind: 'swiglu', interleaved: false }, scaleLeft: true, scaled: true },
    { left: 'gather', right: 'rows', scaleLeft: true, scaled: false },
    // the composed attention's dK = dSᵀ·q (L scaled) and dV = Pᵀ·dO (R scaled): uniform groups, no plan
    { left: 'rows', right: 'rows', scaleLeft: false, scaled: true, uniformGroups: true },
    { left: 'rows', right: 'rows', scaleLeft: false, scaled: true, scaledRight: true, uniformGroups: true },
  ];
  for (const spec of gradSpecs) {
    const v6Whole: SubgroupStaging = { left: 'vec4', right: 'vec4', v6: { whole: { depth: false, rows: true, cols: true } } };
    for (const staging of [ELEMENT_STAGING, v5Structure(weightGradStaging({ P: 96, Q: 64 })), weightGradStaging({ P: 96, Q: 64 }), v6Whole,
      { left: 'element', right: 'vec4' } as const]) {
      for (const depth of [64, 32] as const) {
        const program = new SubgroupMatrixWeightGradProgram([4, 96, 64], 4, 96, 64, spec, 32, staging, depth);
        it(`SubgroupMatrixWeightGradProgram ${program.shaderKey}: valid WGSL around the matrix builtins`, async () => {
          expect(await compileErrors(standIn(program, ['seg', 'pr']))).to.deep.equal([]);
        });
      }
    }
  }

  // the experts' weight gradients on f16 operands ('half8'): dW1 = dhᵀ·x (L rows, R gathered), dW2 = dyᵀ·(rw·act(h)) (L gathered,
  // R the converted rows), one side f16 only, blocks not whole (P 96, Q 64: clamped runs), both depths
  const halfGradCases: Array<[SubgroupWeightGradSpec, { P: number; Q: number }, { left: boolean; right: boolean }]> = [
    [{ left: 'rows', right: 'gather', scaleLeft: false, scaled: true }, { P: 256, Q: 128 }, { left: true, right: true }],
    [{ left: 'gather', right: 'rows', scaleLeft: false, scaled: true }, { P: 128, Q: 256 }, { left: true, right: true }],
    [{ left: 'gather', right: 'rows', scaleLeft: false, scaled: true }, { P: 96, Q: 64 }, { left: true, right: true }],
    [{ left: 'gather', right: 'gather', scaleLeft: true, scaled: true }, { P: 96, Q: 64 }, { left: false, right: true }],
    [{ left: 'rows', right: 'act', activation: { kind: 'swiglu', interleaved: true }, scaleLeft: false, scaled: true }, { P: 96, Q: 68 },
      { left: true, right: false }],
  ];
  for (const [spec, d, half] of halfGradCases) {
    for (const depth of [64, 32] as const) {
      const staging = weightGradStaging(d, half);
      const program = new SubgroupMatrixWeightGradProgram([4, d.P, d.Q], 4, d.P, d.Q, spec, 32, staging, depth);
      it(`SubgroupMatrixWeightGradProgram ${program.shaderKey}: f16 operands, 8 halves a load, valid WGSL under tfjs's preamble`, async () => {
        const halfSides = (['L', 'R'] as const).filter((_, i) => [staging.left, staging.right][i] === 'half8');
        expect(halfSides.length).to.equal(Number(half.left && d.P % 8 === 0) + Number(half.right && d.Q % 8 === 0));
        const code = program.getUserCode().replace(/\s+/g, ' ');
        for (const side of halfSides) {
          // the row's 16-byte run, staged as it is: no scale or row weight at staging (the conversion applied them)
          expect(code).to.contain(`fn load${side}8(r : i32, c : i32) -> vec4<u32>`);
          expect(code).to.contain(`select(vec4<f16>(), halfQuad(h.xy), `);
        }
        if (halfSides.includes('L')) expect(code).to.not.match(/loadL8\([^;]*\) \* s/);
        if (d.P % 128 !== 0 && halfSides.includes('L')) expect(code).to.contain('min(p0 + i32(pp), uniforms.P - 8)');
        expect(auditSubgroupControlFlow(program.getUserCode()), program.shaderKey).to.deep.equal([]);
        const ints = ['seg', 'pr', 'amax', ...halfSides];
        const rows = (name: string) => (name === 'L' ? [256, halfSides.includes('L') ? d.P / 2 : d.P] : [256, halfSides.includes('R') ? d.Q / 2 : 2 * d.Q]);
        const inputs = program.variableNames.map(name => [name, ints.includes(name) ? 'int32' : 'float32', name === 'L' || name === 'R' ? rows(name) : [256]] as
            [string, DataType, number[]]);
        const tfjs = shaderOf(program, inputs, [4, d.P, d.Q]);
        for (const side of halfSides) expect(tfjs).to.match(new RegExp(`var<storage, read> ${side}: array<vec4<i32>>`));
        expect(await compileErrors(tfjs)).to.deep.equal([]);
      });
    }
  }

  // scaled results stored straight to the output (staging scaledDirect): a gradient MatMul (with a LoRA tail, with split K),
  // an unscaled one with alpha, and the weight gradients (planned on f16 operands, and uniform groups)
  const scaledDirectCases: Array<[string, () => SubgroupMatrixMatMulProgram | SubgroupMatrixWeightGradProgram, string[]]> = [
    ['MatMul dy·W', () => new SubgroupMatrixMatMulProgram(256, 128, { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false,
      scaled: true, loraTail: true, packedWeight: packedSpec('bf16', 1) }, 32, { left: 'half8', right: 'vec4', v6: whole, scaledDirect: true }), ['A', 'W']],
    ['MatMul split K', () => new SubgroupMatrixMatMulProgram(128, 96, { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false,
      scaled: true, singleGroup: true, splitK: true }, 32, { left: 'half8', right: 'vec4', v6: whole, scaledDirect: true }, 64, 3), ['A']],
    ['MatMul x·Wᵀ', () => new SubgroupMatrixMatMulProgram(256, 128, { source: 'gather', hasBias: false, hasAddend: false, kContiguous: true,
      scaled: false }, 32, { left: 'vec4', right: 'vec4', v6: whole, scaledDirect: true }), []],
    ['weight gradient', () => new SubgroupMatrixWeightGradProgram([4, 256, 128], 4, 256, 128, { left: 'rows', right: 'gather', scaleLeft: false,
      scaled: true }, 32, { ...weightGradStaging({ P: 256, Q: 128 }, { left: true, right: true }), scaledDirect: true }), ['L', 'R']],
    ['batched weight gradient', () => new SubgroupMatrixWeightGradProgram([4, 128, 128], 4, 128, 128, { left: 'rows', right: 'rows', scaleLeft: false,
      scaled: true, scaledRight: true, uniformGroups: true }, 32, { ...weightGradStaging({ P: 128, Q: 128 }), scaledDirect: true }), []],
  ];
  for (const [name, make, ints] of scaledDirectCases) {
    it(`${name} with scaled direct stores: each result matrix times unscale, stored whole; the slots only for blocks out of range`, async () => {
      const program = make();
      expect(program.shaderKey).to.match(/_6[drc]*s(_|$)/);
      const code = program.getUserCode().replace(/\s+/g, ' ');
      expect(code).to.contain('subgroupMatrixStore(&result, ');
      expect(code).to.contain(', subgroupMatrixScalarMultiply(c0_0, unscale), false, ');
      // the direct condition no longer asks alpha / s to be 1; the per-element epilogue stays for the other blocks
      expect(code).to.not.contain('uniforms.alpha / s == 1.0');
      expect(code).to.contain('subgroupMatrixStore(&Ts, ');
      expect(auditSubgroupControlFlow(program.getUserCode()), program.shaderKey).to.deep.equal([]);
      const inputs = program.variableNames.map(n => [n, ['seg', 'pr', 'amax', ...ints].includes(n) ? 'int32' : 'float32', [256, 256]] as
          [string, DataType, number[]]);
      expect(await compileErrors(shaderOf(program, inputs, program.outputShape))).to.deep.equal([]);
    });
  }
  it('without scaledDirect a scaled block keeps the per-element epilogue (alpha / s must be 1 to store directly)', () => {
    const program = new SubgroupMatrixMatMulProgram(256, 128, { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true },
        32, { left: 'half8', right: 'vec4', v6: whole });
    const code = program.getUserCode();
    expect(code).to.contain('uniforms.alpha / s == 1.0');
    expect(code).to.not.contain('subgroupMatrixScalarMultiply');
  });

  it('the weight gradient\'s f16 operands: each side whose rows are whole runs of 8, the routing weight on the side in the plan\'s row order', () => {
    const halves = (left: 'gather' | 'rows', right: 'gather' | 'rows' | 'act', scaleLeft: boolean, P = 1536, Q = 2048) =>
      weightGradHalves({ left, right, scaleLeft }, P, Q);
    // dW1 = dhᵀ·x: no routing weight
    expect(halves('rows', 'gather', false)).to.deep.equal({ left: true, right: true, rowScale: 'none' });
    // dW2 = (w·dy)ᵀ·act(h): dy gathered (token rows, shared by the K pairs), so w rides on act(h)'s rows
    expect(halves('gather', 'act', true, 2048, 768)).to.deep.equal({ left: true, right: true, rowScale: 'R' });
    // L in the plan's rows carries it itself
    expect(halves('rows', 'gather', true)).to.deep.equal({ left: true, right: true, rowScale: 'L' });
    // both sides gathered: L stays f32 and the product applies w as it stages L
    expect(halves('gather', 'gather', true)).to.deep.equal({ left: false, right: true, rowScale: 'program' });
    // R not whole runs of 8: w cannot ride on it, so with L gathered L stays f32 too
    expect(halves('gather', 'act', true, 2048, 770)).to.deep.equal({ left: false, right: false, rowScale: 'program' });
    expect(halves('rows', 'gather', false, 1532, 2048)).to.deep.equal({ left: false, right: true, rowScale: 'none' });
    // the flag off: f32 staging on both sides
    const before = tf.env().getBool(TC_HALF_GRAD_OPERANDS_FLAG);
    tf.env().set(TC_HALF_GRAD_OPERANDS_FLAG, false);
    try {
      expect(halves('gather', 'act', true, 2048, 768)).to.deep.equal({ left: false, right: false, rowScale: 'program' });
    } finally {
      tf.env().set(TC_HALF_GRAD_OPERANDS_FLAG, before);
    }
  });

  it('f16 weight-gradient operands only where the conversion carries all of it: no row scale, activation, odd length or uniform groups', () => {
    const both: SubgroupStaging = { left: 'half8', right: 'half8' };
    const make = (spec: SubgroupWeightGradSpec, staging: SubgroupStaging, P = 128, Q = 128) =>
      () => new SubgroupMatrixWeightGradProgram([4, P, Q], 4, P, Q, spec, 32, staging);
    const message = /^SubgroupMatrixWeightGradProgram: f16 operands \(staging 'half8'\) are rows or gathered rows whose length is a multiple of 8, with no row scale, register prefetch or uniform groups, but got /;
    expect(make({ left: 'gather', right: 'rows', scaleLeft: true, scaled: true }, both)).to.throw(message);
    expect(make({ left: 'rows', right: 'act', activation: { kind: 'swiglu', interleaved: false }, scaleLeft: false, scaled: true }, both))
      .to.throw(/right half8 \('act', Q 128\)/);
    expect(make({ left: 'rows', right: 'rows', scaleLeft: false, scaled: true }, both, 124)).to.throw(/left half8 \(P 124, scaleLeft false\)/);
    expect(make({ left: 'rows', right: 'rows', scaleLeft: false, scaled: true, uniformGroups: true }, both)).to.throw(/uniformGroups true/);
    expect(make({ left: 'rows', right: 'rows', scaleLeft: false, scaled: true }, { ...both, registerPrefetch: true })).to.throw(/registerPrefetch true/);
    // the row scale stays with an f32 L; the MatMul takes no f16 W
    expect(make({ left: 'gather', right: 'rows', scaleLeft: true, scaled: true }, { left: 'vec4', right: 'half8' })).to.not.throw();
    expect(() => new SubgroupMatrixMatMulProgram(128, 96, { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false }, 32,
        { left: 'vec4', right: 'half8' })).to.throw('SubgroupMatrixMatMulProgram: W is staged per element or in runs of 4 or 8 packed halves, not as f16 rows');
  });

  it('quad programs under tfjs\'s own preamble (its vec4 / vec2 input declarations and getters): valid WGSL around the matrix builtins', async () => {
    const bf16 = packedSpec('bf16', 2);
    const matmul = new SubgroupMatrixMatMulProgram(256, 96, { source: 'act', activation: { kind: 'swiglu', interleaved: true }, hasBias: true,
      hasAddend: false, kContiguous: true, scaled: true, packedWeight: bf16 }, 32, matMulStaging({ packedWeight: bf16 }, { inner: 128, outCols: 96, sE: 96 * 64, sN: 128, sK: 1 }));
    const matmulCode = shaderOf(matmul, [['A', 'float32', [256, 256]], ['W', 'int32', [4, 96 * 64]], ['seg', 'int32', [9]], ['pr', 'int32', [256]],
      ['bias', 'float32', [4, 96]], ['amax', 'int32', [1]]], [256, 96]);
    expect(matmulCode).to.match(/var<storage, read> A: array<vec4<f32>>/);
    // bf16 along k: 8 halves (4 words) a load
    expect(matmulCode).to.match(/var<storage, read> W: array<vec4<i32>>/);
    expect(await compileErrors(matmulCode)).to.deep.equal([]);
    const grad = new SubgroupMatrixWeightGradProgram([4, 96, 64], 4, 96, 64, { left: 'gather', right: 'rows', scaleLeft: true, scaled: false }, 32,
        weightGradStaging({ P: 96, Q: 64 }));
    const gradCode = shaderOf(grad, [['L', 'float32', [64, 96]], ['R', 'float32', [256, 64]], ['seg', 'int32', [9]], ['pr', 'int32', [256]],
      ['rw', 'float32', [64]]], [4, 96, 64]);
    expect(gradCode).to.match(/var<storage, read> L: array<vec4<f32>>/);
    expect(await compileErrors(gradCode)).to.deep.equal([]);
  });

  it('a dense product in 64-row blocks (WEBGPU_MOE_DENSE_TC_BLOCK_ROWS 64): twice the blocks of 128 rows, valid WGSL', async () => {
    const dense = { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false, singleGroup: true } as const;
    const staging = matMulStaging({}, { inner: 2048, outCols: 2048, sE: 0, sN: 2048, sK: 1 });
    const r64 = new SubgroupMatrixMatMulProgram(2048, 2048, dense, 32, staging, 64);
    const r128 = new SubgroupMatrixMatMulProgram(2048, 2048, dense, 32, staging, 128);
    expect(r64.dispatch[0] * r64.dispatch[1] * r64.dispatch[2]).to.equal(2 * r128.dispatch[0] * r128.dispatch[1] * r128.dispatch[2]);
    expect(await compileErrors(standIn(r64, []))).to.deep.equal([]);
  });

  it('one group (the dense projections): inputs A, W (+ bias, amax) only, rows straight from A, no expert lookup, its own shader key', async () => {
    const dense = { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true } as const;
    // OLMoE's dy·W at 300 rows (not whole blocks): [300, 2048] · W[2048, 2048]
    const staging = matMulStaging({}, { inner: 2048, outCols: 2048, sE: 0, sN: 1, sK: 2048 });
    const single = new SubgroupMatrixMatMulProgram(300, 2048, { ...dense, singleGroup: true }, 32, staging);
    const grouped = new SubgroupMatrixMatMulProgram(384, 2048, dense, 32, staging);
    expect(single.variableNames).to.deep.equal(['A', 'W', 'amax']);
    expect(grouped.variableNames).to.deep.equal(['A', 'W', 'seg', 'pr', 'amax']);
    expect(single.dispatch).to.deep.equal([16, 3, 1]);
    expect(single.outputShape).to.deep.equal([300, 2048]);
    expect(single.shaderKey).to.equal(`${grouped.shaderKey}_single`);
    const code = single.getUserCode().replace(/\s+/g, ' ');
    expect(code).to.not.match(/\bseg\b|\bpr\[|expertOfRow/);
    expect(code).to.contain('rowSrc[m] = select(-1, row0 + m, row0 + m < uniforms.numRows);');
    expect(code).to.contain('rowSrc[128] = 0;');
    expect(auditSubgroupControlFlow(single.getUserCode())).to.deep.equal([]);
  });

  it('one group under tfjs\'s own preamble (f32 and packed bf16 W, 300 rows): valid WGSL around the matrix builtins', async () => {
    const bf16 = { kind: 'bf16' as const, cols: 256, layout: null };
    const forward = new SubgroupMatrixMatMulProgram(300, 192, { source: 'rows', hasBias: true, hasAddend: false, kContiguous: true, scaled: false,
      singleGroup: true, packedWeight: bf16 }, 32, matMulStaging({ packedWeight: bf16 }, { inner: 256, outCols: 192, sE: 0, sN: 256, sK: 1 }));
    const forwardCode = shaderOf(forward, [['A', 'float32', [300, 256]], ['W', 'int32', [192, 128]], ['bias', 'float32', [192]]], [300, 192]);
    expect(forwardCode).to.match(/var<storage, read> W: array<vec4<i32>>/);
    expect(await compileErrors(forwardCode)).to.deep.equal([]);
    const dx = new SubgroupMatrixMatMulProgram(300, 256, { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true,
      singleGroup: true }, 32, matMulStaging({}, { inner: 192, outCols: 256, sE: 0, sN: 1, sK: 256 }));
    const dxCode = shaderOf(dx, [['A', 'float32', [300, 192]], ['W', 'float32', [192, 256]], ['amax', 'int32', [1]]], [300, 256]);
    expect(dxCode).to.match(/var<storage, read> W: array<vec4<f32>>/);
    expect(await compileErrors(dxCode)).to.deep.equal([]);
  });

  it('uniform groups (MoEBatchProduct): no plan inputs, the block\'s group from its first row, segments of G rows, a shader key each', () => {
    const olmoe = { inner: 128, outCols: 512, sE: 512 * 128, sN: 128, sK: 1 };
    const spec = { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false } as const;
    // attention's scores at OLMoE's shape: 64 groups of 512 rows, 512 columns
    const scores = new SubgroupMatrixMatMulProgram(64 * 512, 512, { ...spec, uniformGroups: true }, 32, matMulStaging({}, olmoe));
    const planned = new SubgroupMatrixMatMulProgram(64 * 512, 512, spec, 32, matMulStaging({}, olmoe));
    expect(scores.variableNames).to.deep.equal(['A', 'W']);
    expect(scores.dispatch).to.deep.equal([4, 256, 1]);
    expect(scores.shaderKey).to.equal(`${planned.shaderKey}_uniformGroups`);
    expect(scores.uniforms).to.equal(`${planned.uniforms}groupRows : i32, `);
    const code = scores.getUserCode().replace(/\s+/g, ' ');
    expect(code).to.not.match(/\bseg\b|\bpr\[|expertOfRow/);
    expect(code).to.contain('if (lid == 0) { rowSrc[128] = row0 / uniforms.groupRows; }');
    expect(code).to.contain('rowSrc[m] = select(-1, row0 + m, row0 + m < uniforms.numRows);');
    expect(code).to.contain('let wBase = max(e, 0) * uniforms.sE;');
    expect(auditSubgroupControlFlow(scores.getUserCode())).to.deep.equal([]);
    // dK = dSᵀ·q scales L (dS), dV = Pᵀ·dO scales R (dO): [64, 512, 128] each over 512 rows a group
    const grad = (scaledRight: boolean) => new SubgroupMatrixWeightGradProgram([64, 512, 128], 64, 512, 128,
        { left: 'rows', right: 'rows', scaleLeft: false, scaled: true, scaledRight, uniformGroups: true }, 32, weightGradStaging({ P: 512, Q: 128 }), 64);
    const [dK, dV] = [grad(false), grad(true)];
    expect(dV.variableNames).to.deep.equal(['L', 'R', 'amax']);
    expect(dV.dispatch).to.deep.equal([1, 4, 64]);
    expect(dV.uniforms).to.match(/groupRows : i32, $/);
    expect(dK.shaderKey).to.match(/_x_32_3_.*_uniformGroups$/);
    expect(dV.shaderKey).to.equal(dK.shaderKey.replace('_x_', '_xr_'));
    const [k, v] = [dK, dV].map(p => p.getUserCode().replace(/\s+/g, ' '));
    for (const c of [k, v]) {
      expect(c).to.contain('segment[0] = e * uniforms.groupRows; segment[1] = uniforms.groupRows;');
      expect(c).to.not.match(/\bseg\[/);
    }
    expect(k).to.contain('loadL4(start + min(r0 + i32(rr), count - 1), p0 + i32(pp)) * s, ');
    expect(k).to.contain('loadR4(start + min(r0 + i32(rr), count - 1), q0 + i32(qq)), ');
    expect(v).to.contain('loadL4(start + min(r0 + i32(rr), count - 1), p0 + i32(pp)), ');
    expect(v).to.contain('loadR4(start + min(r0 + i32(rr), count - 1), q0 + i32(qq)) * s, ');
    // per element too
    const elementV = new SubgroupMatrixWeightGradProgram([64, 512, 128], 64, 512, 128,
        { left: 'rows', right: 'rows', scaleLeft: false, scaled: true, scaledRight: true, uniformGroups: true }, 32).getUserCode();
    expect(elementV).to.contain('let rv = loadR(start + min(r, count - 1), min(q, uniforms.Q - 1)) * s;');
    expect(elementV).to.contain('let l = loadL(start + min(r, count - 1), min(p, uniforms.P - 1));');
  });

  it('refuses uniform groups of gathered or activated rows, with one group, or a row scale; and scaledRight without amax', () => {
    const rows = { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false, uniformGroups: true } as const;
    expect(() => new SubgroupMatrixMatMulProgram(256, 128, { ...rows, source: 'gather' }, 32)).to.throw(
        "SubgroupMatrixMatMulProgram: uniform groups read A as rows, one group per G rows, but got source 'gather'");
    expect(() => new SubgroupMatrixMatMulProgram(256, 128, { ...rows, singleGroup: true }, 32)).to.throw(
        "SubgroupMatrixMatMulProgram: uniform groups read A as rows, one group per G rows, but got source 'rows' and singleGroup");
    const grad = { left: 'rows', right: 'rows', scaleLeft: false, scaled: true, uniformGroups: true } as const;
    expect(() => new SubgroupMatrixWeightGradProgram([2, 128, 128], 2, 128, 128, { ...grad, right: 'gather' }, 32)).to.throw(
        "SubgroupMatrixWeightGradProgram: uniform groups read L and R as rows with no row scale, but got left 'rows', right 'gather', scaleLeft false");
    expect(() => new SubgroupMatrixWeightGradProgram([2, 128, 128], 2, 128, 128, { ...grad, scaleLeft: true }, 32)).to.throw(
        "SubgroupMatrixWeightGradProgram: uniform groups read L and R as rows with no row scale, but got left 'rows', right 'rows', scaleLeft true");
    expect(() => new SubgroupMatrixWeightGradProgram([2, 128, 128], 2, 128, 128, { ...grad, scaled: false, scaledRight: true }, 32)).to.throw(
        'SubgroupMatrixWeightGradProgram: scaledRight needs scaled (the amax input)');
  });

  it('uniform groups under tfjs\'s own preamble at OLMoE\'s shape (3-D inputs and outputs, the six attention products): valid WGSL', async () => {
    const [h, s, l, d] = [64, 512, 512, 128];
    const mm = (kContiguous: boolean, scaled: boolean, inner: number, outCols: number) => new SubgroupMatrixMatMulProgram(h * s, outCols,
        { source: 'rows', hasBias: false, hasAddend: false, kContiguous, scaled, uniformGroups: true }, 32,
        matMulStaging({}, { inner, outCols, sE: inner * outCols, ...(kContiguous ? { sN: inner, sK: 1 } : { sN: 1, sK: outCols }) }));
    const wg = (scaledRight: boolean, P: number, Q: number) => new SubgroupMatrixWeightGradProgram([h, P, Q], h, P, Q,
        { left: 'rows', right: 'rows', scaleLeft: false, scaled: true, scaledRight, uniformGroups: true }, 32, weightGradStaging({ P, Q }), 64);
    const amax: [string, DataType, number[]] = ['amax', 'int32', [1]];
    const cases: Array<[string, WebGPUProgram, Array<[string, DataType, number[]]>, number[]]> = [
      ['scores = q·kᵀ', mm(true, false, d, l), [['A', 'float32', [h, s, d]], ['W', 'float32', [h, l, d]]], [h, s, l]],
      ['value = P·v', mm(false, false, l, d), [['A', 'float32', [h, s, l]], ['W', 'float32', [h, l, d]]], [h, s, d]],
      ['dP = dO·vᵀ', mm(true, true, d, l), [['A', 'float32', [h, s, d]], ['W', 'float32', [h, l, d]], amax], [h, s, l]],
      ['dQ = dS·k', mm(false, true, l, d), [['A', 'float32', [h, s, l]], ['W', 'float32', [h, l, d]], amax], [h, s, d]],
      ['dV = Pᵀ·dO', wg(true, l, d), [['L', 'float32', [h, s, l]], ['R', 'float32', [h, s, d]], amax], [h, l, d]],
      ['dK = dSᵀ·q', wg(false, l, d), [['L', 'float32', [h, s, l]], ['R', 'float32', [h, s, d]], amax], [h, l, d]],
    ];
    for (const [name, program, inputs, out] of cases) {
      const code = shaderOf(program, inputs, out);
      expect(code, name).to.match(/var<storage, read> [AL]: array<vec4<f32>>/);
      expect(await compileErrors(code), name).to.deep.equal([]);
    }
  });

  it('a stand-in shader with a mistake does not compile (the check above can fail)', async () => {
    const program = new SubgroupMatrixMatMulProgram(128, 96, matMulSpecs[0], 32);
    const broken = standIn(program, ['seg', 'pr']).replace('let wBase = max(e, 0) * uniforms.sE;', 'let wBase = max(e, 0) * uniforms.noSuchField;');
    expect((await compileErrors(broken)).join('\n')).to.match(/noSuchField/);
  });
});
