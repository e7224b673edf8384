/**
 * Quantized frozen expert weights: int8, int4, NF4 and MXFP4, held like the 16-bit packed experts
 * (src/ops/packed.ts) in one int32 tensor [E, W] whose row e is everything expert e needs to be
 * decoded: its codes, then its scales (then its zero points). One tensor per weight keeps the
 * rest of the package unchanged: one layer variable, one kernel input, one tensor in a saved
 * folder, and the fused kernels decode one expert from one contiguous range of words.
 *
 * The layout (src/ops/README.md, "Quantized expert weights"): the weight [E, rows, cols] has an
 * input axis (2 for the 'outIn' layout [E, out, in], 1 for gpt-oss's [E, in, out]); an expert's
 * values are taken in output-major order, s = o·N + i (N inputs, O outputs), and cut into groups
 * of G consecutive inputs of one output (the last group of a row may be shorter). Per expert:
 *
 * | kind  | codes (from word 0)                     | then                                         |
 * |-------|-----------------------------------------|----------------------------------------------|
 * | int8  | signed bytes, s in byte s (G = N)       | scale f32 per output: v = scale·q            |
 * | int4  | nibbles 0…15, s in nibble s (G = 32/64/128, default 64) | scale f32, then zero f32, per group: v = scale·(q − zero) |
 * | nf4   | nibbles, s in nibble s (G = 64)         | absmax f32 per group: v = NF4[q]·absmax      |
 * | nf4-dq | nibbles, s in nibble s (G = 64)        | absmax code byte per group, then per 256 groups a nested absmax f32, then per 256 groups an offset f32, then the 256-entry f32 absmax code map: absmax = f32(f32(map[a]·nested) + offset), v = NF4[q]·absmax |
 * | mxfp4 | nibbles, s in nibble s (G = 32)         | e8m0 byte per group: v = E2M1[q]·2^(e − 127)  |
 *
 * Nibble s is bits 4·(s mod 8) … of word ⌊s/8⌋ (low nibble first in each little-endian byte), byte
 * s of the int8 codes is bits 8·(s mod 4) … of word ⌊s/4⌋; f32 values are stored as their bits;
 * each region starts on a word. MXFP4's codes and scales are byte for byte gpt-oss's `_blocks`
 * and `_scales` of one expert, so a gpt-oss checkpoint loads as it is stored.
 *
 * Every decode is a few f32 operations, the same on every backend: int4's is
 * f32(scale · f32(q − zero)), NF4's f32(NF4[q] · absmax), the others exact.
 */
import { fail } from './validate.js';

/** The quantized formats of a frozen expert weight. */
export type QuantizedKind = 'int8' | 'int4' | 'nf4' | 'nf4-dq' | 'mxfp4';
export const QUANTIZED_KINDS: readonly QuantizedKind[] = ['int8', 'int4', 'nf4', 'nf4-dq', 'mxfp4'];

/** int4 group sizes along the input; 64 by default (1 bit of scale and zero per weight, bitsandbytes' NF4 block). */
export const INT4_GROUP_SIZES: readonly number[] = [32, 64, 128];
export const DEFAULT_INT4_GROUP_SIZE = 64;
/** bitsandbytes' NF4 block size */
export const NF4_BLOCK_SIZE = 64;
/** 'nf4-dq' (bitsandbytes' double quantization): absmax codes per nested block (bnb's fixed 256) */
export const NF4_DQ_NESTED_BLOCK_SIZE = 256;
/** OCP MX block size (gpt-oss) */
export const MXFP4_BLOCK_SIZE = 32;

/**
 * bitsandbytes' NF4 code book (the 16 float32 values of its `nf4` quant map, code 0 … 15), as
 * QLoRA defines it: quantiles of N(0, 1) scaled to [−1, 1], with an exact 0.
 */
export const NF4_CODE_BOOK: Float32Array = Float32Array.of(
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
  -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
  0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0);

/** The 16 e2m1 values by code (bit 3 the sign), as transformers' FP4_VALUES. */
export const E2M1_VALUES: Float32Array = Float32Array.of(0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6);

/**
 * torch.linspace(start, end, steps) in float32 as torch's scalar CPU loop computes it: step =
 * f32((end − start) / (steps − 1)), the first half start + step·k, the second end − step·(steps − 1 − k).
 */
function linspaceF32(start: number, end: number, steps: number): Float32Array {
  const f32 = Math.fround;
  const [a, b] = [f32(start), f32(end)];
  const step = f32(f32(b - a) / (steps - 1));
  // a + step·k rounded once, as torch's kernels do it (a fused multiply-add on cpu and cuda; step·k
  // is exact in float64 here): rounding the product first differs in 42 of the map's 256 entries
  // from torch's (spec/fixtures/bnb/torch_dynamic_map.json)
  return Float32Array.from({ length: steps }, (_, k) =>
    k < steps >> 1 ? f32(a + step * k) : f32(b - step * (steps - 1 - k)));
}

/**
 * bitsandbytes' 8-bit dynamic code map, `create_dynamic_map(signed=True, max_exponent_bits=7,
 * total_bits=8)` (functional.py), the code book of 'nf4-dq''s absmax codes when this package
 * quantizes: for i = 0 … 6, the 2^i midpoints m of linspace(0.1, 1, 2^i + 1) (float32, m =
 * f32((b_k + b_(k+1)) / 2)) give ±f32(f32(10^(i − 6)) · m); with 0 and 1 that is 256 values,
 * sorted ascending (code 0 = −0.99296875, 127 = 0, 255 = 1); bit for bit torch 2.11's, cpu and cuda
 * (linspaceF32). A double-quantized checkpoint's own map is kept with its weights all the same (each
 * expert's words hold the map they were quantized with): another torch could round otherwise.
 */
export const BNB_DYNAMIC_MAP: Float32Array = (() => {
  const f32 = Math.fround;
  const data: number[] = [0, 1];
  for (let i = 0; i < 7; i++) {
    const bounds = linspaceF32(0.1, 1, 2 ** i + 1);
    const scale = f32(10 ** (i - 6));
    for (let k = 0; k + 1 < bounds.length; k++) {
      const mean = f32(f32(bounds[k] + bounds[k + 1]) / 2);
      data.push(f32(scale * mean), -f32(scale * mean));
    }
  }
  return Float32Array.from(data.sort((x, y) => x - y));
})();

/** Where everything of one quantized expert lies in its words. */
export interface QuantizedLayout {
  kind: QuantizedKind;
  /** 1 or 2: the axis of [E, rows, cols] that is the input (groups run along it) */
  inputAxis: 1 | 2;
  /** O, N */
  outputs: number;
  inputs: number;
  /** G */
  groupSize: number;
  /** ⌈N / G⌉ */
  groupsPerOutput: number;
  /** first word of the scales (= words of the codes) */
  scaleWord: number;
  /** first word of the zero points (int4), else −1 */
  zeroWord: number;
  /** 'nf4-dq': first word of the nested absmax (one f32 per 256 groups), of the offsets (likewise) and of the 256-entry map; else −1 */
  nestedWord: number;
  offsetWord: number;
  mapWord: number;
  wordsPerExpert: number;
}

/** The group size of `kind` when none is given (int8: the whole input row). */
export function defaultGroupSize(kind: QuantizedKind, inputs: number): number {
  return kind === 'int8' ? inputs : kind === 'int4' ? DEFAULT_INT4_GROUP_SIZE : kind === 'nf4' || kind === 'nf4-dq' ? NF4_BLOCK_SIZE : MXFP4_BLOCK_SIZE;
}

/**
 * The layout of one expert of a `kind` weight of logical shape [E, rows, cols] with the input on
 * `inputAxis`; `groupSize` only for int4 (32, 64 or 128).
 *
 * ```js
 * quantizedLayout('nf4', [64, 2048, 2048], 2).wordsPerExpert;  // 2048·2048/8 + 2048·32 = 589824
 * ```
 */
export function quantizedLayout(
    kind: QuantizedKind, shape: readonly number[], inputAxis: 1 | 2, groupSize?: number, op = 'quantizedLayout'): QuantizedLayout {
  if (!(QUANTIZED_KINDS as readonly string[]).includes(kind)) {
    fail(op, `'kind' must be one of ${QUANTIZED_KINDS.map(k => `'${k}'`).join(', ')} but got ${JSON.stringify(kind)}`);
  }
  if (inputAxis !== 1 && inputAxis !== 2) fail(op, `'inputAxis' must be 1 or 2 but got ${JSON.stringify(inputAxis)}`);
  const inputs = shape[inputAxis];
  const outputs = shape[3 - inputAxis];
  if (groupSize !== undefined && groupSize !== defaultGroupSize(kind, inputs)) {
    if (kind !== 'int4') {
      fail(op, `'groupSize' is fixed for ${kind} (${kind === 'int8' ? `one scale per output: ${inputs}` : defaultGroupSize(kind, inputs)}) but got ${JSON.stringify(groupSize)}`);
    }
    if (!INT4_GROUP_SIZES.includes(groupSize)) fail(op, `'groupSize' of int4 must be one of ${INT4_GROUP_SIZES.join(', ')} but got ${JSON.stringify(groupSize)}`);
  }
  const g = groupSize ?? defaultGroupSize(kind, inputs);
  const groupsPerOutput = Math.ceil(inputs / g);
  const groups = outputs * groupsPerOutput;
  const codeWords = Math.ceil((outputs * inputs) / (kind === 'int8' ? 4 : 8));
  const scaleWords = kind === 'mxfp4' || kind === 'nf4-dq' ? Math.ceil(groups / 4) : groups;
  const zeroWord = kind === 'int4' ? codeWords + scaleWords : -1;
  const nestedBlocks = Math.ceil(groups / NF4_DQ_NESTED_BLOCK_SIZE);
  const dq = kind === 'nf4-dq';
  const nestedWord = dq ? codeWords + scaleWords : -1;
  return {
    kind, inputAxis, outputs, inputs, groupSize: g, groupsPerOutput, scaleWord: codeWords, zeroWord,
    nestedWord, offsetWord: dq ? nestedWord + nestedBlocks : -1, mapWord: dq ? nestedWord + 2 * nestedBlocks : -1,
    wordsPerExpert: codeWords + scaleWords + (kind === 'int4' ? groups : 0) + (dq ? 2 * nestedBlocks + 256 : 0),
  };
}

/** Bytes of one expert in `layout` (what the memory estimate counts). */
export function quantizedBytesPerExpert(layout: QuantizedLayout): number {
  return 4 * layout.wordsPerExpert;
}

function floatView(words: Int32Array): Float32Array {
  return new Float32Array(words.buffer, words.byteOffset, words.length);
}

/**
 * Decodes one expert (first word words[wOff]) into float32 [rows, cols] at dst[dOff …], in the
 * logical layout. Shared by the cpu and wasm kernels (wasm: HEAP32 / HEAPF32) and the host decode.
 * The 4-bit kinds decode through a 16-entry table per group (each entry the float32 the formula
 * gives for that code, so the values are the formula's exactly).
 */
export function decodeQuantizedExpertInto(
    layout: QuantizedLayout, words: Int32Array, wOff: number, dst: Float32Array, dOff: number): void {
  const { kind, outputs, inputs, groupSize, groupsPerOutput, scaleWord, zeroWord, inputAxis } = layout;
  const floats = floatView(words);
  const f32 = Math.fround;
  // the logical index of (o, i): [out, in] or [in, out]
  const oStride = inputAxis === 2 ? inputs : 1;
  const iStride = inputAxis === 2 ? 1 : outputs;
  const lut = new Float32Array(16);
  for (let o = 0; o < outputs; o++) {
    const row = o * inputs;
    for (let g = 0; g < groupsPerOutput; g++) {
      const group = o * groupsPerOutput + g;
      const start = g * groupSize;
      const end = Math.min(inputs, start + groupSize);
      let at = dOff + o * oStride + start * iStride;
      if (kind === 'int8') {
        const scale = floats[wOff + scaleWord + group];
        for (let i = start, s = row + start; i < end; i++, s++, at += iStride) {
          dst[at] = scale * ((words[wOff + (s >> 2)] << (24 - 8 * (s & 3))) >> 24);
        }
        continue;
      }
      if (kind === 'mxfp4') {
        const scale = 2 ** (((words[wOff + scaleWord + (group >> 2)] >>> (8 * (group & 3))) & 255) - 127);
        for (let q = 0; q < 16; q++) lut[q] = E2M1_VALUES[q] * scale;
      } else if (kind === 'nf4') {
        const absmax = floats[wOff + scaleWord + group];
        for (let q = 0; q < 16; q++) lut[q] = NF4_CODE_BOOK[q] * absmax;
      } else if (kind === 'nf4-dq') {
        const absmax = doubleQuantizedAbsmax(layout, words, floats, wOff, group);
        for (let q = 0; q < 16; q++) lut[q] = NF4_CODE_BOOK[q] * absmax;
      } else {
        const scale = floats[wOff + scaleWord + group];
        const zero = floats[wOff + zeroWord + group];
        for (let q = 0; q < 16; q++) lut[q] = scale * f32(q - zero);
      }
      for (let i = start, s = row + start; i < end; i++, s++, at += iStride) {
        dst[at] = lut[(words[wOff + (s >> 3)] >>> (4 * (s & 7))) & 15];
      }
    }
  }
}

/**
 * 'nf4-dq': the absmax of `group` of the expert at words[wOff] (`floats` a Float32Array over the
 * same memory): f32(f32(map[a] · nested) + offset) with a its code byte and nested, offset those
 * of its block of 256 groups (bitsandbytes' dequantize_blockwise, then `+= offset`).
 *
 * ```js
 * const absmax = doubleQuantizedAbsmax(layout, words, new Float32Array(words.buffer), 0, 5);  // group 5 of expert 0
 * ```
 */
export function doubleQuantizedAbsmax(layout: QuantizedLayout, words: Int32Array, floats: Float32Array, wOff: number, group: number): number {
  const f32 = Math.fround;
  const code = (words[wOff + layout.scaleWord + (group >> 2)] >>> (8 * (group & 3))) & 255;
  const block = Math.floor(group / NF4_DQ_NESTED_BLOCK_SIZE);
  return f32(f32(floats[wOff + layout.mapWord + code] * floats[wOff + layout.nestedWord + block]) + floats[wOff + layout.offsetWord + block]);
}

/**
 * bitsandbytes' quantize_blockwise code of one value x (already f32(v · f32(1 / absmax))): clamped
 * to [−1, 1], the index of `map` (sorted ascending) with the smallest f32(|x − map[k]|), the lowest
 * index on ties (torch.argmin over the float32 differences, backends/default/ops.py). The
 * differences only grow away from x, so the two entries around x decide, then equal neighbours below.
 *
 * ```js
 * nearestMapCode(1, BNB_DYNAMIC_MAP);    // 255
 * nearestMapCode(NaN, BNB_DYNAMIC_MAP);  // 0
 * ```
 */
export function nearestMapCode(x: number, map: Float32Array): number {
  const f32 = Math.fround;
  if (x !== x) return 0;   // NaN (an all-zero block: 0 · (1 / 0)): torch.argmin's first index
  const v = x < -1 ? -1 : x > 1 ? 1 : x;
  let [lo, hi] = [0, map.length];   // first index whose entry is ≥ v
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (map[mid] < v) lo = mid + 1;
    else hi = mid;
  }
  const diff = (k: number) => Math.abs(f32(v - map[k]));
  let best = lo === map.length ? map.length - 1 : lo;
  if (lo > 0 && diff(lo - 1) <= diff(best)) best = lo - 1;
  while (best > 0 && diff(best - 1) === diff(best)) best--;
  return best;
}

// the quantizers' nearest-code thresholds: midpoints between neighbouring values (exact: the
// sum of two float32 values and its half are exact in float64); a value above a midpoint takes
// the upper code, one on it the lower
const NF4_MIDPOINTS = Float64Array.from({ length: 15 }, (_, c) => (NF4_CODE_BOOK[c] + NF4_CODE_BOOK[c + 1]) / 2);
const E2M1_MAGNITUDE_MIDPOINTS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5];

/** The NF4 code of x in [−1, 1] by the midpoints (the definition; the table below is built from it). */
function nearestNF4(x: number): number {
  let c = 0;
  while (c < 15 && x > NF4_MIDPOINTS[c]) c++;
  return c;
}

/** The e2m1 code (no sign) of a magnitude m ≥ 0 by the midpoints, saturating at 6. */
function nearestE2M1Magnitude(m: number): number {
  let c = 0;
  while (c < 7 && m > E2M1_MAGNITUDE_MIDPOINTS[c]) c++;
  return c;
}

/**
 * NF4's nearest code by table: [−1, 1] cut into 4096 buckets; a bucket that no midpoint comes
 * near (within 2^-20, far more than the rounding of (x + 1)·2048) holds its one code, the few
 * that hold a midpoint hold 255 and are decided by nearestNF4. Codes grow with x, so a bucket
 * whose widened ends have the same code has that code throughout: the same codes as nearestNF4,
 * for about one compare a value instead of eight.
 */
const NF4_BUCKETS = 4096;
const NF4_BUCKET_CODES: Uint8Array = (() => {
  const codes = new Uint8Array(NF4_BUCKETS + 1);   // x = 1 lands in bucket 4096
  const slack = 2 ** -20;
  for (let b = 0; b <= NF4_BUCKETS; b++) {
    const lo = nearestNF4((b * 2) / NF4_BUCKETS - 1 - slack);
    const hi = nearestNF4(((b + 1) * 2) / NF4_BUCKETS - 1 + slack);
    codes[b] = lo === hi ? lo : 255;
  }
  return codes;
})();

/**
 * MXFP4's nearest code by table: the midpoints are multiples of 0.25 and a tie goes to the
 * smaller magnitude, so the magnitude code is constant on each (j − 1)/4 < m ≤ j/4 and
 * j = ⌈m·4⌉ (m·4 exact) names it; |v / 2^e| < 8 always (absmax < 8·2^e), so j ≤ 32. Entry
 * j + 33 is the same code with the sign bit (8), except 0 (a negative value that rounds to 0 is
 * +0, as in the definition), so the sign bit of v picks the half without a branch.
 */
const E2M1_BY_CEILING: Uint8Array = (() => {
  const codes = new Uint8Array(66);
  for (let j = 0; j <= 32; j++) {
    const c = nearestE2M1Magnitude(j / 4);   // the code of the whole interval ((j − 1)/4, j/4]
    codes[j] = c;
    codes[j + 33] = c === 0 ? 0 : c | 8;
  }
  return codes;
})();

/** floor(log2(x)) for x > 0, exact (Math.log2 may be off by one near powers of two). */
function exponentOf(x: number): number {
  let e = Math.floor(Math.log2(x));
  if (2 ** e > x) e--;
  if (2 ** (e + 1) <= x) e++;
  return e;
}

/*
 * The per-group code loops, one per kind: `n` values from values[at], `stride` apart, whose flat
 * indices in the expert are s0 … s0 + n − 1. Codes are gathered in a word (acc) and OR-ed into
 * the zeroed words once a word is full or the group ends (a row of an odd size shares its first
 * and last word with its neighbours). Each computes exactly the formula of quantizeExpertInto's
 * doc, in the same float64 operations as the definitions above (the division by the scale is
 * kept: a multiplication by its reciprocal would round differently).
 */

function codesInt8(values: Float32Array, at: number, stride: number, n: number, s0: number, scale: number, words: Int32Array, wOff: number): void {
  let acc = 0;
  for (let k = 0, s = s0; k < n; k++, s++, at += stride) {
    let q = Math.round(values[at] / scale);
    if (q > 127) q = 127;
    else if (q < -127) q = -127;
    acc |= (q & 255) << ((s & 3) << 3);
    if ((s & 3) === 3) {
      words[wOff + (s >> 2)] |= acc;
      acc = 0;
    }
  }
  if (acc !== 0) words[wOff + ((s0 + n - 1) >> 2)] |= acc;
}

function codesInt4(values: Float32Array, at: number, stride: number, n: number, s0: number, scale: number, zero: number, words: Int32Array, wOff: number): void {
  let acc = 0;
  for (let k = 0, s = s0; k < n; k++, s++, at += stride) {
    let q = Math.round(values[at] / scale + zero);
    if (q > 15) q = 15;
    else if (q < 0) q = 0;
    acc |= q << ((s & 7) << 2);
    if ((s & 7) === 7) {
      words[wOff + (s >> 3)] |= acc;
      acc = 0;
    }
  }
  if (acc !== 0) words[wOff + ((s0 + n - 1) >> 3)] |= acc;
}

function codesNF4(values: Float32Array, at: number, stride: number, n: number, s0: number, absmax: number, words: Int32Array, wOff: number): void {
  let acc = 0;
  for (let k = 0, s = s0; k < n; k++, s++, at += stride) {
    const x = values[at] / absmax;   // in [−1, 1]
    let q = NF4_BUCKET_CODES[((x + 1) * (NF4_BUCKETS / 2)) | 0];
    if (q === 255) q = nearestNF4(x);
    acc |= q << ((s & 7) << 2);
    if ((s & 7) === 7) {
      words[wOff + (s >> 3)] |= acc;
      acc = 0;
    }
  }
  if (acc !== 0) words[wOff + ((s0 + n - 1) >> 3)] |= acc;
}

/**
 * NF4 codes as bitsandbytes computes them (backends/default/ops.py quantize_4bit): x =
 * clamp(f32(v · f32(1 / absmax)), −1, 1), the code of the smallest f32(|x − NF4[c]|), the lowest
 * code on ties (torch.argmin). The table's code (nearest by exact midpoints) or a neighbour is that
 * code: the float32 differences only move the choice on a near-tie (the codes are ≥ 0.079 apart).
 * An all-zero group (1 / 0 · 0 = NaN) takes code 0, as torch.argmin's first index (decodes to −0).
 */
function codesNF4Bnb(values: Float32Array, at: number, stride: number, n: number, s0: number, inverse: number, words: Int32Array, wOff: number): void {
  const f32 = Math.fround;
  let acc = 0;
  for (let k = 0, s = s0; k < n; k++, s++, at += stride) {
    let x = f32(values[at] * inverse);
    let q = 0;
    if (x === x) {
      x = x < -1 ? -1 : x > 1 ? 1 : x;
      q = NF4_BUCKET_CODES[((x + 1) * (NF4_BUCKETS / 2)) | 0];
      if (q === 255) q = nearestNF4(x);
      const d = Math.abs(f32(x - NF4_CODE_BOOK[q]));
      if (q > 0 && Math.abs(f32(x - NF4_CODE_BOOK[q - 1])) <= d) {
        q--;
      } else if (q < 15) {
        const up = Math.abs(f32(x - NF4_CODE_BOOK[q + 1]));
        if (up < d) q++;
      }
    }
    acc |= q << ((s & 7) << 2);
    if ((s & 7) === 7) {
      words[wOff + (s >> 3)] |= acc;
      acc = 0;
    }
  }
  if (acc !== 0) words[wOff + ((s0 + n - 1) >> 3)] |= acc;
}

function codesMXFP4(values: Float32Array, bits: Int32Array, at: number, stride: number, n: number, s0: number, scale: number, words: Int32Array, wOff: number): void {
  let acc = 0;
  for (let k = 0, s = s0; k < n; k++, s++, at += stride) {
    const j = Math.ceil(Math.abs(values[at] / scale) * 4);   // exact: scale is a power of two
    const q = E2M1_BY_CEILING[j + ((bits[at] >>> 31) * 33)];
    acc |= q << ((s & 7) << 2);
    if ((s & 7) === 7) {
      words[wOff + (s >> 3)] |= acc;
      acc = 0;
    }
  }
  if (acc !== 0) words[wOff + ((s0 + n - 1) >> 3)] |= acc;
}

/**
 * Quantizes one expert's float32 values [rows, cols] (logical layout, at values[vOff …]) into its
 * words at words[wOff …] (which must be zero or hold an earlier expert's words: every word is
 * written). Round to nearest: int8 q = round(v / scale), scale = absmax / 127 per output; int4
 * q = round(v / scale + zero), scale = (max − min) / 15 and zero = −min / scale over the group with
 * 0 in its range; NF4 the nearest code of v / absmax; MXFP4 e = ⌊log2 absmax⌋ − 2 (OCP's shared
 * exponent) and the nearest e2m1 of v / 2^e, saturating at ±6. Ties go to the lower code (NF4,
 * e2m1 magnitudes) or up (Math.round: int8, int4). One pass a group for min, max and the
 * finiteness check, one for the codes; no allocation (the loaders reuse `words` across experts).
 */
export function quantizeExpertInto(
    layout: QuantizedLayout, values: Float32Array, vOff: number, words: Int32Array, wOff: number,
    op = 'quantizeExpertValues', arg = 'values'): void {
  const { kind, outputs, inputs, groupSize, groupsPerOutput, scaleWord, zeroWord, inputAxis } = layout;
  const floats = floatView(words);
  const valueBits = new Int32Array(values.buffer, values.byteOffset, values.length);   // MXFP4 reads the sign bit
  const f32 = Math.fround;
  const oStride = inputAxis === 2 ? inputs : 1;
  const iStride = inputAxis === 2 ? 1 : outputs;
  words.fill(0, wOff, wOff + layout.wordsPerExpert);
  for (let o = 0; o < outputs; o++) {
    for (let g = 0; g < groupsPerOutput; g++) {
      const group = o * groupsPerOutput + g;
      const start = g * groupSize;
      const n = Math.min(inputs, start + groupSize) - start;
      const first = vOff + o * oStride + start * iStride;
      const s0 = o * inputs + start;
      let min = 0;
      let max = 0;
      for (let k = 0, at = first; k < n; k++, at += iStride) {
        const v = values[at];
        if (v - v !== 0) fail(op, `'${arg}' must be finite to be quantized (${kind}) but holds ${v}`);  // NaN, ±Infinity
        if (v < min) min = v;
        if (v > max) max = v;
      }
      const absmax = Math.max(max, -min);
      if (kind === 'int8') {
        const scale = f32(absmax / 127);
        floats[wOff + scaleWord + group] = scale;
        if (scale !== 0) codesInt8(values, first, iStride, n, s0, scale, words, wOff);   // else every code 0
      } else if (kind === 'int4') {
        const scale = f32((max - min) / 15);
        const zero = scale === 0 ? 0 : f32(-min / scale);
        floats[wOff + scaleWord + group] = scale;
        floats[wOff + zeroWord + group] = zero;
        if (scale !== 0) codesInt4(values, first, iStride, n, s0, scale, zero, words, wOff);
      } else if (kind === 'nf4-dq') {
        // bitsandbytes' own rule (its codes bit for bit); the absmax waits in a scratch buffer until
        // every group has one, then is quantized itself (compressAbsmax)
        dqScratch(layout)[group] = absmax;
        codesNF4Bnb(values, first, iStride, n, s0, Math.fround(1 / absmax), words, wOff);
      } else if (kind === 'nf4') {
        floats[wOff + scaleWord + group] = absmax;  // an f32 value already
        if (absmax !== 0) {
          codesNF4(values, first, iStride, n, s0, absmax, words, wOff);
        } else {
          for (let s = s0; s < s0 + n; s++) words[wOff + (s >> 3)] |= 7 << ((s & 7) << 2);   // NF4's 0
        }
      } else {
        // e8m0 holds 2^−127 … 2^127; the shared exponent leaves the largest value in [4, 8) · 2^e
        const e = absmax === 0 ? 0 : Math.max(-127, Math.min(127, exponentOf(absmax) - 2));
        words[wOff + scaleWord + (group >> 2)] |= (e + 127) << (8 * (group & 3));
        codesMXFP4(values, valueBits, first, iStride, n, s0, 2 ** e, words, wOff);
      }
    }
  }
  if (kind === 'nf4-dq') compressAbsmax(layout, dqScratch(layout), words, wOff, BNB_DYNAMIC_MAP);
}

let dqAbsmax = new Float32Array(0);
/** a reused float32 buffer of one expert's absmax per group ('nf4-dq' quantizes them at the end) */
function dqScratch(layout: QuantizedLayout): Float32Array {
  const groups = layout.outputs * layout.groupsPerOutput;
  if (dqAbsmax.length < groups) dqAbsmax = new Float32Array(groups);
  return dqAbsmax;
}

/**
 * bitsandbytes' double quantization of one weight's block absmax (functional.py quantize_4bit with
 * compress_statistics, then quantize_blockwise): offset = their mean (float32; here the float64 sum
 * over the count, rounded once: torch's float32 reduction may differ in the last bit), then
 * c = f32(absmax − offset) in blocks of 256: nested = max|c|, codes nearestMapCode(f32(c · f32(1 / nested))).
 * Written to the expert's words with `map` and the offset repeated per block of 256.
 */
function compressAbsmax(layout: QuantizedLayout, absmax: Float32Array, words: Int32Array, wOff: number, map: Float32Array): void {
  const f32 = Math.fround;
  const floats = floatView(words);
  const groups = layout.outputs * layout.groupsPerOutput;
  let sum = 0;
  for (let b = 0; b < groups; b++) sum += absmax[b];
  const offset = f32(sum / groups);
  for (let start = 0, block = 0; start < groups; start += NF4_DQ_NESTED_BLOCK_SIZE, block++) {
    const end = Math.min(groups, start + NF4_DQ_NESTED_BLOCK_SIZE);
    let nested = 0;
    for (let b = start; b < end; b++) nested = Math.max(nested, Math.abs(f32(absmax[b] - offset)));
    floats[wOff + layout.nestedWord + block] = nested;
    floats[wOff + layout.offsetWord + block] = offset;
    const inverse = f32(1 / nested);
    for (let b = start; b < end; b++) {
      const code = nearestMapCode(f32(f32(absmax[b] - offset) * inverse), map);
      words[wOff + layout.scaleWord + (b >> 2)] |= code << (8 * (b & 3));
    }
  }
  floats.set(map, wOff + layout.mapWord);
}

/**
 * A weight's float32 values [E, rows, cols] (host memory) quantized expert by expert: the int32
 * words [E, layout.wordsPerExpert] of a PackedExpertWeight. For loaders and callers that hold the
 * values on the host (webgpu cannot read a tensor synchronously).
 *
 * ```js
 * const layout = quantizedLayout('int8', [E, 2 * I, H], 2);
 * const words = quantizeExpertValues(layout, E, values);
 * new PackedExpertWeight('int8', [E, 2 * I, H], tf.tensor2d(words, [E, layout.wordsPerExpert], 'int32'));
 * ```
 */
export function quantizeExpertValues(layout: QuantizedLayout, experts: number, values: Float32Array): Int32Array {
  const block = layout.outputs * layout.inputs;
  if (!(values instanceof Float32Array) || values.length !== experts * block) {
    fail('quantizeExpertValues', `'values' must be a Float32Array of ${experts * block} values but got ` +
        `${values instanceof Float32Array ? `${values.length} values` : String(values)}`);
  }
  const words = new Int32Array(experts * layout.wordsPerExpert);
  for (let e = 0; e < experts; e++) quantizeExpertInto(layout, values, e * block, words, e * layout.wordsPerExpert);
  return words;
}
