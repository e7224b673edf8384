/**
 * MoEAttention / MoEAttentionGrad on tensor cores (SubgroupMatrixAttentionProgram, issues 13 and 15)
 * where there are none: Mesa (CI) has no subgroup matrices, so this checks which head widths,
 * subgroup sizes and workgroup memory the programs take, that their WGSL is valid apart from the
 * subgroup-matrix builtins (compiled with plain stand-ins), that the builtins and barriers sit in
 * uniform control flow, and that with the tensor-core flag on, a device that is not registered runs
 * the f32 tiled programs with bit-identical results; and the op's separate kernel threshold for
 * tensor cores. The programs' algorithm and index math are checked numerically here with the
 * matrices emulated (EmulatedSubgroupProgram: f32, slow, one small shape) against the tiled f32
 * programs; their f16 numbers and speed on the GPU machine by
 * tools/webgpu_attention/time_attention.ts --tensor-cores on. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import type { WebGPUBackend, WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { attentionTensorCores, maxAbsCode } from '../../../src/backends/webgpu/kernels.js';
import { TiledAttentionProgram } from '../../../src/backends/webgpu/programs/tiled_attention_program.js';
import {
  ATTENTION_BLOCK, SubgroupMatrixAttentionProgram, subgroupMatrixAttentionBytes, subgroupMatrixAttentionMisfit,
  type SubgroupMatrixAttentionPass,
} from '../../../src/backends/webgpu/programs/subgroup_matrix_attention_program.js';
import type { AttentionDims } from '../../../src/backends/webgpu/programs/attention_program.js';
import { TENSOR_CORES_FLAG } from '../../../src/backends/webgpu/tensor_cores.js';
import { attentionMask, causalMask } from '../../../src/layers/attention.js';
import {
  ATTENTION, ATTENTION_GRAD, ATTENTION_KERNEL_FLAG, ATTENTION_KERNEL_MIN_BYTES_FLAG, ATTENTION_TENSOR_CORE_MIN_BYTES, ATTENTION_TENSOR_CORE_MIN_BYTES_FLAG,
  registerTensorCoreAttention, scaledDotProductAttention, useAttentionKernels,
} from '../../../src/ops/attention_core.js';
import { maxRelativeError } from '../../../src/util/numeric.js';
import { auditSubgroupControlFlow } from '../../../tools/webgpu_tc/uniformity.js';
import { standInMatrices, tfjsPreambleStandIn } from '../../../tools/webgpu_tc/variant_codes.js';
import { compileErrors, expectNoLeakAsync, withEnvFlag, withShaderKeys } from './helpers.js';

const PASSES: SubgroupMatrixAttentionPass[] = ['stats', 'forward', 'gradQ', 'gradV'];

/** The program's shader under a stand-in of tfjs's preamble, the matrix builtins replaced by plain functions. */
function standIn(program: SubgroupMatrixAttentionProgram): string {
  // amax is an exponent code (int32), the rest f32
  const inputs = program.variableNames.map((name, i) => `@group(0) @binding(${i + 1}) var<storage, read> ${name} : array<${name === 'amax' ? 'i32' : 'f32'}>;`);
  return `${tfjsPreambleStandIn(program.uniforms, inputs)}
    ${standInMatrices(program.getUserCode())}
    @compute @workgroup_size(${program.workgroupSize.join(', ')})
    fn _start(@builtin(local_invocation_index) li : u32, @builtin(workgroup_id) wg : vec3<u32>) {
      localIndex = li;
      workgroupId = wg;
      main(0);   // tfjs passes the flat index (the programs' dispatch layout is flat), unused
    }`;
}

/**
 * The program with its subgroup matrices emulated exactly, in f32, by every invocation for its
 * whole subgroup: a matrix is a private array of its 256 elements, a load reads all of them with
 * the builtin's indexing (element (r, c) at offset + r·stride + c, column-major offset + c·stride + r),
 * a multiply-accumulate computes the whole product, a store writes every element (each lane the
 * same values). The halves become f32. So Mesa runs the programs' index math, staging, softmax
 * and epilogues, slowly, and their numbers can be compared with the f32 tiled programs'.
 * Its limit on Mesa 22.3.6 (llvmpipe): the four passes here are right, but gradV with one more
 * product in its tile loop, whose result nothing reads, already gives wrong numbers, so a pass with
 * more matrices (the removed gradK had two more products) cannot be judged by this emulation.
 */
class EmulatedSubgroupProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number];
  uniforms: string;
  private readonly code: string;

  constructor(program: SubgroupMatrixAttentionProgram) {
    this.variableNames = program.variableNames;
    this.outputShape = program.outputShape;
    this.shaderKey = `emulated_${program.shaderKey}`;
    this.dispatchLayout = program.dispatchLayout;
    this.dispatch = program.dispatch;
    this.workgroupSize = program.workgroupSize;
    this.uniforms = program.uniforms;
    const arrays = new Set<string>();
    const body = program.getUserCode().replace(/^\s*(enable|diagnostic)\b.*$/gm, '').replace(/\bf16\b/g, 'f32')
      .replace(/subgroupMatrix(Load|Store)(?:<subgroup_matrix_(?:left|right)<f32, 16, 16>>)?\(&(\w+), /g, (_, op: string, name: string) => {
        arrays.add(`${op}_${name}`);
        return `sm${op}_${name}(`;
      })
      .replace(/subgroup_matrix_result<f32, 16, 16>\(\)/g, 'SM()')
      .replace(/subgroupMatrixMultiplyAccumulate\(/g, 'smMma(');
    expect(body).to.not.match(/subgroup_matrix|subgroupMatrix/);
    const at = 'select(offset + r * stride + c, offset + c * stride + r, colMajor)';
    const helpers = [...arrays].map(entry => {
      const [op, name] = entry.split('_');
      return op === 'Load'
        ? `fn smLoad_${name}(offset : u32, colMajor : bool, stride : u32) -> SM {
             var m : SM;
             let n = smEdge();
             for (var r = 0u; r < n; r++) { for (var c = 0u; c < n; c++) { m.v[r * 16u + c] = f32(${name}[${at}]); } }
             return m;
           }`
        : `fn smStore_${name}(offset : u32, m : SM, colMajor : bool, stride : u32) {
             let n = smEdge();
             for (var r = 0u; r < n; r++) { for (var c = 0u; c < n; c++) { ${name}[${at}] = m.v[r * 16u + c]; } }
           }`;
    });
    this.code = `
      struct SM { v : array<f32, 256> }
      // 16, from a uniform: loops the shader compiler cannot unroll (unrolled, Mesa's JIT takes minutes per program)
      fn smEdge() -> u32 { return 16u + u32(min(uniforms.seqLen, 0)); }
      fn smMma(a : SM, b : SM, acc : SM) -> SM {
        var m = acc;
        let n = smEdge();
        for (var r = 0u; r < n; r++) {
          for (var c = 0u; c < n; c++) {
            var sum = 0.0;
            for (var k = 0u; k < n; k++) { sum += a.v[r * 16u + k] * b.v[k * 16u + c]; }
            m.v[r * 16u + c] += sum;
          }
        }
        return m;
      }
      ${body}
      ${helpers.join('\n')}`;
  }

  getUserCode(): string {
    return this.code;
  }
}

describe('webgpu: attention on tensor cores (SubgroupMatrixAttentionProgram) where there are none', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it('takes head widths that are multiples of 16 up to 128, subgroups of 16 to 64, within the workgroup memory', () => {
    for (const d of [16, 64, 80, 96, 128]) expect(subgroupMatrixAttentionMisfit({ dk: d, dv: d }, 32, 32768), `head ${d}`).to.equal(undefined);
    expect(subgroupMatrixAttentionMisfit({ dk: 128, dv: 64 }, 16, 32768)).to.equal(undefined);
    expect(subgroupMatrixAttentionMisfit({ dk: 72, dv: 72 }, 32, 32768)).to.equal('head widths Dk 72, Dv 72: both must be multiples of 16 up to 128');
    expect(subgroupMatrixAttentionMisfit({ dk: 128, dv: 256 }, 32, 32768)).to.equal('head widths Dk 128, Dv 256: both must be multiples of 16 up to 128');
    expect(subgroupMatrixAttentionMisfit({ dk: 64, dv: 64 }, 8, 32768)).to.equal('subgroup size 8: must be 16, 32 or 64');
    expect(subgroupMatrixAttentionMisfit({ dk: 64, dv: 64 }, 128, 32768)).to.equal('subgroup size 128: must be 16, 32 or 64');
    const most = Math.max(...PASSES.map(p => subgroupMatrixAttentionBytes(p, { dk: 128, dv: 128 })));
    // every pass of the widest head fits WebGPU's 32 KiB (desktop GPUs' common limit), not 16 KiB
    expect(most).to.be.at.most(32768);
    expect(subgroupMatrixAttentionMisfit({ dk: 128, dv: 128 }, 32, 16384)).to.equal(`${most} bytes of workgroup memory needed, the device has 16384`);
    expect(() => new SubgroupMatrixAttentionProgram('stats', { nkv: 1, rep: 1, seqLen: 8, keyLen: 8, dk: 72, dv: 72, maskBatch: 0 }, 32))
      .to.throw('SubgroupMatrixAttentionProgram: head widths Dk 72, Dv 72: both must be multiples of 16 up to 128');
  });

  it('dispatches a workgroup per 64 query rows of a KV head (stats, forward, gradQ) or per 64 of its keys (gradV)', () => {
    // Qwen3-shaped: 8 query heads on 2 KV heads (rep 4), 100 positions over 130 keys
    const dims: AttentionDims = { nkv: 2, rep: 4, seqLen: 100, keyLen: 130, dk: 128, dv: 64, maskBatch: 0 };
    const rowBlocks = Math.ceil(4 * 100 / ATTENTION_BLOCK);
    const keyBlocks = Math.ceil(130 / ATTENTION_BLOCK);
    const expected: Record<SubgroupMatrixAttentionPass, { dispatch: number[]; shape: number[] }> = {
      stats: { dispatch: [rowBlocks, 2, 1], shape: [8, 100, 2] },
      forward: { dispatch: [rowBlocks, 2, 1], shape: [8, 100, 64] },
      gradQ: { dispatch: [rowBlocks, 2, 1], shape: [8, 100, 128] },
      gradV: { dispatch: [keyBlocks, 2, 1], shape: [2, 130, 64] },
    };
    const keys = new Set<string>();
    for (const pass of PASSES) {
      const program = new SubgroupMatrixAttentionProgram(pass, dims, 32);
      expect(program.dispatch, pass).to.deep.equal(expected[pass].dispatch);
      expect(program.outputShape, pass).to.deep.equal(expected[pass].shape);
      expect(program.workgroupSize).to.deep.equal([128, 1, 1]);
      keys.add(program.shaderKey);
      keys.add(new SubgroupMatrixAttentionProgram(pass, { ...dims, maskBatch: 2 }, 32).shaderKey);
      keys.add(new SubgroupMatrixAttentionProgram(pass, dims, 16).shaderKey);
    }
    expect(keys.size, 'the shader key names the pass, the head widths, the subgroup size and the mask kind').to.equal(12);
  });

  const shapes: Array<{ dims: AttentionDims; subgroupSize: number }> = [
    { dims: { nkv: 4, rep: 1, seqLen: 64, keyLen: 64, dk: 128, dv: 128, maskBatch: 0 }, subgroupSize: 32 },
    { dims: { nkv: 2, rep: 4, seqLen: 40, keyLen: 40, dk: 64, dv: 64, maskBatch: 2 }, subgroupSize: 16 },
    { dims: { nkv: 1, rep: 2, seqLen: 5, keyLen: 83, dk: 128, dv: 48, maskBatch: 0 }, subgroupSize: 64 },
  ];
  for (const { dims, subgroupSize } of shapes) {
    for (const pass of PASSES) {
      const program = new SubgroupMatrixAttentionProgram(pass, dims, subgroupSize);
      it(`${program.shaderKey}: valid WGSL around the matrix builtins, which it reaches in uniform control flow`, async () => {
        expect(auditSubgroupControlFlow(program.getUserCode())).to.deep.equal([]);
        expect(await compileErrors(standIn(program))).to.deep.equal([]);
      });
    }
  }

  /**
   * The tensor-core kernels' sequence (stats, forward; delta, max |dO|, gradQ, tiled gradK, gradV) with
   * the emulated programs against MoEAttention / MoEAttentionGrad's tiled f32 programs on the same
   * inputs: the statistics, O, dQ, dK and dV. Both are f32 (the emulation keeps no halves), so they
   * differ by summation order only.
   */
  async function compareEmulated(nq: number, nkv: number, s: number, keyLen: number, dk: number, dv: number,
      mask: tf.Tensor2D | tf.Tensor4D, subgroupSize: number): Promise<void> {
    const scale = 1 / Math.sqrt(dk);
    const q = tf.randomNormal([nq, s, dk], 0, 1, 'float32', 5) as tf.Tensor3D;
    const k = tf.randomNormal([nkv, keyLen, dk], 0, 1, 'float32', 6) as tf.Tensor3D;
    const v = tf.randomNormal([nkv, keyLen, dv], 0, 1, 'float32', 7) as tf.Tensor3D;
    // a mean loss's cotangent: far below f16's smallest normal unscaled
    const dy = tf.randomNormal([nq, s, dv], 0, 1e-6, 'float32', 8) as tf.Tensor3D;
    const dims: AttentionDims = { nkv, rep: nq / nkv, seqLen: s, keyLen, dk, dv, maskBatch: mask.rank === 4 ? mask.shape[0] : 0 };
    const backend = tf.backend() as unknown as WebGPUBackend;
    const uniforms = TiledAttentionProgram.uniformsFor(dims, scale);
    const run = (pass: SubgroupMatrixAttentionPass, inputs: tf.TensorInfo[]) => tf.engine().makeTensorFromTensorInfo(
        backend.runWebGPUProgram(new EmulatedSubgroupProgram(new SubgroupMatrixAttentionProgram(pass, dims, subgroupSize)), inputs, 'float32', uniforms));
    await expectNoLeakAsync(async () => {
      const [oRef, statsRef] = tf.engine().runKernel(ATTENTION, { q, k, v, mask }, { scale, withStats: true }) as tf.Tensor[];
      const gradsRef = tf.engine().runKernel(ATTENTION_GRAD, { q, k, v, mask, o: oRef, stats: statsRef, dy }, { scale, withStats: false }) as tf.Tensor[];
      // an invalid pipeline leaves its output as the buffer pool had it: catch any, or a comparison could pass on stale data
      backend.device.pushErrorScope('validation');
      const stats = run('stats', [q, k, mask]);
      const o = run('forward', [q, k, v, mask, stats]);
      const deltas = tf.engine().makeTensorFromTensorInfo(backend.runWebGPUProgram(
          new TiledAttentionProgram('delta', dims, backend.device.limits.maxComputeWorkgroupStorageSize), [o, dy], 'float32', uniforms));
      const amax = maxAbsCode(dy);
      // as the kernel runs them: dK on the tiled f32 program (SubgroupMatrixAttentionProgram has no gradK pass)
      const dK = tf.engine().makeTensorFromTensorInfo(backend.runWebGPUProgram(
          new TiledAttentionProgram('gradK', dims, backend.device.limits.maxComputeWorkgroupStorageSize), [q, k, v, mask, stats, deltas, dy], 'float32', uniforms));
      const grads = [run('gradQ', [q, k, v, mask, stats, deltas, dy, amax]), dK, run('gradV', [q, k, mask, stats, dy, amax])];
      const error = await backend.device.popErrorScope();
      expect(error?.message, 'the emulated programs are valid').to.equal(undefined);
      const names = ['stats', 'o', 'dq', 'dk', 'dv'];
      const ours = await Promise.all([stats, o, ...grads].map(t => t.data()));
      const theirs = await Promise.all([statsRef, oRef, ...gradsRef].map(t => t.data()));
      const errors = names.map((name, i) => `${name} ${maxRelativeError(ours[i], theirs[i]).toExponential(2)}`);
      for (let i = 0; i < names.length; i++) {
        expect(maxRelativeError(ours[i], theirs[i]), `${names[i]} (all: ${errors.join(', ')})`).to.be.below(1e-5);
      }
      tf.dispose([oRef, statsRef, ...gradsRef, stats, o, deltas, amax, ...grads]);
    });
    tf.dispose([q, k, v, dy]);
  }

  // Mesa's JIT takes about 15 s per emulated program (the matrices are private arrays): one small problem, heads of 16,
  // that still has two row blocks and two key tiles (both partial at the ends), grouped heads and a fully blocked row;
  // the programs' code differs between head widths only in how many 16-wide matrices it unrolls
  it('emulated: rep 2, 40 positions, causal with a fully blocked row, heads of 16: the statistics, O, dq, dk, dv as the tiled programs\'', async function () {
    this.timeout(900_000);
    const s = 40;
    const mask = tf.tidy(() => {
      const causal = causalMask(s, null);
      const blocked = tf.cast(tf.reshape(tf.oneHot(tf.tensor1d([3], 'int32'), s), [s, 1]), 'bool');
      return tf.where(tf.logicalAnd(blocked, tf.ones([s, s], 'bool')), tf.fill([s, s], -1e9), causal) as tf.Tensor2D;
    });
    await compareEmulated(4, 2, s, s, 16, 16, mask, 32);
    mask.dispose();
  });

  it('with the tensor-core flag on, the suite\'s device (not registered) runs the tiled f32 programs: bit-identical O, dq, dk, dv', async () => {
    expect(attentionTensorCores(128, 128)).to.equal(undefined);
    await withEnvFlag(TENSOR_CORES_FLAG, true, async () => expect(attentionTensorCores(128, 128)).to.equal(undefined));
    await withShaderKeys(keys => withEnvFlag(ATTENTION_KERNEL_MIN_BYTES_FLAG, 0, () => expectNoLeakAsync(async () => {
        // grouped heads (rep 2), a per-sample packed mask with a fully blocked row, 70 positions: several blocks and tiles
        const [nq, nkv, s, d] = [4, 2, 70, 64];
        const q = tf.randomNormal([nq, s, d], 0, 1, 'float32', 1) as tf.Tensor3D;
        const k = tf.randomNormal([nkv, s, d], 0, 1, 'float32', 2) as tf.Tensor3D;
        const v = tf.randomNormal([nkv, s, d], 0, 1, 'float32', 3) as tf.Tensor3D;
        const w = tf.randomNormal([nq, s, d], 0, 1, 'float32', 4);
        const segments = tf.tensor2d(Array.from({ length: 2 * s }, (_, i) => (i % s < 30 ? 1 : 2)), [2, s], 'int32');
        const mask = tf.tidy(() => {
          const m = attentionMask(s, null, segments) as tf.Tensor4D;
          // row 5 of sample 0 blocked everywhere
          const blocked = tf.mul(tf.reshape(tf.oneHot(tf.tensor1d([5], 'int32'), s), [1, 1, s, 1]), tf.tensor4d([1, 0], [2, 1, 1, 1]));
          return tf.where(tf.cast(blocked, 'bool'), tf.fill(m.shape, -1e9), m) as tf.Tensor4D;
        });
        const both = async () => {
          const f = (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) =>
            tf.sum(tf.mul(scaledDotProductAttention(a as tf.Tensor3D, b as tf.Tensor3D, c as tf.Tensor3D, mask, 0.125), w));
          const { value, grads } = tf.valueAndGrads(f)([q, k, v]);
          const o = scaledDotProductAttention(q, k, v, mask, 0.125);
          const out = await Promise.all([o, ...grads].map(t => t.data()));
          tf.dispose([value, o, ...grads]);
          return out;
        };
        keys.splice(0);   // the inputs' programs
        const off = await both();
        const offKeys = keys.splice(0);
        const on = await withEnvFlag(TENSOR_CORES_FLAG, true, both);
        expect(keys, 'the same programs').to.deep.equal(offKeys);
        expect(keys.some(key => key.startsWith('moeTiledAttention_')), 'the tiled programs ran').to.equal(true);
        expect(keys.some(key => key.startsWith('moeSubgroupAttention')), 'no subgroup-matrix program').to.equal(false);
        for (let i = 0; i < off.length; i++) {
          expect(Buffer.from((on[i] as Float32Array).buffer).equals(Buffer.from((off[i] as Float32Array).buffer)), `output ${i} bit for bit`).to.equal(true);
        }
        tf.dispose([q, k, v, w, segments, mask]);
      })));
  });

  it('MOE_ATTENTION_TENSOR_CORE_MIN_BYTES applies where the backend runs the heads on tensor cores, MOE_ATTENTION_KERNEL_MIN_BYTES elsewhere', async () => {
    const [nq, s, d] = [4, 64, 128];
    const bytes = nq * s * s * 4;
    expect(tf.env().getNumber(ATTENTION_TENSOR_CORE_MIN_BYTES_FLAG), 'the H100-measured default').to.equal(ATTENTION_TENSOR_CORE_MIN_BYTES);
    expect(ATTENTION_TENSOR_CORE_MIN_BYTES).to.equal(256 * 2 ** 20);
    const decide = () => useAttentionKernels(nq, d, d, s, s);
    await withEnvFlag(ATTENTION_TENSOR_CORE_MIN_BYTES_FLAG, 0, async () => {
      // here no tensor cores: the f32 threshold (64 MiB) holds, whatever the tensor-core one says
      await withEnvFlag(TENSOR_CORES_FLAG, true, async () => expect(decide(), 'f32 threshold').to.equal(false));
      await withEnvFlag(ATTENTION_KERNEL_MIN_BYTES_FLAG, bytes, async () => expect(decide(), 'f32 threshold met').to.equal(true));
    });
    // a backend whose heads run on tensor cores: the tensor-core threshold instead
    registerTensorCoreAttention('webgpu', (dk, dv) => dk === 128 && dv === 128);
    try {
      await withEnvFlag(ATTENTION_TENSOR_CORE_MIN_BYTES_FLAG, bytes, async () => {
        expect(decide(), 'tensor-core threshold met').to.equal(true);
        expect(useAttentionKernels(nq, 64, 64, s, s), 'heads not on tensor cores: the f32 threshold').to.equal(false);
      });
      await withEnvFlag(ATTENTION_TENSOR_CORE_MIN_BYTES_FLAG, bytes + 1, async () => expect(decide(), 'one byte short').to.equal(false));
      await withEnvFlag(ATTENTION_KERNEL_FLAG, false, async () =>
        withEnvFlag(ATTENTION_TENSOR_CORE_MIN_BYTES_FLAG, 0, async () => expect(decide(), 'the kernels off').to.equal(false)));
    } finally {
      registerTensorCoreAttention('webgpu', (dk, dv) => attentionTensorCores(dk, dv) !== undefined);
    }
    // the real hook again: no tensor cores here
    await withEnvFlag(ATTENTION_TENSOR_CORE_MIN_BYTES_FLAG, 0, async () => expect(decide()).to.equal(false));
  });
});
