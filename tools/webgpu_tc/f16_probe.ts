/**
 * Is the tensor-core path's error on the gpt_oss fixture (run Q: materialize dx 1.1e-2, dA/dB
 * gate_up 1.3e-2 / 2.0e-2; split <= 1.9e-3) f16 rounding alone? A float64 JS emulation of the
 * fixture's MoE block (contract.ts's setup: r 4 LoRA, scaling 2, on gate_up and down, seeds 11 and
 * 13) in which each expert product rounds both operands (f16 round-to-nearest-even, or bf16) and
 * sums in f64, as the subgroup-matrix programs do (f16 inputs, f32 sums):
 *   materialize: h = x·(W1 + s·B1·A1)ᵀ, y = a·(W2 + s·B2·A2)ᵀ, dx/da through the merged weights,
 *                dW_eff = dhᵀ·x, dyᵀ·a (the tensor-core weight gradient), dA = s·Bᵀ·dW_eff, dB = s·dW_eff·Aᵀ;
 *   split:       the base products rounded, the rank-r ones unrounded.
 * Gradient operands (dy, da, dh) are rounded to 11 (bf16: 8) significant bits with no range
 * limit, as the programs scale them by a power of two first; weights and activations to real f16
 * (subnormals, overflow). The router is f32 on the device and unrounded here.
 * Beside each rounded run, the same run with the clamp masks taken from the unrounded h
 * ('masks fixed'): what is left without the clamp flips. The unrounded f64 block is first checked
 * against the fused op on the cpu backend (f32).
 *
 *   npx tsx tools/webgpu_tc/f16_probe.ts
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs-layers';  // the gradients
import { join } from 'node:path';
import { blockLayerIndex, loadMoEBlockWeights } from '../../src/io/hf_block.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { type HFConfig, moeBlockConfigFromHF } from '../../src/models/families.js';
import { moeBlock } from '../../src/ops/moe_block.js';
import type { LoRAMode } from '../../src/ops/types.js';
import { readJSONFile } from '../../src/util/files.js';
import { maxRelativeError } from '../../src/util/numeric.js';

const FIXTURE_DIR = 'spec/fixtures/hf/gpt_oss';
const LORA_RANK = 4;
const LORA_SCALING = 2;
/** the unrounded f64 block against the fused cpu op (f32 sums over at most 64 terms) */
const SELF_CHECK = 1e-5;
const TENSORS = ['out', 'dx', 'dRouter', 'dA gate_up', 'dB gate_up', 'dA down', 'dB down'];

type Format = 'none' | 'f16' | 'bf16';

/** v rounded to `bits` significant bits, round-to-nearest-even, no exponent limit. */
function roundBits(v: number, bits: number): number {
  if (v === 0 || !Number.isFinite(v)) return v;
  const ulp = 2 ** (Math.floor(Math.log2(Math.abs(v))) - (bits - 1));
  return roundTiesEven(v / ulp) * ulp;
}

/** v as IEEE f16: round-to-nearest-even, subnormals (spacing 2^-24) below 2^-14, ±Infinity above 65504. */
function toF16(v: number): number {
  const r = Math.abs(v) < 2 ** -14 ? roundTiesEven(v / 2 ** -24) * 2 ** -24 : roundBits(v, 11);
  return Math.abs(r) > 65504 ? Math.sign(r) * Infinity : r;
}

function roundTiesEven(q: number): number {
  return Math.abs(q - Math.trunc(q)) === 0.5 ? 2 * Math.round(q / 2) : Math.round(q);
}

/** An operand as the tensor-core program sees it: weights/activations in the format, gradients scaled first. */
function operand(values: Float64Array, format: Format, gradient: boolean): Float64Array {
  if (format === 'none') return values;
  const bits = format === 'f16' ? 11 : 8;
  return values.map(v => (format === 'f16' && !gradient ? toF16(v) : roundBits(v, bits)));
}

/** C [m, n] = A [m, k] · B [k, n] with A, B given by element functions, f64 sums. */
function matMul(m: number, k: number, n: number, a: (i: number, p: number) => number, b: (p: number, j: number) => number): Float64Array {
  const c = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let sum = 0;
      for (let p = 0; p < k; p++) sum += a(i, p) * b(p, j);
      c[i * n + j] = sum;
    }
  }
  return c;
}

interface Block {
  T: number; H: number; I: number; E: number; K: number; r: number;
  alpha: number; limit: number;
  x: Float64Array; g: Float64Array; router: Float64Array; routerBias: Float64Array;
  /** per expert, [2I, H] and [H, I] (out × in, gate_up's interleaved column order kept) */
  w1: Float64Array[]; w2: Float64Array[]; b1: Float64Array; b2: Float64Array;
  /** PEFT layouts: A [r·E, in], B [out, r·E] */
  a1: Float64Array; bB1: Float64Array; a2: Float64Array; bB2: Float64Array;
}

interface Variant { format: Format; loraMode: LoRAMode; fixedMasks?: Uint8Array[] }
interface Result { tensors: Float64Array[]; h: Float64Array[]; rows: number[][]; masks: Uint8Array[] }

/** Expert e's A_e [r, in] and B_e [out, r] from A [r·E, in], B [out, r·E] (B's columns j·E + e). */
function factors(b: Block, A: Float64Array, B: Float64Array, e: number, inSize: number, outSize: number): [Float64Array, Float64Array] {
  const ae = A.slice(e * b.r * inSize, (e + 1) * b.r * inSize);
  const be = new Float64Array(outSize * b.r);
  for (let o = 0; o < outSize; o++) for (let j = 0; j < b.r; j++) be[o * b.r + j] = B[o * b.r * b.E + j * b.E + e];
  return [ae, be];
}

/**
 * The block's output and gradients in TENSORS order. masks[e] [n, 2I]: 1 where the clamp passes
 * the gradient (gate <= limit; −limit <= up <= limit); `fixedMasks` replaces them.
 */
function runBlock(b: Block, v: Variant): Result {
  const { T, H, I, E, K, r, alpha, limit } = b;
  const s = LORA_SCALING;
  const logits = matMul(T, H, E, (t, p) => b.x[t * H + p], (p, e) => b.router[e * H + p]).map((l, i) => l + b.routerBias[i % E]);
  // top-K by logit, softmax over the chosen
  const chosen: number[][] = [];
  const weights: number[][] = [];
  for (let t = 0; t < T; t++) {
    const order = [...Array(E).keys()].sort((p, q) => logits[t * E + q] - logits[t * E + p]).slice(0, K);
    const top = Math.max(...order.map(e => logits[t * E + e]));
    const ex = order.map(e => Math.exp(logits[t * E + e] - top));
    const sum = ex.reduce((p, q) => p + q, 0);
    chosen.push(order);
    weights.push(ex.map(z => z / sum));
  }
  const out = new Float64Array(T * H);
  const dx = new Float64Array(T * H);
  const dRouter = new Float64Array(E * H);
  const dA1 = new Float64Array(r * E * H); const dB1 = new Float64Array(2 * I * r * E);
  const dA2 = new Float64Array(r * E * I); const dB2 = new Float64Array(H * r * E);
  const dw = [...Array(T)].map(() => new Float64Array(K));
  const hs: Float64Array[] = []; const rowsOf: number[][] = []; const masks: Uint8Array[] = [];
  const rd = (m: Float64Array) => operand(m, v.format, false);
  const rg = (m: Float64Array) => operand(m, v.format, true);
  for (let e = 0; e < E; e++) {
    const pairs: Array<[number, number]> = [];
    for (let t = 0; t < T; t++) chosen[t].forEach((c, k) => { if (c === e) pairs.push([t, k]); });
    const n = pairs.length;
    rowsOf.push(pairs.map(([t]) => t));
    const xe = new Float64Array(n * H);
    pairs.forEach(([t], i) => xe.set(b.x.subarray(t * H, (t + 1) * H), i * H));
    const [a1, bb1] = factors(b, b.a1, b.bB1, e, H, 2 * I);   // [r, H], [2I, r]
    const [a2, bb2] = factors(b, b.a2, b.bB2, e, I, H);       // [r, I], [H, r]
    const materialize = v.loraMode === 'materialize';
    const merged = (w: Float64Array, be: Float64Array, ae: Float64Array, out: number, inSize: number) => !materialize ? w :
      matMul(out, r, inSize, (o, j) => be[o * r + j], (j, i) => ae[j * inSize + i]).map((d, i) => w[i] + s * d);
    const w1 = merged(b.w1[e], bb1, a1, 2 * I, H);             // [2I, H]
    const w2 = merged(b.w2[e], bb2, a2, H, I);                 // [H, I]
    // h = x·W1ᵀ (+ s·(x·A1ᵀ)·B1ᵀ in split) + b1
    const xr = rd(xe); const w1r = rd(w1);
    const h = matMul(n, H, 2 * I, (i, p) => xr[i * H + p], (p, o) => w1r[o * H + p]);
    const u1 = matMul(n, H, r, (i, p) => xe[i * H + p], (p, j) => a1[j * H + p]);  // [n, r] (split)
    if (!materialize) {
      const low = matMul(n, r, 2 * I, (i, j) => u1[i * r + j], (j, o) => bb1[o * r + j]);
      h.forEach((_, i) => { h[i] += s * low[i]; });
    }
    h.forEach((_, i) => { h[i] += b.b1[e * 2 * I + (i % (2 * I))]; });
    hs.push(h);
    // a = (clamp(up) + 1)·g·σ(αg), g = min(gate, limit); gate = even columns, up = odd
    const act = new Float64Array(n * I);
    const mask = new Uint8Array(n * 2 * I);
    for (let i = 0; i < n; i++) {
      for (let c = 0; c < I; c++) {
        const gate = h[i * 2 * I + 2 * c]; const up = h[i * 2 * I + 2 * c + 1];
        const gc = Math.min(gate, limit); const uc = Math.min(Math.max(up, -limit), limit);
        act[i * I + c] = (uc + 1) * gc / (1 + Math.exp(-alpha * gc));
        mask[i * 2 * I + 2 * c] = gate <= limit ? 1 : 0;
        mask[i * 2 * I + 2 * c + 1] = up >= -limit && up <= limit ? 1 : 0;
      }
    }
    masks.push(mask);
    const ar = rd(act); const w2r = rd(w2);
    const y = matMul(n, I, H, (i, c) => ar[i * I + c], (c, o) => w2r[o * I + c]);
    const u2 = matMul(n, I, r, (i, c) => act[i * I + c], (c, j) => a2[j * I + c]);  // [n, r] (split)
    if (!materialize) {
      const low = matMul(n, r, H, (i, j) => u2[i * r + j], (j, o) => bb2[o * r + j]);
      y.forEach((_, i) => { y[i] += s * low[i]; });
    }
    // out[t] += w·y; dw = ⟨G_t, y⟩; dy = w·G_t
    const dy = new Float64Array(n * H);
    pairs.forEach(([t, k], i) => {
      const w = weights[t][k];
      let dot = 0;
      for (let o = 0; o < H; o++) {
        const yo = y[i * H + o] + b.b2[e * H + o];
        out[t * H + o] += w * yo;
        dot += b.g[t * H + o] * yo;
        dy[i * H + o] = w * b.g[t * H + o];
      }
      dw[t][k] = dot;
    });
    // down backward: da = dy·W2 (+ s·(dy·B2)·A2), LoRA factors' gradients
    const dyr = rg(dy);
    const da = matMul(n, H, I, (i, o) => dyr[i * H + o], (o, c) => w2r[o * I + c]);
    const dyB2 = matMul(n, H, r, (i, o) => dy[i * H + o], (o, j) => bb2[o * r + j]);  // [n, r]
    if (materialize) {
      const dW2 = matMul(H, n, I, (o, i) => dyr[i * H + o], (i, c) => ar[i * I + c]);  // [H, I] tensor cores
      addFactorGrads(b, e, dW2, a2, bb2, H, I, dA2, dB2);
    } else {
      const low = matMul(n, r, I, (i, j) => dyB2[i * r + j], (j, c) => a2[j * I + c]);
      da.forEach((_, i) => { da[i] += s * low[i]; });
      addSplitGrads(b, e, dy, dyB2, act, u2, n, H, I, dA2, dB2);
    }
    // activation backward (clamps pass the gradient inside the limits, boundaries included)
    const m = v.fixedMasks?.[e] ?? mask;
    const dh = new Float64Array(n * 2 * I);
    for (let i = 0; i < n; i++) {
      for (let c = 0; c < I; c++) {
        const gate = h[i * 2 * I + 2 * c]; const up = h[i * 2 * I + 2 * c + 1];
        const gc = Math.min(gate, limit); const uc = Math.min(Math.max(up, -limit), limit);
        const sig = 1 / (1 + Math.exp(-alpha * gc));
        const dGlu = sig * (1 + alpha * gc * (1 - sig));
        dh[i * 2 * I + 2 * c] = da[i * I + c] * (uc + 1) * dGlu * m[i * 2 * I + 2 * c];
        dh[i * 2 * I + 2 * c + 1] = da[i * I + c] * gc * sig * m[i * 2 * I + 2 * c + 1];
      }
    }
    // up backward: dx = dh·W1 (+ s·(dh·B1)·A1)
    const dhr = rg(dh);
    const dxe = matMul(n, 2 * I, H, (i, o) => dhr[i * 2 * I + o], (o, p) => w1r[o * H + p]);
    const dhB1 = matMul(n, 2 * I, r, (i, o) => dh[i * 2 * I + o], (o, j) => bb1[o * r + j]);  // [n, r]
    if (materialize) {
      const dW1 = matMul(2 * I, n, H, (o, i) => dhr[i * 2 * I + o], (i, p) => xr[i * H + p]);  // [2I, H] tensor cores
      addFactorGrads(b, e, dW1, a1, bb1, 2 * I, H, dA1, dB1);
    } else {
      const low = matMul(n, r, H, (i, j) => dhB1[i * r + j], (j, p) => a1[j * H + p]);
      dxe.forEach((_, i) => { dxe[i] += s * low[i]; });
      addSplitGrads(b, e, dh, dhB1, xe, u1, n, 2 * I, H, dA1, dB1);
    }
    pairs.forEach(([t], i) => { for (let p = 0; p < H; p++) dx[t * H + p] += dxe[i * H + p]; });
  }
  // routing backward: softmax over the chosen logits, then the router's linear map
  for (let t = 0; t < T; t++) {
    const mean = weights[t].reduce((sum, w, k) => sum + w * dw[t][k], 0);
    chosen[t].forEach((e, k) => {
      const dLogit = weights[t][k] * (dw[t][k] - mean);
      for (let p = 0; p < H; p++) {
        dRouter[e * H + p] += dLogit * b.x[t * H + p];
        dx[t * H + p] += dLogit * b.router[e * H + p];
      }
    });
  }
  return { tensors: [out, dx, dRouter, dA1, dB1, dA2, dB2], h: hs, rows: rowsOf, masks };
}

/** materialize: dA_e = s·B_eᵀ·dW_eff [r, in], dB_e = s·dW_eff·A_eᵀ [out, r], into PEFT's layouts. */
function addFactorGrads(b: Block, e: number, dW: Float64Array, ae: Float64Array, be: Float64Array, out: number, inSize: number,
    dA: Float64Array, dB: Float64Array): void {
  const r = b.r;
  const da = matMul(r, out, inSize, (j, o) => be[o * r + j], (o, i) => dW[o * inSize + i]);
  const db = matMul(out, inSize, r, (o, i) => dW[o * inSize + i], (i, j) => ae[j * inSize + i]);
  da.forEach((d, i) => { dA[e * r * inSize + i] += LORA_SCALING * d; });
  for (let o = 0; o < out; o++) for (let j = 0; j < r; j++) dB[o * r * b.E + j * b.E + e] += LORA_SCALING * db[o * r + j];
}

/** split (unrounded rank-r products): dA_e = s·(d·B_e)ᵀ·in [r, in], dB_e = s·dᵀ·(in·A_eᵀ) [out, r]. */
function addSplitGrads(b: Block, e: number, d: Float64Array, dB_: Float64Array, input: Float64Array, u: Float64Array,
    n: number, out: number, inSize: number, dA: Float64Array, dB: Float64Array): void {
  const r = b.r;
  const da = matMul(r, n, inSize, (j, i) => dB_[i * r + j], (i, p) => input[i * inSize + p]);
  const db = matMul(out, n, r, (o, i) => d[i * out + o], (i, j) => u[i * r + j]);
  da.forEach((v, i) => { dA[e * r * inSize + i] += LORA_SCALING * v; });
  for (let o = 0; o < out; o++) for (let j = 0; j < r; j++) dB[o * r * b.E + j * b.E + e] += LORA_SCALING * db[o * r + j];
}

const f64 = (t: tf.Tensor) => Float64Array.from(t.dataSync());
const fmt = (errors: number[]) => TENSORS.map((name, i) => `${name} ${errors[i].toExponential(1)}`).join(', ');

async function main(): Promise<void> {
  await tf.setBackend('cpu');
  const hf = await readJSONFile(join(FIXTURE_DIR, 'config.json'), 'fixture config') as HFConfig;
  const meta = await readJSONFile(join(FIXTURE_DIR, 'golden.json'), 'fixture golden.json') as { block: string };
  const golden = await readSafetensorsFile(join(FIXTURE_DIR, 'golden.safetensors'));
  const model = await readSafetensorsFile(join(FIXTURE_DIR, 'model.safetensors'));
  const weights = await loadMoEBlockWeights(model, hf, blockLayerIndex(meta.block));
  const config = moeBlockConfigFromHF(hf);
  const activation = config.activation;
  if (activation.kind !== 'clampedSwiglu' || weights.experts.layout !== 'inOutInterleaved') {
    throw new Error(`f16_probe: expected gpt_oss's clampedSwiglu and 'inOutInterleaved' but got ${activation.kind}, ${weights.experts.layout}`);
  }
  const H = hf.hidden_size as number;
  const x = tf.reshape(await golden.tensor('block.x'), [-1, H]) as tf.Tensor2D;  // [T, H]
  const g = tf.reshape(await golden.tensor('block.g'), [-1, H]) as tf.Tensor2D;  // [T, H]
  const gateUp = weights.experts.gateUp as tf.Tensor3D;  // [E, H, 2I]
  const down = weights.experts.down as tf.Tensor3D;      // [E, I, H]
  const [E, , twoI] = gateUp.shape;
  const I = twoI / 2;
  const rE = LORA_RANK * E;
  // contract.ts's factors
  const A1 = tf.randomNormal([rE, H], 0, 1 / Math.sqrt(H), 'float32', 11) as tf.Tensor2D;
  const B1 = tf.randomNormal([twoI, rE], 0, 0.1, 'float32', 12) as tf.Tensor2D;
  const A2 = tf.randomNormal([rE, I], 0, 1 / Math.sqrt(I), 'float32', 13) as tf.Tensor2D;
  const B2 = tf.randomNormal([H, rE], 0, 0.1, 'float32', 14) as tf.Tensor2D;
  const perExpert = (w: tf.Tensor3D) => tf.unstack(tf.transpose(w, [0, 2, 1])).map(f64);  // out × in
  const block: Block = {
    T: x.shape[0], H, I, E, K: config.routing.topK as number, r: LORA_RANK, alpha: activation.alpha, limit: activation.limit,
    x: f64(x), g: f64(g), router: f64(weights.router.weight), routerBias: f64(weights.router.bias!),
    w1: perExpert(gateUp), w2: perExpert(down), b1: f64(weights.experts.gateUpBias!), b2: f64(weights.experts.downBias!),
    a1: f64(A1), bB1: f64(B1), a2: f64(A2), bB2: f64(B2),
  };
  console.log(`gpt_oss block: T ${block.T} H ${H} I ${I} E ${E} K ${block.K}, LoRA r ${LORA_RANK} scaling ${LORA_SCALING}, ` +
      `clamp limit ${block.limit} alpha ${block.alpha}`);
  const ulp7 = 2 ** (2 - 10);  // f16 spacing in [4, 8)
  for (const loraMode of ['materialize', 'split'] as LoRAMode[]) {
    // the probe's own check: the unrounded f64 block against the fused op on the cpu backend (f32)
    const f = (xs: tf.Tensor, router: tf.Tensor, a1: tf.Tensor, b1: tf.Tensor, a2: tf.Tensor, b2: tf.Tensor) => {
      const { out, routing } = moeBlock(xs as tf.Tensor2D, {
        ...weights, router: { ...weights.router, weight: router as tf.Tensor2D },
        experts: {
          ...weights.experts,
          gateUpLoRA: [{ A: a1 as tf.Tensor2D, B: b1 as tf.Tensor2D, scaling: LORA_SCALING }],
          downLoRA: [{ A: a2 as tf.Tensor2D, B: b2 as tf.Tensor2D, scaling: LORA_SCALING }],
        },
      }, config, { expertKernel: 'fused', loraMode });
      tf.dispose([routing.weights, routing.experts, routing.logits]);
      return out;
    };
    const { value, grads } = tf.valueAndGrads(f)([x, weights.router.weight, A1, B1, A2, B2], g);
    const fused = [value, ...grads].map(t => t.dataSync());
    tf.dispose([value, ...grads]);
    const exact = runBlock(block, { format: 'none', loraMode });
    const checkErrors = exact.tensors.map((t, i) => maxRelativeError(fused[i], t));
    console.log(`${loraMode} check, f64 emulation unrounded vs fused cpu f32: ${fmt(checkErrors)}`);
    if (!checkErrors.every(e => e <= SELF_CHECK)) {
      throw new Error(`the unrounded emulation differs from the fused op by more than ${SELF_CHECK} (${loraMode}): a bug in this probe`);
    }
    for (const format of ['f16', 'bf16'] as Format[]) {
      const rounded = runBlock(block, { format, loraMode });
      console.log(`${loraMode} ${format} operands vs unrounded: ${fmt(rounded.tensors.map((t, i) => maxRelativeError(t, exact.tensors[i])))}`);
      const fixed = runBlock(block, { format, loraMode, fixedMasks: exact.masks });
      console.log(`${loraMode} ${format} operands, clamp masks of the unrounded h: ` +
          fmt(fixed.tensors.map((t, i) => maxRelativeError(t, exact.tensors[i]))));
      // clamp flips: elements whose gradient mask differs between the rounded and the unrounded h
      let near = 0; let elements = 0;
      const flips: string[] = [];
      const flipTokens = new Set<number>();
      exact.h.forEach((h, e) => h.forEach((value, i) => {
        elements++;
        const isGate = i % 2 === 0;
        if (isGate ? Math.abs(value - block.limit) <= ulp7 : Math.abs(Math.abs(value) - block.limit) <= ulp7) near++;
        if (rounded.masks[e][i] !== exact.masks[e][i]) {
          const token = exact.rows[e][Math.floor(i / twoI)];
          flipTokens.add(token);
          flips.push(`expert ${e} token ${token} ${isGate ? 'gate' : 'up'} ${Math.floor((i % twoI) / 2)}: ` +
              `h ${value.toFixed(5)} unrounded, ${rounded.h[e][i].toFixed(5)} rounded`);
        }
      }));
      // the token with dx's largest error
      const dxError = rounded.tensors[1].map((d, i) => Math.abs(d - exact.tensors[1][i]));
      const worstToken = Math.floor(dxError.indexOf(Math.max(...dxError)) / H);
      console.log(`${loraMode} ${format}: of ${elements} gate/up pre-activations ${near} lie within an f16 ulp (${ulp7}) of ` +
          `the clamp; the rounding flips the clamp of ${flips.length}${flips.length > 0 ? ` (${flips.join('; ')})` : ''}; ` +
          `dx's largest error is at token ${worstToken}${flipTokens.has(worstToken) ? ', a flipped one' : ''}`);
    }
  }
  tf.dispose([x, g, A1, B1, A2, B2, gateUp, down, weights.router.weight, weights.router.bias!,
    weights.experts.gateUpBias!, weights.experts.downBias!]);
}

main().catch(err => {
  console.error(`f16_probe: ${(err as Error)?.stack ?? err}`);
  process.exit(1);
});
