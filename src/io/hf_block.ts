/**
 * Loads one decoder layer's MoE block from a Hugging Face checkpoint into `MoEBlockWeights`,
 * fusing the Hub's per-expert tensors the way transformers 5 does in memory.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor1D, Tensor2D, Tensor3D } from '@tensorflow/tfjs-core';
import {
  isQuantizedKind, packedExpertWeightFromBits, packedWordsPerExpert, PackedExpertWeight, type HalfKind, type PackedKind,
} from '../ops/packed.js';
import { NF4_DQ_NESTED_BLOCK_SIZE, QUANTIZED_KINDS, quantizeExpertInto, quantizedLayout, type QuantizedKind, type QuantizedLayout } from '../ops/quantized.js';
import { CheckpointError } from './hf_checkpoint_core.js';
import { assertInteger, assertOneOf, fail } from '../ops/validate.js';
import { buildTensor, decodeHalvesInto, fillDecodedHalves, readHalvesInto, readToDevice, TensorBuilder, type HalfScratch } from './device_tensor.js';
import type { ExpertQuantizer } from './quantize_pool.js';
import type { ExpertWeights, MoEBlockWeights, RouterWeights, SharedExpertWeights } from '../ops/types.js';
import {
  familyOf, isMoELayer, moeBlockDims, moeLayerIndices, type HFConfig,
} from '../models/families.js';

/**
 * What the loaders need from a checkpoint; `SafetensorsFile` (src/io/safetensors.ts) is one.
 * Names and shapes come from the header; `tensor` reads one tensor when asked (from memory or
 * with a positional read of a file), so a load holds one tensor at a time, not the whole file.
 */
export interface TensorSource {
  has(name: string): boolean;
  info(name: string): { dtype: string; shape: number[] };
  /** a new float32 (or int32) tensor the caller owns */
  tensor(name: string): Promise<tf.Tensor>;
  /**
   * The raw 16-bit values of a BF16 or F16 tensor, as stored (optional: without it, 16-bit
   * experts are loaded as float32)
   */
  halfBits?(name: string): Promise<Uint16Array>;
  /** halfBits' elements [from, from + into.length) read into `into` (optional: readHalvesInto copies from halfBits) */
  halfBitsInto?(name: string, into: Uint16Array, from?: number): Promise<void>;
  /** whether `name` is an MXFP4 weight shown as one tensor (mxfp4TensorSource); optional */
  isMXFP4?(name: string): boolean;
  /** an MXFP4 weight's stored bytes (`X_blocks`, `X_scales`), where isMXFP4(name) */
  mxfp4Bytes?(name: string): Promise<{ blocks: Uint8Array; scales: Uint8Array }>;
  /**
   * The quantized kind a weight is stored in when its codes and scales are that kind's own
   * (bitsandbytes NF4 in blocks of 64, LLM.int8: src/io/bnb_checkpoint.ts), else null; optional
   */
  storedQuantizedKind?(name: string): QuantizedKind | null;
  /**
   * Such a [out, in] weight's codes (bytes in this package's order: src/ops/quantized.ts) and
   * scales (one per group, output-major), where storedQuantizedKind(name) is not null
   */
  storedQuantizedParts?(name: string): Promise<StoredQuantizedParts>;
}

/**
 * A stored quantized [out, in] weight's own codes and scales: `scales` one per group, or for
 * 'nf4-dq' (bitsandbytes' double quantization) null and `doubleQuant` the absmax codes (a byte a
 * group), the nested absmax (one per 256 groups), the offset and the 256-entry code map.
 */
export interface StoredQuantizedParts {
  codes: Uint8Array;
  scales: Float32Array | null;
  doubleQuant?: { absmaxCodes: Uint8Array; nestedAbsmax: Float32Array; offset: number; map: Float32Array };
}

/**
 * 'stored' (default): routed-expert weights stored BF16 or F16 stay 16-bit in memory, packed
 * (src/ops/packed.ts), frozen; MXFP4 ones (gpt-oss) stay MXFP4, their bytes as stored; F32 ones
 * stay float32. 'float32': every weight widened to float32. 'int8', 'int4', 'nf4', 'mxfp4':
 * quantized on load (src/ops/quantized.ts; int4 in groups of 64), one expert tensor at a time,
 * frozen; an MXFP4 checkpoint asked for 'mxfp4' keeps its bytes.
 */
export type ExpertDtype = 'stored' | 'float32' | QuantizedKind;
export const EXPERT_DTYPES: readonly ExpertDtype[] = ['stored', 'float32', ...QUANTIZED_KINDS];

export interface LoadMoEBlockOptions {
  /** default 'stored' */
  expertDtype?: ExpertDtype;
  /** with expertDtype 'int4': its group size along the input, 32, 64 (default) or 128 */
  int4GroupSize?: number;
  /**
   * @internal Node: worker threads that quantize 16-bit experts (src/io/quantize_pool.ts;
   * loadHFCheckpoint passes one); without it they are quantized on this thread.
   */
  quantizer?: ExpertQuantizer;
}

const PACKED_OF: Readonly<Record<string, HalfKind>> = { BF16: 'bf16', F16: 'f16' };

/**
 * The packed kind the routed experts of `names` load as: every one stored BF16 (or every one
 * F16) and a source that gives raw halves; otherwise null (float32).
 */
export function storedExpertKind(file: TensorSource, names: string[], expertDtype: ExpertDtype = 'stored'): HalfKind | null {
  if (expertDtype !== 'stored' || typeof file.halfBits !== 'function' || names.length === 0) return null;
  const dtypes = new Set(names.map(n => file.info(n).dtype));
  if (dtypes.size !== 1) return null;
  return PACKED_OF[[...dtypes][0]] ?? null;
}

/**
 * The packed kind the routed experts of `names` load as for `expertDtype`: a quantized kind as
 * asked; for 'stored', MXFP4 when every one is stored MXFP4 (and the source gives its bytes),
 * else storedExpertKind's 16-bit kind; null for float32.
 */
export function expertPackedKind(file: TensorSource, names: string[], expertDtype: ExpertDtype = 'stored'): PackedKind | null {
  if (isQuantizedKind(expertDtype)) return expertDtype;
  if (expertDtype === 'stored' && names.length > 0 && typeof file.isMXFP4 === 'function' &&
      names.every(n => file.isMXFP4!(n))) return 'mxfp4';
  const stored = storedQuantizedKindOf(file, names);
  if (expertDtype === 'stored' && stored !== null) return stored;
  return storedExpertKind(file, names, expertDtype);
}

/** The one quantized kind every tensor of `names` is stored in as its own words (bitsandbytes' NF4, int8), else null. */
function storedQuantizedKindOf(file: TensorSource, names: string[]): QuantizedKind | null {
  if (typeof file.storedQuantizedKind !== 'function' || names.length === 0) return null;
  const kinds = new Set(names.map(n => file.storedQuantizedKind!(n)));
  return kinds.size === 1 ? [...kinds][0] : null;
}

/** The routed-expert weight tensors of a block plan (the ones that may load packed). */
export function expertTensorNames(plan: BlockTensorPlan): string[] {
  const ex = plan.experts;
  return ex.kind === 'perExpert' ? [...ex.gate, ...ex.up, ...ex.down].map(e => e.name) : [ex.gateUp.name, ex.down.name];
}

/**
 * The decoder layer index in a block name such as golden.json's "block".
 *
 * ```js
 * blockLayerIndex('model.layers.1.mlp');  // 1
 * ```
 */
export function blockLayerIndex(blockName: string): number {
  const match = typeof blockName === 'string' ? /(?:^|\.)layers\.(\d+)(?:\.|$)/.exec(blockName) : null;
  if (match === null) {
    fail('blockLayerIndex', `'block' must name a decoder layer's block like 'model.layers.1.mlp' ` +
        `but got ${JSON.stringify(blockName)}`);
  }
  return Number(match[1]);
}

interface Expected { name: string; shape: number[] }

/** The full names of one block's tensors with the shapes the config implies. */
export interface BlockTensorPlan {
  router: { weight: Expected; bias?: Expected; correctionBias?: Expected; inputScale?: Expected; expertScale?: Expected };
  experts:
    | { kind: 'perExpert'; gate: Expected[]; up: Expected[]; down: Expected[] }
    | { kind: 'fusedInterleaved'; gateUp: Expected; gateUpBias: Expected; down: Expected; downBias: Expected }
    | { kind: 'fused'; layout: 'inOut' | 'outIn'; gateUp: Expected; down: Expected };
  shared?: { gate: Expected; up: Expected; down: Expected; sigmoidGate?: Expected };
}

/**
 * The checkpoint tensors of layer `layer`'s MoE block and their expected shapes.
 *
 * ```js
 * moeBlockTensorPlan(mixtralConfig, 0).router.weight;
 * // {name: 'model.layers.0.block_sparse_moe.gate.weight', shape: [8, 64]}
 * ```
 */
export function moeBlockTensorPlan(config: HFConfig, layer: number): BlockTensorPlan {
  const op = 'moeBlockTensorPlan';
  const family = familyOf(config);
  const { hidden: H, intermediate: I, experts: E, sharedIntermediate: Is } = moeBlockDims(config);
  assertInteger(op, 'layerIndex', layer, 0);
  if (!isMoELayer(config, layer)) {
    fail(op, `layer ${layer} of this '${family.modelType}' model is a dense MLP, not an MoE block ` +
        `(MoE layers: ${moeLayerIndices(config).join(', ') || 'none'})`);
  }
  const layout = family.checkpoint;
  const full = (relative: string) => `model.layers.${layer}.${layout.block === '' ? '' : `${layout.block}.`}${relative}`;
  const at = (relative: string, shape: number[]): Expected => ({ name: full(relative), shape });
  const perExpert = (template: string, shape: number[]) =>
    Array.from({ length: E }, (_, e) => at(template.replace('{e}', String(e)), shape));

  const plan: BlockTensorPlan = {
    router: { weight: at(layout.router.weight, [E, H]) },
    experts: layout.experts.kind === 'perExpert' ? {
      kind: 'perExpert',
      gate: perExpert(layout.experts.gate, [I, H]),
      up: perExpert(layout.experts.up, [I, H]),
      down: perExpert(layout.experts.down, [H, I]),
    } : layout.experts.kind === 'fused' ? {
      kind: 'fused',
      layout: layout.experts.layout,
      gateUp: at(layout.experts.gateUp, layout.experts.layout === 'inOut' ? [E, H, 2 * I] : [E, 2 * I, H]),
      down: at(layout.experts.down, layout.experts.layout === 'inOut' ? [E, I, H] : [E, H, I]),
    } : {
      kind: 'fusedInterleaved',
      gateUp: at(layout.experts.gateUp, [E, H, 2 * I]),
      gateUpBias: at(layout.experts.gateUpBias, [E, 2 * I]),
      down: at(layout.experts.down, [E, I, H]),
      downBias: at(layout.experts.downBias, [E, H]),
    },
  };
  if (layout.router.bias) plan.router.bias = at(layout.router.bias, [E]);
  if (layout.router.correctionBias) {
    plan.router.correctionBias = at(layout.router.correctionBias, layout.router.correctionBiasRow ? [1, E] : [E]);
  }
  if (layout.router.inputScale) plan.router.inputScale = at(layout.router.inputScale, [H]);
  if (layout.router.expertScale) plan.router.expertScale = at(layout.router.expertScale, [E]);
  if (layout.shared && Is !== undefined) {
    plan.shared = {
      gate: at(layout.shared.gate, [Is, H]),
      up: at(layout.shared.up, [Is, H]),
      down: at(layout.shared.down, [H, Is]),
    };
    if (layout.shared.sigmoidGate) plan.shared.sigmoidGate = at(layout.shared.sigmoidGate, [1, H]);
  }
  return plan;
}

function planEntries(plan: BlockTensorPlan): Expected[] {
  const all: Array<Expected | undefined> = [plan.router.weight, plan.router.bias, plan.router.correctionBias,
    plan.router.inputScale, plan.router.expertScale];
  const ex = plan.experts;
  if (ex.kind === 'perExpert') {
    all.push(...ex.gate, ...ex.up, ...ex.down);
  } else if (ex.kind === 'fused') {
    all.push(ex.gateUp, ex.down);
  } else {
    all.push(ex.gateUp, ex.gateUpBias, ex.down, ex.downBias);
  }
  if (plan.shared) all.push(plan.shared.gate, plan.shared.up, plan.shared.down, plan.shared.sigmoidGate);
  return all.filter((e): e is Expected => e !== undefined);
}

/** The float32 values of one expert tensor of the file (read, checked, its tensor disposed). */
async function floatValuesOf(op: string, file: TensorSource, name: string): Promise<Float32Array> {
  const t = await file.tensor(name);
  try {
    if (t.dtype !== 'float32') fail(op, `'${name}' must be a floating-point tensor but is ${t.dtype}`);
    return await t.data() as Float32Array;
  } finally {
    t.dispose();
  }
}

/**
 * Stacks per-expert [rows, cols] tensors into [E, parts·rows, cols]: expert e's block is
 * parts[0][e] then parts[1][e] ... . Written into the stack expert tensor by expert tensor
 * (TensorBuilder: on webgpu through its upload buffers), so loading holds at most one expert's
 * tensor on the host, never a host copy of the whole stack (on cpu the stack is host memory
 * itself); a 16-bit tensor is decoded straight into its place (fillDecodedHalves), no float32
 * array made for it.
 */
async function fuseRows(
    op: string, file: TensorSource, numExperts: number, parts: Expected[][],
    [rows, cols]: number[]): Promise<tf.Tensor3D> {
  const block = rows * cols;
  const scratch: HalfScratch = { halves: new Uint16Array(0) };
  return await buildTensor([numExperts, parts.length * rows, cols], 'float32', async stack => {
    for (let e = 0; e < numExperts; e++) {
      for (const [p, part] of parts.entries()) {
        const { name } = part[e];
        const offset = (e * parts.length + p) * block;
        if (typeof file.halfBits === 'function' && ['BF16', 'F16'].includes(file.info(name).dtype)) {
          await fillDecodedHalves(stack, offset, file, name, scratch);
        } else {
          await stack.write(await floatValuesOf(op, file, name), offset);
        }
      }
    }
  }) as tf.Tensor3D;
}

/**
 * `read(0)`, `read(1)`, … `read(count − 1)` one ahead: each call of the result gives the next read
 * and starts the one after it, so that a read is under way while the one before is used. A read
 * that fails is thrown where it is taken, never as an unhandled rejection meanwhile.
 */
function readingOneAhead<T>(count: number, read: (i: number) => Promise<T>): () => Promise<T> {
  const start = (i: number): Promise<T> | null => {
    if (i >= count) return null;
    const pending = read(i);
    pending.catch(() => {});
    return pending;
  };
  let taken = 0;
  let next = start(0);
  // called at most `count` times (one per expert)
  return () => {
    const current = next!;
    next = start(++taken);
    return current;
  };
}

/** Experts whose reads run at once while a packed stack is filled (each fills its own upload buffer). */
const EXPERTS_IN_FLIGHT = 4;

/**
 * 16-bit experts kept packed, [E, rows, cols]: `readInto(e, halves, from)` reads expert e's halves
 * [from, from + halves.length) as stored straight into `halves`, which is where the stack's words
 * go next (TensorBuilder.fill: on webgpu an upload buffer's memory, elsewhere the stack's own), so
 * nothing is copied on the host and no array is made per tensor. EXPERTS_IN_FLIGHT experts are
 * read at once; a failed read waits for the others before the stack is freed.
 */
async function stackPackedExperts(
    kind: HalfKind, [numExperts, rows, cols]: number[],
    readInto: (e: number, halves: Uint16Array, from: number) => Promise<unknown>): Promise<PackedExpertWeight> {
  const words = packedWordsPerExpert(rows, cols);
  const halvesPerExpert = rows * cols;
  const stack = new TensorBuilder([numExperts, words], 'int32');
  const fillExpert = (e: number) => stack.fill(e * words, words, async (into, at) => {
    const halves = new Uint16Array(into.buffer, into.byteOffset, 2 * into.length);
    // the expert's own halves, then (an odd-sized expert's last word) a padding half, zeroed
    const own = Math.max(0, Math.min(halves.length, halvesPerExpert - 2 * at));
    halves.fill(0, own);
    if (own > 0) await readInto(e, halves.subarray(0, own), 2 * at);
  });
  const inFlight = new Set<Promise<void>>();
  try {
    for (let e = 0; e < numExperts; e++) {
      const filling = fillExpert(e);
      inFlight.add(filling);
      filling.then(() => inFlight.delete(filling), () => {});
      if (inFlight.size >= EXPERTS_IN_FLIGHT) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
    return new PackedExpertWeight(kind, [numExperts, rows, cols], await stack.finish());
  } catch (err) {
    await Promise.allSettled(inFlight);
    stack.dispose();
    throw err;
  }
}

/** fuseRows for 16-bit experts kept packed: expert e's halves are its parts' one after the other. */
function fuseRowsPacked(
    file: TensorSource, kind: HalfKind, numExperts: number, parts: Expected[][],
    [rows, cols]: number[]): Promise<PackedExpertWeight> {
  const block = rows * cols;
  return stackPackedExperts(kind, [numExperts, parts.length * rows, cols], async (e, halves, from) => {
    const reads: Array<Promise<void>> = [];
    for (const [p, part] of parts.entries()) {
      const [begin, end] = [Math.max(from, p * block), Math.min(from + halves.length, (p + 1) * block)];
      if (begin < end) reads.push(readHalvesInto(file, part[e].name, halves.subarray(begin - from, end - from), begin - p * block));
    }
    // every read settled before any error is thrown: `halves` is an upload buffer's memory, unmapped after a failure
    const settled = await Promise.allSettled(reads);
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
  });
}

/**
 * fuseRows for quantized experts: each expert's parts read (float32, one expert tensor at a time)
 * into one expert's block, quantized into one expert's words and written into the stack; no
 * float32 copy beyond one expert.
 */
async function fuseRowsQuantized(
    op: string, file: TensorSource, kind: QuantizedKind, numExperts: number, parts: Expected[][],
    [rows, cols]: number[], groupSize: number | undefined, quantizer?: ExpertQuantizer): Promise<PackedExpertWeight> {
  const shape = [numExperts, parts.length * rows, cols];
  const layout = quantizedLayout(kind, shape, 2, groupSize, op);
  if (storedQuantizedKindOf(file, parts.flat().map(p => p.name)) === kind) return fuseStoredQuantized(file, kind, layout, numExperts, parts, [rows, cols]);
  // 16-bit experts (the Hub's bf16): their stored halves decoded into `block`, no tensor made;
  // expert e + 1's reads are under way while expert e is quantized (or on workers, see below)
  const asHalves = typeof file.halfBits === 'function' &&
      parts.every(part => part.every(t => ['BF16', 'F16'].includes(file.info(t.name).dtype)));
  const readHalves = (e: number) => Promise.all(parts.map(part => file.halfBits!(part[e].name)));
  const stack = new TensorBuilder([numExperts, layout.wordsPerExpert], 'int32');
  if (asHalves && quantizer !== undefined) return fuseRowsOnWorkers(op, file, quantizer, layout, stack, shape, parts, readHalves, groupSize);
  const block = new Float32Array(parts.length * rows * cols);
  const expert = new Int32Array(layout.wordsPerExpert);
  try {
    const nextHalves = asHalves ? readingOneAhead(numExperts, readHalves) : null;
    for (let e = 0; e < numExperts; e++) {
      if (nextHalves !== null) {
        const halves = await nextHalves();
        halves.forEach((h, p) => decodeHalvesInto(file.info(parts[p][e].name).dtype, h, block, p * rows * cols));
      } else {
        for (const [p, part] of parts.entries()) {
          block.set(await floatValuesOf(op, file, part[e].name), p * rows * cols);
        }
      }
      quantizeExpertInto(layout, block, 0, expert, 0, op, `${parts.map(p => p[e].name).join("', '")}`);
      await stack.write(expert, e * layout.wordsPerExpert);
    }
    return new PackedExpertWeight(kind, shape, await stack.finish(), { inputAxis: 2, groupSize });
  } catch (err) {
    stack.dispose();
    throw err;
  }
}

/**
 * fuseRowsQuantized on worker threads: expert tensors read in order on this thread, each expert
 * quantized by the next free worker and its words written into the stack when they come; at
 * most threads + 1 experts in flight (their halves and words are what the host holds).
 */
async function fuseRowsOnWorkers(
    op: string, file: TensorSource, quantizer: ExpertQuantizer, layout: QuantizedLayout, stack: TensorBuilder,
    shape: number[], parts: Expected[][], readHalves: (e: number) => Promise<Uint16Array[]>,
    groupSize: number | undefined): Promise<PackedExpertWeight> {
  const W = layout.wordsPerExpert;
  const inFlight = new Set<Promise<void>>();
  let failure: unknown = null;
  try {
    for (let e = 0; e < shape[0] && failure === null; e++) {
      const halves = await readHalves(e);
      const job: Promise<void> = quantizer.quantize(
          layout, halves.map((h, p) => ({ dtype: file.info(parts[p][e].name).dtype, halves: h })), op,
          `${parts.map(p => p[e].name).join("', '")}`)
        .then(words => stack.write(words, e * W))
        .catch(err => { failure ??= err; })
        .finally(() => inFlight.delete(job));
      inFlight.add(job);
      if (inFlight.size > quantizer.threads) await Promise.race(inFlight);
    }
  } catch (err) {
    failure ??= err;
  }
  await Promise.all(inFlight);   // nothing writes into the stack after this
  if (failure !== null) {
    stack.dispose();
    throw failure;
  }
  return new PackedExpertWeight(layout.kind, shape, await stack.finish(), { inputAxis: 2, groupSize });
}

/**
 * fuseRows for experts stored in `kind`'s own codes and scales (bitsandbytes NF4 or int8): each
 * part's codes and scales copied into the expert's words, gate rows then up rows (the groups of a
 * part are whole rows, so its codes and scales follow the previous part's); nothing is decoded.
 */
async function fuseStoredQuantized(
    file: TensorSource, kind: QuantizedKind, layout: QuantizedLayout, numExperts: number, parts: Expected[][],
    [rows, cols]: number[]): Promise<PackedExpertWeight> {
  const W = layout.wordsPerExpert;
  // one expert's words on the host at a time, written to the device as the others (TensorBuilder)
  const expert = new Int32Array(W);
  const bytes = new Uint8Array(expert.buffer);
  const floats = new Float32Array(expert.buffer);
  const codeBytes = kind === 'int8' ? rows * cols : (rows * cols) / 2;
  const scales = rows * layout.groupsPerOutput;
  const stack = new TensorBuilder([numExperts, W], 'int32');
  try {
    for (let e = 0; e < numExperts; e++) {
      expert.fill(0);
      let map: Float32Array | null = null;
      for (const [p, part] of parts.entries()) {
        const stored = await file.storedQuantizedParts!(part[e].name);
        bytes.set(stored.codes, p * codeBytes);
        const dq = stored.doubleQuant;
        if (dq === undefined) {
          floats.set(stored.scales!, layout.scaleWord + p * scales);
          continue;
        }
        // nf4-dq: each part's groups fill whole nested blocks of 256 (storedQuantizedKind), so
        // part p's nested absmax and offset are blocks p·scales/256 …; one code map per expert
        const nestedBlocks = scales / NF4_DQ_NESTED_BLOCK_SIZE;
        bytes.set(dq.absmaxCodes, 4 * layout.scaleWord + p * scales);
        floats.set(dq.nestedAbsmax, layout.nestedWord + p * nestedBlocks);
        floats.fill(dq.offset, layout.offsetWord + p * nestedBlocks, layout.offsetWord + (p + 1) * nestedBlocks);
        if (map !== null && !dq.map.every((v, k) => Object.is(v, map![k]))) {
          throw new CheckpointError(`'${part[e].name}.nested_quant_map' must equal '${parts[0][e].name}.nested_quant_map' ` +
              `(one absmax code map per fused expert) but differs at entry ${dq.map.findIndex((v, k) => !Object.is(v, map![k]))}`);
        }
        map = dq.map;
        floats.set(map, layout.mapWord);
      }
      await stack.write(expert, e * W);
    }
    return new PackedExpertWeight(kind, [numExperts, parts.length * rows, cols], await stack.finish(), { inputAxis: 2 });
  } catch (err) {
    stack.dispose();
    throw err;
  }
}

/**
 * A fused expert tensor [E, in, out] (gpt-oss's layout: the input on axis 1) as a quantized
 * weight: MXFP4 stored bytes copied as they are when the kind is MXFP4 and the source has them
 * (gpt-oss's `_blocks` of one expert are its codes, `_scales` its scales); a 16-bit one read as
 * stored and decoded one expert at a time; else read as float32 (this one tensor); quantized
 * expert by expert, each expert's words written into the stack as they are made.
 */
async function readQuantizedTransposed(
    op: string, file: TensorSource, kind: QuantizedKind, e: Expected, groupSize: number | undefined): Promise<PackedExpertWeight> {
  const layout = quantizedLayout(kind, e.shape, 1, groupSize, op);
  const [experts, rows, cols] = e.shape;
  const expert = new Int32Array(layout.wordsPerExpert);
  const stack = new TensorBuilder([experts, layout.wordsPerExpert], 'int32');
  try {
    if (kind === 'mxfp4' && file.isMXFP4?.(e.name) === true) {
      const { blocks, scales } = await file.mxfp4Bytes!(e.name);
      const bytes = new Uint8Array(expert.buffer);
      const codeBytes = (layout.outputs * layout.inputs) / 2;
      const scaleBytes = layout.outputs * layout.groupsPerOutput;
      for (let x = 0; x < experts; x++) {
        expert.fill(0);
        bytes.set(blocks.subarray(x * codeBytes, (x + 1) * codeBytes), 0);
        bytes.set(scales.subarray(x * scaleBytes, (x + 1) * scaleBytes), 4 * layout.scaleWord);
        await stack.write(expert, x * layout.wordsPerExpert);
      }
    } else if (typeof file.halfBits === 'function' && ['BF16', 'F16'].includes(file.info(e.name).dtype)) {
      // as stored (half the bytes of float32), one expert decoded at a time
      const { dtype } = file.info(e.name);
      const halves = await file.halfBits(e.name);
      const block = new Float32Array(rows * cols);
      for (let x = 0; x < experts; x++) {
        decodeHalvesInto(dtype, halves.subarray(x * rows * cols, (x + 1) * rows * cols), block, 0);
        quantizeExpertInto(layout, block, 0, expert, 0, op, e.name);
        await stack.write(expert, x * layout.wordsPerExpert);
      }
    } else {
      const t = await file.tensor(e.name);
      try {
        if (t.dtype !== 'float32') fail(op, `'${e.name}' must be a floating-point tensor but is ${t.dtype}`);
        const values = await t.data() as Float32Array;
        for (let x = 0; x < experts; x++) {
          quantizeExpertInto(layout, values, x * rows * cols, expert, 0, op, e.name);
          await stack.write(expert, x * layout.wordsPerExpert);
        }
      } finally {
        t.dispose();
      }
    }
    return new PackedExpertWeight(kind, e.shape, await stack.finish(), { inputAxis: 1, groupSize });
  } catch (err) {
    stack.dispose();
    throw err;
  }
}

/**
 * A fused 16-bit expert tensor kept packed: expert x's halves read from their place in the tensor,
 * or, from a source that reads whole tensors only (no halfBitsInto), cut from one read.
 */
function readPackedHalves(file: TensorSource, kind: HalfKind, e: Expected): Promise<PackedExpertWeight> {
  const [experts, rows, cols] = e.shape;
  const block = rows * cols;
  if (typeof file.halfBitsInto === 'function') {
    return stackPackedExperts(kind, e.shape, (x, halves, from) => file.halfBitsInto!(e.name, halves, x * block + from));
  }
  const whole = file.halfBits!(e.name).then(halves => {
    // a source's own array of another length: packedExpertWeightFromBits' error names it
    if (halves.length !== experts * block) packedExpertWeightFromBits(kind, e.shape, halves);
    return halves;
  });
  whole.catch(() => {});  // thrown where an expert takes it
  return stackPackedExperts(kind, e.shape, async (x, halves, from) =>
    halves.set((await whole).subarray(x * block + from, x * block + from + halves.length)));
}

const sameShape = (a: readonly number[], b: readonly number[]) =>
  a.length === b.length && a.every((d, i) => d === b[i]);

/**
 * Reads layer `layerIndex`'s MoE block: router, experts (Hub per-expert tensors fused on load:
 * gateUp[e] = gate_proj[e] rows then up_proj[e] rows → [E, 2I, H], down → [E, H, I]; gpt-oss
 * kept as stored, layout 'inOutInterleaved'; Llama 4's and Gemma 4's fused ones as stored, layout 'inOut' /
 * 'outIn') and shared experts. Every tensor is checked before
 * any is read; a mismatch throws one error that lists every missing or misshapen tensor.
 * The caller owns the returned tensors (see `disposeMoEBlockWeights`).
 *
 * With `expertDtype` 'stored' (default), routed experts stored BF16 (or F16) in the checkpoint
 * come back as PackedExpertWeight (frozen, half the memory of float32), copied from the file's
 * halves one expert tensor at a time (MXFP4 ones as MXFP4, their bytes copied); 'float32'
 * decodes them; 'int8', 'int4', 'nf4', 'mxfp4' quantize them (one expert tensor at a time).
 *
 * ```js
 * const file = await readSafetensorsFile('model.safetensors');
 * const weights = await loadMoEBlockWeights(file, config, 1);
 * weights.experts.gateUp.shape;  // [E, 2I, H]
 * ```
 */
export async function loadMoEBlockWeights(
    file: TensorSource, hfConfig: HFConfig, layerIndex: number, options: LoadMoEBlockOptions = {}): Promise<MoEBlockWeights> {
  const op = 'loadMoEBlockWeights';
  const expertDtype = options?.expertDtype ?? 'stored';
  assertOneOf(op, 'options.expertDtype', expertDtype, EXPERT_DTYPES);
  const plan = moeBlockTensorPlan(hfConfig, layerIndex);

  const problems: string[] = [];
  for (const { name, shape } of planEntries(plan)) {
    if (!file.has(name)) {
      problems.push(`missing '${name}' (expected shape [${shape}])`);
      continue;
    }
    const actual = file.info(name).shape;
    if (!sameShape(actual, shape)) {
      problems.push(`'${name}' must have shape [${shape}] but has [${actual}]`);
    }
  }
  if (problems.length > 0) {
    const family = familyOf(hfConfig).modelType;
    fail(op, `the checkpoint does not hold layer ${layerIndex}'s MoE block as config.json ` +
        `('${family}') describes it; ${problems.length} problem${problems.length > 1 ? 's' : ''}:\n  ` +
        problems.join('\n  '));
  }

  const kind = expertPackedKind(file, expertTensorNames(plan), expertDtype);
  const groupSize = options.int4GroupSize;
  if (groupSize !== undefined && expertDtype !== 'int4') {
    fail(op, `'options.int4GroupSize' is for expertDtype 'int4' but expertDtype is '${expertDtype}'`);
  }
  const created: Array<tf.Tensor | PackedExpertWeight> = [];
  const track = <T extends tf.Tensor | PackedExpertWeight>(t: T): T => { created.push(t); return t; };
  const readPacked = async (e: Expected): Promise<PackedExpertWeight> => track(isQuantizedKind(kind!) ?
    await readQuantizedTransposed(op, file, kind, e, groupSize) : await readPackedHalves(file, kind as HalfKind, e));
  const fuse = (parts: Expected[][], E: number, dims: number[]) =>
    kind === null ? fuseRows(op, file, E, parts, dims) :
    isQuantizedKind(kind) ? fuseRowsQuantized(op, file, kind, E, parts, dims, groupSize, options.quantizer) : fuseRowsPacked(file, kind, E, parts, dims);
  const read = async <T extends tf.Tensor>(e: Expected): Promise<T> => {
    // on the device now (webgpu), not left on the host until its first use
    const t = track(await readToDevice(file, e.name));
    if (t.dtype !== 'float32') fail(op, `'${e.name}' must be a floating-point tensor but is ${t.dtype}`);
    return t as T;
  };
  try {
    const router: RouterWeights = { weight: await read<Tensor2D>(plan.router.weight) };
    if (plan.router.bias) router.bias = await read<Tensor1D>(plan.router.bias);
    if (plan.router.correctionBias) {
      const bias = await read<tf.Tensor>(plan.router.correctionBias);   // [E], or ERNIE's [1, E]
      if (bias.rank === 1) {
        router.correctionBias = bias as Tensor1D;
      } else {
        router.correctionBias = track(tf.reshape(bias, [bias.size]) as Tensor1D);
        bias.dispose();   // the reshape is a new tensor (disposing twice on an error later is harmless)
      }
    }
    if (plan.router.inputScale) {
      router.inputScale = await read<Tensor1D>(plan.router.inputScale);
      // Gemma4TextRouter's norm uses rms_norm_eps (Gemma4TextConfig's default 1e-6)
      const eps = hfConfig['rms_norm_eps'] ?? 1e-6;
      if (typeof eps !== 'number' || !Number.isFinite(eps)) fail(op, `'config.rms_norm_eps' must be a finite number but got ${JSON.stringify(eps)}`);
      router.inputNormEpsilon = eps;
    }
    if (plan.router.expertScale) router.expertScale = await read<Tensor1D>(plan.router.expertScale);

    let experts: ExpertWeights;
    const ex = plan.experts;
    if (ex.kind === 'perExpert') {
      const E = ex.gate.length;
      const [I, H] = ex.gate[0].shape;
      const gateUp = track(await fuse([ex.gate, ex.up], E, [I, H]));  // [E, 2I, H]
      const down = track(await fuse([ex.down], E, [H, I]));           // [E, H, I]
      experts = { gateUp, down, layout: 'outIn' };
    } else if (ex.kind === 'fused') {
      experts = {
        gateUp: kind ? await readPacked(ex.gateUp) : await read<Tensor3D>(ex.gateUp),  // [E, H, 2I] or [E, 2I, H]
        down: kind ? await readPacked(ex.down) : await read<Tensor3D>(ex.down),        // [E, I, H] or [E, H, I]
        layout: ex.layout,
      };
    } else {
      experts = {
        gateUp: kind ? await readPacked(ex.gateUp) : await read<Tensor3D>(ex.gateUp),  // [E, H, 2I]
        gateUpBias: await read<Tensor2D>(ex.gateUpBias),  // [E, 2I]
        down: kind ? await readPacked(ex.down) : await read<Tensor3D>(ex.down),        // [E, I, H]
        downBias: await read<Tensor2D>(ex.downBias),      // [E, H]
        layout: 'inOutInterleaved',
      };
    }

    const weights: MoEBlockWeights = { router, experts };
    if (plan.shared) {
      const shared: SharedExpertWeights = {
        gate: await read<Tensor2D>(plan.shared.gate),
        up: await read<Tensor2D>(plan.shared.up),
        down: await read<Tensor2D>(plan.shared.down),
      };
      if (plan.shared.sigmoidGate) shared.sigmoidGate = await read<Tensor2D>(plan.shared.sigmoidGate);
      weights.shared = shared;
    }
    return weights;
  } catch (e) {
    for (const t of created) t.dispose();
    throw e;
  }
}
