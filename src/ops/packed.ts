/**
 * Frozen expert weights kept in their stored 16-bit precision. TF.js has no 16-bit dtype, so the
 * bf16 or f16 values are held two per element of an int32 tensor, with a small wrapper that says
 * what is inside (the format, the logical shape). The bit layout is in src/ops/README.md ("Packed
 * expert weights"): expert e owns words [e·W, (e+1)·W) with W = ceil(rows·cols / 2); its flat
 * element j = row·cols + col is the low half (bits 0–15) of word j/2 when j is even and the high
 * half (bits 16–31) when j is odd. That is the byte order of the 16-bit values in a little-endian
 * file, so a load copies the file's halves as they are, and WGSL can read them later with
 * `unpack2x16float` (f16) or a shift (bf16 is the high half of an f32).
 *
 * The fused kernels (cpu, wasm) decode one expert at a time into a scratch block; the composed
 * fallback decodes one expert group at a time; only the oracle, saving and merging decode the
 * whole weight (unpackExpertWeight).
 */
import * as tf from '@tensorflow/tfjs-core';
import { encodeBFloat16, encodeFloat16, float16Values } from '../util/half.js';
import {
  QUANTIZED_KINDS, decodeQuantizedExpertInto, doubleQuantizedAbsmax, quantizeExpertInto, quantizedLayout, type QuantizedKind, type QuantizedLayout,
} from './quantized.js';
import { matMulAdd } from './matmul_add.js';
import { fail } from './validate.js';

/** The 16-bit formats a packed expert weight can hold. */
export type HalfKind = 'bf16' | 'f16';
export const HALF_KINDS: readonly HalfKind[] = ['bf16', 'f16'];
/** Every format a packed (frozen) expert weight can hold: 16-bit, or quantized (src/ops/quantized.ts). */
export type PackedKind = HalfKind | QuantizedKind;
export const PACKED_KINDS: readonly PackedKind[] = [...HALF_KINDS, ...QUANTIZED_KINDS];

export function isQuantizedKind(kind: string): kind is QuantizedKind {
  return (QUANTIZED_KINDS as readonly string[]).includes(kind);
}

/** How a packed weight's words are laid out beyond its kind and shape (quantized kinds only). */
export interface PackedOptions {
  /** the input axis of [E, rows, cols]: 2 for [E, out, in] (default), 1 for gpt-oss's [E, in, out] */
  inputAxis?: 1 | 2;
  /** int4's group size along the input: 32, 64 (default) or 128 */
  groupSize?: number;
}

/** int32 words per expert of a `kind` weight of logical shape [E, rows, cols]. */
export function expertWordsOf(kind: PackedKind, shape: readonly number[], options: PackedOptions = {}): number {
  if (isQuantizedKind(kind)) return quantizedLayout(kind, shape, options.inputAxis ?? 2, options.groupSize).wordsPerExpert;
  return packedWordsPerExpert(shape[1], shape[2]);
}

/** int32 words that hold one expert's rows·cols halves (the last half of an odd count is padding, 0). */
export function packedWordsPerExpert(rows: number, cols: number): number {
  return Math.ceil((rows * cols) / 2);
}

/**
 * A frozen routed-expert weight of logical shape [E, rows, cols] held compactly in an int32 tensor
 * [E, W], row e everything expert e needs: bf16 or f16 halves two per word (W = ceil(rows·cols /
 * 2)), or a quantized format's codes, scales and zero points (src/ops/quantized.ts: `layout` says
 * where each lies; `codes()`, `scales()`, `zeros()` read them out). Frozen: it never gets a
 * gradient. The wrapper owns nothing beyond `packed`; `dispose()` disposes it.
 *
 * ```js
 * const w = packExpertWeight(tf.randomNormal([8, 256, 64]), 'bf16');
 * w.shape;          // [8, 256, 64]
 * w.packed.shape;   // [8, 8192], int32
 * const q = packExpertWeight(tf.randomNormal([8, 256, 64]), 'nf4');
 * q.packed.shape;   // [8, 2048 + 256], int32: 4-bit codes, then one absmax per 64 inputs
 * ```
 */
export class PackedExpertWeight {
  readonly kind: PackedKind;
  /** the logical shape [E, rows, cols], in the layout of the f32 weight it stands for */
  readonly shape: [number, number, number];
  /** int32 [E, wordsPerExpert] */
  readonly packed: tf.Tensor2D;
  /** the input axis (quantized kinds group along it); 2 unless given */
  readonly inputAxis: 1 | 2;
  /** where codes, scales and zeros lie (quantized kinds), else null */
  readonly layout: QuantizedLayout | null;

  constructor(kind: PackedKind, shape: readonly number[], packed: tf.Tensor, options: PackedOptions = {}) {
    const op = 'PackedExpertWeight';
    if (!(PACKED_KINDS as readonly string[]).includes(kind)) {
      fail(op, `'kind' must be one of ${PACKED_KINDS.map(k => `'${k}'`).join(', ')} but got ${JSON.stringify(kind)}`);
    }
    if (!Array.isArray(shape) || shape.length !== 3 || !shape.every(d => Number.isInteger(d) && d >= 1)) {
      fail(op, `'shape' must be [E, rows, cols] of positive integers but got ${JSON.stringify(shape)}`);
    }
    const inputAxis = options.inputAxis ?? 2;
    this.layout = isQuantizedKind(kind) ? quantizedLayout(kind, shape, inputAxis, options.groupSize, op) : null;
    if (!isQuantizedKind(kind) && options.groupSize !== undefined) fail(op, `'groupSize' is for quantized kinds, not ${kind}`);
    checkPackedTensor(op, 'packed', packed, kind, shape as [number, number, number], this.wordsOf(shape));
    this.kind = kind;
    this.shape = [shape[0], shape[1], shape[2]];
    this.packed = packed as tf.Tensor2D;
    this.inputAxis = inputAxis;
  }

  private wordsOf(shape: readonly number[]): number {
    return this.layout?.wordsPerExpert ?? packedWordsPerExpert(shape[1], shape[2]);
  }

  get rank(): 3 { return 3; }
  get isDisposed(): boolean { return this.packed.isDisposed; }
  /** int32 words per expert */
  get wordsPerExpert(): number { return this.wordsOf(this.shape); }
  /** quantized kinds' group size along the input, else null */
  get groupSize(): number | null { return this.layout?.groupSize ?? null; }
  /** the options that rebuild this weight's wrapper around other words */
  get options(): PackedOptions {
    return this.layout ? { inputAxis: this.inputAxis, groupSize: this.layout.groupSize } : {};
  }
  /** int32 [E, codeWords]: the codes' words (quantized kinds; 16-bit: every word) */
  codes(): tf.Tensor2D {
    return tf.slice(this.packed, [0, 0], [-1, this.layout?.scaleWord ?? this.wordsPerExpert]);
  }
  /** float32 [E, O, groups]: the scales (mxfp4: 2^(e − 127); nf4-dq: the decoded absmax); null for 16-bit kinds */
  scales(): tf.Tensor3D | null { return this.metaFloats('scales'); }
  /** float32 [E, O, groups]: int4's zero points, else null */
  zeros(): tf.Tensor3D | null { return this.metaFloats('zeros'); }

  private metaFloats(which: 'scales' | 'zeros'): tf.Tensor3D | null {
    const l = this.layout;
    if (l === null || (which === 'zeros' && l.zeroWord < 0)) return null;
    const groups = l.outputs * l.groupsPerOutput;
    const words = this.packed.dataSync() as Int32Array;
    const out = new Float32Array(this.shape[0] * groups);
    const floats = new Float32Array(words.buffer, words.byteOffset, words.length);
    for (let e = 0; e < this.shape[0]; e++) {
      const base = e * l.wordsPerExpert + (which === 'zeros' ? l.zeroWord : l.scaleWord);
      for (let g = 0; g < groups; g++) {
        out[e * groups + g] = l.kind === 'mxfp4' ? 2 ** (((words[base + (g >> 2)] >>> (8 * (g & 3))) & 255) - 127) :
          l.kind === 'nf4-dq' ? doubleQuantizedAbsmax(l, words, floats, e * l.wordsPerExpert, g) : floats[base + g];
      }
    }
    return tf.tensor3d(out, [this.shape[0], l.outputs, l.groupsPerOutput]);
  }

  dispose(): void { this.packed.dispose(); }
}

function checkPackedTensor(
    op: string, arg: string, packed: unknown, kind: string, shape: [number, number, number], words: number): void {
  if (!(packed instanceof tf.Tensor)) fail(op, `'${arg}' must be an int32 tensor [${shape[0]}, ${words}] but got ${String(packed)}`);
  if (packed.isDisposed) fail(op, `'${arg}' was already disposed`);
  if (packed.dtype !== 'int32' || packed.rank !== 2 || packed.shape[0] !== shape[0] || packed.shape[1] !== words) {
    fail(op, `'${arg}' must be an int32 tensor [${shape[0]}, ${words}] (${kind} ${isQuantizedKind(kind) ? 'words' : 'halves'} of [${shape}]) ` +
        `but got a ${packed.dtype} tensor of shape [${packed.shape}]`);
  }
}

/** A routed-expert weight as the ops take it: float32, or packed 16-bit (frozen). */
export type ExpertWeightTensor = tf.Tensor3D | PackedExpertWeight;

export function isPackedExpertWeight(value: unknown): value is PackedExpertWeight {
  return value instanceof PackedExpertWeight;
}

/** An expert weight argument: a 3-D float32 tensor or a valid, undisposed PackedExpertWeight. */
export function assertExpertWeight(op: string, arg: string, value: unknown): asserts value is ExpertWeightTensor {
  if (value instanceof PackedExpertWeight) {
    checkPackedTensor(op, `${arg}.packed`, value.packed, value.kind, value.shape, value.wordsPerExpert);
    return;
  }
  if (!(value instanceof tf.Tensor)) {
    fail(op, `'${arg}' must be a 3-D float32 tensor or a PackedExpertWeight but got ${value === null ? 'null' : typeof value}`);
  }
  if (value.isDisposed) fail(op, `'${arg}' was already disposed`);
  if (value.rank !== 3) fail(op, `'${arg}' must be 3-D but got shape [${value.shape}]`);
  if (value.dtype !== 'float32') fail(op, `'${arg}' must be float32 or a PackedExpertWeight but got ${value.dtype} (shape [${value.shape}])`);
}

// ---------------------------------------------------------------------------------------------
// the 16-bit formats on the host

/** float32 → bf16 bits, rounded to nearest even as torch's `.to(torch.bfloat16)`; NaN stays NaN. */
export function bfloat16Bits(v: number): number {
  return encodeBFloat16(Float32Array.of(v))[0];
}

/** float32 → IEEE binary16 bits, rounded to nearest even; overflow gives ±Infinity. */
export function float16Bits(v: number): number {
  return encodeFloat16(Float32Array.of(v))[0];
}

/**
 * Decodes `count` elements of one expert, whose first word is words[wOff], into float32 at
 * dst[dOff …]. `dstBits` is an Int32Array over the same memory as `dst` (bf16 is written as bits:
 * exact and branch-free). Shared by the cpu and wasm kernels (wasm: HEAP32 / HEAPF32).
 */
export function decodeExpertInto(
    kind: HalfKind, count: number, words: Int32Array, wOff: number,
    dst: Float32Array, dstBits: Int32Array, dOff: number): void {
  const pairs = count >> 1;
  if (kind === 'bf16') {
    for (let i = 0; i < pairs; i++) {
      const w = words[wOff + i];
      dstBits[dOff + 2 * i] = w << 16;
      dstBits[dOff + 2 * i + 1] = w & -65536;
    }
    if (count & 1) dstBits[dOff + count - 1] = words[wOff + pairs] << 16;
  } else {
    const table = float16Values();
    for (let i = 0; i < pairs; i++) {
      const w = words[wOff + i];
      dst[dOff + 2 * i] = table[w & 0xffff];
      dst[dOff + 2 * i + 1] = table[w >>> 16];
    }
    if (count & 1) dst[dOff + count - 1] = table[words[wOff + pairs] & 0xffff];
  }
}

/** What a kernel knows of a packed weight: its kind, logical shape and options (the kernel attrs). */
export interface PackedFormat {
  kind: PackedKind;
  shape: readonly number[];
  inputAxis: 1 | 2;
  /** quantized kinds' group size (ignored for 16-bit) */
  groupSize: number;
}

/** The quantized layout of `f`, else null (cached per call site by the kernels: cheap anyway). */
export function layoutOf(f: PackedFormat): QuantizedLayout | null {
  return isQuantizedKind(f.kind) ? quantizedLayout(f.kind, f.shape, f.inputAxis, f.groupSize) : null;
}

/**
 * Decodes expert e of any packed format (its first word words[wOff]) into float32 [rows, cols] at
 * dst[dOff …]; `dstBits` an Int32Array over the same memory (see decodeExpertInto).
 */
export function decodePackedExpertInto(
    f: PackedFormat, layout: QuantizedLayout | null, words: Int32Array, wOff: number,
    dst: Float32Array, dstBits: Int32Array, dOff: number): void {
  if (layout !== null) decodeQuantizedExpertInto(layout, words, wOff, dst, dOff);
  else decodeExpertInto(f.kind as HalfKind, f.shape[1] * f.shape[2], words, wOff, dst, dstBits, dOff);
}

/**
 * A packed weight from 16-bit values (bits) laid out as the f32 weight would be, expert-major
 * [E, rows, cols]: the values are copied as they are, each expert starting on a word.
 *
 * ```js
 * const w = packedExpertWeightFromBits('bf16', [E, 2 * I, H], halves);  // halves: Uint16Array(E·2I·H)
 * ```
 */
export function packedExpertWeightFromBits(kind: HalfKind, shape: readonly number[], halves: Uint16Array): PackedExpertWeight {
  const op = 'packedExpertWeightFromBits';
  if (!Array.isArray(shape) || shape.length !== 3 || !shape.every(d => Number.isInteger(d) && d >= 1)) {
    fail(op, `'shape' must be [E, rows, cols] of positive integers but got ${JSON.stringify(shape)}`);
  }
  const [e, rows, cols] = shape;
  const block = rows * cols;
  if (!(halves instanceof Uint16Array) || halves.length !== e * block) {
    fail(op, `'halves' must be a Uint16Array of ${e * block} values (shape [${shape}]) but got ` +
        `${halves instanceof Uint16Array ? `${halves.length} values` : String(halves)}`);
  }
  const words = packedWordsPerExpert(rows, cols);
  const data = new Int32Array(e * words);
  const view = new Uint16Array(data.buffer);
  for (let i = 0; i < e; i++) view.set(halves.subarray(i * block, (i + 1) * block), 2 * i * words);
  return new PackedExpertWeight(kind, shape, tf.tensor2d(data, [e, words], 'int32'));
}

/**
 * A float32 weight [E, rows, cols] rounded to bf16 or f16 (nearest even, as torch does) and
 * packed, or quantized to int8, int4, NF4 or MXFP4 (src/ops/quantized.ts) one expert at a time.
 *
 * ```js
 * const packed = packExpertWeight(gateUp, 'bf16');
 * const q = packExpertWeight(gateUp, 'int4', {groupSize: 128});  // [E, out, in]: groups along in
 * ```
 */
export function packExpertWeight(weight: tf.Tensor3D, kind: PackedKind, options: PackedOptions = {}): PackedExpertWeight {
  checkPackArgs('packExpertWeight', weight, kind);
  return packExpertValues('packExpertWeight', weight.dataSync() as Float32Array, weight.shape, kind, options);
}

/**
 * @internal packExpertWeight reading `weight` asynchronously, so it runs on webgpu too (merge's
 * re-quantizing): the values are read to the host either way, as packing is done there.
 */
export async function packExpertWeightAsync(weight: tf.Tensor3D, kind: PackedKind, options: PackedOptions = {}): Promise<PackedExpertWeight> {
  checkPackArgs('packExpertWeight', weight, kind);
  return packExpertValues('packExpertWeight', await weight.data() as Float32Array, weight.shape, kind, options);
}

function checkPackArgs(op: string, weight: tf.Tensor3D, kind: PackedKind): void {
  assertExpertWeight(op, 'weight', weight);
  if (weight instanceof PackedExpertWeight) fail(op, `'weight' is already packed (${weight.kind})`);
  if (!(PACKED_KINDS as readonly string[]).includes(kind)) {
    fail(op, `'kind' must be one of ${PACKED_KINDS.map(k => `'${k}'`).join(', ')} but got ${JSON.stringify(kind)}`);
  }
}

/** The packing itself, from the weight's values [E, rows, cols] on the host. */
function packExpertValues(
    op: string, values: Float32Array, shape: [number, number, number], kind: PackedKind, options: PackedOptions): PackedExpertWeight {
  if (!isQuantizedKind(kind)) {
    if (options.groupSize !== undefined || options.inputAxis !== undefined) fail(op, `'options' are for quantized kinds, not ${kind}`);
    return packedExpertWeightFromBits(kind, shape, kind === 'bf16' ? encodeBFloat16(values) : encodeFloat16(values));
  }
  const layout = quantizedLayout(kind, shape, options.inputAxis ?? 2, options.groupSize, op);
  const [e, rows, cols] = shape;
  const data = new Int32Array(e * layout.wordsPerExpert);
  for (let i = 0; i < e; i++) quantizeExpertInto(layout, values, i * rows * cols, data, i * layout.wordsPerExpert, op, 'weight');
  return new PackedExpertWeight(kind, shape, tf.tensor2d(data, [e, layout.wordsPerExpert], 'int32'), options);
}

/** `weight`'s format as the kernels take it. */
export function packedFormatOf(weight: PackedExpertWeight): PackedFormat {
  return { kind: weight.kind, shape: weight.shape, inputAxis: weight.inputAxis, groupSize: weight.groupSize ?? 0 };
}

function decodeWords(weight: PackedExpertWeight, experts: number, words: Int32Array): Float32Array {
  const [, rows, cols] = weight.shape;
  const block = rows * cols;
  const perExpert = weight.wordsPerExpert;
  const out = new Float32Array(experts * block);
  const bits = new Int32Array(out.buffer);
  const f = packedFormatOf(weight);
  for (let e = 0; e < experts; e++) decodePackedExpertInto(f, weight.layout, words, e * perExpert, out, bits, e * block);
  return out;
}

/**
 * MoEDecodePacked: input packed int32 [E, W]; out float32 [count, rows, cols], experts
 * first … first + count − 1 decoded. Registered where the packed words cannot be read to the host
 * synchronously (webgpu); elsewhere the decode runs on the host.
 */
export const DECODE_PACKED = 'MoEDecodePacked';
export interface DecodePackedAttrs {
  kind: PackedKind;
  first: number;
  count: number;
  rows: number;
  cols: number;
  /** quantized kinds: the input axis and group size (src/ops/quantized.ts) */
  inputAxis: 1 | 2;
  groupSize: number;
}

function decodeOnDevice(weight: PackedExpertWeight, first: number, count: number): tf.Tensor3D | null {
  if (tf.getKernel(DECODE_PACKED, tf.getBackend()) == null) return null;
  const [, rows, cols] = weight.shape;
  const attrs: DecodePackedAttrs = {
    kind: weight.kind, first, count, rows, cols, inputAxis: weight.inputAxis, groupSize: weight.groupSize ?? 0,
  };
  return tf.engine().runKernel(DECODE_PACKED, { packed: weight.packed }, attrs as unknown as tf.NamedAttrMap) as tf.Tensor3D;
}

/**
 * The whole weight decoded to float32 [E, rows, cols] (exact). For the reference block (the
 * oracle), saving and merging; the fused paths never call it. Reads the packed words to the host
 * (or decodes on the device where a MoEDecodePacked kernel is registered).
 *
 * ```js
 * const w = unpackExpertWeight(packed);  // float32 [E, rows, cols]
 * ```
 */
export function unpackExpertWeight(weight: ExpertWeightTensor): tf.Tensor3D {
  assertExpertWeight('unpackExpertWeight', 'weight', weight);
  if (!(weight instanceof PackedExpertWeight)) return tf.clone(weight);
  const e = weight.shape[0];
  const onDevice = decodeOnDevice(weight, 0, e);
  if (onDevice) return onDevice;
  return tf.tensor3d(decodeWords(weight, e, weight.packed.dataSync() as Int32Array), weight.shape);
}

/**
 * Expert `e`'s weight as float32 [rows, cols]: one expert group decoded (the composed fallback,
 * on backends without the packed kernels). Reads that expert's words to the host, or decodes on
 * the device where a MoEDecodePacked kernel is registered.
 */
export function packedExpertGroup(weight: PackedExpertWeight, e: number): tf.Tensor2D {
  const [, rows, cols] = weight.shape;
  const onDevice = decodeOnDevice(weight, e, 1);
  if (onDevice) {
    const group = tf.reshape(onDevice, [rows, cols]) as tf.Tensor2D;
    onDevice.dispose();
    return group;
  }
  const words = tf.tidy(() => tf.slice(weight.packed, [e, 0], [1, -1]));
  try {
    return tf.tensor2d(decodeWords(weight, 1, words.dataSync() as Int32Array), [rows, cols]);
  } finally {
    words.dispose();
  }
}

// ---------------------------------------------------------------------------------------------
// frozen dense (non-expert) weights: attention projections, the token embedding

/**
 * A frozen 2-D weight [rows, cols] (a linear's [out, in], an embedding's [vocab, hidden]) kept in
 * its stored 16-bit precision: the expert wrapper with one "expert" per row, i.e. a
 * PackedExpertWeight of shape [rows, 1, cols] over int32 words [rows, ceil(cols/2)]. Each row
 * starts on a word, so a gather of packed rows is a gather of words (the embedding lookup), and
 * the decode is the experts' own (`unpackExpertWeight`: on the host on cpu and wasm, the
 * MoEDecodePacked kernel on webgpu). On cpu and wasm the ops decode it inside the product that uses
 * it and free the float32 copy when that product is done; on webgpu the products and the row gather
 * read the halves in place (MoEPackedDenseMatMul, MoEGatherPackedRows: no float32 copy at all).
 *
 * ```js
 * const w = packDenseWeight(tf.randomNormal([64, 32]), 'bf16');
 * w.shape;                 // [64, 32]
 * w.rowsAsExperts.packed;  // int32 [64, 16]
 * const f32 = unpackDenseWeight(w);  // float32 [64, 32], the bf16-rounded values
 * ```
 */
export class PackedDenseWeight {
  /** the logical shape [rows, cols] of the float32 weight it stands for */
  readonly shape: [number, number];
  /** the same words seen as the expert wrapper: one expert per row, shape [rows, 1, cols] */
  readonly rowsAsExperts: PackedExpertWeight;

  constructor(kind: HalfKind, shape: readonly number[], packed: tf.Tensor) {
    const op = 'PackedDenseWeight';
    if (!(HALF_KINDS as readonly string[]).includes(kind)) {
      fail(op, `'kind' must be one of ${HALF_KINDS.map(k => `'${k}'`).join(', ')} but got ${JSON.stringify(kind)}`);
    }
    if (!Array.isArray(shape) || shape.length !== 2 || !shape.every(d => Number.isInteger(d) && d >= 1)) {
      fail(op, `'shape' must be [rows, cols] of positive integers but got ${JSON.stringify(shape)}`);
    }
    this.shape = [shape[0], shape[1]];
    this.rowsAsExperts = new PackedExpertWeight(kind, [shape[0], 1, shape[1]], packed);
  }

  get kind(): HalfKind { return this.rowsAsExperts.kind as HalfKind; }
  /** int32 [rows, ceil(cols/2)] */
  get packed(): tf.Tensor2D { return this.rowsAsExperts.packed; }
  get rank(): 2 { return 2; }
  get isDisposed(): boolean { return this.packed.isDisposed; }
  dispose(): void { this.packed.dispose(); }
}

/** A frozen 2-D weight as the dense ops take it: float32, or packed 16-bit. */
export type DenseWeightTensor = tf.Tensor2D | PackedDenseWeight;

export function isPackedDenseWeight(value: unknown): value is PackedDenseWeight {
  return value instanceof PackedDenseWeight;
}

/** int32 words of one row of a packed dense weight with `cols` columns. */
export function packedDenseWordsPerRow(cols: number): number {
  return packedWordsPerExpert(1, cols);
}

/** A dense weight argument: a 2-D float32 tensor or a valid, undisposed PackedDenseWeight. */
export function assertDenseWeight(op: string, arg: string, value: unknown): asserts value is DenseWeightTensor {
  if (value instanceof PackedDenseWeight) {
    assertExpertWeight(op, arg, value.rowsAsExperts);
    return;
  }
  if (!(value instanceof tf.Tensor)) {
    fail(op, `'${arg}' must be a 2-D float32 tensor or a PackedDenseWeight but got ${value === null ? 'null' : typeof value}`);
  }
  if (value.isDisposed) fail(op, `'${arg}' was already disposed`);
  if (value.rank !== 2) fail(op, `'${arg}' must be 2-D but got shape [${value.shape}]`);
  if (value.dtype !== 'float32') fail(op, `'${arg}' must be float32 or a PackedDenseWeight but got ${value.dtype} (shape [${value.shape}])`);
}

/**
 * 16-bit values as stored ([rows, cols] order) packed as a dense weight, each row on a word.
 *
 * ```js
 * const w = packedDenseWeightFromBits('bf16', [out, inSize], halves);  // halves: Uint16Array(out·in)
 * ```
 */
export function packedDenseWeightFromBits(kind: HalfKind, shape: readonly number[], halves: Uint16Array): PackedDenseWeight {
  return new PackedDenseWeight(kind, shape, packedDenseWords(kind, shape, halves));
}

/**
 * @internal The int32 words [rows, ceil(cols/2)] of a dense weight's stored halves (host memory),
 * for a loader that uploads them itself.
 */
export function packedDenseWordsOf(kind: HalfKind, shape: readonly number[], halves: Uint16Array): { words: Int32Array; shape: [number, number] } {
  const op = 'packedDenseWeightFromBits';
  if (!Array.isArray(shape) || shape.length !== 2 || !shape.every(d => Number.isInteger(d) && d >= 1)) {
    fail(op, `'shape' must be [rows, cols] of positive integers but got ${JSON.stringify(shape)}`);
  }
  if (!(HALF_KINDS as readonly string[]).includes(kind)) {
    fail(op, `'kind' must be one of ${HALF_KINDS.map(k => `'${k}'`).join(', ')} but got ${JSON.stringify(kind)}`);
  }
  const [rows, cols] = shape;
  if (!(halves instanceof Uint16Array) || halves.length !== rows * cols) {
    fail(op, `'halves' must be a Uint16Array of ${rows * cols} values (shape [${shape}]) but got ` +
        `${halves instanceof Uint16Array ? `${halves.length} values` : String(halves)}`);
  }
  const perRow = packedDenseWordsPerRow(cols);
  const words = new Int32Array(rows * perRow);
  const view = new Uint16Array(words.buffer);
  if (2 * perRow === cols) view.set(halves);  // even rows: the file's halves as they are
  else for (let r = 0; r < rows; r++) view.set(halves.subarray(r * cols, (r + 1) * cols), 2 * r * perRow);
  return { words, shape: [rows, perRow] };
}

function packedDenseWords(kind: HalfKind, shape: readonly number[], halves: Uint16Array): tf.Tensor2D {
  const { words, shape: wordShape } = packedDenseWordsOf(kind, shape, halves);
  return tf.tensor2d(words, wordShape, 'int32');
}

/**
 * A float32 weight [rows, cols] rounded to bf16 or f16 (nearest even, as torch does) and packed
 * as a dense weight (reads it to the host).
 *
 * ```js
 * const w = packDenseWeight(qProj, 'bf16');
 * ```
 */
export function packDenseWeight(weight: tf.Tensor2D, kind: HalfKind): PackedDenseWeight {
  const op = 'packDenseWeight';
  assertDenseWeight(op, 'weight', weight);
  if (weight instanceof PackedDenseWeight) fail(op, `'weight' is already packed (${weight.kind})`);
  if (!(HALF_KINDS as readonly string[]).includes(kind)) {
    fail(op, `'kind' must be one of ${HALF_KINDS.map(k => `'${k}'`).join(', ')} but got ${JSON.stringify(kind)}`);
  }
  const values = weight.dataSync() as Float32Array;
  return packedDenseWeightFromBits(kind, weight.shape, kind === 'bf16' ? encodeBFloat16(values) : encodeFloat16(values));
}

/**
 * The whole dense weight as float32 [rows, cols] (exact; a new tensor the caller owns; a float32
 * weight is cloned). The experts' decoder: on the host (cpu, wasm) or the MoEDecodePacked kernel.
 *
 * ```js
 * const y = tf.tidy(() => tf.matMul(x, unpackDenseWeight(w), false, true));  // the copy freed with the tidy
 * ```
 */
export function unpackDenseWeight(weight: DenseWeightTensor): tf.Tensor2D {
  assertDenseWeight('unpackDenseWeight', 'weight', weight);
  if (!(weight instanceof PackedDenseWeight)) return tf.clone(weight);
  const decoded = unpackExpertWeight(weight.rowsAsExperts);  // [rows, 1, cols]
  const flat = tf.reshape(decoded, weight.shape) as tf.Tensor2D;
  decoded.dispose();
  return flat;
}

/**
 * MoEGatherPackedRows: inputs packed int32 [rows, ceil(cols/2)] (a PackedDenseWeight's words) and
 * indices int32 [N]; output float32 [N, cols], row indices[i] decoded exactly (row i is zeros for an
 * index outside [0, rows), as tfjs-webgpu's Gather gives). Registered where tfjs's own Gather is not
 * exact on int32 words (webgpu: it moves them through float32, which rounds words above 2^24); there
 * only the looked-up rows are read and decoded. Elsewhere tf.gather of the words, then the decode.
 */
export const GATHER_PACKED_ROWS = 'MoEGatherPackedRows';
export interface GatherPackedRowsAttrs {
  kind: HalfKind;
  /** the logical columns (halves per row, without the padding half of an odd count) */
  cols: number;
}

/**
 * Rows `indices` (int32 [N]) of a dense weight as float32 [N, cols]: for a packed weight only
 * those rows' words are gathered and decoded (the embedding lookup), never the whole table: on
 * webgpu in one MoEGatherPackedRows program (exact for every word), elsewhere a gather of the
 * words and the host decode.
 *
 * ```js
 * const h = gatherDenseRows(embedding, tf.tensor1d([5, 1, 5], 'int32'));  // [3, hidden]
 * ```
 */
export function gatherDenseRows(weight: DenseWeightTensor, indices: tf.Tensor1D): tf.Tensor2D {
  const op = 'gatherDenseRows';
  assertDenseWeight(op, 'weight', weight);
  if (!(indices instanceof tf.Tensor) || indices.rank !== 1 || indices.dtype !== 'int32') {
    fail(op, `'indices' must be a 1-D int32 tensor but got ${indices instanceof tf.Tensor ? `a ${indices.dtype} tensor of shape [${indices.shape}]` : String(indices)}`);
  }
  if (!(weight instanceof PackedDenseWeight)) return tf.gather(weight, indices);
  if (indices.shape[0] === 0) return tf.zeros([0, weight.shape[1]]);
  if (tf.getKernel(GATHER_PACKED_ROWS, tf.getBackend()) != null) {
    const attrs: GatherPackedRowsAttrs = { kind: weight.kind, cols: weight.shape[1] };
    return tf.engine().runKernel(GATHER_PACKED_ROWS, { packed: weight.packed, indices }, attrs as unknown as tf.NamedAttrMap) as tf.Tensor2D;
  }
  const words = tf.gather(weight.packed, indices);  // int32 [N, ceil(cols/2)]
  try {
    return unpackDenseWeight(new PackedDenseWeight(weight.kind, [indices.shape[0], weight.shape[1]], words));
  } finally {
    words.dispose();
  }
}

/**
 * MoEPackedDenseMatMul: inputs a float32 [N, K], packed int32 [rows, ceil(cols/2)] (a
 * PackedDenseWeight W [rows, cols]) and optionally bias float32 [outCols]; attrs kind, rows, cols,
 * transposeWeight. Output a·Wᵀ [N, rows] (K = cols) with transposeWeight, a·W [N, cols] (K = rows)
 * without, + bias after the product (one rounding, as tf.add). A backend registers it to read the
 * halves inside the product (webgpu: decoded in the tile loads); elsewhere the weight is decoded
 * for the product and freed after it.
 */
export const PACKED_DENSE_MATMUL = 'MoEPackedDenseMatMul';
export interface PackedDenseMatMulAttrs {
  kind: HalfKind;
  rows: number;
  cols: number;
  transposeWeight: boolean;
  /**
   * a holds a gradient (dy of dx = dy·W): a backend that rounds it to f16 (webgpu's tensor cores)
   * scales it per tensor first, as gradients can lie below f16's smallest normal; absent: false
   */
  gradient?: boolean;
}

/**
 * MoEDenseMatMul: MoEPackedDenseMatMul for a float32 W: inputs a float32 [N, K], weight float32
 * [rows, cols] and optionally bias float32 [outCols]; attrs rows, cols, transposeWeight; the same
 * output. A backend registers it where its own program beats the stock tf.matMul (webgpu: the
 * experts' grouped program with one group, see DENSE_PROGRAM_FLAG); elsewhere tf.matMul runs.
 */
export const DENSE_MATMUL = 'MoEDenseMatMul';
export interface DenseMatMulAttrs {
  rows: number;
  cols: number;
  transposeWeight: boolean;
  /** as PackedDenseMatMulAttrs.gradient */
  gradient?: boolean;
}

/**
 * A LoRA branch's expansion added to a dense product (denseWeightMatMul's `tail`): + a·bᵀ for b
 * [outCols, r] (`transposeB`: the forward's down·Bᵀ) or + a·b for b [r, outCols] (the backward's
 * g·A), a [N, r]. The kernels take it as inputs `tailA`, `tailB` and the attr `tailTransposeB`.
 */
export interface DenseProductTail { a: tf.Tensor2D; b: tf.Tensor2D; transposeB: boolean }

/**
 * MoEDenseMatMul's gradient, for a product on tfjs's tape (LinearLoRA's composed path with a
 * trained W or bias, a tied head trained by full fine-tuning): the input's through
 * denseWeightMatMul again (the other direction, so the flag picks it too), W's as tfjs's product
 * (dyᵀ·a for a·Wᵀ, aᵀ·dy for a·W), the bias's the column sums of dy.
 */
tf.registerGradient({
  kernelName: DENSE_MATMUL,
  inputsToSave: ['a', 'weight'],
  gradFunc: (dy: tf.Tensor | tf.Tensor[], saved: tf.Tensor[], attrs: tf.NamedAttrMap) => {
    const [a, weight] = saved as [tf.Tensor2D, tf.Tensor2D];
    const g = dy as tf.Tensor2D;
    const transposeWeight = (attrs as unknown as DenseMatMulAttrs).transposeWeight;
    return {
      a: () => denseWeightMatMul(g, weight, !transposeWeight, null, 'gradient'),
      weight: () => transposeWeight ? tf.matMul(g, a, true, false) : tf.matMul(a, g, true, false),
      bias: () => tf.sum(g, 0),
    };
  },
});

/**
 * tf.env() flag: which products of a float32 dense W run MoEDenseMatMul where it is registered
 * (webgpu). 'forward': x·Wᵀ only (the default: on the H100, tfjs-webgpu's product of the forward
 * shapes is the slow one, up to 1.8× the grouped program's; for dy·W ours is 1.0–1.4× faster, but
 * the end-to-end A/B of 'grouped' has not yet run in one lease with the default, docs/webgpu.md);
 * 'grouped': x·Wᵀ and dy·W, and on webgpu MoEMatMulAdd's products too (loraLinear's LoRA sums);
 * 'tfjs': neither (tf.matMul, as before). It picks between f32 programs only: a product the
 * backend runs on tensor cores (registerDenseKernelOverride: webgpu with WEBGPU_MOE_TENSOR_CORES on
 * a device that has them) goes to MoEDenseMatMul whatever it says, since there our program (f16
 * operands, f32 accumulation) is the fast one and tfjs has no tensor-core product at all.
 */
export const DENSE_PROGRAM_FLAG = 'WEBGPU_MOE_DENSE_PROGRAM';
export const DENSE_PROGRAM_CHOICES = ['forward', 'grouped', 'tfjs'] as const;
export type DenseProgramChoice = typeof DENSE_PROGRAM_CHOICES[number];
tf.env().registerFlag(DENSE_PROGRAM_FLAG, () => 'forward');

/** DENSE_PROGRAM_FLAG's value; an unknown one throws, naming the flag and the choices. */
export function denseProgramChoice(): DenseProgramChoice {
  const choice = tf.env().get(DENSE_PROGRAM_FLAG);
  if (!(DENSE_PROGRAM_CHOICES as readonly unknown[]).includes(choice)) {
    fail('denseWeightMatMul', `tf.env() flag ${DENSE_PROGRAM_FLAG} must be one of ${DENSE_PROGRAM_CHOICES.map(c => `'${c}'`).join(', ')} but got ${JSON.stringify(choice)}`);
  }
  return choice as DenseProgramChoice;
}

/**
 * Whether a backend's MoEDenseMatMul takes a product of `rows` rows, `outCols` × `inner`, whatever
 * DENSE_PROGRAM_FLAG says (webgpu: when it runs that product on tensor cores).
 */
export type DenseKernelOverride = (rows: number, outCols: number, inner: number) => boolean;
const denseKernelOverrides = new Map<string, DenseKernelOverride>();

/** Sets (or, with undefined, removes) `backendName`'s DenseKernelOverride; called by the backend's registration. */
export function registerDenseKernelOverride(backendName: string, takes: DenseKernelOverride | undefined): void {
  if (takes === undefined) denseKernelOverrides.delete(backendName);
  else denseKernelOverrides.set(backendName, takes);
}

/** Whether this product of a float32 W goes to MoEDenseMatMul: the backend's override, else the flag. */
function denseProgramTakes(a: tf.Tensor2D, weight: tf.Tensor2D, transposeWeight: boolean): boolean {
  const choice = denseProgramChoice();
  const [outCols, inner] = transposeWeight ? weight.shape : [weight.shape[1], weight.shape[0]];
  if (denseKernelOverrides.get(tf.getBackend())?.(a.shape[0], outCols, inner) === true) return true;
  return choice === 'grouped' || (choice === 'forward' && transposeWeight);
}

/**
 * @internal a·Wᵀ (`transposeWeight`) or a·W for a frozen dense W, float32 or packed, plus `bias`
 * [outCols] if given: a packed W is read in the product where MoEPackedDenseMatMul is registered
 * (no float32 copy of it), else decoded for this product only; a float32 W goes to MoEDenseMatMul
 * where it is registered and DENSE_PROGRAM_FLAG (or the backend's override) picks it for this
 * direction, else tf.matMul. `operand` 'gradient': a is a gradient (the kernels' `gradient` attr).
 * `tail`: a LoRA branch's expansion added to the result, inside the product's own kernel where the
 * backend folds it (webgpu's tensor cores: one more step of the reduction), else by matMulAdd
 * after it. loraLinear passes it inside its customGrad: the tape never differentiates a tail.
 * No argument checks beyond tfjs's: the callers (loraLinear, LinearLoRA) pass shapes they checked.
 *
 * ```js
 * const y = denseWeightMatMul(x, qProj, true, null);                 // x [N, in], qProj [out, in] → [N, out]
 * const dx = denseWeightMatMul(dy, qProj, false, null, 'gradient');  // dy [N, out] → [N, in]
 * ```
 */
export function denseWeightMatMul(a: tf.Tensor2D, weight: DenseWeightTensor, transposeWeight: boolean, bias: tf.Tensor1D | null,
    operand: 'activation' | 'gradient' = 'activation', tail?: DenseProductTail): tf.Tensor2D {
  const withBias: tf.NamedTensorMap = bias === null ? {} : { bias };
  const withTail: tf.NamedTensorMap = tail === undefined ? {} : { tailA: tail.a, tailB: tail.b };
  const tailAttrs = tail === undefined ? {} : { tailTransposeB: tail.transposeB };
  const gradient = operand === 'gradient';
  if (weight instanceof PackedDenseWeight && tf.getKernel(PACKED_DENSE_MATMUL, tf.getBackend()) != null) {
    const attrs: PackedDenseMatMulAttrs = { kind: weight.kind, rows: weight.shape[0], cols: weight.shape[1], transposeWeight, gradient };
    const inputs: tf.NamedTensorMap = { a, packed: weight.packed, ...withBias, ...withTail };
    return tf.engine().runKernel(PACKED_DENSE_MATMUL, inputs, { ...attrs, ...tailAttrs } as unknown as tf.NamedAttrMap) as tf.Tensor2D;
  }
  if (!(weight instanceof PackedDenseWeight) && weight.dtype === 'float32' && tf.getKernel(DENSE_MATMUL, tf.getBackend()) != null &&
      denseProgramTakes(a, weight, transposeWeight)) {
    const attrs: DenseMatMulAttrs = { rows: weight.shape[0], cols: weight.shape[1], transposeWeight, gradient };
    const inputs: tf.NamedTensorMap = { a, weight, ...withBias, ...withTail };
    return tf.engine().runKernel(DENSE_MATMUL, inputs, { ...attrs, ...tailAttrs } as unknown as tf.NamedAttrMap) as tf.Tensor2D;
  }
  // not tf.fused.matMul with the bias: tfjs-backend-wasm 4.22's FusedMatMul adds it wrongly with transposeB
  const product = tf.tidy(() => {
    const W = weight instanceof PackedDenseWeight ? unpackDenseWeight(weight) : weight;
    const y = tf.matMul(a, W, false, transposeWeight) as tf.Tensor2D;
    return bias === null ? y : tf.add(y, bias) as tf.Tensor2D;
  });
  if (tail === undefined) return product;
  const sum = matMulAdd(tail.a, tail.b, false, tail.transposeB, product);
  product.dispose();
  return sum;
}
