/**
 * The part of Hugging Face checkpoint import that needs no file system: checking a checkpoint's
 * tensors against its config.json and writing them into a MoECausalLM. The Node loader
 * (hf_checkpoint.ts, files) and the browser loader (fetch_checkpoint.ts, fetch) only differ in how
 * they get config.json and the safetensors bytes, so both hand them to this file.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import {
  buildMoECausalLM, decoderLayerIndex, MAX_TENSOR_ELEMENTS, moeCausalLMConfigFromHF, type MoECausalLM, type MoECausalLMOptions,
} from '../layers/moe_causal_lm.js';
import { SparseMoE, type ExpertStorage } from '../layers/sparse_moe.js';
import { gatedDeltaNetWeightShapes } from '../layers/gated_delta_net.js';
import { mlaWeightShapes } from '../layers/mla_attention.js';
import { dequantizingSource, withoutQuantizationConfig } from './fp8_checkpoint.js';
import { familyOf, type HFConfig } from '../models/families.js';
import { estimateLoadMemory, memoryProblem } from '../models/memory.js';
import { disposeMoEBlockWeights, getWeightField, type WeightField } from '../models/weight_fields.js';
import {
  EXPERT_DTYPES, expertPackedKind, expertTensorNames, storedExpertKind, loadMoEBlockWeights, moeBlockTensorPlan,
  type BlockTensorPlan, type ExpertDtype, type TensorSource,
} from './hf_block.js';
import { isPackedExpertWeight, packedDenseWordsOf, unpackExpertWeight, type HalfKind } from '../ops/packed.js';
import { INT4_GROUP_SIZES } from '../ops/quantized.js';
import type { SafetensorsFile } from './safetensors_bytes.js';
import { MoELoraError } from '../errors.js';
import { recordSourceDtypes } from './checkpoint_source.js';
import { deviceTensor, readHalfWordsToDevice, readIntoVariable, writeVariable } from './device_tensor.js';
import { packedDenseFormat, type DenseStorage } from '../layers/dense_storage.js';
import type { ExpertQuantizer } from './quantize_pool.js';
import { isMXFP4Config, mxfp4TensorSource } from './mxfp4.js';
import { bnbTensorSource, isBitsAndBytesConfig } from './bnb_checkpoint.js';

/** A checkpoint that does not match its config (or is not there): the message lists every problem. */
export class CheckpointError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'CheckpointError';
    Object.setPrototypeOf(this, CheckpointError.prototype);
  }
}

/** @internal One error for all `problems` of the checkpoint at `where` (quoted path or URL). */
export function checkpointError(op: string, where: string, problems: string[], context = ''): CheckpointError {
  return new CheckpointError(`\`${op}()\`: ${where}${context}: ${problems.length} problem${problems.length > 1 ? 's' : ''}:\n  ` +
      problems.join('\n  '));
}

/** Reads tensors by name from one file or from the shards an index maps them to. */
export class CheckpointSource implements TensorSource {
  constructor(private readonly fileOf: Map<string, SafetensorsFile>) {}
  /** every tensor of one safetensors file */
  static single(file: SafetensorsFile): CheckpointSource {
    return new CheckpointSource(new Map(file.names().map(n => [n, file])));
  }
  names(): string[] { return [...this.fileOf.keys()]; }
  has(name: string): boolean { return this.fileOf.has(name); }
  info(name: string): { dtype: string; shape: number[] } { return this.fileOf.get(name)!.info(name); }
  tensor(name: string): Promise<tf.Tensor> { return this.fileOf.get(name)!.tensor(name); }
  halfBits(name: string): Promise<Uint16Array> { return this.fileOf.get(name)!.halfBits(name); }
  halfBitsInto(name: string, into: Uint16Array, from?: number): Promise<void> { return this.fileOf.get(name)!.halfBitsInto(name, into, from); }
  uint8Values(name: string): Promise<Uint8Array> { return this.fileOf.get(name)!.uint8Values(name); }
}

/**
 * @internal The tensors of a sharded checkpoint: `index` is model.safetensors.index.json (read
 * from `indexWhere`), `openShard` gives a shard file by name or null when it is missing. Every
 * problem of the index and the shards is reported together.
 */
export async function indexedCheckpointSource(
    op: string, where: string, indexWhere: string, index: unknown,
    openShard: (shard: string) => Promise<SafetensorsFile | null>): Promise<CheckpointSource> {
  const map = (index as { weight_map?: unknown } | null)?.weight_map;
  if (map == null || typeof map !== 'object' || Array.isArray(map)) {
    throw new CheckpointError(`\`${op}()\`: '${indexWhere}' must have a 'weight_map' object {tensor name: shard file}`);
  }
  const entries = Object.entries(map as Record<string, unknown>);
  const problems: string[] = [];
  const shardNames = new Set<string>();
  for (const [name, shard] of entries) {
    // a bare file name: the index must not reach outside the checkpoint's folder
    if (typeof shard !== 'string' || /[/\\]/.test(shard) || !shard.endsWith('.safetensors')) {
      problems.push(`weight_map['${name}'] must be a .safetensors file name in the same folder but is ${JSON.stringify(shard)}`);
    } else {
      shardNames.add(shard);
    }
  }
  const shards = new Map<string, SafetensorsFile>();
  for (const shard of [...shardNames].sort()) {
    const file = await openShard(shard);
    if (file === null) {
      problems.push(`shard '${shard}' named in the index is missing`);
      continue;
    }
    shards.set(shard, file);
  }
  const fileOf = new Map<string, SafetensorsFile>();
  for (const [name, shard] of entries) {
    const file = typeof shard === 'string' ? shards.get(shard) : undefined;
    if (file === undefined) continue;
    if (!file.has(name)) {
      problems.push(`the index puts '${name}' in '${shard}' but that shard does not hold it`);
      continue;
    }
    fileOf.set(name, file);
  }
  if (problems.length > 0) throw checkpointError(op, where, problems);
  return new CheckpointSource(fileOf);
}

const FLOAT_DTYPES = ['F32', 'F16', 'BF16'];

/** A checkpoint tensor's name and the shape its config implies. */
export interface Expected { name: string; shape: number[] }

/** @internal The MoE block's checkpoint tensors with expected shapes. */
export function planTensors(plan: BlockTensorPlan): Expected[] {
  const out: Array<Expected | undefined> = [plan.router.weight, plan.router.bias, plan.router.correctionBias,
    plan.router.inputScale, plan.router.expertScale];
  const ex = plan.experts;
  if (ex.kind === 'perExpert') out.push(...ex.gate, ...ex.up, ...ex.down);
  else if (ex.kind === 'fused') out.push(ex.gateUp, ex.down);
  else out.push(ex.gateUp, ex.gateUpBias, ex.down, ex.downBias);
  if (plan.shared) out.push(plan.shared.gate, plan.shared.up, plan.shared.down, plan.shared.sigmoidGate);
  return out.filter((e): e is Expected => e !== undefined);
}

/** The checkpoint tensors of a config: the plain layers, then per MoE layer its block plan. */
export interface ConfigTensorPlan {
  /** every tensor, in graph order (a block's tensors where its layer is) */
  all: Expected[];
  /** embed, norms, attention, dense MLPs and lm_head: one checkpoint tensor per model weight */
  plain: Expected[];
  /** per MoE decoder layer, the Hub tensors its SparseMoE is fused from */
  blocks: Array<{ layer: number; plan: BlockTensorPlan }>;
}

/**
 * @internal Every checkpoint tensor (name and shape) a config.json implies for a whole model,
 * computed from the config alone: nothing is built or allocated, so a config that does not fit
 * its checkpoint is reported before any weight exists. A spec keeps this list equal to the
 * weights `buildMoECausalLM` makes.
 *
 * ```js
 * configTensorPlan(mixtralConfig).plain[0];  // {name: 'model.embed_tokens.weight', shape: [97, 64]}
 * ```
 */
export function configTensorPlan(config: HFConfig): ConfigTensorPlan {
  const c = moeCausalLMConfigFromHF(config);
  const H = c.hiddenSize;
  const q = c.numHeads * c.headDim;
  const kv = c.numKeyValueHeads * c.headDim;
  const plain: Expected[] = [];
  const all: Expected[] = [];
  const blocks: ConfigTensorPlan['blocks'] = [];
  const add = (e: Expected) => { plain.push(e); all.push(e); };
  add({ name: 'model.embed_tokens.weight', shape: [c.vocabSize, H] });
  for (let i = 0; i < c.numLayers; i++) {
    const at = (relative: string, shape: number[]) => add({ name: `model.layers.${i}.${relative}`, shape });
    at('input_layernorm.weight', [H]);
    if (c.deltaNet?.layers[i]) {
      for (const w of gatedDeltaNetWeightShapes(c.deltaNet.shape, H)) at(`linear_attn.${w.name}`, w.shape);
    } else if (c.mla !== null) {
      for (const w of mlaWeightShapes({ numHeads: c.numHeads, ...c.mla }, H)) at(`self_attn.${w.name}`, w.shape);
    } else {
      const qOut = c.outputGate ? 2 * q : q;  // qwen3_next: each head's queries then its gate logits
      at('self_attn.q_proj.weight', [qOut, H]);
      at('self_attn.k_proj.weight', [kv, H]);
      at('self_attn.v_proj.weight', [kv, H]);
      at('self_attn.o_proj.weight', [H, q]);
      if (c.qkvBias) {
        at('self_attn.q_proj.bias', [qOut]);
        at('self_attn.k_proj.bias', [kv]);
        at('self_attn.v_proj.bias', [kv]);
      }
      if (c.outputBias) at('self_attn.o_proj.bias', [H]);
      if (c.sinks) at('self_attn.sinks', [c.numHeads]);
      if (c.qkNorm === 'perHeadAfterRope') {
        at('self_attn.query_layernorm.weight', [c.headDim]);
        at('self_attn.key_layernorm.weight', [c.headDim]);
      } else if (c.qkNorm === 'perHead' || c.qkNorm === 'full') {
        at('self_attn.q_norm.weight', [c.qkNorm === 'perHead' ? c.headDim : q]);
        at('self_attn.k_norm.weight', [c.qkNorm === 'perHead' ? c.headDim : kv]);
      }
    }
    at('post_attention_layernorm.weight', [H]);
    if (c.moeLayers.includes(i)) {
      const plan = moeBlockTensorPlan(config, i);
      blocks.push({ layer: i, plan });
      all.push(...planTensors(plan));
    } else {
      const I = c.denseIntermediateSize!;
      at(`${c.mlpModule}.gate_proj.weight`, [I, H]);
      at(`${c.mlpModule}.up_proj.weight`, [I, H]);
      at(`${c.mlpModule}.down_proj.weight`, [H, I]);
    }
  }
  add({ name: 'model.norm.weight', shape: [H] });
  if (!c.tieWordEmbeddings) add({ name: 'lm_head.weight', shape: [c.vocabSize, H] });
  return { all, plain, blocks };
}

/**
 * @internal Checks `source` against the tensors `config` implies (present, expected shape, a
 * float dtype, a size tfjs can hold) from the config and the tensor headers alone, before any
 * model weight is allocated; every problem is in the one CheckpointError. So a config.json with a
 * wrong vocab_size costs nothing, not the gigabytes of a model built first.
 */
export function checkCheckpointAgainstConfig(op: string, where: string, config: HFConfig, source: TensorSource): void {
  const problems: string[] = [];
  for (const { name, shape } of configTensorPlan(config).all) {
    const elements = shape.reduce((a, b) => a * b, 1);
    if (elements > MAX_TENSOR_ELEMENTS) {
      problems.push(`'${name}' would have shape [${shape}], ${elements} elements, more than the ${MAX_TENSOR_ELEMENTS} a tensor can hold`);
    }
    if (!source.has(name)) {
      problems.push(`missing '${name}' (expected shape [${shape}])`);
      continue;
    }
    const info = source.info(name);
    if (!sameShape(info.shape, shape)) problems.push(`'${name}' must have shape [${shape}] but has [${info.shape}]`);
    if (!FLOAT_DTYPES.includes(info.dtype)) {
      problems.push(`'${name}' must be a float tensor (${FLOAT_DTYPES.join(', ')}) but is ${info.dtype}`);
    }
  }
  if (problems.length > 0) {
    throw checkpointError(op, where, problems,
        ` does not hold the weights its config.json ('${String(config['model_type'])}') describes`);
  }
}

/** SparseMoE weight names of the fields of `MoEBlockWeights`. */
const SPARSE_MOE_WEIGHT: Readonly<Record<WeightField, string>> = {
  'router.weight': 'router_weight',
  'router.bias': 'router_bias',
  'router.correctionBias': 'correction_bias',
  // Gemma 4's router scales: block level only, no SparseMoE holds them yet
  'router.inputScale': 'router_input_scale',
  'router.expertScale': 'router_expert_scale',
  'experts.gateUp': 'gate_up',
  'experts.down': 'down',
  'experts.gateUpBias': 'gate_up_bias',
  'experts.downBias': 'down_bias',
  'shared.gate': 'shared_gate',
  'shared.up': 'shared_up',
  'shared.down': 'shared_down',
  'shared.sigmoidGate': 'shared_expert_gate',
};

/** The checkpoint name of a plain layer weight: `<layer name>.<weight name>` (see moe_causal_lm.ts). */
export function hfWeightName(layer: tfl.layers.Layer, weight: tfl.LayerVariable): string {
  const scope = `${layer.name}/`;
  const short = weight.originalName.startsWith(scope) ? weight.originalName.slice(scope.length) : weight.originalName;
  return `${layer.name}.${short}`;
}

function sameShape(a: readonly number[], b: readonly (number | null)[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

export interface LoadHFCheckpointOptions extends Omit<MoECausalLMOptions, 'expertStorage' | 'expertGroupSize'> {
  /**
   * 'stored' (default): routed experts stored BF16 or F16 stay 16-bit in memory (packed, frozen:
   * LoRA trains, the experts themselves do not); 'float32': widened, e.g. to train the experts.
   */
  expertDtype?: ExpertDtype;
  /** with expertDtype 'int4': its group size along the input, 32, 64 (default) or 128 */
  int4GroupSize?: number;
  /**
   * The frozen non-expert weights, attention's q/k/v/o_proj, an untied token embedding and LM head:
   * 'float32' (default) widens them; 'stored' keeps them in their stored 16-bit precision when
   * every one is stored in one of BF16 / F16 (packed halves, decoded in each product that uses
   * them: bit for bit the float32 results, half the bytes). An untied LM head is held so too
   * (frozen; Qwen3-30B-A3B's is 1.24 GB float32, 0.62 GB bf16).
   */
  denseDtype?: DenseDtype;
  /**
   * @internal with a quantized expertDtype: hold the experts as float32, the exact values the
   * quantized experts stand for (a merge into the base an adapter was trained on)
   */
  dequantizeExperts?: boolean;
}

/** A checkpoint already in memory: its parsed config.json and its tensors. */
export interface HFCheckpointFiles {
  /** config.json, parsed */
  config: HFConfig;
  /** the tensors of model.safetensors (a `SafetensorsFile`) or of its shards */
  tensors: TensorSource;
  /** how error messages name the checkpoint; default 'the checkpoint' */
  source?: string;
}

/**
 * Builds the MoECausalLM of an HF checkpoint held in memory, as `loadHFCheckpoint` does for a
 * folder: every tensor is checked (present, expected shape, a float dtype) before any is read,
 * and all problems are one CheckpointError.
 *
 * ```js
 * const config = await (await fetch('model/config.json')).json();
 * const bytes = new Uint8Array(await (await fetch('model/model.safetensors')).arrayBuffer());
 * const model = await loadHFCheckpointFrom({config, tensors: parseSafetensors(bytes)});
 * ```
 */
export async function loadHFCheckpointFrom(
    files: HFCheckpointFiles, options: LoadHFCheckpointOptions = {}): Promise<MoECausalLM> {
  const op = 'loadHFCheckpointFrom';
  if (files == null || typeof files !== 'object') {
    throw new CheckpointError(`\`${op}()\`: 'files' must be {config, tensors} but got ${String(files)}`);
  }
  const { config, tensors, source = 'the checkpoint' } = files;
  if (config == null || typeof config !== 'object' || Array.isArray(config)) {
    throw new CheckpointError(`\`${op}()\`: 'config' must be the parsed config.json object but got ${JSON.stringify(config)}`);
  }
  const methods = ['has', 'info', 'tensor'] as const;
  const missing = methods.filter(m => typeof (tensors as unknown as Record<string, unknown> | null)?.[m] !== 'function');
  if (missing.length > 0) {
    throw new CheckpointError(`\`${op}()\`: 'tensors' must have ${methods.join(', ')} (e.g. a SafetensorsFile) ` +
        `but lacks ${missing.join(', ')}`);
  }
  return modelFromCheckpoint(op, source, config, tensors, options);
}

/** @internal The model of `config` with the weights of `source`; `where` names the checkpoint in errors. */
export async function modelFromCheckpoint(
    op: string, where: string, config: HFConfig, source: TensorSource,
    options: LoadHFCheckpointOptions, quantizer?: ExpertQuantizer): Promise<MoECausalLM> {
  const { expertDtype = 'stored', denseDtype = 'float32', dequantizeExperts = false, int4GroupSize, ...modelOptions } = options ?? {};
  if (!(DENSE_DTYPES as readonly unknown[]).includes(denseDtype)) {
    throw new CheckpointError(`\`${op}()\`: 'denseDtype' must be one of ${DENSE_DTYPES.map(d => `'${d}'`).join(', ')} ` +
        `but got ${JSON.stringify(denseDtype)}`);
  }
  if (!(EXPERT_DTYPES as readonly unknown[]).includes(expertDtype)) {
    throw new CheckpointError(`\`${op}()\`: 'expertDtype' must be one of ${EXPERT_DTYPES.map(d => `'${d}'`).join(', ')} ` +
        `but got ${JSON.stringify(expertDtype)}`);
  }
  if (int4GroupSize !== undefined && (expertDtype !== 'int4' || !INT4_GROUP_SIZES.includes(int4GroupSize))) {
    throw new CheckpointError(`\`${op}()\`: 'int4GroupSize' must be one of ${INT4_GROUP_SIZES.join(', ')} with expertDtype 'int4' ` +
        `but got ${JSON.stringify(int4GroupSize)} with expertDtype '${expertDtype}'`);
  }
  familyOf(config);  // unknown model types fail here, before any weight is checked
  if (isMXFP4Config(config)) {
    // MXFP4 experts (gpt-oss on the Hub) are read as the BF16 weights they decode to, exactly
    source = mxfp4TensorSource(source, where);
  } else if (isBitsAndBytesConfig(config)) {
    // bitsandbytes 4-/8-bit linears read as the weights they decode to (NF4 in blocks of 64 and
    // int8 experts can stay as they are stored: bnb_checkpoint.ts); the model is then a plain one
    source = await bnbTensorSource(source, where);
    config = withoutQuantizationConfig(config);
  } else if (config['quantization_config'] != null) {
    // an FP8 checkpoint loads as the float32 model of its dequantized weights (any other
    // quantization is refused here, by name)
    source = dequantizingSource(config, source, where);
    config = withoutQuantizationConfig(config);
  }
  checkCheckpointAgainstConfig(op, where, config, source);  // before buildMoECausalLM allocates anything
  const expertStorage = dequantizeExperts ? 'float32' : modelExpertStorage(config, source, expertDtype);
  // know before you build: the experts as they will be held (16-bit, quantized), every other weight 4 bytes an element
  const groupOptions = int4GroupSize !== undefined && expertStorage === 'int4' ? { expertGroupSize: int4GroupSize } : {};
  const denseStorage = modelDenseStorage(config, source, denseDtype);
  const need = estimateLoadMemory(config, { expertStorage, ...groupOptions, denseStorage });
  const tooLarge = memoryProblem(`loading the weights (${need.bytes} bytes) needs at its peak`,
      { bytes: need.peakBytes, largest: need.largest }, 'a smaller model');
  if (tooLarge !== null) throw new CheckpointError(`\`${op}()\`: ${where}: ${tooLarge}`);
  // every weight is overwritten from the checkpoint: built as zeros, not drawn at random
  const model = buildMoECausalLM(config, { ...modelOptions, expertStorage, ...groupOptions, denseStorage, initializeWeights: false });
  try {
    await fillWeights(op, model, config, source, expertDtype, int4GroupSize, quantizer);
  } catch (e) {
    model.dispose();
    throw e;
  }
  // each tensor's dtype on disk, whichever loader read it: a save writes bf16 back as bf16
  recordSourceDtypes(model, new Map(configTensorPlan(config).all.map(({ name }) => [name, source.info(name).dtype])));
  return model;
}

/**
 * How the model holds its routed experts: packed when every MoE layer's expert tensors are stored
 * in one 16-bit dtype and 'stored' is asked for, float32 otherwise.
 */
function modelExpertStorage(config: HFConfig, source: TensorSource, expertDtype: ExpertDtype): ExpertStorage {
  const names = configTensorPlan(config).blocks.flatMap(b => expertTensorNames(b.plan));
  return expertPackedKind(source, names, expertDtype) ?? 'float32';
}

/** loadHFCheckpoint's choices for the frozen non-expert weights (`denseDtype`). */
export type DenseDtype = 'stored' | 'float32';
export const DENSE_DTYPES: readonly DenseDtype[] = ['stored', 'float32'];

/**
 * The checkpoint names of the weights a MoECausalLM can hold packed (DenseStorage): every
 * RotaryAttention's q/k/v/o_proj weight, and the token embedding and lm_head unless they are tied.
 */
export function denseStorageTensorNames(config: HFConfig): string[] {
  const c = moeCausalLMConfigFromHF(config);
  const names = c.tieWordEmbeddings ? [] : ['model.embed_tokens.weight', 'lm_head.weight'];
  if (c.mla !== null) return names;
  for (let i = 0; i < c.numLayers; i++) {
    if (c.deltaNet?.layers[i]) continue;
    for (const p of ['q_proj', 'k_proj', 'v_proj', 'o_proj']) names.push(`model.layers.${i}.self_attn.${p}.weight`);
  }
  return names;
}

/**
 * How the model holds its frozen non-expert weights: their 16-bit kind with 'stored' when every
 * one of them is stored in that dtype (and the source gives raw halves), float32 otherwise
 * (F32 weights stay F32; a mix is widened).
 */
function modelDenseStorage(config: HFConfig, source: TensorSource, denseDtype: DenseDtype): DenseStorage {
  if (denseDtype !== 'stored') return 'float32';
  return storedExpertKind(source, denseStorageTensorNames(config)) ?? 'float32';
}

/** The int32 words [rows, ceil(cols/2)] of a 16-bit checkpoint tensor, on the device. */
async function packedDenseTensor(source: TensorSource, name: string, kind: HalfKind, shape: [number, number]): Promise<tf.Tensor> {
  // an even row's words are the file's halves as they are (every real model's q/k/v/o, embedding and LM head)
  if (shape[1] % 2 === 0 && typeof source.halfBitsInto === 'function') return readHalfWordsToDevice(source, name, shape);
  const { words, shape: wordShape } = packedDenseWordsOf(kind, shape, await source.halfBits!(name));
  return deviceTensor(words, wordShape, 'int32');
}

/**
 * Writes the checkpoint's tensors into the model, one at a time (checkCheckpointAgainstConfig ran
 * first), each on the device as it is read (src/io/device_tensor.ts): on webgpu the host never
 * holds more than the tensor being read, or one expert of a fused stack.
 */
async function fillWeights(
    op: string, model: MoECausalLM, config: HFConfig, source: TensorSource, expertDtype: ExpertDtype,
    int4GroupSize: number | undefined, quantizer: ExpertQuantizer | undefined): Promise<void> {
  const plain: Array<[tfl.LayerVariable, string]> = [];
  const blocks: Array<[SparseMoE, number]> = [];
  for (const layer of model.layers) {
    if (layer instanceof SparseMoE) {
      const index = decoderLayerIndex(layer.name);
      if (index === null) throw new CheckpointError(`\`${op}()\`: cannot tell the decoder layer of '${layer.name}'`);
      blocks.push([layer, index]);
      continue;
    }
    for (const w of layer.weights) plain.push([w, hfWeightName(layer, w)]);
  }
  for (const [variable, name] of plain) {
    // on the device before it is written (webgpu would otherwise keep it on the host until first use);
    // a packed dense weight gets the file's halves as they are (never a float32 copy)
    const dense = packedDenseFormat(variable);
    if (dense === undefined) {
      await readIntoVariable(source, name, variable);
      continue;
    }
    const t = await packedDenseTensor(source, name, dense.kind, dense.shape);
    try {
      writeVariable(variable, t);
    } finally {
      t.dispose();
    }
  }
  for (const [layer, index] of blocks) {
    const weights = await loadMoEBlockWeights(source, config, index, { expertDtype, int4GroupSize, quantizer });
    try {
      for (const [field, weightName] of Object.entries(SPARSE_MOE_WEIGHT) as Array<[WeightField, string]>) {
        const t: unknown = getWeightField(weights, field);
        if (t === undefined) continue;
        const variable = layer.weightVariable(weightName);
        // written into the variables' own buffers (writeVariable): on wasm the heap keeps no holes
        if (!isPackedExpertWeight(t)) writeVariable(variable, t as tf.Tensor);
        else if (layer.expertStorage !== 'float32') writeVariable(variable, t.packed);
        else tf.tidy(() => { writeVariable(variable, unpackExpertWeight(t)); });
      }
    } finally {
      disposeMoEBlockWeights(weights);
    }
  }
}
