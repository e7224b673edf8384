/**
 * One training run as `tfjs-moe-lora train` does it: a model from scratch (an init config) or
 * from a checkpoint folder, its tokenizer (the character tokenizer built from the data, or the
 * folder's: a real HF tokenizer.json or a character one), the plugin registered with the run's args
 * (LoRA or not), the training loop, and the result written to a folder: an HF checkpoint with
 * its tokenizer files (from scratch, or full fine-tuning), or a PEFT adapter (LoRA).
 */
import type { DenseDtype } from '../io/hf_checkpoint_core.js';
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { join } from 'node:path';
import type { ResolvedPluginArgs } from '../args/schema.js';
import { datasetBatches, epochBatchCount, loadDatasets, type DatasetSpec } from '../data/datasets.js';
import type { HFTokenizer } from '../data/hf_tokenizer.js';
import type { TextTokenizer } from '../data/text_tokenizer.js';
import { CharTokenizer, describeChar, TOKENIZER_FILE } from '../data/tokenizer.js';
import { readTokenizer, tokenizerFiles } from '../data/tokenizer_file.js';
import type { ExpertDtype } from '../io/hf_block.js';
import { loadHFCheckpoint } from '../io/hf_checkpoint.js';
import { saveHFCheckpoint } from '../io/hf_save.js';
import { ADAPTER_CONFIG, ADAPTER_WEIGHTS } from '../io/peft.js';
import { loadPeftAdapter, savePeftAdapter } from '../io/peft_files.js';
import { buildMoECausalLM, hfConfigOf, trainableVariables } from '../layers/moe_causal_lm.js';
import { variableShape } from '../layers/sparse_moe.js';
import type { HFConfig } from '../models/families.js';
import { estimateLoadMemory, memoryProblem } from '../models/memory.js';
import { register, type PluginHandle } from '../plugin.js';
import { checkOutputFolder } from '../util/output_folder.js';
import { readTextFile } from '../util/files.js';
import { TrainError } from './errors.js';
import { evaluateDatasetLoss, evaluateLoss } from './evaluate.js';
import type { BatchSource } from './batches.js';
import { loadTrainCheckpoint, saveTrainCheckpoint } from './checkpoint.js';
import { trainLoop, type TrainState, type TrainWarning } from './loop.js';
import { openMetricsLog } from './metrics.js';
import type { LRScheduler } from './schedule.js';
import { INIT_PRESET_NAMES, presetConfig, type InitPreset } from './presets.js';
import { createProgress, type ProgressOptions } from './progress.js';
import { seedAdapterInit, seedModelInit } from './seeded_init.js';

export type TrainMode = 'scratch' | 'full' | 'lora';

export interface TrainRunOptions {
  /** from scratch: a family preset (INIT_PRESETS) or the path of an HF config.json */
  initConfig?: string;
  /** start from this HF checkpoint folder, which must hold the tokenizer.json it was trained with */
  model?: string;
  /** the training text file (random windows of its tokens); or give `datasets` */
  data?: string;
  /** a held-out text file (with `data`): its loss is measured before and after training (and every evalEvery steps) */
  val?: string;
  /**
   * JSON Lines datasets (axolotl's `datasets: [{path, type, field}]`, see loadDatasets) instead of
   * `data`: samples of at most `seq` tokens, loss-masked, padded or packed, `batch` rows a micro-batch
   */
  datasets?: DatasetSpec[];
  /** with datasets: several samples a row (axolotl's sample_packing); default false */
  samplePacking?: boolean;
  /** with datasets: the loss on prompts and user turns too (axolotl's train_on_inputs); default false */
  trainOnInputs?: boolean;
  /** with datasets: validation samples split off, a fraction in (0, 1) or a count (axolotl's val_set_size) */
  valSetSize?: number;
  /**
   * from scratch: a folder whose tokenizer.json (an HF tokenizer, with its tokenizer_config.json)
   * the new model uses; default a character tokenizer built from `data`
   */
  tokenizer?: string;
  /** optimizer steps (HF's max_steps); wins over numEpochs */
  steps?: number;
  /**
   * passes over the data when `steps` is absent: one epoch is ceil(tokens / (batch · seq · gradAccum))
   * steps of a text, ceil(micro-batches of the first epoch / gradAccum) of datasets
   */
  numEpochs?: number;
  /** 'constant' (default), 'linear' or 'cosine', after a linear warm-up */
  lrScheduler?: LRScheduler;
  /** warm-up steps; default 0 */
  warmupSteps?: number;
  /** warm-up as a fraction of the steps (HF: ceil(steps · ratio)) when warmupSteps is absent */
  warmupRatio?: number;
  /** micro-batches (of `batch` windows) per optimizer step; default 1 */
  gradAccum?: number;
  /** clip the gradients' global norm to this; default none */
  maxGradNorm?: number;
  /** recompute each decoder layer in the backward pass (trainLoop's gradientCheckpointing); default false */
  gradientCheckpointing?: boolean;
  /** evaluate on `val` every this many steps (a line in the metrics) */
  evalEvery?: number;
  /** write out/checkpoint-<step>/ every this many steps */
  saveEvery?: number;
  /** keep only the newest this many checkpoints */
  saveTotalLimit?: number;
  /** write one JSON line per step and per evaluation to this file */
  metrics?: string;
  /** continue the run from this checkpoint folder (out/checkpoint-<step>), exactly as it would have gone on */
  resume?: string;
  lr: number;
  batch: number;
  seq: number;
  seed: number;
  /** the output folder: checked before any work (checkOutputFolder), never the model folder nor inside it */
  out: string;
  /** replace a model or adapter already in `out` (default false: such an `out` is refused before any work) */
  overwrite?: boolean;
  /** the plugin args (models are added here); lora null trains every weight */
  plugin: ResolvedPluginArgs;
  /**
   * How `model`'s BF16/F16 routed experts are held: 'stored' (16-bit, packed, frozen; the default
   * with LoRA) or 'float32' (the default for full fine-tuning, which trains them: 'stored' is then refused)
   */
  expertDtype?: ExpertDtype;
  /** with expertDtype 'int4': its group size along the input (32, 64 default, 128) */
  int4GroupSize?: number;
  /**
   * `model`'s BF16/F16 attention projections and untied embedding and LM head: 'stored' (16-bit,
   * packed, frozen, as PEFT on a bf16 base holds them; the default with LoRA) or 'float32' (the
   * default for full fine-tuning, which trains them: 'stored' is then refused)
   */
  denseDtype?: DenseDtype;
  progress?: ProgressOptions;
  /** checked between steps; true stops training, and what was trained is saved */
  shouldStop?: () => boolean;
  /** stop at a dead model's warning (trainLoop's stopOnNoGradient); what was trained is saved; default false */
  stopOnNoGradient?: boolean;
  /** each warning of the loop as it comes (a dead model: trainLoop's onWarning); also in the result and the metrics */
  onWarning?: (warning: TrainWarning) => void;
  /** notes for the user (unknown characters, ...) */
  note?: (line: string) => void;
  /** called once the model is ready, before the first step */
  onStart?: (info: { mode: TrainMode; modelType: string; params: number; trainableParams: number; trainTokens: number }) => void;
}

export interface TrainRunResult {
  mode: TrainMode;
  modelType: string;
  backend: string;
  vocabSize: number;
  params: number;
  trainableParams: number;
  trainTokens: number;
  steps: number;
  stopped: boolean;
  /** stopOnNoGradient ended the run early, at a 'noGradient' warning */
  stoppedNoGradient: boolean;
  /** the loop's warnings (a dead model) */
  warnings: TrainWarning[];
  firstLoss: number | null;
  /** the mean loss of the last 10 steps (fewer when fewer ran) */
  finalLoss: number | null;
  valLossBefore: number | null;
  valLossAfter: number | null;
  seconds: number;
  tokensPerSecond: number;
  out: string;
  files: string[];
  losses: number[];
}

async function readText(path: string, what: string): Promise<string> {
  const text = await readTextFile(path, `the ${what} file`);
  if (text.length === 0) throw new TrainError(`the ${what} file '${path}' is empty`);
  return text;
}

async function initConfig(spec: string, vocabSize: number): Promise<HFConfig> {
  if ((INIT_PRESET_NAMES as string[]).includes(spec)) return presetConfig(spec as InitPreset, vocabSize);
  let text: string;
  try {
    text = await readTextFile(spec, '--init-config');
  } catch (e) {
    throw new TrainError(`--init-config '${spec}' is neither a preset (${INIT_PRESET_NAMES.join(', ')}) nor a readable ` +
        `config.json (${(e as Error).message})`);
  }
  let config: unknown;
  try {
    config = JSON.parse(text);
  } catch (e) {
    throw new TrainError(`--init-config '${spec}' is not valid JSON: ${(e as Error).message}`);
  }
  if (config === null || typeof config !== 'object' || Array.isArray(config)) {
    throw new TrainError(`--init-config '${spec}' must hold a JSON object (an HF config.json)`);
  }
  const c = { ...(config as HFConfig) };
  const given = c['vocab_size'];
  if (given == null) {
    c['vocab_size'] = vocabSize;
  } else if (typeof given !== 'number' || given < vocabSize) {
    throw new TrainError(`--init-config '${spec}' sets vocab_size ${JSON.stringify(given)} but the tokenizer built ` +
        `from the data has ${vocabSize} tokens; raise vocab_size or leave it out`);
  }
  return c;
}

/** What the loop trains on and evaluates with, from a text file or from datasets. */
interface RunData {
  /** a text's tokens, the predicted labels of datasets */
  trainTokens: number;
  /** the loop's input, positioned after `startBatch` micro-batches (resume) */
  source(startBatch: number): Int32Array | BatchSource;
  /** optimizer steps in `epochs` passes */
  epochSteps(epochs: number): number;
  evaluate: (() => number | Promise<number>) | null;
}

function textData(model: tfl.LayersModel, tokenizer: TextTokenizer, text: string, valText: string | undefined,
    options: TrainRunOptions, gradAccum: number): RunData {
  const tokens = tokenizer.encode(text);
  const valTokens = valText === undefined ? undefined : tokenizer.encode(valText);
  if (valTokens !== undefined && valTokens.length < 2) throw new TrainError(`the validation text '${options.val}' needs at least 2 tokens`);
  return {
    trainTokens: tokens.length,
    // the loop draws the windows itself (windowBatches), positioned by the resumed state
    source: () => tokens,
    epochSteps: epochs => Math.ceil(epochs * tokens.length / (options.batch * options.seq * gradAccum)),
    evaluate: valTokens === undefined ? null : () => evaluateLoss(model, valTokens, { seq: options.seq, batch: options.batch }),
  };
}

async function datasetData(
    model: tfl.LayersModel, tokenizer: TextTokenizer, options: TrainRunOptions, gradAccum: number): Promise<RunData> {
  const { train, val, dropped } = await loadDatasets(options.datasets!, tokenizer, {
    sequenceLen: options.seq, samplePacking: options.samplePacking, trainOnInputs: options.trainOnInputs,
    valSetSize: options.valSetSize, seed: options.seed,
  });
  if (dropped > 0) {
    options.note?.(`${dropped} sample${dropped > 1 ? 's' : ''} left out: nothing to predict within seq ${options.seq} ` +
        '(the answer was cut away, or empty)');
  }
  return {
    trainTokens: train.targetCount,
    source: startBatch => datasetBatches(train, { batch: options.batch, seed: options.seed, startBatch }),
    // packing makes an epoch's row count depend on its order: the first epoch's stands for all
    epochSteps: epochs => Math.ceil(epochs * epochBatchCount(train, { batch: options.batch, seed: options.seed, epoch: 0 }) / gradAccum),
    evaluate: val === null ? null : () => evaluateDatasetLoss(model, val, options.batch),
  };
}

// logical shapes: packed 16-bit experts count their [E, rows, cols] values, not their int32 words
const count = (vars: ReadonlyArray<tfl.LayerVariable | tf.Variable>) =>
  vars.reduce((s, v) => s + (v instanceof tf.Variable ? v.shape : variableShape(v)).reduce((p, d) => p * d, 1), 0);

/**
 * Runs one training as `tfjs-moe-lora train` does (the caller has set the backend).
 *
 * ```js
 * const plugin = validatePluginArgs({lora: {r: 8, alpha: 16, targets: ['experts.gate_up', 'experts.down', 'router']}});
 * const result = await runTraining({model: 'examples/models/tala-moe', data: 'my.txt', steps: 100, lr: 5e-3,
 *     batch: 8, seq: 64, seed: 1, out: 'my-adapter', plugin});
 * result.finalLoss;
 * ```
 */
export async function runTraining(options: TrainRunOptions): Promise<TrainRunResult> {
  const { plugin } = options;
  if ((options.data === undefined) === (options.datasets === undefined)) {
    throw new TrainError('give exactly one of data (a text file) and datasets (JSON Lines files)');
  }
  if (options.datasets === undefined) {
    const datasetOnly = (['samplePacking', 'trainOnInputs', 'valSetSize'] as const).filter(k => options[k] !== undefined);
    if (datasetOnly.length > 0) {
      throw new TrainError(`${datasetOnly.join(', ')}: for datasets (JSON Lines files), not for the text file of data`);
    }
  } else if (options.val !== undefined) {
    throw new TrainError('val (a held-out text file) goes with data; with datasets, split validation samples off with valSetSize');
  }
  if (options.steps === undefined && options.numEpochs === undefined) throw new TrainError('give steps (max_steps) or numEpochs');
  if ((options.initConfig === undefined) === (options.model === undefined)) {
    throw new TrainError('give exactly one of initConfig (from scratch) and model (a checkpoint folder)');
  }
  const lora = plugin.lora;
  if (options.initConfig !== undefined && lora !== null) {
    throw new TrainError('LoRA needs a trained model to adapt (model), not a from-scratch initConfig');
  }
  if (options.tokenizer !== undefined && options.initConfig === undefined) {
    throw new TrainError('tokenizer is for a from-scratch run (initConfig): a model folder brings its own tokenizer.json');
  }
  if (options.initConfig !== undefined && options.tokenizer === undefined && options.datasets !== undefined) {
    throw new TrainError('a from-scratch run on datasets needs a tokenizer folder (tokenizer): the character tokenizer ' +
        'is built from the text file of data');
  }
  const mode: TrainMode = options.initConfig !== undefined ? 'scratch' : lora !== null ? 'lora' : 'full';
  if (mode === 'full' && options.denseDtype === 'stored') {
    throw new TrainError("full fine-tuning trains the attention and embedding weights, which needs them in float32: denseDtype 'stored' " +
        "keeps them 16-bit and frozen; leave denseDtype at 'float32' or train LoRA");
  }
  if (mode === 'full' && options.expertDtype !== undefined && options.expertDtype !== 'float32') {
    throw new TrainError(`full fine-tuning trains the routed experts, which needs them in float32: expertDtype '${options.expertDtype}' ` +
        `keeps them ${options.expertDtype === 'stored' ? '16-bit and ' : 'quantized and '}frozen; use expertDtype 'float32' ` +
        '(the default without LoRA) or train LoRA adapters');
  }
  // before any work: a bad output path must not cost a training run
  checkOutputFolder(options.out, { name: '`runTraining()`: out', overwrite: options.overwrite === true, inputs: { model: options.model } });
  const text = options.data === undefined ? null : await readText(options.data, 'training data');
  const resumed = options.resume === undefined ? null : await loadTrainCheckpoint(options.resume);
  const valText = options.val === undefined ? undefined : await readText(options.val, 'validation');

  let model: tfl.LayersModel;
  let tokenizer: CharTokenizer | HFTokenizer;
  if (resumed !== null && mode !== 'lora') {
    // the checkpoint holds the trained weights and the tokenizer they were trained with
    tokenizer = await readTokenizer(options.resume!);
    model = await loadHFCheckpoint(options.resume!, { expertDtype: 'float32' });
  } else if (options.initConfig !== undefined) {
    tokenizer = options.tokenizer !== undefined ? await readTokenizer(options.tokenizer) : CharTokenizer.fromText(text!);
    const config = await initConfig(options.initConfig, tokenizer.vocabSize);
    // a loaded checkpoint is checked by its loader; a new model before it is built (the step: by trainLoop)
    const tooLarge = memoryProblem('the weights need', estimateLoadMemory(config), 'a smaller config');  // built in place: no load peak
    if (tooLarge !== null) throw new TrainError(`the model of '${options.initConfig}': ${tooLarge}`);
    model = buildMoECausalLM(config);
    const std = typeof config['initializer_range'] === 'number' ? config['initializer_range'] : 0.02;
    await seedModelInit(model, options.seed, std);
  } else {
    tokenizer = await readTokenizer(options.model!);
    // full fine-tuning widens 16-bit experts and dense weights to float32 masters; LoRA keeps them
    // packed by default (the same loss and LoRA gradients, half those weights' memory: Qwen3-30B-A3B's
    // attention, embedding and head are 3.1 GB less, what its 24 GB run needs)
    model = await loadHFCheckpoint(options.model!, {
      expertDtype: options.expertDtype ?? (mode === 'full' ? 'float32' : 'stored'),
      ...(options.int4GroupSize !== undefined ? { int4GroupSize: options.int4GroupSize } : {}),
      denseDtype: options.denseDtype ?? (mode === 'full' ? 'float32' : 'stored'),
    });
  }
  let handle: PluginHandle | null = null;
  try {
    const config = hfConfigOf(model)!;
    const storedDtype = config['dtype'] ?? config['torch_dtype'];
    if (mode === 'full' && options.expertDtype === undefined && (storedDtype === 'bfloat16' || storedDtype === 'float16')) {
      options.note?.(`full fine-tuning: the ${storedDtype} experts were widened to float32 to be trained ` +
          '(LoRA keeps them 16-bit and frozen, at half the memory)');
    }
    const modelVocab = config['vocab_size'] as number;
    if (tokenizer.vocabSize > modelVocab) {
      throw new TrainError(`'${join(options.model ?? '', TOKENIZER_FILE)}' has ${tokenizer.vocabSize} tokens but the ` +
          `model's vocab_size is ${modelVocab}`);
    }
    // resuming LoRA: the checkpoint's adapter first; register() keeps an adapter of its name
    if (resumed !== null && lora !== null) await loadPeftAdapter(model, options.resume!, { name: lora.adapterName });
    handle = register({ ...plugin, models: [model] });
    if (lora !== null && resumed === null) seedAdapterInit(model, lora.adapterName, options.seed);
    // a real tokenizer has byte fallback or an unknown token of its own: only the character one can miss characters
    if (tokenizer instanceof CharTokenizer && text !== null) {
      const chars = tokenizer;
      for (const [label, t] of [['training data', text], ['validation text', valText ?? '']] as const) {
        const unknown = chars.unknownChars(t);
        if (unknown.length > 0) {
          options.note?.(`${label}: ${unknown.length} character${unknown.length > 1 ? 's' : ''} not in the tokenizer ` +
              `became <unk>: ${unknown.slice(0, 8).map(describeChar).join(', ')}${unknown.length > 8 ? ', ...' : ''}`);
        }
      }
    }
    const gradAccum = options.gradAccum ?? 1;
    const data = text !== null ?
      textData(model, tokenizer, text, valText, options, gradAccum) :
      await datasetData(model, tokenizer, options, gradAccum);
    const steps = options.steps ?? data.epochSteps(options.numEpochs!);
    if (options.evalEvery !== undefined && data.evaluate === null) {
      throw new TrainError('evalEvery needs validation data: val (with data) or valSetSize (with datasets)');
    }
    const evaluate = async () => data.evaluate === null ? null : data.evaluate();
    // what decides the loss curve: a resumed run must match the checkpoint's run on all of it
    const curve = {
      mode, steps, lr: options.lr, batch: options.batch, seq: options.seq, seed: options.seed,
      lrScheduler: options.lrScheduler ?? 'constant',
      warmupSteps: options.warmupSteps ?? Math.ceil(steps * (options.warmupRatio ?? 0)),
      gradAccum, maxGradNorm: options.maxGradNorm ?? null, trainTokens: data.trainTokens,
      // datasets: what makes their rows (a text's windows depend on the above only)
      ...(options.datasets === undefined ? {} : {
        samplePacking: options.samplePacking === true, trainOnInputs: options.trainOnInputs === true, valSetSize: options.valSetSize ?? 0,
      }),
    };
    if (resumed !== null) {
      const differ = Object.entries(curve).filter(([k, v]) => JSON.stringify(resumed.options[k]) !== JSON.stringify(v));
      if (differ.length > 0) {
        throw new TrainError(`the run differs from the checkpoint '${options.resume}' it resumes, which would not continue ` +
            `its loss curve: ${differ.map(([k, v]) => `${k} ${JSON.stringify(v)} (checkpoint: ${JSON.stringify(resumed.options[k])})`).join(', ')}`);
      }
    }
    const saveModel = async (dir: string): Promise<string[]> => {
      if (lora !== null) {
        await savePeftAdapter(model, dir, { name: lora.adapterName });
        return [ADAPTER_CONFIG, ADAPTER_WEIGHTS];
      }
      // the tokenizer is part of the checkpoint artifact: one atomic save, never new weights with an old tokenizer
      const extraFiles = tokenizerFiles(tokenizer);
      await saveHFCheckpoint(model, dir, { extraFiles });
      return ['config.json', 'model.safetensors', ...Object.keys(extraFiles)];
    };

    const valLossBefore = await evaluate();
    options.onStart?.({
      mode, modelType: String(config['model_type']), params: count(model.weights),
      trainableParams: count(trainableVariables(model)), trainTokens: data.trainTokens,
    });
    const progress = createProgress(steps, resumed?.state.step ?? 0, options.progress);
    const metrics = options.metrics === undefined ? null : openMetricsLog(options.metrics, resumed !== null);
    let result;
    try {
      result = await trainLoop(model, data.source(resumed?.state.microBatches ?? 0), {
        steps, lr: options.lr, batch: options.batch, seq: options.seq, seed: options.seed,
        lrScheduler: curve.lrScheduler, warmupSteps: curve.warmupSteps, gradAccum, maxGradNorm: curve.maxGradNorm,
        // not part of `curve`: the loss and the gradients are the same with it, so a resumed run may change it
        gradientCheckpointing: options.gradientCheckpointing,
        resume: resumed?.state,
        evalEvery: options.evalEvery, evaluate: async () => (await evaluate())!, onEval: r => metrics?.eval(r),
        saveEvery: options.saveEvery,
        onSave: (state: TrainState) => saveTrainCheckpoint(options.out, state, curve, async dir => { await saveModel(dir); },
            options.saveTotalLimit).then(() => undefined),
        onStep: r => { progress.update(r); metrics?.step(r); },
        shouldStop: options.shouldStop,
        onWarning: w => { metrics?.warning(w); options.onWarning?.(w); },
        stopOnNoGradient: options.stopOnNoGradient,
      });
    } finally {
      progress.stop();
      metrics?.close();
    }
    const valLossAfter = result.losses.length > 0 ? await evaluate() : valLossBefore;
    const files = await saveModel(options.out);
    const last = result.losses.slice(-10);
    return {
      mode,
      modelType: String(config['model_type']),
      backend: tf.getBackend(),
      vocabSize: tokenizer.vocabSize,
      params: count(model.weights),
      trainableParams: count(trainableVariables(model)),
      trainTokens: data.trainTokens,
      steps: result.step,
      stopped: result.stopped,
      stoppedNoGradient: result.stoppedNoGradient,
      warnings: result.warnings,
      firstLoss: result.losses[0] ?? null,
      finalLoss: last.length > 0 ? last.reduce((s, l) => s + l, 0) / last.length : null,
      valLossBefore,
      valLossAfter,
      seconds: result.seconds,
      tokensPerSecond: result.tokensPerSecond,
      out: options.out,
      files,
      losses: result.losses,
    };
  } finally {
    handle?.unregister();
    model.dispose();
  }
}
