/**
 * MXFP4 expert weights (gpt-oss on the Hub, config.json `quantization_config.quant_method: "mxfp4"`),
 * kept as MXFP4 (expertDtype 'stored' or 'mxfp4': `mxfp4Bytes` gives the stored bytes, which are
 * the quantized experts' own layout, src/ops/quantized.ts) or decoded on load into bf16 halves /
 * float32 for any other expertDtype.
 *
 * The Hub stores a weight `X` of transformers' layout [E, in, out] as two U8 tensors:
 * `X_blocks` [E, out, in/32, 16], two e2m1 codes a byte, and `X_scales` [E, out, in/32], one e8m0
 * exponent per 32 consecutive inputs. Byte b of a block holds inputs 2b (low nibble) and 2b + 1
 * (high nibble); code c means E2M1[c] (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, bit 3 the sign) and the
 * value is E2M1[c] · 2^(scale − 127). That is transformers' `convert_moe_packed_tensors`
 * (integrations/mxfp4.py), which then transposes [E, out, in] to [E, in, out].
 *
 * Every such value has at most two significant bits, so bf16 holds it exactly (the exponents of
 * 2^−127 .. 2^128 are f32's, and bf16 shares them; 6 · 2^128 overflows to infinity there as in
 * transformers' bf16 output). So the decoded weight is bf16 with no rounding, written straight
 * into the halves the packed experts are made of: no float32 copy of the weight is ever made.
 */
import type * as tf from '@tensorflow/tfjs-core';
import { tensor } from '@tensorflow/tfjs-core';
import { decodeBFloat16 } from '../util/half.js';
import { CheckpointError } from './hf_checkpoint_core.js';
import type { TensorSource } from './hf_block.js';

/** The 16 e2m1 values by code (transformers' FP4_VALUES). */
const E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6];

/** bf16 bits of every (scale, code) pair: index scale · 16 + code. */
let bitsTable: Uint16Array | null = null;
function mxfp4Bits(): Uint16Array {
  if (bitsTable !== null) return bitsTable;
  const f32 = new Float32Array(1);
  const u32 = new Uint32Array(f32.buffer);
  bitsTable = new Uint16Array(256 * 16);
  for (let scale = 0; scale < 256; scale++) {
    for (let code = 0; code < 16; code++) {
      f32[0] = E2M1[code] * 2 ** (scale - 127);  // exact in f32 (or ±infinity), so its top half is the bf16
      bitsTable[scale * 16 + code] = u32[0] >>> 16;
    }
  }
  return bitsTable;
}

/**
 * Decodes MXFP4 `blocks` [E, out, in/32, 16] and `scales` [E, out, in/32] (flat bytes) into bf16
 * bits of the weight [E, in, out] (transposed as transformers does).
 *
 * ```js
 * // one expert, out 1, in 32: byte 0x21 → inputs 0 and 1 are 0.5 and 1, times 2^(128 − 127)
 * decodeMXFP4(Uint8Array.of(0x21, ...new Array(15).fill(0)), Uint8Array.of(128), [1, 1, 1, 16]);  // bf16 of [1, 2, 0, ...]
 * ```
 */
export function decodeMXFP4(blocks: Uint8Array, scales: Uint8Array, blocksShape: readonly number[]): Uint16Array {
  const [experts, rows, groups, bytesPerGroup] = blocksShape;
  const cols = groups * bytesPerGroup * 2;  // `in`
  const table = mxfp4Bits();
  const out = new Uint16Array(experts * rows * cols);
  for (let e = 0; e < experts; e++) {
    const outBase = e * rows * cols;
    for (let r = 0; r < rows; r++) {
      for (let g = 0; g < groups; g++) {
        const group = (e * rows + r) * groups + g;
        const scaleRow = scales[group] * 16;
        const blockBase = group * bytesPerGroup;
        for (let b = 0; b < bytesPerGroup; b++) {
          const byte = blocks[blockBase + b];
          const col = (g * bytesPerGroup + b) * 2;
          // [E, in, out]: input col of output row r is at (col · rows + r)
          out[outBase + col * rows + r] = table[scaleRow + (byte & 0x0f)];
          out[outBase + (col + 1) * rows + r] = table[scaleRow + (byte >> 4)];
        }
      }
    }
  }
  return out;
}

/** A source that can give a U8 tensor's bytes (SafetensorsFile, CheckpointSource). */
type ByteSource = TensorSource & { uint8Values?(name: string): Promise<Uint8Array> };

/** Whether config.json says the checkpoint is MXFP4-quantized. */
export function isMXFP4Config(config: Record<string, unknown>): boolean {
  const q = config['quantization_config'];
  return q != null && typeof q === 'object' && (q as Record<string, unknown>)['quant_method'] === 'mxfp4';
}

/**
 * `source` with every `X_blocks` + `X_scales` pair shown as one BF16 tensor `X` [E, in, out]
 * (its halves decoded on read); every other tensor as it is. Every pair is checked first (both
 * present, U8, shapes that fit each other), all problems in one CheckpointError.
 *
 * ```js
 * const tensors = mxfp4TensorSource(CheckpointSource.single(file), 'model.safetensors');
 * tensors.info('model.layers.0.mlp.experts.down_proj');  // {dtype: 'BF16', shape: [32, 2880, 2880]}
 * ```
 */
export function mxfp4TensorSource(source: ByteSource, where: string): TensorSource {
  const op = 'mxfp4TensorSource';
  const names = (source as { names?(): string[] }).names?.() ?? [];
  const decoded = new Map<string, { blocks: string; scales: string; shape: number[] }>();
  const problems: string[] = [];
  for (const name of names.filter(n => n.endsWith('_blocks'))) {
    const base = name.slice(0, -'_blocks'.length);
    const scalesName = `${base}_scales`;
    if (!source.has(scalesName)) {
      problems.push(`'${name}' has no '${scalesName}'`);
      continue;
    }
    const blocks = source.info(name);
    const scales = source.info(scalesName);
    if (blocks.dtype !== 'U8' || scales.dtype !== 'U8') {
      problems.push(`'${name}' and '${scalesName}' must be U8 but are ${blocks.dtype} and ${scales.dtype}`);
      continue;
    }
    const [E, rows, groups, bytes] = blocks.shape;
    if (blocks.shape.length !== 4 || bytes !== 16 || scales.shape.length !== 3 ||
        scales.shape.some((d, i) => d !== blocks.shape[i])) {
      problems.push(`'${name}' [${blocks.shape}] must be [E, out, in/32, 16] and '${scalesName}' [${scales.shape}] ` +
          'its first three dimensions');
      continue;
    }
    if (source.has(base)) {
      problems.push(`'${base}' is stored both plain and as MXFP4 ('${name}', '${scalesName}')`);
      continue;
    }
    decoded.set(base, { blocks: name, scales: scalesName, shape: [E, groups * 32, rows] });
  }
  for (const name of names.filter(n => n.endsWith('_scales'))) {
    if (!source.has(`${name.slice(0, -'_scales'.length)}_blocks`)) problems.push(`'${name}' has no '${name.slice(0, -'_scales'.length)}_blocks'`);
  }
  if (decoded.size > 0 && typeof source.uint8Values !== 'function') {
    problems.push('the tensor source cannot read U8 tensors (it has no uint8Values)');
  }
  if (problems.length > 0) {
    throw new CheckpointError(`\`${op}()\`: ${where}: the MXFP4 expert tensors (quantization_config.quant_method ` +
        `'mxfp4') are not as transformers stores them; ${problems.length} problem${problems.length > 1 ? 's' : ''}:\n  ` +
        problems.join('\n  '));
  }
  const hidden = new Set([...decoded.values()].flatMap(d => [d.blocks, d.scales]));
  const halfBits = async (name: string): Promise<Uint16Array> => {
    const d = decoded.get(name);
    if (d === undefined) return source.halfBits!(name);
    const [blocks, scales] = [await source.uint8Values!(d.blocks), await source.uint8Values!(d.scales)];
    return decodeMXFP4(blocks, scales, source.info(d.blocks).shape);
  };
  const wrapped: TensorSource & { names(): string[] } = {
    names: () => [...names.filter(n => !hidden.has(n)), ...decoded.keys()],
    has: name => decoded.has(name) || (!hidden.has(name) && source.has(name)),
    info: name => {
      const d = decoded.get(name);
      return d === undefined ? source.info(name) : { dtype: 'BF16', shape: d.shape };
    },
    tensor: async name => {
      const d = decoded.get(name);
      if (d === undefined) return source.tensor(name);
      return tensor(decodeBFloat16(await halfBits(name)), d.shape, 'float32') as tf.Tensor;
    },
  };
  if (typeof source.halfBits === 'function' || decoded.size > 0) wrapped.halfBits = halfBits;
  // the stored bytes, for a load that keeps MXFP4 experts as they are (expertDtype 'stored' / 'mxfp4')
  wrapped.isMXFP4 = name => decoded.has(name);
  wrapped.mxfp4Bytes = async name => {
    const d = decoded.get(name)!;
    return { blocks: await source.uint8Values!(d.blocks), scales: await source.uint8Values!(d.scales) };
  };
  return wrapped;
}
