/**
 * The arithmetic of this package's MoE kernels on plain typed arrays, shared by the cpu kernels
 * (each tensor's own array) and the wasm kernels (the wasm heap, addressed by offset). Every
 * operand is (array, offset) with row-major, contiguous rows. Accumulations that feed one output
 * element run in float64 (JS numbers), so results are at least as accurate as tfjs's float32.
 */

type F32 = Float32Array;

/**
 * C[m, n] = alpha·A[m, k]·B[k, n], or C += that with `accumulate`. Two rows of A and four of B
 * per step: each loaded B element feeds two rows and each C element is loaded and stored once per
 * four k, which is what V8's scalar code is bound by (about 4x tfjs-cpu's matMul on this machine).
 * Best for wide outputs; see gemmNT for narrow ones.
 */
export function gemm(
    m: number, k: number, n: number, A: F32, aOff: number, B: F32, bOff: number, C: F32, cOff: number,
    accumulate = false, alpha = 1): void {
  if (!accumulate) C.fill(0, cOff, cOff + m * n);
  const k4 = k - (k % 4);
  let i = 0;
  for (; i + 1 < m; i += 2) {
    const c0 = cOff + i * n;
    const c1 = c0 + n;
    const r0 = aOff + i * k;
    const r1 = r0 + k;
    let p = 0;
    for (; p < k4; p += 4) {
      const a00 = alpha * A[r0 + p], a01 = alpha * A[r0 + p + 1], a02 = alpha * A[r0 + p + 2], a03 = alpha * A[r0 + p + 3];
      const a10 = alpha * A[r1 + p], a11 = alpha * A[r1 + p + 1], a12 = alpha * A[r1 + p + 2], a13 = alpha * A[r1 + p + 3];
      const b0 = bOff + p * n, b1 = b0 + n, b2 = b1 + n, b3 = b2 + n;
      for (let j = 0; j < n; j++) {
        const x0 = B[b0 + j], x1 = B[b1 + j], x2 = B[b2 + j], x3 = B[b3 + j];
        C[c0 + j] += a00 * x0 + a01 * x1 + a02 * x2 + a03 * x3;
        C[c1 + j] += a10 * x0 + a11 * x1 + a12 * x2 + a13 * x3;
      }
    }
    for (; p < k; p++) {
      const a0 = alpha * A[r0 + p], a1 = alpha * A[r1 + p];
      const b0 = bOff + p * n;
      for (let j = 0; j < n; j++) {
        const x = B[b0 + j];
        C[c0 + j] += a0 * x;
        C[c1 + j] += a1 * x;
      }
    }
  }
  if (i < m) {
    const c0 = cOff + i * n;
    const r0 = aOff + i * k;
    for (let p = 0; p < k; p++) {
      const a0 = alpha * A[r0 + p];
      const b0 = bOff + p * n;
      for (let j = 0; j < n; j++) C[c0 + j] += a0 * B[b0 + j];
    }
  }
}

/**
 * C[m, n] = alpha·A[m, k]·Btᵀ (Bt [n, k]), or C += that with `accumulate`: dot products along
 * contiguous rows of both operands, two by two. For narrow outputs (LoRA's rank-r products),
 * where gemm's inner loop would be only n long.
 */
export function gemmNT(
    m: number, k: number, n: number, A: F32, aOff: number, Bt: F32, btOff: number, C: F32, cOff: number,
    accumulate = false, alpha = 1): void {
  for (let i = 0; i < m; i += 2) {
    const two = i + 1 < m;
    const r0 = aOff + i * k;
    const r1 = two ? r0 + k : r0;
    for (let j = 0; j < n; j += 2) {
      const twoJ = j + 1 < n;
      const q0 = btOff + j * k;
      const q1 = twoJ ? q0 + k : q0;
      let s00 = 0, s01 = 0, s10 = 0, s11 = 0;
      for (let p = 0; p < k; p++) {
        const x0 = A[r0 + p], x1 = A[r1 + p], y0 = Bt[q0 + p], y1 = Bt[q1 + p];
        s00 += x0 * y0; s01 += x0 * y1; s10 += x1 * y0; s11 += x1 * y1;
      }
      const o0 = cOff + i * n + j;
      const o1 = o0 + n;
      C[o0] = (accumulate ? C[o0] : 0) + alpha * s00;
      if (twoJ) C[o0 + 1] = (accumulate ? C[o0 + 1] : 0) + alpha * s01;
      if (two) {
        C[o1] = (accumulate ? C[o1] : 0) + alpha * s10;
        if (twoJ) C[o1 + 1] = (accumulate ? C[o1 + 1] : 0) + alpha * s11;
      }
    }
  }
}

/** Outputs at most this wide go through gemmNT. */
export const NARROW = 16;

/** dst[cols, rows] = src[rows, cols]ᵀ (see gatherTransposeInto). */
export function transposeInto(rows: number, cols: number, src: F32, sOff: number, dst: F32, dOff: number): void {
  gatherTransposeInto(rows, cols, src, sOff, null, 0, 0, dst, dOff);
}

/**
 * dst[n, cols] = src rows idx[start], …, idx[start + n − 1] (a row gather); with `idx` null the
 * rows start … start + n − 1 themselves.
 */
export function gatherRowsInto(
    n: number, cols: number, src: F32, sOff: number, idx: Int32Array | null, idxOff: number, start: number,
    dst: F32, dOff: number): void {
  for (let r = 0; r < n; r++) {
    const row = idx === null ? start + r : idx[idxOff + start + r];
    const s = sOff + row * cols;
    const d = dOff + r * cols;
    if (src === dst) {
      dst.copyWithin(d, s, s + cols);
    } else {
      dst.set(src.subarray(s, s + cols), d);
    }
  }
}

/**
 * dst[cols, n] = (gathered rows, as in gatherRowsInto)ᵀ. Eight source rows at a time: each
 * destination row gets eight neighbouring writes per pass and the eight source rows stream in
 * order: about 0.8 ns an element in V8 against 2.3 for 32×32 tiles of single writes (256×256 on
 * the benchmark box, docs/benchmarks.md "wasm, third pass"); a pure copy, the values unchanged.
 */
export function gatherTransposeInto(
    n: number, cols: number, src: F32, sOff: number, idx: Int32Array | null, idxOff: number, start: number,
    dst: F32, dOff: number): void {
  const rowAt = (r: number) => sOff + (idx === null ? start + r : idx[idxOff + start + r]) * cols;
  let r = 0;
  for (; r + 8 <= n; r += 8) {
    const s0 = rowAt(r), s1 = rowAt(r + 1), s2 = rowAt(r + 2), s3 = rowAt(r + 3);
    const s4 = rowAt(r + 4), s5 = rowAt(r + 5), s6 = rowAt(r + 6), s7 = rowAt(r + 7);
    for (let c = 0, d = dOff + r; c < cols; c++, d += n) {
      dst[d] = src[s0 + c];
      dst[d + 1] = src[s1 + c];
      dst[d + 2] = src[s2 + c];
      dst[d + 3] = src[s3 + c];
      dst[d + 4] = src[s4 + c];
      dst[d + 5] = src[s5 + c];
      dst[d + 6] = src[s6 + c];
      dst[d + 7] = src[s7 + c];
    }
  }
  for (; r < n; r++) {
    const s = rowAt(r);
    for (let c = 0, d = dOff + r; c < cols; c++, d += n) dst[d] = src[s + c];
  }
}

/** y[n, m] += bias[m] on every row. */
export function addRowVector(n: number, m: number, y: F32, yOff: number, bias: F32, bOff: number): void {
  for (let r = 0; r < n; r++) {
    const o = yOff + r * m;
    for (let j = 0; j < m; j++) y[o + j] += bias[bOff + j];
  }
}

/** y[i] = alpha·y[i] (+ add[i]) for i < size. */
export function scaleAdd(size: number, alpha: number, y: F32, yOff: number, add: F32 | null, addOff: number): void {
  if (add === null) {
    for (let i = 0; i < size; i++) y[yOff + i] *= alpha;
  } else {
    for (let i = 0; i < size; i++) y[yOff + i] = alpha * y[yOff + i] + add[addOff + i];
  }
}

export interface ActivationParams {
  /** 0: silu(gate)·up; 1: gpt-oss's clamped (up + 1)·gate·σ(alpha·gate) */
  clamped: boolean;
  /** Gemma 4: gelu_tanh(gate)·up (with clamped false); absent: false */
  gelu?: boolean;
  alpha: number;
  limit: number;
  /** gate/up interleaved in columns (gpt-oss) instead of halves */
  interleaved: boolean;
}

function sigmoid(v: number): number {
  return 1 / (1 + Math.exp(-v));
}

/** GELU's tanh approximation (PyTorch's gelu(approximate='tanh')): 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))) */
const GELU_C = Math.sqrt(2 / Math.PI);
export function geluTanh(g: number): number {
  return 0.5 * g * (1 + Math.tanh(GELU_C * (g + 0.044715 * g * g * g)));
}

/** d geluTanh / dg = 0.5·(1 + t) + 0.5·g·(1 − t²)·√(2/π)·(1 + 3·0.044715·g²), t = tanh(…) */
export function geluTanhGrad(g: number): number {
  const t = Math.tanh(GELU_C * (g + 0.044715 * g * g * g));
  return 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * GELU_C * (1 + 3 * 0.044715 * g * g);
}

/**
 * a[n, I] from h[n, 2I]; with `scale` also aScaled[r] = a[r]·scale[r] (the routing weight of
 * the row), which the down projection's weight gradient needs.
 */
export function activationForward(
    n: number, inter: number, p: ActivationParams, h: F32, hOff: number, a: F32, aOff: number,
    scale: F32 | null, sOff: number, aScaled: F32 | null, asOff: number): void {
  const { clamped, alpha, limit, interleaved } = p;
  const gelu = p.gelu === true;
  for (let r = 0; r < n; r++) {
    const hr = hOff + r * 2 * inter;
    const ar = r * inter;
    const s = scale === null ? 1 : scale[sOff + r];
    for (let j = 0; j < inter; j++) {
      const g = interleaved ? h[hr + 2 * j] : h[hr + j];
      const u = interleaved ? h[hr + 2 * j + 1] : h[hr + inter + j];
      let v: number;
      if (gelu) {
        v = geluTanh(g) * u;
      } else if (!clamped) {
        v = (g * u) * sigmoid(g);
      } else {
        const gg = g < limit ? g : limit;
        const uu = u < -limit ? -limit : u > limit ? limit : u;
        v = (uu + 1) * gg * sigmoid(alpha * gg);
      }
      a[aOff + ar + j] = v;
      if (aScaled !== null) aScaled[asOff + ar + j] = Math.fround(v) * s;
    }
  }
}

/**
 * dh[n, 2I] from h[n, 2I] and da[n, I] (times scale[r] when given). The clamps pass the gradient
 * where the input is within the limits, boundaries included, as torch.clamp does.
 */
export function activationBackward(
    n: number, inter: number, p: ActivationParams, h: F32, hOff: number, da: F32, daOff: number,
    scale: F32 | null, sOff: number, dh: F32, dhOff: number): void {
  const { clamped, alpha, limit, interleaved } = p;
  const gelu = p.gelu === true;
  for (let r = 0; r < n; r++) {
    const hr = hOff + r * 2 * inter;
    const dr = dhOff + r * 2 * inter;
    const ar = daOff + r * inter;
    const s = scale === null ? 1 : scale[sOff + r];
    for (let j = 0; j < inter; j++) {
      const gi = interleaved ? 2 * j : j;
      const ui = interleaved ? 2 * j + 1 : inter + j;
      const g = h[hr + gi];
      const u = h[hr + ui];
      const d = da[ar + j] * s;
      let dg: number;
      let du: number;
      if (gelu) {
        dg = d * u * geluTanhGrad(g);
        du = d * geluTanh(g);
      } else if (!clamped) {
        const sig = sigmoid(g);
        // silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
        dg = d * u * sig * (1 + g * (1 - sig));
        du = d * g * sig;
      } else {
        const gg = g < limit ? g : limit;
        const uu = u < -limit ? -limit : u > limit ? limit : u;
        const sig = sigmoid(alpha * gg);
        // d(g·σ(αg))/dg = σ(αg)·(1 + αg·(1 − σ(αg)))
        dg = g <= limit ? d * (uu + 1) * sig * (1 + alpha * gg * (1 - sig)) : 0;
        du = u >= -limit && u <= limit ? d * gg * sig : 0;
      }
      dh[dr + gi] = dg;
      dh[dr + ui] = du;
    }
  }
}

/**
 * out[t, c] = Σ_k w[t, k]·y[rowOfPair[t·K + k], c]: the weighted scatter-add of the expert rows
 * back to their tokens, written as a gather (each pair's row is known), so no atomics and no
 * zero-fill. With `w` null the weights are 1 (the gradient of x).
 */
export function combineRows(
    t: number, k: number, cols: number, y: F32, yOff: number, rowOfPair: Int32Array, rpOff: number,
    w: F32 | null, wOff: number, out: F32, oOff: number): void {
  // One pass over each output row with its K source rows side by side (K = 2 unrolled): a
  // float64 [cols] accumulator read and written K times per row cost more than the products.
  // The sum is formed in the same order from 0 as before, so the results are unchanged.
  const src = new Int32Array(k);
  const scale = new Float64Array(k);
  for (let tok = 0; tok < t; tok++) {
    for (let j = 0; j < k; j++) {
      const p = tok * k + j;
      scale[j] = w === null ? 1 : w[wOff + p];
      src[j] = yOff + rowOfPair[rpOff + p] * cols;
    }
    const o = oOff + tok * cols;
    if (k === 2) {
      const s0 = scale[0], s1 = scale[1], r0 = src[0], r1 = src[1];
      for (let c = 0; c < cols; c++) out[o + c] = 0 + s0 * y[r0 + c] + s1 * y[r1 + c];
    } else {
      for (let c = 0; c < cols; c++) {
        let acc = 0;
        for (let j = 0; j < k; j++) acc += scale[j] * y[src[j] + c];
        out[o + c] = acc;
      }
    }
  }
}

/** out[p] = ⟨a[rowOfPair[p]], b[rowOfPair[p]]⟩ for every (token, slot) pair p. */
export function pairRowDot(
    pairs: number, cols: number, a: F32, aOff: number, b: F32, bOff: number, rowOfPair: Int32Array,
    rpOff: number, out: F32, oOff: number): void {
  for (let p = 0; p < pairs; p++) {
    const row = rowOfPair[rpOff + p] * cols;
    let s = 0;
    for (let c = 0; c < cols; c++) s += a[aOff + row + c] * b[bOff + row + c];
    out[oOff + p] = s;
  }
}
