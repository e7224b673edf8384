/**
 * bitsandbytes checkpoints as transformers saves them (config.json `quantization_config.quant_method:
 * "bitsandbytes"`): every quantized nn.Linear `X` has, beside its bias,
 *
 * - 4-bit (`load_in_4bit`, bnb.nn.Linear4bit; bitsandbytes/nn/modules.py `_save_to_state_dict`,
 *   functional.py `QuantState.as_dict(packed=True)`):
 *   `X.weight` U8 [⌈n/2⌉, 1], two 4-bit codes a byte, element 2j in the HIGH nibble of byte j
 *   (backends/default/ops.py `quantize_4bit`: `(q[::2] << 4) | q[1::2]`), n = out·in taken
 *   row-major; `X.weight.absmax` F32 [⌈n/blocksize⌉], one per `blocksize` consecutive elements of
 *   that flat order; `X.weight.quant_map` F32 [16]; `X.weight.quant_state.bitsandbytes__nf4` (or
 *   `__fp4`) U8, the UTF-8 JSON {quant_type, blocksize, dtype, shape} (utils.py
 *   `pack_dict_to_tensor`). With double quantization (`bnb_4bit_use_double_quant`) absmax is U8
 *   codes into `X.weight.nested_quant_map` F32 [256] with `X.weight.nested_absmax` F32 per
 *   `nested_blocksize` (256) of them, and the JSON adds nested_blocksize, nested_dtype and
 *   nested_offset. Decode (default/ops.py `_dequantize_4bit_compute`, functional.py
 *   `dequantize_4bit`): absmax_b = f32(f32(nested_quant_map[a_b] · nested_absmax[⌊b/256⌋]) +
 *   offset) when nested; w_j = f32(code[q_j] · absmax[⌊j/blocksize⌋]), then rounded to `dtype`.
 *   `code` is bitsandbytes' built-in NF4 or FP4 table (the kernels use it, not the file's
 *   quant_map, so a quant_map that differs from it is refused).
 * - 8-bit (`load_in_8bit`, bnb.nn.Linear8bitLt): `X.weight` I8 [out, in], `X.SCB` F32 [out] (the
 *   row absmax) and `X.weight_format` U8 scalar, 0 = row-major (the only layout bitsandbytes still
 *   writes or reads, utils.py LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING). Decode (_ops.py
 *   `int8_vectorwise_dequant`): w = f32(f32(q · SCB) · f32(1/127)).
 *
 * transformers quantizes nn.Linear modules only, so MoE experts are bnb-quantized only where they
 * are per-expert linears (Mixtral's `experts.N.w1`, OLMoE's and Qwen's `experts.N.gate_proj`:
 * checkpoints written before transformers 5 fused the experts into 3-D parameters, which bnb
 * leaves as they are). Those are the Hub's per-expert names this package already reads.
 *
 * `bnbTensorSource` shows each such `X.weight` as one tensor of its real shape and dtype (4-bit:
 * the quant state's dtype; 8-bit: F32, what int8_vectorwise_dequant gives), decoded on read; it
 * also gives the codes and scales as this package's own 'nf4' / 'int8' words where the math is the
 * same (storedQuantizedKind / storedQuantizedParts), so such experts load without a decode.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { HFConfig } from '../models/families.js';
import { NF4_BLOCK_SIZE, NF4_CODE_BOOK, NF4_DQ_NESTED_BLOCK_SIZE } from '../ops/quantized.js';
import { describeValue } from '../util/describe.js';
import { decodeBFloat16, decodeFloat16, encodeBFloat16, encodeFloat16 } from '../util/half.js';
import type { TensorSource } from './hf_block.js';
import { CheckpointError } from './hf_checkpoint_core.js';

/** bitsandbytes' FP4 table by code (functional.py get_4bit_type('fp4'): the values over their absmax, 12). */
export const BNB_FP4_CODE_BOOK: Float32Array = Float32Array.from(
    [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3], v => v / 12);

/** The 4-bit tables by quant_type: NF4 is this package's own NF4_CODE_BOOK (the same 16 floats). */
const CODE_BOOKS: Readonly<Record<string, Float32Array>> = { nf4: NF4_CODE_BOOK, fp4: BNB_FP4_CODE_BOOK };
const BLOCK_SIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096];
const DTYPES: Readonly<Record<string, string>> = { bfloat16: 'BF16', float16: 'F16', float32: 'F32' };
const QUANT_STATE = '.quant_state.bitsandbytes__';

/** Whether config.json says the checkpoint was quantized by bitsandbytes. */
export function isBitsAndBytesConfig(config: HFConfig): boolean {
  const q = config['quantization_config'];
  return q != null && typeof q === 'object' && (q as Record<string, unknown>)['quant_method'] === 'bitsandbytes';
}

/** One 4-bit weight's quant state, checked. */
interface FourBitState {
  bits: 4;
  quantType: 'nf4' | 'fp4';
  blocksize: number;
  /** the dtype the weight decodes to: 'BF16', 'F16' or 'F32' */
  dtype: string;
  shape: number[];
  nested: { blocksize: number; offset: number } | null;
}

interface EightBitState { bits: 8; shape: number[] }

type BnbState = FourBitState | EightBitState;

/**
 * The absmax of every block of a double-quantized 4-bit weight: f32(f32(code[a_b] ·
 * nestedAbsmax[⌊b/nestedBlocksize⌋]) + offset), as bitsandbytes' dequantize_blockwise then `+=
 * offset` in float32.
 *
 * ```js
 * decodeNestedAbsmax(Uint8Array.of(255), Float32Array.of(0.5), dynamicMap, 256, 0.25);  // [f32(1 · 0.5) + 0.25] = [0.75]
 * ```
 */
export function decodeNestedAbsmax(
    codes: Uint8Array, nestedAbsmax: Float32Array, nestedCode: Float32Array, nestedBlocksize: number, offset: number): Float32Array {
  const f32 = Math.fround;
  const out = new Float32Array(codes.length);
  const off = f32(offset);
  for (let b = 0; b < codes.length; b++) {
    out[b] = f32(f32(nestedCode[codes[b]] * nestedAbsmax[Math.floor(b / nestedBlocksize)]) + off);
  }
  return out;
}

/**
 * The n float32 values of a bitsandbytes 4-bit weight: code[q_j] · absmax[⌊j/blocksize⌋] in
 * float32, q_j the high nibble of byte j/2 for even j and the low one for odd j.
 *
 * ```js
 * decode4bit(Uint8Array.of(0xF0), Float32Array.of(2), NF4_CODE_BOOK, 64, 2);  // [2, -2]: codes 15 (1) and 0 (−1)
 * ```
 */
export function decode4bit(packed: Uint8Array, absmax: Float32Array, code: Float32Array, blocksize: number, n: number): Float32Array {
  const out = new Float32Array(n);
  for (let j = 0; j < n; j++) {
    const byte = packed[j >> 1];
    out[j] = code[(j & 1) === 0 ? byte >> 4 : byte & 15] * absmax[Math.floor(j / blocksize)];
  }
  return out;
}

/**
 * A bitsandbytes 8-bit weight [rows, cols] as int8_vectorwise_dequant gives it:
 * f32(f32(q · SCB[row]) · f32(1/127)).
 *
 * ```js
 * decode8bit(Int8Array.of(127, -64), Float32Array.of(0.5), 1, 2);  // [f32(63.5 · f32(1/127)), ...] ≈ [0.5, -0.252]
 * ```
 */
export function decode8bit(codes: Int8Array, scb: Float32Array, rows: number, cols: number): Float32Array {
  const f32 = Math.fround;
  const reciprocal = f32(7.874015718698502e-3);  // the constant bitsandbytes multiplies by
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) out[r * cols + c] = f32(f32(codes[r * cols + c] * scb[r]) * reciprocal);
  }
  return out;
}

type ByteSource = TensorSource & { names?(): string[]; uint8Values?(name: string): Promise<Uint8Array> };

const sameShape = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((d, i) => d === b[i]);
const isPositiveInteger = (v: unknown): v is number => Number.isInteger(v) && (v as number) >= 1;

/**
 * `source` with every bitsandbytes-quantized linear weight shown as one tensor of its real shape
 * (4-bit: dtype of its quant state; 8-bit: F32), decoded when read; their quant-state tensors are
 * hidden; every other tensor as it is. Every quantized weight is checked first (its quant state
 * JSON, the shapes and dtypes of its tensors, the code book), all problems in one CheckpointError
 * that names each tensor with what it expected and what it found.
 *
 * ```js
 * const tensors = await bnbTensorSource(CheckpointSource.single(file), "'dir'");
 * tensors.info('model.layers.0.block_sparse_moe.experts.0.w1.weight');  // {dtype: 'F32', shape: [96, 64]}
 * ```
 */
export async function bnbTensorSource(source: ByteSource, where: string): Promise<TensorSource> {
  const names = source.names?.() ?? [];
  const problems: string[] = [];
  const states = new Map<string, BnbState>();
  const hidden = new Set<string>();
  const withState = new Set<string>();
  const bytesOf = typeof source.uint8Values === 'function' ? source.uint8Values.bind(source) : null;
  if (bytesOf === null) {
    throw new CheckpointError(`${where}: the bitsandbytes weights cannot be read: the tensor source has no uint8Values`);
  }
  const expectTensor = (name: string, dtype: string, shape: number[] | null, what: string): boolean => {
    if (!source.has(name)) {
      problems.push(`'${name}' (${what}) is missing`);
      return false;
    }
    const info = source.info(name);
    if (info.dtype !== dtype || (shape !== null && !sameShape(info.shape, shape))) {
      problems.push(`'${name}' (${what}) must be ${dtype}${shape === null ? '' : ` [${shape}]`} but is ${info.dtype} [${info.shape}]`);
      return false;
    }
    return true;
  };

  for (const stateName of names.filter(n => n.includes(QUANT_STATE))) {
    const weight = stateName.slice(0, stateName.indexOf(QUANT_STATE));
    const suffix = stateName.slice(stateName.indexOf(QUANT_STATE) + QUANT_STATE.length);
    hidden.add(stateName);
    withState.add(weight);
    for (const part of ['absmax', 'quant_map', 'nested_absmax', 'nested_quant_map']) hidden.add(`${weight}.${part}`);
    if (!(suffix in CODE_BOOKS)) {
      problems.push(`'${stateName}': quant_type must be 'nf4' or 'fp4' but the entry names ${describeValue(suffix)}`);
      continue;
    }
    const state = await fourBitState(stateName, suffix as 'nf4' | 'fp4', source, bytesOf, problems);
    if (state === null) continue;
    const n = state.shape[0] * state.shape[1];
    const blocks = Math.ceil(n / state.blocksize);
    let ok = expectTensor(weight, 'U8', [Math.ceil(n / 2), 1], `the packed 4-bit codes of a [${state.shape}] weight`);
    ok = expectTensor(`${weight}.quant_map`, 'F32', [16], `the ${state.quantType} code book`) && ok;
    if (state.nested === null) {
      ok = expectTensor(`${weight}.absmax`, 'F32', [blocks], `one absmax per block of ${state.blocksize}`) && ok;
    } else {
      ok = expectTensor(`${weight}.absmax`, 'U8', [blocks], `one 8-bit absmax code per block of ${state.blocksize}`) && ok;
      ok = expectTensor(`${weight}.nested_absmax`, 'F32', [Math.ceil(blocks / state.nested.blocksize)],
          `one absmax per ${state.nested.blocksize} absmax codes`) && ok;
      ok = expectTensor(`${weight}.nested_quant_map`, 'F32', [256], 'the 8-bit code book of the absmax codes') && ok;
    }
    if (!ok) continue;
    const map = await floatValues(source, `${weight}.quant_map`);
    const book = CODE_BOOKS[state.quantType];
    if (!map.every((v, i) => Object.is(v, book[i]) || (v === 0 && book[i] === 0))) {
      problems.push(`'${weight}.quant_map' must be bitsandbytes' ${state.quantType} table [${Array.from(book)}] ` +
          `(its kernels decode with it) but is [${Array.from(map)}]`);
      continue;
    }
    states.set(weight, state);
  }
  for (const scbName of names.filter(n => n.endsWith('.SCB'))) {
    const prefix = scbName.slice(0, -'SCB'.length);
    const weight = `${prefix}weight`;
    const formatName = `${prefix}weight_format`;
    hidden.add(scbName);
    hidden.add(formatName);
    withState.add(weight);
    if (!source.has(weight)) {
      problems.push(`'${scbName}' has no 8-bit weight '${weight}'`);
      continue;
    }
    const info = source.info(weight);
    if (info.dtype !== 'I8' || info.shape.length !== 2) {
      problems.push(`'${weight}' (an 8-bit weight, it has '${scbName}') must be I8 [out, in] but is ${info.dtype} [${info.shape}]`);
      continue;
    }
    if (!expectTensor(scbName, 'F32', [info.shape[0]], 'the absmax of each row')) continue;
    if (source.has(formatName)) {
      const format = source.info(formatName);
      const value = format.dtype === 'U8' && format.shape.length === 0 ? (await bytesOf(formatName))[0] : null;
      if (value !== 0) {
        problems.push(`'${formatName}' must be a U8 scalar 0 (row-major, the only layout bitsandbytes writes) but is ` +
            (value === null ? `${format.dtype} [${format.shape}]` : `${value}`));
        continue;
      }
    }
    states.set(weight, { bits: 8, shape: info.shape });
  }
  for (const name of names) {
    // a quantized weight without its quant state would otherwise fail later as "not a float tensor"
    if (name.endsWith('.weight') && !withState.has(name) && source.info(name).dtype === 'U8') {
      problems.push(`'${name}' is U8 (packed 4-bit?) but has no '${name}${QUANT_STATE}nf4' (or fp4) quant state`);
    }
  }
  if (problems.length > 0) {
    throw new CheckpointError(`\`bnbTensorSource()\`: ${where}: the bitsandbytes-quantized weights (quantization_config.quant_method ` +
        `'bitsandbytes') are not as bitsandbytes saves them; ${problems.length} problem${problems.length > 1 ? 's' : ''}:\n  ` +
        problems.join('\n  '));
  }

  /** a quantized weight's float32 values: bitsandbytes' dequantized floats, before the rounding to its dtype */
  const productValues = async (name: string, state: BnbState): Promise<Float32Array> => {
    const [rows, cols] = state.shape;
    if (state.bits === 8) {
      const bytes = await bytesOf(name);
      return decode8bit(new Int8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength), await floatValues(source, name.replace(/weight$/, 'SCB')), rows, cols);
    }
    return decode4bit(await bytesOf(name), await absmaxOf(name, state), CODE_BOOKS[state.quantType], state.blocksize, rows * cols);
  };
  const absmaxOf = async (name: string, state: FourBitState): Promise<Float32Array> => {
    if (state.nested === null) return floatValues(source, `${name}.absmax`);
    return decodeNestedAbsmax(await bytesOf(`${name}.absmax`), await floatValues(source, `${name}.nested_absmax`),
        await floatValues(source, `${name}.nested_quant_map`), state.nested.blocksize, state.nested.offset);
  };
  const dtypeOf = (state: BnbState) => state.bits === 8 ? 'F32' : state.dtype;
  const halfBits = async (name: string): Promise<Uint16Array> => {
    const state = states.get(name);
    if (state === undefined) return source.halfBits!(name);
    const values = await productValues(name, state);
    return dtypeOf(state) === 'BF16' ? encodeBFloat16(values) : encodeFloat16(values);
  };
  const wrapped: ByteSource = {
    names: () => [...names.filter(n => !hidden.has(n))],
    has: name => !hidden.has(name) && source.has(name),
    info: name => {
      const state = states.get(name);
      return state === undefined ? source.info(name) : { dtype: dtypeOf(state), shape: [...state.shape] };
    },
    tensor: async name => {
      const state = states.get(name);
      if (state === undefined) return source.tensor(name);
      const dtype = dtypeOf(state);
      // rounded to the weight's dtype, as bitsandbytes' dequantize_4bit returns it
      const values = dtype === 'F32' ? await productValues(name, state) :
        dtype === 'BF16' ? decodeBFloat16(await halfBits(name)) : decodeFloat16(await halfBits(name));
      return tf.tensor(values, state.shape, 'float32');
    },
    uint8Values: name => bytesOf(name),
    storedQuantizedKind: name => {
      const state = states.get(name);
      if (state === undefined) return null;
      if (state.bits === 8) return 'int8';
      // the same words as this package's nf4: blocks of 64 that never span two rows, one f32 absmax
      // each; double-quantized: nf4-dq when the nested blocks are 256 and whole in the weight (so
      // gate and up, fused one after the other, each keep their own nested absmax and offset)
      if (state.quantType !== 'nf4' || state.blocksize !== NF4_BLOCK_SIZE || state.shape[1] % NF4_BLOCK_SIZE !== 0) return null;
      if (state.nested === null) return 'nf4';
      const blocks = (state.shape[0] * state.shape[1]) / NF4_BLOCK_SIZE;
      return state.nested.blocksize === NF4_DQ_NESTED_BLOCK_SIZE && blocks % NF4_DQ_NESTED_BLOCK_SIZE === 0 ? 'nf4-dq' : null;
    },
    storedQuantizedParts: async name => {
      const state = states.get(name)!;
      if (state.bits === 8) {
        // int8 q · SCB / 127 per row is this package's int8 with scale f32(SCB / 127)
        const scb = await floatValues(source, name.replace(/weight$/, 'SCB'));
        return { codes: await bytesOf(name), scales: Float32Array.from(scb, v => v / 127) };
      }
      // bitsandbytes puts element 2j in the high nibble, this package in the low one: swap them
      const codes = Uint8Array.from(await bytesOf(name), b => ((b & 15) << 4) | (b >> 4));
      if (state.nested === null) return { codes, scales: await floatValues(source, `${name}.absmax`) };
      // nf4-dq: the absmax codes, nested absmax, offset and code map as bitsandbytes stored them
      return {
        codes, scales: null,
        doubleQuant: {
          absmaxCodes: await bytesOf(`${name}.absmax`), nestedAbsmax: await floatValues(source, `${name}.nested_absmax`),
          offset: Math.fround(state.nested.offset), map: await floatValues(source, `${name}.nested_quant_map`),
        },
      };
    },
  };
  if (typeof source.halfBits === 'function' || [...states.values()].some(s => dtypeOf(s) !== 'F32')) wrapped.halfBits = halfBits;
  return wrapped;
}

async function floatValues(source: TensorSource, name: string): Promise<Float32Array> {
  const t = await source.tensor(name);
  try {
    return t.dataSync() as Float32Array;
  } finally {
    t.dispose();
  }
}

/** The quant state JSON of a 4-bit weight, checked; null (and a problem) when it is not usable. */
async function fourBitState(
    stateName: string, quantType: 'nf4' | 'fp4', source: TensorSource, bytesOf: (name: string) => Promise<Uint8Array>,
    problems: string[]): Promise<FourBitState | null> {
  const info = source.info(stateName);
  if (info.dtype !== 'U8' || info.shape.length !== 1) {
    problems.push(`'${stateName}' must be U8 [bytes] (the quant state JSON) but is ${info.dtype} [${info.shape}]`);
    return null;
  }
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(await bytesOf(stateName)));
  } catch (e) {
    problems.push(`'${stateName}' must hold the quant state as UTF-8 JSON but does not parse: ${(e as Error).message}`);
    return null;
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    problems.push(`'${stateName}' must hold a JSON object {quant_type, blocksize, dtype, shape} but holds ${describeValue(json)}`);
    return null;
  }
  const s = json as Record<string, unknown>;
  const bad: string[] = [];
  if (s['quant_type'] !== quantType) bad.push(`quant_type must be '${quantType}' (the entry's name) but is ${describeValue(s['quant_type'])}`);
  if (!BLOCK_SIZES.includes(s['blocksize'] as number)) bad.push(`blocksize must be one of ${BLOCK_SIZES.join(', ')} but is ${describeValue(s['blocksize'])}`);
  if (typeof s['dtype'] !== 'string' || !(s['dtype'] in DTYPES)) {
    bad.push(`dtype must be one of ${Object.keys(DTYPES).join(', ')} but is ${describeValue(s['dtype'])}`);
  }
  const shape = s['shape'];
  if (!Array.isArray(shape) || shape.length !== 2 || !shape.every(isPositiveInteger)) {
    bad.push(`shape must be [out, in] (a linear weight) but is ${describeValue(shape)}`);
  }
  let nested: FourBitState['nested'] = null;
  if ('nested_blocksize' in s || 'nested_offset' in s || source.has(`${stateName.slice(0, stateName.indexOf(QUANT_STATE))}.nested_absmax`)) {
    if (!BLOCK_SIZES.includes(s['nested_blocksize'] as number)) {
      bad.push(`nested_blocksize must be one of ${BLOCK_SIZES.join(', ')} but is ${describeValue(s['nested_blocksize'])}`);
    }
    if (typeof s['nested_offset'] !== 'number' || !Number.isFinite(s['nested_offset'])) {
      bad.push(`nested_offset must be a finite number but is ${describeValue(s['nested_offset'])}`);
    }
    if (s['nested_dtype'] !== 'float32') bad.push(`nested_dtype must be 'float32' but is ${describeValue(s['nested_dtype'])}`);
    nested = { blocksize: s['nested_blocksize'] as number, offset: s['nested_offset'] as number };
  }
  if (bad.length > 0) {
    problems.push(`'${stateName}': ${bad.join('; ')}`);
    return null;
  }
  return {
    bits: 4, quantType, blocksize: s['blocksize'] as number, dtype: DTYPES[s['dtype'] as string],
    shape: shape as number[], nested,
  };
}
