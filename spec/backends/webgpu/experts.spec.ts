/**
 * The WebGPU routed experts (webgpuFusedExperts, the 'fused' block's implementation on webgpu)
 * against the float64 reference and central finite differences on it: output and every gradient,
 * odd shapes, empty experts, K = E, one token, both layouts and activations, every LoRA mode.
 * Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { limitWebGPUBufferPool, webgpuBufferPoolStats } from '../../../src/backends/webgpu/buffer_pool.js';
import {
  PADDED_H_MAX_RATIO_FLAG, ROW_TILE_FLAG, WEBGPU_MOE_TUNING_FEW, WEBGPU_MOE_TUNING_LARGE, WEBGPU_MOE_TUNING_SMALL, getWebGPUMoETuning, setWebGPUMoETuning,
  webgpuFusedExperts, webgpuMoETuningFor,
} from '../../../src/backends/webgpu/experts.js';
import { gatherRows, GROUPED_MATMUL, SUBMIT_FLOPS_FLAG, planCapacity } from '../../../src/backends/webgpu/kernels.js';
import { buildDispatchPlanAsync } from '../../../src/ops/experts/dispatch_plan.js';
import { fusedExperts } from '../../../src/ops/experts/fused_experts.js';
import { moeBlock, registerExpertsImplementation } from '../../../src/ops/moe_block.js';
import type { LoRAMode } from '../../../src/ops/types.js';
import { OpArgumentError } from '../../../src/ops/validate.js';
import { Rng, asF32, finiteDifferences } from '../../helpers/numeric.js';
import { experts64 } from '../../ops/expert_reference64.js';
import {
  type ExpertCase, type ExpertCaseSpec, expectCloseAsync, expectNoLeakAsync, loss64, makeExpertCase, trainedOf, weightsWith, withEnvFlag,
  withShaderKeys,
} from './helpers.js';

async function checkAgainstReference(
    c: ExpertCase, opts: { trainBase: boolean; loraMode?: LoRAMode }, seed: number): Promise<void> {
  const { m } = c;
  const G = asF32(new Rng(seed).array(m.T * m.H));
  const gT = tf.tensor2d(Float32Array.from(G), [m.T, m.H]);
  const trained = trainedOf(c, opts.trainBase);
  const options = { trainExpertWeights: opts.trainBase, loraMode: opts.loraMode };
  const f = (...inputs: tf.Tensor[]) => {
    const { x, weights, w } = weightsWith(c, trained, inputs);
    return tf.sum(tf.mul(webgpuFusedExperts(x, { weights, experts: c.experts }, w, c.activation, options), gT));
  };
  const out = webgpuFusedExperts(c.x, { weights: c.weights, experts: c.experts }, c.w, c.activation, options);
  await expectCloseAsync(out, experts64(m), 1e-5, 'out', [m.T, m.H]);
  out.dispose();
  const grads = tf.grads(f)(trained.map(p => p.t));
  for (const [i, p] of trained.entries()) {
    const fd = finiteDifferences(v => loss64(p.set(m, v), G), p.get(m));
    await expectCloseAsync(grads[i], fd, 1e-4, `d${p.name}`, p.t.shape);
  }
  tf.dispose([...grads, gT]);
}

describe('webgpu: webgpuFusedExperts', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  const cases: Array<[string, ExpertCaseSpec]> = [
    ['odd sizes, E=5 K=3', { T: 7, H: 6, I: 3, E: 5, K: 3 }],
    ['one token, K = E', { T: 1, H: 5, I: 2, E: 4, K: 4 }],
    ['every token to one expert, K=1', { T: 9, H: 4, I: 3, E: 3, K: 1, routing: 'one' }],
    ['experts with no tokens', { T: 6, H: 5, I: 2, E: 6, K: 2, routing: 'skip' }],
    ['gpt-oss layout, biases, clamped GLU', { T: 5, H: 6, I: 4, E: 4, K: 2, layout: 'inOutInterleaved', bias: true,
      activation: { kind: 'clampedSwiglu', alpha: 1.702, limit: 0.8 } }],
    ['more rows than one tile, E=5 K=3', { T: 40, H: 7, I: 5, E: 5, K: 3 }],
    ['Llama 4 layout (W [E, in, out], gate half then up half)', { T: 6, H: 5, I: 3, E: 4, K: 2, layout: 'inOut' }],
    ['Gemma 4 geglu (tanh GELU)', { T: 6, H: 5, I: 3, E: 4, K: 2, activation: { kind: 'gegluTanh' } }],
  ];
  for (const [name, spec] of cases) {
    it(`matches float64 and finite differences: ${name}`, async () => {
      const c = makeExpertCase(spec, 11);
      await checkAgainstReference(c, { trainBase: true }, 12);
      c.dispose();
    });
  }

  for (const mode of ['split', 'materialize'] as const) {
    it(`expert LoRA (${mode}): two adapters on W1, one on W2, frozen base; dx, dweights, dA, dB`, async () => {
      const c = makeExpertCase({ T: 8, H: 6, I: 3, E: 5, K: 2, lora1: [2, 1], lora2: [3], routing: 'skip' }, 21);
      await checkAgainstReference(c, { trainBase: false, loraMode: mode }, 22);
      c.dispose();
    });
    it(`expert LoRA (${mode}) on the gpt-oss transposed layout`, async () => {
      const c = makeExpertCase({ T: 5, H: 4, I: 3, E: 3, K: 2, layout: 'inOutInterleaved', bias: true, lora1: [2], lora2: [1],
        activation: { kind: 'clampedSwiglu', alpha: 1.702, limit: 1.2 } }, 31);
      await checkAgainstReference(c, { trainBase: false, loraMode: mode }, 32);
      c.dispose();
    });
  }

  it('split LoRA\'s backward reads each factor\'s u = x·A_eᵀ as forward made it: one rank-wide product per factor each way', async () => {
    // ranks 2 and 1 on W1, 3 on W2; every other product is at least I = 5 wide
    const c = makeExpertCase({ T: 8, H: 6, I: 5, E: 5, K: 2, lora1: [2, 1], lora2: [3], routing: 'skip' }, 23);
    const config = tf.getKernel(GROUPED_MATMUL, 'webgpu')!;
    const kernelFunc = config.kernelFunc;
    const rankWide: number[] = [];
    config.kernelFunc = (args => {
      const outCols = args.attrs!.outCols as number;
      if (outCols <= 3) rankWide.push(outCols);
      return kernelFunc(args);
    }) as tf.KernelFunc;
    try {
      await expectNoLeakAsync(async () => {
        const up = c.w.gateUpLoRA!;
        const down = c.w.downLoRA!;
        const factors = [...up, ...down].flatMap(f => [f.A, f.B]);
        const grads = tf.grads((...ts: tf.Tensor[]) => {
          const at = (i: number) => ({ A: ts[1 + 2 * i] as tf.Tensor2D, B: ts[2 + 2 * i] as tf.Tensor2D });
          const w = { ...c.w, gateUpLoRA: up.map((f, i) => ({ ...f, ...at(i) })), downLoRA: down.map((f, i) => ({ ...f, ...at(up.length + i) })) };
          return tf.sum(webgpuFusedExperts(ts[0] as tf.Tensor2D, { weights: c.weights, experts: c.experts }, w, c.activation, { loraMode: 'split' }));
        })([c.x, ...factors]);
        await Promise.all(grads.map(g => g.data()));
        tf.dispose(grads);
      });
    } finally {
      config.kernelFunc = kernelFunc;
    }
    // forward: u of each factor; backward: s·dy·B_e of each, no u again
    expect([...rankWide].sort()).to.deep.equal([1, 1, 2, 2, 3, 3]);
    c.dispose();
  });

  it('trains base and LoRA together in split mode (auto picks split)', async () => {
    const c = makeExpertCase({ T: 6, H: 5, I: 2, E: 3, K: 2, lora1: [1], lora2: [2] }, 41);
    await checkAgainstReference(c, { trainBase: true, loraMode: 'auto' }, 42);
    c.dispose();
  });

  it('H=100, E=5, K=3 with an unused expert: forward and dx match float64', async () => {
    const c = makeExpertCase({ T: 3, H: 100, I: 8, E: 5, K: 3, routing: 'skip', lora1: [2] }, 51);
    await checkAgainstReference(c, { trainBase: false, loraMode: 'split' }, 52);
    c.dispose();
  });

  it('T=300, H=100, I=24, E=8, K=2: forward and gradients match the cpu-style composed op within 1e-4', async () => {
    // the composed fusedExperts reads the plan with dataSync, which webgpu cannot: give it a host plan
    const c = makeExpertCase({ T: 300, H: 100, I: 24, E: 8, K: 2 }, 61);
    const plan = await buildDispatchPlanAsync(c.experts, 8);
    const G = tf.randomNormal([300, 100], 0, 1, 'float32', 5);
    const run = (impl: typeof fusedExperts) => tf.grads((x: tf.Tensor, w: tf.Tensor, w1: tf.Tensor, w2: tf.Tensor) =>
      tf.sum(tf.mul(impl(x as tf.Tensor2D, { weights: w as tf.Tensor2D, experts: c.experts },
          { gateUp: w1 as tf.Tensor3D, down: w2 as tf.Tensor3D }, c.activation, { plan }), G)))(
        [c.x, c.weights, c.w.gateUp, c.w.down]);
    const ours = run(webgpuFusedExperts);
    const composed = run(fusedExperts);
    const names = ['dx', 'dweights', 'dW1', 'dW2'];
    for (let i = 0; i < 4; i++) await expectCloseAsync(ours[i], await composed[i].data(), 1e-4, names[i], composed[i].shape);
    const out = webgpuFusedExperts(c.x, c, c.w, c.activation);
    await expectCloseAsync(out, experts64(c.m), 1e-5, 'out');
    tf.dispose([...ours, ...composed, G, out]);
    c.dispose();
  });

  it('gives the same results with 32- and 128-row tiles (8×8 vec4 register tiles)', async () => {
    const c = makeExpertCase({ T: 50, H: 20, I: 12, E: 5, K: 3 }, 71);
    const grads = () => tf.grads((x: tf.Tensor, w1: tf.Tensor) => tf.sum(webgpuFusedExperts(x as tf.Tensor2D, c,
        { ...c.w, gateUp: w1 as tf.Tensor3D }, c.activation)))([c.x, c.w.gateUp]);
    const previous = setWebGPUMoETuning({ rowTile: 32, tile: { tm: 2, tn: 2, bk: 8 }, gradTile: { tm: 2, tn: 1, bk: 8 } });
    let small: tf.Tensor[];
    try { small = grads(); } finally { setWebGPUMoETuning(previous); }
    setWebGPUMoETuning({ rowTile: 128, tile: { tm: 8, tn: 8, bk: 16, vec4: true }, gradTile: { tm: 8, tn: 4, bk: 16, vec4: true } });
    let large: tf.Tensor[];
    try { large = grads(); } finally { setWebGPUMoETuning(previous); }
    await expectCloseAsync(small[0], await large[0].data(), 1e-5, 'dx');
    await expectCloseAsync(small[1], await large[1].data(), 1e-5, 'dW1');
    tf.dispose([...small, ...large]);
    c.dispose();
  });

  it(`${SUBMIT_FLOPS_FLAG} = 0 submits after every grouped product (by default none does), with the same results`, async () => {
    expect(tf.env().getNumber(SUBMIT_FLOPS_FLAG), 'default').to.equal(Infinity);
    const c = makeExpertCase({ T: 50, H: 20, I: 12, E: 5, K: 3 }, 73);
    const grads = () => tf.grads((x: tf.Tensor, w1: tf.Tensor, w2: tf.Tensor) => tf.sum(webgpuFusedExperts(x as tf.Tensor2D, c,
        { gateUp: w1 as tf.Tensor3D, down: w2 as tf.Tensor3D }, c.activation)))([c.x, c.w.gateUp, c.w.down]);
    const backend = tf.backend() as unknown as { submitQueue(): void };
    const submit = backend.submitQueue;
    let submits = 0;
    backend.submitQueue = function (this: unknown) { submits++; return submit.call(this); };
    let batched: tf.Tensor[];
    let each: tf.Tensor[];
    let batchedSubmits: number;
    try {
      batched = grads();
      batchedSubmits = submits;
      submits = 0;
      tf.env().set(SUBMIT_FLOPS_FLAG, 0);
      each = grads();
    } finally {
      tf.env().set(SUBMIT_FLOPS_FLAG, Infinity);
      delete (backend as Partial<typeof backend>).submitQueue;
    }
    // forward up and down, backward g = dOut·W2, dx, dW1, dW2: six products, each submitted; by
    // default they wait for tfjs's batches of 15 dispatches
    expect(submits, 'submits after every product').to.be.at.least(6);
    expect(batchedSubmits, 'submits by default').to.be.below(submits);
    for (let i = 0; i < 3; i++) await expectCloseAsync(each[i], await batched[i].data(), 0, `grad ${i}`);
    tf.dispose([...batched, ...each]);
    c.dispose();
  });

  it('picks tiles by rows per expert; setWebGPUMoETuning rejects a row tile that the register tile does not divide', () => {
    expect(() => setWebGPUMoETuning({ rowTile: 48, tile: { tm: 2, tn: 2, bk: 8 } })).to.throw(OpArgumentError,
        "`setWebGPUMoETuning()`: 'rowTile' must be a multiple of 16·tile.tm = 32 but got 48");
    expect(() => setWebGPUMoETuning({ tile: { tm: 16, tn: 2, bk: 8 } })).to.throw(OpArgumentError,
        "`setWebGPUMoETuning()`: 'tile' must have tm, tn <= 8 but got 16x2");
    expect(() => setWebGPUMoETuning({ gradTile: { tm: 4, tn: 2, bk: 8, vec4: true } })).to.throw(OpArgumentError,
        "`setWebGPUMoETuning()`: 'gradTile' with vec4 must have tm, tn multiples of 4 but got 4x2");
    expect(getWebGPUMoETuning(), 'still automatic').to.equal(undefined);
    expect(webgpuMoETuningFor(8 * 300, 8)).to.deep.equal(WEBGPU_MOE_TUNING_LARGE);
    expect(webgpuMoETuningFor(8 * 200, 8)).to.deep.equal(WEBGPU_MOE_TUNING_SMALL);
    expect(webgpuMoETuningFor(8 * 64, 8)).to.deep.equal(WEBGPU_MOE_TUNING_SMALL);
    expect(webgpuMoETuningFor(512 * 8, 128), "Qwen3-30B-A3B's 128 experts at 512 tokens").to.deep.equal(WEBGPU_MOE_TUNING_FEW);
  });

  it('takes the row tile from WEBGPU_MOE_ROW_TILE where set, and refuses a tile it has no preset for', () => {
    const previous = tf.env().getNumber(ROW_TILE_FLAG);
    try {
      tf.env().set(ROW_TILE_FLAG, 64);
      expect(webgpuMoETuningFor(8 * 300, 8), 'forced below the automatic 128').to.deep.equal(WEBGPU_MOE_TUNING_SMALL);
      tf.env().set(ROW_TILE_FLAG, 128);
      expect(webgpuMoETuningFor(512 * 8, 128), 'forced above the automatic 32').to.deep.equal(WEBGPU_MOE_TUNING_LARGE);
      tf.env().set(ROW_TILE_FLAG, 48);
      expect(() => webgpuMoETuningFor(8 * 300, 8)).to.throw('WEBGPU_MOE_ROW_TILE must be 0 (automatic) or one of 128, 64, 32 but got 48');
    } finally {
      tf.env().set(ROW_TILE_FLAG, previous);
    }
    expect(webgpuMoETuningFor(8 * 300, 8), 'automatic again').to.deep.equal(WEBGPU_MOE_TUNING_LARGE);
  });

  it('at 128 experts with ~32 rows each (Qwen3-30B-A3B at 512 tokens), 32-row tiles: the same values, 4096 fewer padded rows held', async () => {
    // T·K = 4096 rows over 128 experts: planCapacity 12160 rows with 64-row tiles, 8064 with 32
    const c = makeExpertCase({ T: 512, H: 8, I: 4, E: 128, K: 8, lora1: [2], lora2: [2] }, 91);
    expect(planCapacity(4096, 128, WEBGPU_MOE_TUNING_SMALL.rowTile) - planCapacity(4096, 128, WEBGPU_MOE_TUNING_FEW.rowTile)).to.equal(4096);
    const step = () => {
      // a LoRA training step's call: frozen base, gradients to x, the routing weights and the factors
      const inputs = [c.x, c.weights, c.w.gateUpLoRA![0].A, c.w.gateUpLoRA![0].B, c.w.downLoRA![0].A, c.w.downLoRA![0].B];
      const limit = limitWebGPUBufferPool(Infinity);
      const start = webgpuBufferPoolStats().usedBytes;
      try {
        const grads = tf.grads((x: tf.Tensor, w: tf.Tensor, a1: tf.Tensor, b1: tf.Tensor, a2: tf.Tensor, b2: tf.Tensor) =>
          tf.sum(webgpuFusedExperts(x as tf.Tensor2D, { weights: w as tf.Tensor2D, experts: c.experts }, {
            ...c.w, gateUpLoRA: [{ ...c.w.gateUpLoRA![0], A: a1 as tf.Tensor2D, B: b1 as tf.Tensor2D }],
            downLoRA: [{ ...c.w.downLoRA![0], A: a2 as tf.Tensor2D, B: b2 as tf.Tensor2D }],
          }, c.activation)))(inputs);
        return { grads, peak: limit.peakUsedBytes() - start };
      } finally { limit.restore(); }
    };
    await expectNoLeakAsync(async () => {
      const out = webgpuFusedExperts(c.x, c, c.w, c.activation);
      await expectCloseAsync(out, experts64(c.m), 1e-5, 'out', [512, 8]);
      out.dispose();
      const few = step();
      const previous = setWebGPUMoETuning(WEBGPU_MOE_TUNING_SMALL);
      let small: ReturnType<typeof step>;
      try { small = step(); } finally { setWebGPUMoETuning(previous); }
      const names = ['dx', 'dweights', 'dA1', 'dB1', 'dA2', 'dB2'];
      for (let i = 0; i < names.length; i++) await expectCloseAsync(few.grads[i], await small.grads[i].data(), 1e-5, names[i]);
      // at least h [cap, 2I] and the down output y [cap, H] are alive together at the forward's end
      expect(small.peak - few.peak, 'peak bytes in use, 64- minus 32-row tiles').to.be.at.least(4096 * (2 * 4 + 8) * 4);
      tf.dispose([...few.grads, ...small.grads]);
    });
    c.dispose();
  });

  it('keeps h for backward in pair order (N rows), not padded to the capacity: what every layer holds at the loss', async () => {
    const c = makeExpertCase({ T: 512, H: 8, I: 16, E: 128, K: 8 }, 92);
    const rows = 512 * 8;
    // an identity whose backward notes the bytes held when backward starts: what forward kept
    let heldAtBackward = 0;
    const probe = tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => ({
      value: (args[0] as tf.Tensor).clone(),
      gradFunc: (dy: tf.Tensor) => { heldAtBackward = tf.memory().numBytes; return dy; },
    }));
    await expectNoLeakAsync(async () => {
      const before = tf.memory().numBytes;
      const [dx] = tf.grads((x: tf.Tensor) => tf.sum(probe(webgpuFusedExperts(x as tf.Tensor2D, c, c.w, c.activation))))([c.x]);
      const plan = await buildDispatchPlanAsync(c.experts, 128);
      const [composed] = tf.grads((x: tf.Tensor) => tf.sum(fusedExperts(x as tf.Tensor2D, c, c.w, c.activation, { plan })))([c.x]);
      await expectCloseAsync(dx, await composed.data(), 1e-5, 'dx');
      composed.dispose();
      const held = heldAtBackward - before;
      const hKept = rows * 2 * 16 * 4;
      const hPadded = planCapacity(rows, 128, webgpuMoETuningFor(rows, 128).rowTile) * 2 * 16 * 4;
      expect(held, 'bytes held from forward to backward').to.be.at.least(hKept).and.below(hPadded);
      dx.dispose();
    });
    c.dispose();
  });

  it('keeps h padded where the capacity is at most 1.5× the pairs (no gathers), in pair order above it: the same gradients', async () => {
    // 4096 pairs over 8 experts, 128-row tiles: capacity 5120 (1.25×), as OLMoE's batch (1.5×)
    const c = makeExpertCase({ T: 512, H: 8, I: 16, E: 8, K: 8, lora1: [2], lora2: [2] }, 93);
    const rows = 512 * 8;
    const capacity = planCapacity(rows, 8, webgpuMoETuningFor(rows, 8).rowTile);
    expect(capacity).to.equal(5120);
    const inputs = [c.x, c.weights, c.w.gateUpLoRA![0].A, c.w.gateUpLoRA![0].B, c.w.downLoRA![0].A, c.w.downLoRA![0].B];
    const step = () => withShaderKeys(async keys => {
      // an identity whose backward notes the bytes held when backward starts: what forward kept
      let heldAtBackward = 0;
      const probe = tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => ({
        value: (args[0] as tf.Tensor).clone(),
        gradFunc: (dy: tf.Tensor) => { heldAtBackward = tf.memory().numBytes; return dy; },
      }));
      const before = tf.memory().numBytes;
      const grads = tf.grads((x: tf.Tensor, w: tf.Tensor, a1: tf.Tensor, b1: tf.Tensor, a2: tf.Tensor, b2: tf.Tensor) =>
        tf.sum(probe(webgpuFusedExperts(x as tf.Tensor2D, { weights: w as tf.Tensor2D, experts: c.experts }, {
          ...c.w, gateUpLoRA: [{ ...c.w.gateUpLoRA![0], A: a1 as tf.Tensor2D, B: b1 as tf.Tensor2D }],
          downLoRA: [{ ...c.w.downLoRA![0], A: a2 as tf.Tensor2D, B: b2 as tf.Tensor2D }],
        }, c.activation))))(inputs);
      return { grads, held: heldAtBackward - before, gathers: keys.filter(k => k === 'moeGatherRows').length };
    });
    await expectNoLeakAsync(async () => {
      const padded = await step();
      const pairOrder = await withEnvFlag(PADDED_H_MAX_RATIO_FLAG, 1.2, step);
      expect([padded.gathers, pairOrder.gathers], 'gathers of h, kept padded and in pair order').to.deep.equal([0, 2]);
      // h [cap, 2I] held from forward to backward, against [N, 2I]
      expect(padded.held - pairOrder.held, 'bytes held from forward to backward').to.equal((capacity - rows) * 2 * 16 * 4);
      const names = ['dx', 'dweights', 'dA1', 'dB1', 'dA2', 'dB2'];
      for (let i = 0; i < names.length; i++) {
        const [a, b] = [await padded.grads[i].data(), await pairOrder.grads[i].data()];
        expect(Buffer.from(a.buffer).equals(Buffer.from(b.buffer)), `${names[i]}: the same bits`).to.equal(true);
      }
      tf.dispose([...padded.grads, ...pairOrder.grads]);
    });
    c.dispose();
  });

  for (const [count, width] of [[4, 8], [70000, 4], [5, 6]]) {
    it(`gatherRows: rows picked by index, zeros for −1 (the padding rows of h), ${count} × ${width}` +
        `${width % 4 ? " (tfjs's gather)" : count > 65535 ? ' (more rows than a grid column)' : ''}`, async () => {
      const sourceRows = 37;
      const values = Float32Array.from({ length: sourceRows * width }, (_, i) => Math.fround(Math.sin(i) * 100));
      const picks = Int32Array.from({ length: count }, (_, i) => (i % 5 === 1 ? -1 : (i * 7) % sourceRows));
      const x = tf.tensor2d(values, [sourceRows, width]);
      const rows = tf.tensor1d(picks, 'int32');
      const before = tf.memory().numTensors;
      const out = gatherRows(x, rows);
      expect(out.shape).to.deep.equal([count, width]);
      const got = await out.data();
      const want = new Float32Array(count * width);
      picks.forEach((r, i) => { if (r >= 0) want.set(values.subarray(r * width, (r + 1) * width), i * width); });
      expect(Buffer.from(got.buffer).equals(Buffer.from(want.buffer))).to.equal(true);
      out.dispose();
      expect(tf.memory().numTensors).to.equal(before);
      tf.dispose([x, rows]);
    });
  }

  it('rejects a host plan of another shape, like fusedExperts', () => {
    const c = makeExpertCase({ T: 4, H: 5, I: 2, E: 3, K: 2 }, 81);
    const plan = { numTokens: 5, topK: 2, numExperts: 3, pairOfRow: new Int32Array(10), tokenOfRow: new Int32Array(10),
      rowOfPair: new Int32Array(10), groupSizes: [10, 0, 0] };
    expect(() => webgpuFusedExperts(c.x, c, c.w, c.activation, { plan })).to.throw(OpArgumentError,
        "`fusedExperts()`: 'options.plan' is for T=5, K=2, E=3 but the call has T=4, K=2, E=3");
    c.dispose();
  });

  it('refuses expert LoRA dropout (not implemented in the WebGPU programs), naming the adapter', () => {
    const c = makeExpertCase({ T: 4, H: 5, I: 2, E: 3, K: 2, lora1: [1], lora2: [1] }, 82);
    const w = { ...c.w, downLoRA: [{ ...c.w.downLoRA![0], dropout: { p: 0.1, seed: 1 } }] };
    expect(() => webgpuFusedExperts(c.x, c, w, c.activation)).to.throw(OpArgumentError,
        "`fusedExperts()`: 'weights.downLoRA[0].dropout' must be absent or p 0 on webgpu but got p 0.1: expert LoRA dropout " +
        'runs on cpu, wasm and the stock-op backends; on webgpu use lora.dropout 0 on expert targets');
    c.dispose();
  });

  it('leaves no tensor behind across forward + backward, and reads nothing synchronously', async () => {
    const c = makeExpertCase({ T: 7, H: 6, I: 3, E: 5, K: 2, lora1: [2], lora2: [1] }, 91);
    await expectNoLeakAsync(async () => {
      const f = (x: tf.Tensor, a: tf.Tensor) => tf.sum(webgpuFusedExperts(x as tf.Tensor2D, c,
          { ...c.w, gateUpLoRA: [{ ...c.w.gateUpLoRA![0], A: a as tf.Tensor2D }] }, c.activation, { loraMode: 'split' }));
      for (let step = 0; step < 3; step++) {
        const g = tf.grads(f)([c.x, c.w.gateUpLoRA![0].A]);
        await g[0].data();
        tf.dispose(g);
      }
      const out = webgpuFusedExperts(c.x, c, c.w, c.activation);
      await out.data();
      out.dispose();
    });
    c.dispose();
  });

  it("is what moeBlock's 'fused' kernel runs on webgpu", async () => {
    const c = makeExpertCase({ T: 6, H: 8, I: 4, E: 4, K: 2 }, 101);
    let calls = 0;
    const previous = registerExpertsImplementation('webgpu', (...args) => { calls++; return webgpuFusedExperts(...args); });
    try {
      const router = tf.randomNormal([4, 8], 0, 1, 'float32', 3) as tf.Tensor2D;
      const r = moeBlock(c.x, { router: { weight: router }, experts: c.w },
          { routing: { kind: 'softmaxTopK', topK: 2 }, activation: { kind: 'swiglu' } });
      // the block's experts given the routing it chose, in float64
      const chosen = Int32Array.from(await r.routing.experts.data());
      const w = Float64Array.from(await r.routing.weights.data());
      await expectCloseAsync(r.out, experts64({ ...c.m, experts: chosen, weights: w }), 1e-5, 'block out');
      tf.dispose([r.out, r.routing.weights, r.routing.experts, r.routing.logits, router]);
    } finally {
      registerExpertsImplementation('webgpu', previous);
    }
    expect(calls).to.equal(1);
    c.dispose();
  });
});
