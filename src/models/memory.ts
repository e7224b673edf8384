/**
 * Know before you build: the memory a model's weights take (from its config.json alone) and a
 * training step's (from the built model), against what the backend can hold. A load or a training
 * run that cannot fit is refused with the need and the limit in the message, instead of failing
 * deep inside tfjs (wasm: `RuntimeError: memory access out of bounds`; webgpu: a buffer larger
 * than the device allows).
 *
 * The limits, per backend:
 * - wasm: the module's heap, at most WASM_HEAP_LIMIT_BYTES (tfjs-backend-wasm 4.22 is built with
 *   emscripten's 32-bit heap: 4 GiB − 64 KiB); tensors already on the backend (tf.memory().numBytes)
 *   count against it. The whole need must fit.
 * - webgpu: the device's maxBufferSize and maxStorageBufferBindingSize bound the largest single
 *   tensor (each tensor is one buffer, bound whole by the kernels). GPU memory as a whole is not
 *   reported by WebGPU, so it is not checked.
 * - cpu (and any other backend): nothing. The cpu backend keeps tensors in typed arrays, whose
 *   ArrayBuffers lie outside V8's heap limit, so that limit says nothing about them.
 *
 * Free of Node modules (the browser entry loads checkpoints too).
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { configTensorPlan, denseStorageTensorNames, type Expected } from '../io/hf_checkpoint_core.js';
import { DENSE_STORAGES, type DenseStorage } from '../layers/dense_storage.js';
import { hfConfigOf, moeCausalLMConfigFromHF, splitAtHead, trainableVariables } from '../layers/moe_causal_lm.js';
import { defaultChunkRows } from '../ops/linear_cross_entropy.js';
import { EXPERT_STORAGES, type ExpertStorage } from '../layers/sparse_moe.js';
import { expertWordsOf, isQuantizedKind, packedDenseWordsPerRow } from '../ops/packed.js';
import { assertInteger, fail } from '../ops/validate.js';
import type { HFConfig } from './families.js';

/** The largest heap tfjs-backend-wasm (4.22) can grow to: emscripten's `getHeapMax()` of its build. */
export const WASM_HEAP_LIMIT_BYTES = 4294901760;

export interface LoadMemoryOptions {
  /**
   * bytes per element of the routed experts' gate/up/down weights: 4 (float32, the default), 2
   * (16-bit experts kept packed in their stored precision)
   */
  expertBytesPerElement?: number;
  /**
   * how the model holds its routed experts (SparseMoE's expertStorage): their exact bytes, the
   * quantized formats' codes, scales and zero points included (src/ops/quantized.ts); instead of
   * expertBytesPerElement
   */
  expertStorage?: ExpertStorage;
  /** int4 experts' group size (expertStorage 'int4'): 32, 64 (default) or 128 */
  expertGroupSize?: number;
  /**
   * how the model holds its frozen attention projections and untied token embedding
   * (MoECausalLMOptions.denseStorage): 'float32' (default), or 'bf16' / 'f16', packed two to an
   * int32 word per row ([rows, ceil(cols/2)] words)
   */
  denseStorage?: DenseStorage;
}

export interface LoadMemoryEstimate {
  /** every weight of the model, in bytes */
  bytes: number;
  /** the routed experts' gate/up/down weights (fused as the model holds them), in bytes */
  expertBytes: number;
  /** every other weight (embeddings, attention, norms, router, shared expert, head): float32, or packed 16-bit with denseStorage */
  otherBytes: number;
  /** the largest single weight of the model as it holds it (experts fused: [E, 2I, H]) */
  largest: { name: string; bytes: number };
  /**
   * what a load holds at its peak: `bytes`, plus the largest MoE block's weights (read and fused
   * beside the built model's before they replace them), plus the largest other weight (its copy
   * read beside it; on wasm, also the hole its replaced value leaves, which a larger tensor read
   * later cannot reuse). Measured: OLMoE's widths with 1 layer, 2.50e9 bytes of weights, run out of
   * wasm's 4.29e9-byte heap while loading.
   */
  peakBytes: number;
}

const size = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

/**
 * The bytes the weights of the model of `config` take once loaded, from the config alone (nothing
 * is allocated): every weight's elements × 4 bytes (float32), except the routed experts'
 * gate/up/down weights at `expertBytesPerElement`. A spec keeps it equal to the built model's
 * weight bytes for every fixture.
 *
 * ```js
 * const {bytes, largest} = estimateLoadMemory(config, {expertBytesPerElement: 2});  // bf16 experts kept packed
 * estimateLoadMemory(config, {expertStorage: 'nf4'}).expertBytes;  // 4-bit codes + one absmax per 64
 * ```
 */
export function estimateLoadMemory(config: HFConfig, options: LoadMemoryOptions = {}): LoadMemoryEstimate {
  const op = 'estimateLoadMemory';
  const expertBytesPerElement = options.expertBytesPerElement ?? 4;
  if (![1, 2, 4].includes(expertBytesPerElement)) {
    fail(op, `'options.expertBytesPerElement' must be 1, 2 or 4 but got ${JSON.stringify(expertBytesPerElement)}`);
  }
  const storage = options.expertStorage;
  if (storage !== undefined && !(EXPERT_STORAGES as readonly unknown[]).includes(storage)) {
    fail(op, `'options.expertStorage' must be one of ${EXPERT_STORAGES.map(k => `'${k}'`).join(', ')} but got ${JSON.stringify(storage)}`);
  }
  if (storage !== undefined && options.expertBytesPerElement !== undefined) {
    fail(op, "give 'options.expertStorage' or 'options.expertBytesPerElement', not both");
  }
  if (options.expertGroupSize !== undefined && storage !== 'int4') {
    fail(op, `'options.expertGroupSize' is for expertStorage 'int4' but got expertStorage ${JSON.stringify(storage)}`);
  }
  const denseStorage = options.denseStorage ?? 'float32';
  if (!(DENSE_STORAGES as readonly unknown[]).includes(denseStorage)) {
    fail(op, `'options.denseStorage' must be one of ${DENSE_STORAGES.map(k => `'${k}'`).join(', ')} but got ${JSON.stringify(denseStorage)}`);
  }
  const packedDense = new Set(denseStorage === 'float32' ? [] : denseStorageTensorNames(config));
  /** bytes of a fused expert weight [E, rows, cols] (the input on `inputAxis`) as the model holds it */
  const expertWeightBytes = (shape: number[], inputAxis: 1 | 2): number => {
    if (storage === undefined) return size(shape) * expertBytesPerElement;
    if (storage === 'float32') return size(shape) * 4;
    const groupSize = storage === 'int4' ? options.expertGroupSize : undefined;
    return 4 * shape[0] * expertWordsOf(storage, shape, isQuantizedKind(storage) ? { inputAxis, groupSize } : {});
  };
  const plan = configTensorPlan(config);
  // `block`: the decoder layer of a MoE block's weight, null for the others
  const weights: Array<{ name: string; bytes: number; block: number | null }> =
      plan.plain.map(e => ({
        name: e.name, block: null,
        bytes: packedDense.has(e.name) ? 4 * e.shape[0] * packedDenseWordsPerRow(e.shape[1]) : size(e.shape) * 4,
      }));
  for (const { layer, plan: block } of plan.blocks) {
    const ex = block.experts;
    // the model holds each block's experts fused, one gate_up and one down tensor, whatever the checkpoint's layout
    const [gateUp, down, name] = ex.kind === 'perExpert' ?
      [expertWeightBytes([ex.gate.length, 2 * ex.gate[0].shape[0], ex.gate[0].shape[1]], 2),
        expertWeightBytes([ex.down.length, ...ex.down[0].shape], 2),
        ex.down[0]?.name.replace(/\.experts\.\d+\..*$/, '.experts') ?? 'experts'] :
      [expertWeightBytes(ex.gateUp.shape, 1), expertWeightBytes(ex.down.shape, 1), ex.gateUp.name.replace(/\.[^.]+$/, '')];
    weights.push({ name: `${name} (gate_up, fused)`, bytes: gateUp, block: layer });
    weights.push({ name: `${name} (down, fused)`, bytes: down, block: layer });
    const others: Array<Expected | undefined> = [block.router.weight, block.router.bias, block.router.correctionBias];
    if (ex.kind === 'fusedInterleaved') others.push(ex.gateUpBias, ex.downBias);
    if (block.shared) others.push(block.shared.gate, block.shared.up, block.shared.down, block.shared.sigmoidGate);
    for (const e of others) if (e !== undefined) weights.push({ name: e.name, bytes: size(e.shape) * 4, block: layer });
  }
  let expertBytes = 0;
  let otherBytes = 0;
  let largest = { name: '', bytes: 0 };
  let largestPlain = 0;
  for (const w of weights) {
    const bytes = w.bytes;
    if (w.name.endsWith(', fused)')) expertBytes += bytes;
    else otherBytes += bytes;
    if (bytes > largest.bytes) largest = { name: w.name, bytes };
    if (w.block === null) largestPlain = Math.max(largestPlain, bytes);
  }
  const blockBytes = new Map<number, number>();
  for (const w of weights) if (w.block !== null) blockBytes.set(w.block, (blockBytes.get(w.block) ?? 0) + w.bytes);
  const largestBlock = Math.max(0, ...blockBytes.values());
  const bytes = expertBytes + otherBytes;
  return { bytes, expertBytes, otherBytes, largest, peakBytes: bytes + largestBlock + largestPlain };
}

export interface TrainingMemoryEstimate {
  /** the model's weights as they are now (dtype-aware) */
  weightBytes: number;
  /** per trainable float32 element: its gradient and Adam's two moments, 3 × 4 bytes */
  optimizerBytes: number;
  /** the largest activations of one step (see estimateTrainingMemory) */
  activationBytes: number;
  /** what a step allocates beyond the weights already loaded: optimizerBytes + activationBytes */
  stepBytes: number;
  bytes: number;
  /** the largest single tensor of a step: a weight or the logits (a chunk of them [rows, V], or [B·S, V]) */
  largest: { name: string; bytes: number };
}

/** Tensors of the logits' size a training step holds at its peak with the composed loss (measured: 6.8; see estimateTrainingMemory). */
const LOSS_LOGITS_COPIES = 7;
/** [rows, V] chunks of logits linearCrossEntropy holds at a step's peak (measured: 2.3; see estimateTrainingMemory). */
const LOSS_CHUNK_COPIES = 3;

const DTYPE_BYTES: Readonly<Record<string, number>> = { float32: 4, int32: 4, bool: 1, complex64: 8, string: 0 };

/**
 * The memory one training step of `model` on `batch` windows of `seq` tokens needs, a simple
 * estimate (it says what dominates, it is no allocator trace):
 *   weights (as held) + trainable elements × 3 × 4 bytes (gradient, Adam's m and v)
 *   + 3 × C·V × 4, C = min(B·S, defaultChunkRows(V)) (64 MiB of logits): batchLoss applies the
 *     head and the loss chunk by chunk (linearCrossEntropy), never holding the logits [B·S, V];
 *     tf.profile's peakBytes of a step of a large-vocabulary model whose chunk is all B·S rows is
 *     2.3 of them on cpu and wasm (6.8 with the logits and tokenCrossEntropy, 15.8 with the
 *     composed loss before that; a spec checks the estimate stays above the measured peak). A
 *     model whose output is not an LM head (batchLoss takes its logits): 7 × B·S·V × 4
 *   + per decoder layer, what its backward keeps: B·S·(8·H + 2·n_heads·S) × 4 (residual stream,
 *     norms, q/k/v/o, attention scores and probabilities) and, in an MoE layer,
 *     B·S·K·(2·I + H) × 4 (each routed token's gate/up output and its gathered input). With
 *     gradientCheckpointing, that of one layer, plus B·S·2·H × 4 per layer (its input, its gradient).
 * A model without an HF config (not built by this package) counts weights, optimizer and the loss.
 *
 * ```js
 * const {bytes} = estimateTrainingMemory(model, {batch: 8, seq: 256});
 * ```
 */
export function estimateTrainingMemory(
    model: tfl.LayersModel, step: { batch: number; seq: number; gradientCheckpointing?: boolean }): TrainingMemoryEstimate {
  const op = 'estimateTrainingMemory';
  assertInteger(op, 'batch', step?.batch, 1);
  assertInteger(op, 'seq', step.seq, 1);
  let weightBytes = 0;
  let largest = { name: '', bytes: 0 };
  for (const w of model.weights) {
    const bytes = size(w.shape as number[]) * (DTYPE_BYTES[w.dtype] ?? 4);
    weightBytes += bytes;
    if (bytes > largest.bytes) largest = { name: w.originalName, bytes };
  }
  const trainable = trainableVariables(model).reduce((n, v) => n + v.size, 0);
  const optimizerBytes = trainable * 3 * 4;
  const tokens = step.batch * step.seq;
  const vocab = model.outputs[0]?.shape[2];
  // batchLoss's two paths: the head in chunks (linearCrossEntropy) or the whole logits
  const chunked = typeof vocab === 'number' && splitAtHead(model) !== null;
  const rows = chunked ? Math.min(tokens, defaultChunkRows(vocab)) : tokens;
  const logitsBytes = typeof vocab === 'number' ? rows * vocab * 4 : 0;
  if (logitsBytes > largest.bytes) largest = { name: `logits [${rows}, ${vocab}]`, bytes: logitsBytes };
  let activationBytes = (chunked ? LOSS_CHUNK_COPIES : LOSS_LOGITS_COPIES) * logitsBytes;
  const hf = hfConfigOf(model);
  if (hf !== null) {
    const c = moeCausalLMConfigFromHF(hf);
    const k = c.moe.routing.topK;
    // gradient checkpointing: one layer's activations at a time, and per layer its input and that input's gradient
    const activeLayers = step.gradientCheckpointing === true ? Math.min(1, c.numLayers) : c.numLayers;
    const activeMoE = step.gradientCheckpointing === true ? Math.min(1, c.moeLayers.length) : c.moeLayers.length;
    if (step.gradientCheckpointing === true) activationBytes += c.numLayers * tokens * 2 * c.hiddenSize * 4;
    activationBytes += activeLayers * tokens * (8 * c.hiddenSize + 2 * c.numHeads * step.seq) * 4;
    activationBytes += activeMoE * tokens * k * (2 * c.moe.intermediateSize + c.hiddenSize) * 4;
  }
  const stepBytes = optimizerBytes + activationBytes;
  return { weightBytes, optimizerBytes, activationBytes, stepBytes, bytes: weightBytes + stepBytes, largest };
}

export interface BackendMemoryLimits {
  backend: string;
  /** the most bytes the backend's tensors can take together, or null when it is not known (cpu, webgpu) */
  totalBytes: number | null;
  /** bytes the backend's tensors take now (tf.memory().numBytes) */
  usedBytes: number;
  /** the largest single tensor the backend can hold, and the limit's name; null when none is known */
  maxTensor: { bytes: number; limit: string } | null;
}

/**
 * What the active backend can hold (see the file comment): wasm's heap, webgpu's largest buffer
 * (read from the device's limits; guarded, so another tfjs version without `backend.device`
 * gives no limit rather than an error).
 *
 * ```js
 * backendMemoryLimits();  // on wasm: {backend: 'wasm', totalBytes: 4294901760, usedBytes: 1024, maxTensor: null}
 * ```
 */
export function backendMemoryLimits(): BackendMemoryLimits {
  const backend = tf.getBackend();
  const usedBytes = tf.memory().numBytes;
  if (backend === 'wasm') return { backend, totalBytes: WASM_HEAP_LIMIT_BYTES, usedBytes, maxTensor: null };
  if (backend === 'webgpu') {
    const limits = (tf.backend() as unknown as { device?: { limits?: Record<string, unknown> } }).device?.limits;
    const candidates = ['maxBufferSize', 'maxStorageBufferBindingSize']
        .map(limit => ({ limit, bytes: limits?.[limit] }))
        .filter((l): l is { limit: string; bytes: number } => typeof l.bytes === 'number' && l.bytes > 0);
    const smallest = candidates.sort((a, b) => a.bytes - b.bytes)[0];
    return { backend, totalBytes: null, usedBytes, maxTensor: smallest === undefined ? null : { bytes: smallest.bytes, limit: `the device's ${smallest.limit}` } };
  }
  return { backend, totalBytes: null, usedBytes, maxTensor: null };
}

/** `1234567890 bytes (1.15 GiB)` */
export function formatBytes(bytes: number): string {
  return `${bytes} bytes (${(bytes / 2 ** 30).toFixed(2)} GiB)`;
}

/**
 * Why `need` more bytes cannot fit on the active backend beside the tensors it holds now, or null
 * when they can (or no limit is known): a sentence with the need and the limit, for the caller to
 * throw with its own error class. `what` names the need with its verb ('the weights need');
 * `remedy` ends the sentence.
 *
 * ```js
 * const why = memoryProblem('the weights need', estimateLoadMemory(config), 'a smaller model');
 * if (why !== null) throw new CheckpointError(`${where}: ${why}`);
 * ```
 */
export function memoryProblem(what: string, need: { bytes: number; largest: { name: string; bytes: number } },
    remedy: string, limits: BackendMemoryLimits = backendMemoryLimits()): string | null {
  const { backend, totalBytes, usedBytes, maxTensor } = limits;
  if (totalBytes !== null && usedBytes + need.bytes > totalBytes) {
    return `${what} ${formatBytes(need.bytes)} but the ${backend} backend holds at most ${formatBytes(totalBytes)}` +
        (usedBytes > 0 ? `, of which tensors already take ${formatBytes(usedBytes)}` : '') +
        `; use a backend with more memory (cpu, webgpu) or ${remedy}`;
  }
  if (maxTensor !== null && need.largest.bytes > maxTensor.bytes) {
    return `${what} a tensor of ${formatBytes(need.largest.bytes)} (${need.largest.name}) but on the ${backend} ` +
        `backend a tensor can be at most ${formatBytes(maxTensor.bytes)} (${maxTensor.limit}); use another backend (cpu, wasm) or ${remedy}`;
  }
  return null;
}
