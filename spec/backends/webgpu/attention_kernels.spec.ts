/**
 * MoEAttention / MoEAttentionGrad on webgpu (src/ops/attention_core.ts; programs/tiled_attention_program.ts
 * and, with MOE_ATTENTION_PROGRAM 'rows', programs/attention_program.ts): scaledDotProductAttention
 * flash-style, no [Nq, S, L] buffer (issue 15). Value and dq, dk, dv against a float64 closed form
 * (softmax, P·V; dS = P ⊙ (dP − Σ dP ⊙ P)) and against the composed path on the same backend
 * (ATTENTION_KERNEL_FLAG off), with grouped KV heads (rep 1, 2, 4), causal and per-sample
 * packed-segment masks, fully blocked rows (also among skipped tiles), S < L (a KV cache), Dk ≠ Dv,
 * head widths 64, 128, 256 and sizes that are no multiple of a row block or a tile; programs
 * counted, workgroup memory within the device limit, no tensors left behind. The op's own spec
 * (attention_core.spec.ts, finite differences) runs on this path too. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { StepCounter } from '../../../bench/e2e/step_profile.js';
import { attentionMask, causalMask } from '../../../src/layers/attention.js';
import {
  ATTENTION, ATTENTION_GRAD, ATTENTION_KERNEL_FLAG, ATTENTION_KERNEL_MIN_BYTES, ATTENTION_KERNEL_MIN_BYTES_FLAG, scaledDotProductAttention,
} from '../../../src/ops/attention_core.js';
import { ATTENTION_PROGRAM_FLAG, TiledAttentionProgram, type AttentionProgramKind } from '../../../src/backends/webgpu/programs/tiled_attention_program.js';
import { OpArgumentError } from '../../../src/ops/validate.js';
import { maxRelativeError } from '../../../src/util/numeric.js';
import { Rng, asF32 } from '../../helpers/numeric.js';

interface Case { nq: number; nkv: number; s: number; keyLen: number; dk: number; dv: number; mask: () => tf.Tensor2D | tf.Tensor4D }

/** float64: O, and dq, dk, dv for the cotangent w, of softmax((q·kᵀ)·scale + mask)·v per query head. */
function reference64(c: Case, q: Float64Array, k: Float64Array, v: Float64Array, mask: Float64Array, maskBatch: number,
    w: Float64Array, scale: number): { o: Float64Array; dq: Float64Array; dk: Float64Array; dv: Float64Array } {
  const rep = c.nq / c.nkv;
  const o = new Float64Array(c.nq * c.s * c.dv);
  const dq = new Float64Array(q.length);
  const dk = new Float64Array(k.length);
  const dv = new Float64Array(v.length);
  for (let n = 0; n < c.nq; n++) {
    const g = Math.floor(n / rep);
    const sample = maskBatch > 0 ? Math.floor(n / (c.nq / maskBatch)) : 0;
    for (let i = 0; i < c.s; i++) {
      const row = n * c.s + i;
      const p = new Float64Array(c.keyLen);
      for (let j = 0; j < c.keyLen; j++) {
        let dot = 0;
        for (let e = 0; e < c.dk; e++) dot += q[row * c.dk + e] * k[(g * c.keyLen + j) * c.dk + e];
        const m = mask[(sample * c.s + i) * c.keyLen + j];
        // in float32 −1e9 + q·k rounds to −1e9: a fully blocked row is uniform (tf.softmax's, torch's)
        p[j] = m <= -1e8 ? m : dot * scale + m;
      }
      const max = Math.max(...p);
      let sum = 0;
      for (let j = 0; j < c.keyLen; j++) sum += (p[j] = Math.exp(p[j] - max));
      for (let j = 0; j < c.keyLen; j++) p[j] /= sum;
      const dp = new Float64Array(c.keyLen);
      let pdp = 0;
      for (let j = 0; j < c.keyLen; j++) {
        for (let e = 0; e < c.dv; e++) {
          const vj = v[(g * c.keyLen + j) * c.dv + e];
          o[row * c.dv + e] += p[j] * vj;
          dp[j] += w[row * c.dv + e] * vj;
          dv[(g * c.keyLen + j) * c.dv + e] += p[j] * w[row * c.dv + e];
        }
        pdp += dp[j] * p[j];
      }
      for (let j = 0; j < c.keyLen; j++) {
        const ds = p[j] * (dp[j] - pdp) * scale;
        for (let e = 0; e < c.dk; e++) {
          dq[row * c.dk + e] += ds * k[(g * c.keyLen + j) * c.dk + e];
          dk[(g * c.keyLen + j) * c.dk + e] += ds * q[row * c.dk + e];
        }
      }
    }
  }
  return { o, dq, dk, dv };
}

/** Runs `fn` with the composed path (ATTENTION_KERNEL_FLAG false), then the kernels again. */
async function composedPath<T>(fn: () => Promise<T>): Promise<T> {
  tf.env().set(ATTENTION_KERNEL_FLAG, false);
  try {
    return await fn();
  } finally {
    tf.env().set(ATTENTION_KERNEL_FLAG, true);
  }
}

/** Runs `fn` with the kernels' programs `kind` (MOE_ATTENTION_PROGRAM), then the default again. */
async function withPrograms<T>(kind: AttentionProgramKind, fn: () => Promise<T>): Promise<T> {
  tf.env().set(ATTENTION_PROGRAM_FLAG, kind);
  try {
    return await fn();
  } finally {
    tf.env().set(ATTENTION_PROGRAM_FLAG, 'tiled');
  }
}

/**
 * Program class and count of a training pass plus a pass without a tape, per MOE_ATTENTION_PROGRAM.
 * The 'rows' programs (kept for timing) run only the cases with narrow heads: each program set is
 * compiled per case, and on Mesa the rows programs at head 128 took 65 s to compile cold, the
 * tiled ones 28 s.
 */
const PROGRAMS: Record<AttentionProgramKind, [string, number, string]> = {
  tiled: ['TiledAttentionProgram', 7, '2 forward + 4 backward (Δ, dQ, dK, dV), then 1 without a tape'],
  rows: ['AttentionProgram', 6, '2 forward + 3 backward, then 1 without a tape'],
};

async function check(c: Case, seed: number, kinds: AttentionProgramKind[] = ['tiled', 'rows']): Promise<void> {
  const rng = new Rng(seed);
  const scale = 1 / Math.sqrt(c.dk);
  const q64 = asF32(rng.array(c.nq * c.s * c.dk));
  const k64 = asF32(rng.array(c.nkv * c.keyLen * c.dk));
  const v64 = asF32(rng.array(c.nkv * c.keyLen * c.dv));
  const w64 = asF32(rng.array(c.nq * c.s * c.dv));
  const q = tf.tensor3d(Float32Array.from(q64), [c.nq, c.s, c.dk]);
  const k = tf.tensor3d(Float32Array.from(k64), [c.nkv, c.keyLen, c.dk]);
  const v = tf.tensor3d(Float32Array.from(v64), [c.nkv, c.keyLen, c.dv]);
  const w = tf.tensor3d(Float32Array.from(w64), [c.nq, c.s, c.dv]);
  const mask = c.mask();
  const maskBatch = mask.rank === 4 ? mask.shape[0] : 0;
  const want = reference64(c, q64, k64, v64, Float64Array.from(await mask.data()), maskBatch, w64, scale);
  const before = tf.memory().numTensors;
  const pass = async () => {
    const counter = new StepCounter();
    counter.install();
    let result;
    try {
      // the value of a pass with a tape: the op's forward; then the gradients of Σ O ⊙ w
      result = tf.valueAndGrads((a: tf.Tensor, b: tf.Tensor, d: tf.Tensor) =>
        tf.sum(tf.mul(scaledDotProductAttention(a as tf.Tensor3D, b as tf.Tensor3D, d as tf.Tensor3D, mask, scale), w)))([q, k, v]);
      const noTape = scaledDotProductAttention(q, k, v, mask, scale);
      const out = { o: await noTape.data(), grads: await Promise.all(result.grads.map(g => g.data())), shapes: result.grads.map(g => g.shape) };
      tf.dispose([noTape, result.value, ...result.grads]);
      return { ...out, programs: counter.programCounts };
    } finally {
      counter.uninstall();
    }
  };
  const composed = await composedPath(pass);
  expect(composed.programs.AttentionProgram, 'the composed path runs none').to.equal(undefined);
  expect(composed.programs.TiledAttentionProgram, 'the composed path runs none').to.equal(undefined);
  for (const kind of kinds) {
    const fused = await withPrograms(kind, pass);
    const [program, count, what] = PROGRAMS[kind];
    const other = PROGRAMS[kind === 'tiled' ? 'rows' : 'tiled'][0];
    expect(fused.programs[program], `${kind}: ${program}: ${what}`).to.equal(count);
    expect(fused.programs[other], `${kind}: no ${other}`).to.equal(undefined);
    expect(maxRelativeError(fused.o, want.o), `${kind}: O against float64`).to.be.below(1e-5);
    expect(maxRelativeError(fused.o, composed.o), `${kind}: O against the composed path`).to.be.below(1e-5);
    for (const [i, name] of (['dq', 'dk', 'dv'] as const).entries()) {
      expect(fused.shapes[i], `${kind}: ${name}: shape`).to.deep.equal([q, k, v][i].shape);
      const errRef = maxRelativeError(fused.grads[i], want[name]);
      expect(errRef, `${kind}: ${name} against float64`).to.be.below(2e-5);
      const errComposed = maxRelativeError(fused.grads[i], composed.grads[i]);
      expect(errComposed, `${kind}: ${name} against the composed path`).to.be.below(2e-5);
    }
  }
  expect(tf.memory().numTensors, 'numTensors after the passes').to.equal(before);
  tf.dispose([q, k, v, w, mask]);
}

describe('webgpu: MoEAttention / MoEAttentionGrad (attention flash-style, no S×L buffer)', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    expect(tf.getKernel(ATTENTION, 'webgpu'), 'MoEAttention is registered').to.not.equal(undefined);
    expect(tf.getKernel(ATTENTION_GRAD, 'webgpu'), 'MoEAttentionGrad is registered').to.not.equal(undefined);
    // these problems are far below the size from which the package picks the kernels: force them
    tf.env().set(ATTENTION_KERNEL_MIN_BYTES_FLAG, 0);
  });

  after(() => tf.env().set(ATTENTION_KERNEL_MIN_BYTES_FLAG, ATTENTION_KERNEL_MIN_BYTES));

  it('runs the kernels from MOE_ATTENTION_KERNEL_MIN_BYTES of probabilities (Nq·S·L·4) up, the composed path below', async () => {
    const [q, k, v, mask] = [tf.ones([4, 6, 8]), tf.ones([2, 6, 8]), tf.ones([2, 6, 3]), causalMask(6, null)];
    const programsAt = async (minBytes: number) => {
      tf.env().set(ATTENTION_KERNEL_MIN_BYTES_FLAG, minBytes);
      const counter = new StepCounter();
      counter.install();
      try {
        const o = scaledDotProductAttention(q as tf.Tensor3D, k as tf.Tensor3D, v as tf.Tensor3D, mask, 0.1);
        await o.data();
        o.dispose();
      } finally {
        counter.uninstall();
        tf.env().set(ATTENTION_KERNEL_MIN_BYTES_FLAG, 0);
      }
      return counter.programCounts;
    };
    const bytes = 4 * 6 * 6 * 4;
    expect((await programsAt(bytes)).TiledAttentionProgram, `kernels at exactly ${bytes} bytes`).to.equal(1);
    const below = await programsAt(bytes + 1);
    expect(below.TiledAttentionProgram, 'no kernel one byte above the problem').to.equal(undefined);
    expect(below.MaskedSoftmaxProgram, 'the composed softmax instead').to.equal(1);
    expect(tf.env().getNumber(ATTENTION_KERNEL_MIN_BYTES_FLAG), 'the spec keeps its own setting').to.equal(0);
    tf.dispose([q, k, v, mask]);
  });


  it('one query head per KV head (rep 1), causal [S, S], 70 rows: past a 64-row workgroup and the key tile', async () => {
    await check({ nq: 2, nkv: 2, s: 70, keyLen: 70, dk: 8, dv: 8, mask: () => causalMask(70, null) }, 11);
  });

  it('rep 4, per-sample packed segments [B, 1, S, S] (2 samples), with a sliding window', async () => {
    const ids = tf.tensor2d([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], [2, 13], 'int32');
    await check({ nq: 16, nkv: 4, s: 13, keyLen: 13, dk: 16, dv: 16, mask: () => attentionMask(13, 4, ids) }, 12);
    ids.dispose();
  });

  it('a KV cache: 5 new queries over 83 keys [S, L], Dk 12 ≠ Dv 20 (MLA), rep 2', async () => {
    await check({ nq: 4, nkv: 2, s: 5, keyLen: 83, dk: 12, dv: 20, mask: () => causalMask(5, null, 83, 78) }, 13);
  });

  it('head width 128 (Qwen3, OLMoE), rep 2, 33 positions', async () => {
    await check({ nq: 4, nkv: 2, s: 33, keyLen: 33, dk: 128, dv: 128, mask: () => causalMask(33, null) }, 14, ['tiled']);
  });

  it('head width 256 for keys, 64 for values (the widest the kernels take), 9 positions', async () => {
    await check({ nq: 1, nkv: 1, s: 9, keyLen: 9, dk: 256, dv: 64, mask: () => causalMask(9, null) }, 16, ['tiled']);
  });

  it('head width 64, rep 4, per-sample packed segments, 100 positions: several row blocks, key tiles skipped', async () => {
    const ids = tf.tensor2d([...Array(200).keys()].map(i => (i < 100 ? Math.floor(i / 37) : Math.floor((i - 100) / 61))), [2, 100], 'int32');
    await check({ nq: 8, nkv: 2, s: 100, keyLen: 100, dk: 64, dv: 64, mask: () => attentionMask(100, null, ids) }, 17, ['tiled']);
    ids.dispose();
  });

  it('fully blocked rows among causal rows whose tiles are skipped: the block is run again without skipping', async () => {
    const s = 70;
    const data = Float32Array.from(await causalMask(s, null).array().then(rows => rows.flat()));
    for (let j = 0; j < s; j++) {
      data[5 * s + j] = -1e9;                             // blocked everywhere
      data[40 * s + j] = j % 2 === 0 ? -2e9 : -1e9;       // two masks added on half of the keys
    }
    data[60 * s + 66] = 0;                                // one key past the diagonal open
    await check({ nq: 2, nkv: 1, s, keyLen: s, dk: 128, dv: 128, mask: () => tf.tensor2d(data, [s, s]) }, 19, ['tiled']);
  });

  it('the tiled programs declare no more workgroup memory than the device limit they are given (16 KiB, 48 KiB)', () => {
    const bytesOf = (wgsl: string) => [...wgsl.matchAll(/var<workgroup> \w+ : (?:array<(\w+), (\d+)>|i32);/g)]
      .reduce((sum, [, type, count]) => sum + (type === undefined ? 4 : (type === 'V' && /alias V = vec4/.test(wgsl) ? 16 : 4) * Number(count)), 0);
    for (const limit of [16384, 49152]) {
      for (const [dk, dv] of [[64, 64], [128, 128], [256, 256], [256, 64], [12, 20], [4, 3]]) {
        for (const pass of ['forward', 'stats', 'gradQ', 'gradK', 'gradV'] as const) {
          const program = new TiledAttentionProgram(pass, { nkv: 2, rep: 4, seqLen: 100, keyLen: 100, dk, dv, maskBatch: 0 }, limit);
          const bytes = bytesOf(program.getUserCode());
          expect(bytes, `${pass} ${dk}/${dv} at ${limit}`).to.be.within(1, limit);
          // the tile is the largest that fits: twice as many rows would not
          if (program.layout.tile < 32) expect(bytes * 2 - 64, `${pass} ${dk}/${dv} at ${limit}: tile ${program.layout.tile}`).to.be.above(limit - 64);
        }
      }
    }
  });

  it('an unknown MOE_ATTENTION_PROGRAM is an error naming the flag', async () => {
    const [q, k, v, mask] = [tf.ones([1, 2, 4]), tf.ones([1, 2, 4]), tf.ones([1, 2, 4]), causalMask(2, null)];
    tf.env().set(ATTENTION_PROGRAM_FLAG, 'fast');
    try {
      expect(() => scaledDotProductAttention(q as tf.Tensor3D, k as tf.Tensor3D, v as tf.Tensor3D, mask, 0.5))
        .to.throw(OpArgumentError, "`scaledDotProductAttention()`: tf.env() flag MOE_ATTENTION_PROGRAM must be 'tiled' or 'rows' but got");
    } finally {
      tf.env().set(ATTENTION_PROGRAM_FLAG, 'tiled');
    }
    tf.dispose([q, k, v, mask]);
  });

  it('a head wider than 256 runs the composed path', async () => {
    const [q, k, v, mask] = [tf.ones([1, 2, 257]), tf.ones([1, 2, 257]), tf.ones([1, 2, 3]), causalMask(2, null)];
    const counter = new StepCounter();
    counter.install();
    try {
      const o = scaledDotProductAttention(q as tf.Tensor3D, k as tf.Tensor3D, v as tf.Tensor3D, mask, 0.1);
      expect(Array.from(await o.data()), 'ones everywhere').to.deep.equal([1, 1, 1, 1, 1, 1]);
      o.dispose();
    } finally {
      counter.uninstall();
    }
    expect(counter.programCounts.TiledAttentionProgram).to.equal(undefined);
    expect(counter.programCounts.MaskedSoftmaxProgram).to.equal(1);
    tf.dispose([q, k, v, mask]);
  });

  it('fully blocked rows (−1e9 everywhere; −2e9 where two masks add) spread evenly, as the composed softmax does', async () => {
    const blocked = [[0, -1e9, -1e9, 0], [-1e9, -1e9, -1e9, -1e9], [-2e9, -1e9, -2e9, -1e9]];
    await check({ nq: 2, nkv: 1, s: 3, keyLen: 4, dk: 4, dv: 3, mask: () => tf.tensor2d(blocked) }, 15);
  });
});
