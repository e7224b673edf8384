/**
 * The routing that runs composed from tfjs ops on webgpu (every kind but plain softmaxTopK, which
 * has its own kernel): each family fixture's MoE block against transformers (runBlockParity: out,
 * dx, every parameter gradient, the experts chosen), every routing kind with real expert groups
 * (n_group > topk_group, which no fixture but deepseek_v3 has) against float64, and the two other
 * one-hots that meet the same tfjs-webgpu Transpose: the load-balancing loss and glm_moe_dsa's
 * DSA indexer (which keys each query keeps). Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor, Tensor1D, Tensor2D } from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { readSafetensorsFile } from '../../../src/io/safetensors.js';
import { MLAAttention, type MLAAttentionArgs } from '../../../src/layers/mla_attention.js';
import { runBlockParity } from '../../../src/models/parity.js';
import { loadBalancingLoss } from '../../../src/ops/aux_losses.js';
import { referenceRoute } from '../../../src/ops/reference/routing.js';
import { route } from '../../../src/ops/routing/index.js';
import type { Routing, RoutingConfig } from '../../../src/ops/types.js';
import { dsaAttention64 } from '../../helpers/glm_dsa64.js';
import { Rng, asF32, finiteDifferences } from '../../helpers/numeric.js';
import { gradFD, routeRows64, separatedLogits, softmax64 } from '../../helpers/routing64.js';
import { expectCloseAsync, expectNoLeakAsync } from './helpers.js';

const FIXTURES = 'spec/fixtures/hf';
const ARCHS = readdirSync(FIXTURES).filter(a => existsSync(join(FIXTURES, a, 'golden.json')));
/** the cpu parity spec's tolerance (spec/cli/parity.spec.ts, DEFAULT_PARITY_TOLERANCE) */
const PARITY_TOL = 1e-4;

describe('webgpu: composed routing', function () {
  this.timeout(120_000);
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  describe('every family fixture\'s MoE block against transformers (runBlockParity)', () => {
    it('finds the fixtures, the grouped-routing ones among them', () => {
      expect(ARCHS).to.include.members(['deepseek_v3', 'glm4_moe', 'glm_moe_dsa', 'mistral4', 'ernie4_5_moe',
        'llama4_text', 'gpt_oss', 'minimax_m2', 'mixtral', 'qwen3_moe']);
    });

    for (const arch of ARCHS) {
      it(`${arch}: out, dx, every parameter gradient and the chosen experts within the cpu run's tolerance`, async () => {
        const before = tf.memory().numTensors;
        const r = await runBlockParity(join(FIXTURES, arch));
        expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
        const golden = await readSafetensorsFile(join(FIXTURES, arch, 'golden.safetensors'));
        const gradients = golden.names().filter(n => n.startsWith('block.grad.')).map(n => n.slice('block.'.length));
        expect(r.comparisons.map(c => c.name)).to.include.members(['out', 'dx', ...gradients]);
        for (const c of r.comparisons) expect(c.maxRelError, `${arch} ${c.name}`).to.be.at.most(PARITY_TOL);
        expect(r.routingIdentical, JSON.stringify(r.routingMismatches)).to.equal(true);
        expect(r).to.include({ family: arch, backend: 'webgpu', expertKernel: 'fused', tolerance: PARITY_TOL, pass: true });
      });
    }
  });

  describe('each routing kind with expert groups, through route() and referenceRoute, against float64', () => {
    const T = 9;
    const E = 16;
    const configs: RoutingConfig[] = [
      // DeepSeek-V3 / GLM-4.5: sigmoid, correction bias, best 2 of 4 groups by their top-2 sum
      { kind: 'sigmoidGroupTopK', topK: 4, nGroup: 4, topkGroup: 2, scalingFactor: 2.5 },
      // Mistral 4: softmax, best 2 of 4 groups by their top-2 sum
      { kind: 'softmaxGroupTopK', topK: 4, nGroup: 4, topkGroup: 2, scalingFactor: 2 },
      // DeepSeek-V2: best 2 of 4 groups by their max
      { kind: 'softmaxGroupLimitedGreedy', topK: 4, nGroup: 4, topkGroup: 2, scalingFactor: 16 },
      { kind: 'softmaxBiasedTopK', topK: 4, normMin: 1e-9 },
      { kind: 'topKSigmoid', topK: 2 },
      { kind: 'topKSoftmax', topK: 3 },
    ];
    const withBias = new Set(['sigmoidGroupTopK', 'softmaxBiasedTopK']);
    const impls: Array<[string, (x: Tensor2D, cfg: RoutingConfig, bias?: Tensor1D) => Routing]> = [
      ['route()', route], ['referenceRoute', referenceRoute],
    ];

    configs.forEach((cfg, i) => {
      for (const [name, impl] of impls) {
        it(`${name} ${cfg.kind}: experts, weights, and d Σ(weights·G)/d logits vs finite differences`, async () => {
          const rng = new Rng(300 + i);
          const bias64 = withBias.has(cfg.kind) ? asF32(rng.array(E, 0.1)) : undefined;
          const x64 = separatedLogits(rng, T, E, cfg, bias64);
          const G64 = asF32(rng.array(T * cfg.topK));
          const ref = routeRows64(x64, T, cfg, bias64);
          const fd = gradFD(x64, T, cfg, G64, bias64);
          const x = tf.tensor2d(Float32Array.from(x64), [T, E]);
          const G = tf.tensor2d(Float32Array.from(G64), [T, cfg.topK]);
          const bias = bias64 ? tf.tensor1d(Float32Array.from(bias64)) : undefined;
          await expectNoLeakAsync(async () => {
            const r = impl(x, cfg, bias);
            expect(Array.from(await r.experts.data()), 'experts').to.deep.equal(Array.from(ref.experts));
            await expectCloseAsync(r.weights, ref.weights, 1e-5, 'weights', [T, cfg.topK]);
            const g = tf.grad((z: Tensor) => tf.sum(tf.mul(impl(z as Tensor2D, cfg, bias).weights, G)))(x);
            await expectCloseAsync(g, fd, 1e-4, 'd sum(weights·G)/d logits vs finite differences', [T, E]);
            tf.dispose([r.weights, r.experts, g]);
          });
          tf.dispose(bias === undefined ? [x, G] : [x, G, bias]);
        });
      }
    });
  });

  it('loadBalancingLoss: the value and its logits gradient against float64', async () => {
    const [T, E, K] = [12, 8, 2];
    const rng = new Rng(41);
    const x64 = asF32(rng.array(T * E, 1.5));
    const chosen = Int32Array.from({ length: T * K }, (_, i) => (i * 5 + (i % K) * 3) % E);
    // E · Σ_k Σ_e (share of tokens whose k-th choice is e) · (mean router probability of e)
    const loss64 = (flat: Float64Array) => {
      const share = new Float64Array(K * E);
      for (let i = 0; i < T * K; i++) share[(i % K) * E + chosen[i]] += 1 / T;
      const prob = new Float64Array(E);
      for (let t = 0; t < T; t++) softmax64(flat.subarray(t * E, (t + 1) * E)).forEach((p, e) => { prob[e] += p / T; });
      let sum = 0;
      for (let k = 0; k < K; k++) for (let e = 0; e < E; e++) sum += share[k * E + e] * prob[e];
      return E * sum;
    };
    const x = tf.tensor2d(Float32Array.from(x64), [T, E]);
    // tfjs-webgpu's OneHot always runs on the GPU, whatever holds the experts
    const experts = tf.tensor2d(chosen, [T, K], 'int32');
    await expectNoLeakAsync(async () => {
      const value = loadBalancingLoss(x, experts);
      await expectCloseAsync(value, [loss64(x64)], 1e-5, 'loss');
      const g = tf.grad((z: Tensor) => loadBalancingLoss(z as Tensor2D, experts))(x);
      await expectCloseAsync(g, finiteDifferences(loss64, x64), 1e-4, 'd loss / d logits vs finite differences', [T, E]);
      tf.dispose([value, g]);
    });
    tf.dispose([x, experts]);
  });

  it('the DSA indexer (glm_moe_dsa): MLAAttention keeps each query\'s topK keys, as transformers\' float64', async () => {
    // spec/layers/dsa_indexer.spec.ts's first case, read asynchronously
    const args = {
      numHeads: 2, qLoraRank: 6, kvLoraRank: 5, qkNopeHeadDim: 3, qkRopeHeadDim: 4, vHeadDim: 3,
      ropeTheta: 30, ropeInterleave: true, attentionBias: false, normEpsilon: 1e-6,
      indexer: { numHeads: 3, headDim: 6, topK: 3 },
    } satisfies MLAAttentionArgs;
    const [b, s, h] = [2, 6, 8];
    const layer = new MLAAttention({ ...args, name: 'attn' });
    layer.apply(tfl.input({ shape: [null, h] }));
    const rng = new Rng(7);
    const w: Record<string, Float64Array> = {};
    for (const v of layer.weights) {
      const name = v.originalName.slice('attn/'.length);
      const size = v.shape.reduce((p: number, q) => p * (q as number), 1);
      w[name] = asF32(name.includes('norm.weight') || name.includes('layernorm') ? rng.array(size, 0.3).map(t => 1 + t) :
        rng.array(size, name.includes('bias') ? 0.1 : 0.7));
      const value = tf.tensor(Float32Array.from(w[name]), v.shape as number[]);
      v.write(value);
      value.dispose();
    }
    const x = asF32(rng.array(b * s * h));
    const want = new Float64Array(b * s * h);
    const kept: number[][][] = [];
    for (let bi = 0; bi < b; bi++) {
      const r = dsaAttention64(x.slice(bi * s * h, (bi + 1) * s * h), n => w[n], {
        numHeads: args.numHeads, qkNopeHeadDim: args.qkNopeHeadDim, qkRopeHeadDim: args.qkRopeHeadDim,
        vHeadDim: args.vHeadDim, kvLoraRank: args.kvLoraRank, ropeTheta: args.ropeTheta, ropeInterleave: true,
        indexHeads: args.indexer.numHeads, indexHeadDim: args.indexer.headDim, indexTopK: args.indexer.topK,
      }, s, h);
      want.set(r.out, bi * s * h);
      kept.push(r.kept);
    }
    // the indexer really drops keys here: later queries keep 3 of up to 6
    expect(kept[0].slice(3).some(row => row.join() !== '0,1,2')).to.equal(true);
    const xt = tf.tensor3d(Float32Array.from(x), [b, s, h]);
    await expectNoLeakAsync(async () => {
      const y = layer.apply(xt) as Tensor;
      await expectCloseAsync(y, want, 1e-5, 'out', [b, s, h]);
      y.dispose();
    });
    xt.dispose();
    layer.dispose();
  });
});
