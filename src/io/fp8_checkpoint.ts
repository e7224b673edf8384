/**
 * Block-scaled FP8 checkpoints (DeepSeek-V3's Hub format, transformers' FineGrainedFP8): each
 * quantized linear weight `X.weight` [out, in] is stored float8 e4m3fn, with `X.weight_scale_inv`
 * [⌈out/bo⌉, ⌈in/bi⌉] float32, one scale per bo × bi block (config.json `quantization_config`:
 * `{quant_method: 'fp8', fmt: 'e4m3', weight_block_size: [bo, bi]}`, [128, 128] on the Hub). The
 * real weight is W[i, j] = q[i, j] · scale_inv[⌊i/bo⌋, ⌊j/bi⌋].
 *
 * `dequantizingSource` wraps a checkpoint's tensors so that such a weight reads as its float32
 * values (info: dtype 'F32'), decoded one tensor at a time on load; every other tensor passes
 * through. The model then is a plain float32 model: its config has no quantization_config, and it
 * saves as float32 (or bf16 with `dtype`), as transformers' `dequantize=True` would.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { HFConfig } from '../models/families.js';
import { describeValue } from '../util/describe.js';
import type { TensorSource } from './hf_block.js';
import { CheckpointError } from './hf_checkpoint_core.js';

/** The block size (rows, columns) of one scale. */
export interface FP8Quantization {
  blockSize: [number, number];
}

/** The stored dtype of an FP8 weight. */
const FP8_DTYPE = 'F8_E4M3';
const SCALE_DTYPES = ['F32', 'BF16', 'F16'];

/**
 * The FP8 settings of config.json's quantization_config, or null for a checkpoint that is not
 * quantized; any other quantization is an error that names it.
 *
 * ```js
 * fp8QuantizationOf({quantization_config: {quant_method: 'fp8', fmt: 'e4m3', weight_block_size: [128, 128]}}, 'dir');
 * // {blockSize: [128, 128]}
 * ```
 */
export function fp8QuantizationOf(config: HFConfig, where: string): FP8Quantization | null {
  const q = config['quantization_config'];
  if (q == null) return null;
  const bad = (what: string) => new CheckpointError(`${where}: config.json's quantization_config ${what}`);
  if (typeof q !== 'object' || Array.isArray(q)) throw bad(`must be an object but got ${describeValue(q)}`);
  const settings = q as Record<string, unknown>;
  if (settings['quant_method'] !== 'fp8') {
    throw bad(`has quant_method ${describeValue(settings['quant_method'])}; only block-scaled 'fp8' (DeepSeek-V3's format) is decoded`);
  }
  if (settings['fmt'] != null && settings['fmt'] !== 'e4m3') {
    throw bad(`has fmt ${describeValue(settings['fmt'])}; only 'e4m3' (float8_e4m3fn) is decoded`);
  }
  const block = settings['weight_block_size'] ?? [128, 128];
  if (!Array.isArray(block) || block.length !== 2 || !block.every(b => Number.isInteger(b) && b >= 1)) {
    throw bad(`must have weight_block_size [rows, columns] of integers >= 1 but has ${describeValue(block)}`);
  }
  return { blockSize: [block[0] as number, block[1] as number] };
}

/** config.json without its quantization_config: the config of the dequantized model. */
export function withoutQuantizationConfig(config: HFConfig): HFConfig {
  const copy = { ...config };
  delete copy['quantization_config'];
  return copy;
}

class DequantizingSource implements TensorSource {
  constructor(private readonly source: TensorSource, private readonly quant: FP8Quantization, private readonly where: string) {
    if (typeof source.halfBits === 'function') this.halfBits = (name: string) => source.halfBits!(name);
    if (typeof source.halfBitsInto === 'function') {
      this.halfBitsInto = (name: string, into: Uint16Array, from?: number) => source.halfBitsInto!(name, into, from);
    }
  }

  halfBits?: (name: string) => Promise<Uint16Array>;
  halfBitsInto?: (name: string, into: Uint16Array, from?: number) => Promise<void>;

  has(name: string): boolean {
    return this.source.has(name);
  }

  /** An FP8 weight reads as F32 (what it decodes to), once its scale tensor is checked. */
  info(name: string): { dtype: string; shape: number[] } {
    const info = this.source.info(name);
    if (info.dtype !== FP8_DTYPE) return info;
    this.scaleOf(name, info.shape);
    return { dtype: 'F32', shape: info.shape };
  }

  async tensor(name: string): Promise<tf.Tensor> {
    const info = this.source.info(name);
    if (info.dtype !== FP8_DTYPE) return this.source.tensor(name);
    const scaleName = this.scaleOf(name, info.shape);
    const [rows, cols] = info.shape;
    const [bo, bi] = this.quant.blockSize;
    const q = await this.source.tensor(name);
    const s = await this.source.tensor(scaleName);
    try {
      const values = await q.data() as Float32Array;
      const scales = await s.data() as Float32Array;
      const blockCols = Math.ceil(cols / bi);
      const out = new Float32Array(rows * cols);
      for (let i = 0; i < rows; i++) {
        const scaleRow = Math.floor(i / bo) * blockCols;
        for (let j = 0; j < cols; j++) out[i * cols + j] = values[i * cols + j] * scales[scaleRow + Math.floor(j / bi)];
      }
      return tf.tensor(out, info.shape, 'float32');
    } finally {
      tf.dispose([q, s]);
    }
  }

  /** The name of weight `name`'s scale tensor, checked: present, float, [⌈out/bo⌉, ⌈in/bi⌉]. */
  private scaleOf(name: string, shape: number[]): string {
    const scaleName = `${name}_scale_inv`;
    const fail = (what: string) => new CheckpointError(`${this.where}: FP8 tensor '${name}' ${what}`);
    if (shape.length !== 2) throw fail(`must be 2-D [out, in] (scaled per block) but has shape [${shape}]`);
    if (!this.source.has(scaleName)) throw fail(`has no scale tensor '${scaleName}'`);
    const [bo, bi] = this.quant.blockSize;
    const expected = [Math.ceil(shape[0] / bo), Math.ceil(shape[1] / bi)];
    const scale = this.source.info(scaleName);
    if (scale.shape.length !== 2 || scale.shape[0] !== expected[0] || scale.shape[1] !== expected[1]) {
      throw fail(`of shape [${shape}] needs '${scaleName}' of shape [${expected}] (blocks of ${bo} × ${bi}) but it has [${scale.shape}]`);
    }
    if (!SCALE_DTYPES.includes(scale.dtype)) {
      throw fail(`needs a float '${scaleName}' (${SCALE_DTYPES.join(', ')}) but it is ${scale.dtype}`);
    }
    return scaleName;
  }
}

/**
 * `source` with block-scaled FP8 weights decoded to float32 when config.json says the checkpoint
 * is FP8-quantized; `source` itself otherwise (and when it is already such a view).
 *
 * ```js
 * const tensors = dequantizingSource(config, await readSafetensorsFile('model.safetensors'), "'dir'");
 * await tensors.tensor('model.layers.0.self_attn.o_proj.weight');  // float32, scales applied
 * ```
 */
export function dequantizingSource(config: HFConfig, source: TensorSource, where: string): TensorSource {
  if (source instanceof DequantizingSource) return source;
  const quant = fp8QuantizationOf(config, where);
  return quant === null ? source : new DequantizingSource(source, quant, where);
}
