/**
 * The browser example: fetch an MoE checkpoint in Hugging Face layout and its tokenizer.json
 * (run by the package's HFTokenizer, i.e. Hugging Face's own tokenizers in JS), register the
 * plugin with LoRA on the experts and the router, train the adapters on wasm (webgpu when the
 * browser offers an adapter), drawing the loss as it goes, and offer the trained adapter as PEFT's
 * two files (adapter_config.json, adapter_model.safetensors) to download.
 *
 * Page parameters (all optional), e.g. index.html?steps=40&lr=0.02:
 *   model    checkpoint folder URL (config.json, model.safetensors, tokenizer.json)  default 'model/'
 *   text     URL of a target text to train on (needs the checkpoint's tokenizer.json); default:
 *            with a tokenizer.json, the example's target text generated here (src/data/),
 *            without one, random token ids, which the adapters learn to predict
 *   steps    training steps (60)        lr     Adam learning rate (0.01)
 *   rank     LoRA rank r (8)            alpha  LoRA alpha (16)
 *   batch    sequences per step (4)     seq    tokens per sequence (32, at most the model's context)
 *   backend  auto | wasm | webgpu | cpu (auto: webgpu when an adapter is offered, else wasm)
 *   expertDtype  how the routed experts are held: stored (default) | float32 | int8 | int4 | nf4 |
 *            mxfp4 (quantized as each expert is read: a 1B-parameter MoE fits wasm's 4 GiB with int4)
 *   seed     seed of the random ids and of the text windows (1)
 *
 * Progress is in `window.__moeLoRA`; `window.__moeLoRAPage` tokenizes with any tokenizer folder
 * and reads the trained adapter (spec/browser/finetune.spec.ts uses both).
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';  // the gradients of the layers' ops
import '@tensorflow/tfjs-backend-cpu';
import { setWasmPaths } from '@tensorflow/tfjs-backend-wasm';
import '@tensorflow/tfjs-backend-webgpu';
import type * as tfl from '@tensorflow/tfjs-layers';
import {
  ADAPTER_CONFIG, ADAPTER_WEIGHTS, estimateLoadMemory, EXAMPLE_CORPORA, encodePeftAdapter, EXPERT_DTYPES, fetchHFCheckpoint,
  generateCorpus, hfConfigOf, HFTokenizer, peftAdapterTensors, register, tokenCrossEntropy, TOKENIZER_CONFIG_FILE, trainableVariables,
  type ExpertDtype, type HFConfig, type PluginHandle,
} from 'tfjs-moe-lora/browser';
import { LossChart } from './chart.js';

/** What the page reports to a test harness (and to anyone in the console). */
export interface PageProgress {
  status: 'loading' | 'training' | 'done' | 'error';
  backend: string | null;
  model: string;
  data: string | null;
  step: number;
  steps: number;
  losses: number[];
  /** mean loss on held-out windows of the target text before and after training (null on random ids) */
  valLoss: { base: number; adapted: number | null } | null;
  msPerStep: number | null;
  /** the page parameter expertDtype: how the routed experts are held */
  expertDtype: ExpertDtype;
  /** the checkpoint's parameters (every weight's elements, whatever the dtype the experts are held in) */
  parameters: number | null;
  /** estimateLoadMemory of config.json for this expertDtype, before loading (null for 'stored': it depends on the files' dtype) */
  estimatedWeightBytes: number | null;
  /** wall time of fetchHFCheckpoint (fetching, decoding, quantizing the experts) */
  loadMs: number | null;
  /** wall time of each training step (forward, backward, Adam, reading the loss) */
  stepMs: number[];
  memory: PageMemory;
  /** the tokenizer.json's model type and size, or null when the checkpoint has none */
  tokenizer: string | null;
  /** the adapter files offered for download once trained: name and size in bytes */
  adapterFiles: Array<{ name: string; bytes: number }>;
  done: boolean;
  error: string | null;
}

/** Memory the page used, sampled after the load and after every step. */
export interface PageMemory {
  /** tf.memory().numBytes right after the load: the model's weights as held */
  weightBytes: number | null;
  /** the largest tf.memory().numBytes seen (after the load, and after each step's gradients, before they are freed) */
  peakTensorBytes: number;
  /**
   * wasm: the module's heap size (it only grows, so this is its peak over the page's life; the
   * tensors live in it); null on other backends
   */
  wasmHeapBytes: number | null;
  /** Chrome's performance.memory.usedJSHeapSize at its largest sample (JS objects, not the wasm heap); null elsewhere */
  peakJSHeapBytes: number | null;
}

/** A LoRA factor of the trained adapter, under its PEFT name. */
export interface TrainedTensor {
  name: string;
  shape: number[];
  values: number[];
}

/** What the page offers a test harness besides the progress. */
export interface PageHelpers {
  /** the ids of each text (no special tokens) by the tokenizer of `folderURL`, read as the page reads the model's */
  tokenize(folderURL: string, texts: string[]): Promise<number[][]>;
  /**
   * the trained adapter's factors as they are in memory, [] before training ends; with `stride`,
   * every stride-th value only (a 1B model's factors are millions of numbers)
   */
  trainedAdapter(stride?: number): TrainedTensor[];
}

declare global {
  interface Window { __moeLoRA: PageProgress; __moeLoRAPage: PageHelpers }
}

const params = new URLSearchParams(location.search);

function numberParam(name: string, fallback: number, check: (v: number) => boolean, rule: string): number {
  const raw = params.get(name);
  if (raw === null || raw === '') return fallback;
  const v = Number(raw);
  if (!Number.isFinite(v) || !check(v)) throw new Error(`page parameter '${name}' must be ${rule} but is '${raw}'`);
  return v;
}

const positiveInt = (v: number) => Number.isInteger(v) && v >= 1;

const progress: PageProgress = {
  status: 'loading', backend: null, model: params.get('model') ?? 'model/', data: null,
  step: 0, steps: 0, losses: [], valLoss: null, msPerStep: null, expertDtype: 'stored', parameters: null,
  estimatedWeightBytes: null, loadMs: null, stepMs: [],
  memory: { weightBytes: null, peakTensorBytes: 0, wasmHeapBytes: null, peakJSHeapBytes: null },
  tokenizer: null, adapterFiles: [], done: false, error: null,
};
window.__moeLoRA = progress;
let trainedAdapter: (stride: number) => TrainedTensor[] = () => [];
window.__moeLoRAPage = {
  tokenize: async (folderURL, texts) => {
    const tokenizer = await fetchTokenizer(folderURL);
    if (tokenizer === null) throw new Error(`no tokenizer.json in '${folderURL}'`);
    return texts.map(text => Array.from(tokenizer.encode(text, { addSpecialTokens: false })));
  },
  trainedAdapter: (stride = 1) => trainedAdapter(stride),
};

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

function show(text: string): void {
  $('status').textContent = text;
}

/** A small seeded generator (mulberry32), so a page parameter set always trains on the same batches. */
function seeded(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    let t = (state = (state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

async function pickBackend(wanted: string): Promise<string> {
  let name = wanted;
  if (name === 'auto') {
    const gpu = (navigator as Navigator & { gpu?: { requestAdapter(): Promise<unknown> } }).gpu;
    const adapter = gpu === undefined ? null : await gpu.requestAdapter().catch(() => null);
    name = adapter != null ? 'webgpu' : 'wasm';
  }
  // the .wasm files lie next to the bundle (the build copies them)
  setWasmPaths(new URL('./', import.meta.url).href);
  if (!(await tf.setBackend(name))) throw new Error(`the '${name}' backend could not be started in this browser`);
  await tf.ready();
  return tf.getBackend();
}

/** Samples the memory figures of `progress.memory` now (see PageMemory). */
function sampleMemory(): void {
  const memory = progress.memory;
  memory.peakTensorBytes = Math.max(memory.peakTensorBytes, tf.memory().numBytes);
  if (tf.getBackend() === 'wasm') {
    // the emscripten module's heap view; its buffer is the whole (grown) heap
    const heap = (tf.backend() as unknown as { wasm?: { HEAPU8?: Uint8Array } }).wasm?.HEAPU8;
    if (heap !== undefined) memory.wasmHeapBytes = heap.buffer.byteLength;
  }
  const js = (performance as Performance & { memory?: { usedJSHeapSize: number } }).memory;
  if (js !== undefined) memory.peakJSHeapBytes = Math.max(memory.peakJSHeapBytes ?? 0, js.usedJSHeapSize);
}

const MB = (bytes: number) => `${(bytes / 1e6).toFixed(0)} MB`;

/** The text of `name` in the folder, or null when the server has no such file (404). */
async function fetchOptionalText(folderURL: string, name: string): Promise<string | null> {
  const url = (folderURL.endsWith('/') ? folderURL : `${folderURL}/`) + name;
  const response = await fetch(url);
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(`cannot fetch '${url}': HTTP ${response.status}`);
  return response.text();
}

/**
 * The folder's Hugging Face tokenizer (tokenizer.json, with tokenizer_config.json's special tokens
 * when there is one), or null when the folder has no tokenizer.json.
 */
async function fetchTokenizer(folderURL: string): Promise<HFTokenizer | null> {
  const [tokenizer, config] = await Promise.all([
    fetchOptionalText(folderURL, 'tokenizer.json'), fetchOptionalText(folderURL, TOKENIZER_CONFIG_FILE),
  ]);
  if (tokenizer === null) return null;
  return HFTokenizer.fromFiles({ tokenizer, config: config ?? undefined }, { source: folderURL });
}

/** Links that download the adapter as PEFT's two files (a click each: browsers block a second automatic download). */
async function offerAdapter(model: tfl.LayersModel): Promise<void> {
  const { config, weights } = await encodePeftAdapter(model);
  const list = $('adapter');
  list.textContent = '';
  for (const [name, data] of [[ADAPTER_CONFIG, config], [ADAPTER_WEIGHTS, weights]] as const) {
    const blob = new Blob([data as BlobPart], { type: typeof data === 'string' ? 'application/json' : 'application/octet-stream' });
    const link = document.createElement('a');
    link.id = `download-${name.replace(/\..*$/, '').replace(/_/g, '-')}`;
    link.download = name;
    link.href = URL.createObjectURL(blob);
    link.textContent = `${name} (${blob.size} bytes)`;
    list.append(link, ' ');
    progress.adapterFiles.push({ name, bytes: blob.size });
  }
  list.append('— put both in one folder: PeftModel.from_pretrained(model, folder) loads it');
}

interface Data {
  describe: string;
  /** the ids [batch, seq] of the next step */
  next(): tf.Tensor2D;
  /** fixed held-out windows [n, seq] of the target text, or null (random ids) */
  validation: tf.Tensor2D | null;
}

/** `count` windows of `seq` tokens at random starts (drawn with `random`). */
function windows(tokens: readonly number[], count: number, seq: number, random: () => number): tf.Tensor2D {
  const ids: number[] = [];
  for (let b = 0; b < count; b++) {
    const start = Math.floor(random() * (tokens.length - seq + 1));
    ids.push(...tokens.slice(start, start + seq));
  }
  return tf.tensor2d(ids, [count, seq], 'int32');
}

/** The training data: the text of `text` or the example's target text, else fixed random ids. */
async function makeData(vocab: number, batch: number, seq: number, seed: number, tokenizer: HFTokenizer | null): Promise<Data> {
  const random = seeded(seed);
  const textURL = params.get('text');
  if (textURL === null && tokenizer === null) {
    const ids = Array.from({ length: batch * seq }, () => Math.floor(random() * vocab));
    return { next: () => tf.tensor2d(ids, [batch, seq], 'int32'), describe: `random token ids [${batch}, ${seq}]`, validation: null };
  }
  if (tokenizer === null) throw new Error(`page parameter 'text' needs the checkpoint's tokenizer.json, which is missing`);
  let train: string;
  let val: string;
  let describe: string;
  if (textURL !== null) {
    const response = await fetch(textURL);
    if (!response.ok) throw new Error(`cannot fetch the text '${textURL}': HTTP ${response.status}`);
    const text = await response.text();
    // the last tenth is held out for the validation loss
    const cut = Math.floor(text.length * 0.9);
    [train, val] = [text.slice(0, cut), text.slice(cut)];
    describe = `'${textURL}'`;
  } else {
    ({ train, val } = generateCorpus('target', EXAMPLE_CORPORA.target));
    describe = "the example's target text (generated by src/data/synthetic.ts)";
  }
  // windows of running text: no BOS/EOS inside them
  const trainTokens = Array.from(tokenizer.encode(train, { addSpecialTokens: false }));
  const valTokens = Array.from(tokenizer.encode(val, { addSpecialTokens: false }));
  for (const [name, tokens] of [['training', trainTokens], ['validation', valTokens]] as const) {
    if (tokens.length < seq) throw new Error(`the ${name} text has ${tokens.length} tokens, fewer than seq = ${seq}`);
  }
  return {
    next: () => windows(trainTokens, batch, seq, random),
    describe: `${describe}: ${trainTokens.length} training + ${valTokens.length} held-out tokens, batch [${batch}, ${seq}]`,
    validation: windows(valTokens, 4 * batch, seq, seeded(seed + 1)),
  };
}

async function validationLoss(model: tfl.LayersModel, ids: tf.Tensor2D, vocab: number): Promise<number> {
  const loss = tf.tidy(() => nextTokenLoss(model, ids, vocab, false));
  const value = (await loss.data())[0];
  loss.dispose();
  return value;
}

/**
 * Mean cross-entropy of predicting ids[:, t+1] from logits[:, t]: tokenCrossEntropy, one op with its
 * own gradient (a loss composed of logSoftmax, a one-hot product and sums holds a dozen
 * logits-sized tensors in a step and builds arrays of ones that size on the host).
 */
function nextTokenLoss(model: tfl.LayersModel, ids: tf.Tensor2D, vocab: number, training = true): tf.Scalar {
  return tf.tidy(() => {
    const [b, s] = ids.shape;
    const logits = model.apply(ids, { training }) as tf.Tensor3D;                  // [B, S, V]
    const predict = tf.reshape(tf.slice(logits, [0, 0, 0], [b, s - 1, vocab]), [b * (s - 1), vocab]) as tf.Tensor2D;
    const targets = tf.reshape(tf.slice(ids, [0, 1], [b, s - 1]), [b * (s - 1)]) as tf.Tensor1D;
    return tokenCrossEntropy(predict, targets, b * (s - 1));
  });
}

/** The memory and timing line of the page. */
function showMemory(): void {
  const { weightBytes, peakTensorBytes, wasmHeapBytes, peakJSHeapBytes } = progress.memory;
  const steps = progress.stepMs.map(ms => (ms / 1000).toFixed(1)).join(', ');
  $('memory').textContent = `weights ${weightBytes === null ? '?' : MB(weightBytes)}, tensors at most ${MB(peakTensorBytes)}` +
      (wasmHeapBytes === null ? '' : `, wasm heap ${MB(wasmHeapBytes)}`) +
      (peakJSHeapBytes === null ? '' : `, JS heap at most ${MB(peakJSHeapBytes)}`);
  $('timing').textContent = `load ${progress.loadMs === null ? '?' : `${(progress.loadMs / 1000).toFixed(1)} s`}` +
      (steps === '' ? '' : `; steps (s): ${steps}`);
}

async function main(): Promise<void> {
  const steps = numberParam('steps', 60, positiveInt, 'an integer >= 1');
  const lr = numberParam('lr', 0.01, v => v > 0, 'a number > 0');
  const rank = numberParam('rank', 8, positiveInt, 'an integer >= 1');
  const alpha = numberParam('alpha', 16, v => v > 0, 'a number > 0');
  const batch = numberParam('batch', 4, positiveInt, 'an integer >= 1');
  const seqWanted = numberParam('seq', 32, v => Number.isInteger(v) && v >= 2, 'an integer >= 2');
  const seed = numberParam('seed', 1, Number.isInteger, 'an integer');
  const expertDtype = params.get('expertDtype') ?? 'stored';
  if (!(EXPERT_DTYPES as readonly string[]).includes(expertDtype)) {
    throw new Error(`page parameter 'expertDtype' must be one of ${EXPERT_DTYPES.join(', ')} but is '${expertDtype}'`);
  }
  progress.expertDtype = expertDtype as ExpertDtype;
  progress.steps = steps;
  const chart = new LossChart($<HTMLCanvasElement>('chart'), { steps, title: 'LoRA training loss (next-token cross-entropy)' });

  show('starting the backend ...');
  progress.backend = await pickBackend(params.get('backend') ?? 'auto');
  $('backend').textContent = progress.backend;

  // know before loading: the parameters and (for a chosen expert format) the bytes the weights will take
  const configURL = `${progress.model.endsWith('/') ? progress.model : `${progress.model}/`}config.json`;
  const configResponse = await fetch(configURL);
  if (!configResponse.ok) throw new Error(`cannot fetch '${configURL}': HTTP ${configResponse.status}`);
  const config = await configResponse.json() as HFConfig;
  progress.parameters = estimateLoadMemory(config, { expertStorage: 'float32' }).bytes / 4;
  if (progress.expertDtype !== 'stored') {
    progress.estimatedWeightBytes = estimateLoadMemory(config, { expertStorage: progress.expertDtype }).bytes;
  }
  const expected = progress.estimatedWeightBytes === null ? '' : `, ${progress.expertDtype} experts: ${MB(progress.estimatedWeightBytes)} estimated`;
  $('model').textContent = `${progress.model}: ${progress.parameters.toLocaleString('en')} parameters${expected}`;

  show(`fetching the checkpoint '${progress.model}' (experts as ${progress.expertDtype}) ...`);
  let fetched = 0;
  const loadStarted = performance.now();
  const model = await fetchHFCheckpoint(progress.model, {
    expertKernel: 'fused', expertDtype: progress.expertDtype,
    onFile: (_, bytes) => { fetched += bytes; },
  });
  progress.loadMs = performance.now() - loadStarted;
  progress.memory.weightBytes = tf.memory().numBytes;
  sampleMemory();
  const tokenizer = await fetchTokenizer(progress.model);
  const vocab = model.outputs[0].shape[2] as number;
  if (tokenizer !== null && tokenizer.vocabSize > vocab) {
    throw new Error(`tokenizer.json has ${tokenizer.vocabSize} tokens but the model's vocabulary only ${vocab}`);
  }
  progress.tokenizer = tokenizer === null ? null :
    `${JSON.parse(tokenizer.files.tokenizer).model.type} tokenizer.json, ${tokenizer.vocabSize} tokens`;
  $('tokenizer').textContent = progress.tokenizer ?? 'none (the checkpoint has no tokenizer.json: random ids)';
  const context = Number(hfConfigOf(model)?.['max_position_embeddings'] ?? seqWanted);
  const seq = Math.min(seqWanted, context);
  $('model').textContent = `${progress.model} (${(fetched / 1e6).toFixed(2)} MB, ${progress.parameters.toLocaleString('en')} ` +
      `parameters, vocab ${vocab}, experts as ${progress.expertDtype}): loaded in ${(progress.loadMs / 1000).toFixed(1)} s, ` +
      `weights ${MB(progress.memory.weightBytes)}${expected === '' ? '' : ` (${MB(progress.estimatedWeightBytes!)} estimated)`}`;
  showMemory();

  // the plugin: fused MoE kernels, LoRA adapters on every MoE layer, everything else frozen
  const handle: PluginHandle = register({
    models: [model],
    lora: { r: rank, alpha, targets: ['experts.gate_up', 'experts.down', 'router'] },
  });
  const vars = trainableVariables(model);
  const loraParams = vars.reduce((n, v) => n + v.size, 0);
  $('plugin').textContent = `${handle.patched.length} MoE layers patched (${handle.expertKernel} kernel), ` +
      `LoRA r=${rank} alpha=${alpha} on experts + router: ${vars.length} tensors, ${loraParams} trainable parameters`;

  const data = await makeData(vocab, batch, seq, seed, tokenizer);
  progress.data = data.describe;
  $('data').textContent = data.describe;
  if (data.validation !== null) {
    progress.valLoss = { base: await validationLoss(model, data.validation, vocab), adapted: null };
  }

  progress.status = 'training';
  const optimizer = tf.train.adam(lr);
  const started = performance.now();
  for (let step = 1; step <= steps; step++) {
    const stepStarted = performance.now();
    const ids = data.next();
    const { value, grads } = tf.variableGrads(() => nextTokenLoss(model, ids, vocab), vars);
    sampleMemory();  // the gradients are still held here
    optimizer.applyGradients(Object.entries(grads).map(([name, tensor]) => ({ name, tensor })));
    const loss = (await value.data())[0];
    progress.stepMs.push(performance.now() - stepStarted);
    tf.dispose([ids, value, ...Object.values(grads)]);
    if (!Number.isFinite(loss)) throw new Error(`step ${step}: the loss is ${loss}`);

    progress.losses.push(loss);
    progress.step = step;
    progress.msPerStep = (performance.now() - started) / step;
    sampleMemory();
    showMemory();
    chart.update(progress.losses);
    show(`step ${step}/${steps}  loss ${loss.toFixed(4)}  ${progress.msPerStep.toFixed(0)} ms/step  ` +
        `${Math.round((batch * seq) / (progress.msPerStep / 1000))} tokens/s`);
    await tf.nextFrame();  // let the page paint the chart between steps
  }
  optimizer.dispose();
  const first = progress.losses[0];
  const last = progress.losses[progress.losses.length - 1];
  let validation = '';
  if (data.validation !== null && progress.valLoss !== null) {
    progress.valLoss.adapted = await validationLoss(model, data.validation, vocab);
    data.validation.dispose();
    validation = `; held-out loss base ${progress.valLoss.base.toFixed(4)} → adapted ${progress.valLoss.adapted.toFixed(4)}`;
  }
  await offerAdapter(model);
  trainedAdapter = stride => peftAdapterTensors(model).map(t => ({
    name: t.peftName, shape: t.variable.shape as number[],
    values: Array.from(t.variable.read().dataSync()).filter((_, i) => i % stride === 0),
  }));
  show(`done: ${steps} steps, loss ${first.toFixed(4)} → ${last.toFixed(4)}, ` +
      `${progress.msPerStep!.toFixed(0)} ms/step on ${progress.backend}${validation}`);
  progress.status = 'done';
  progress.done = true;
}

main().catch((e: unknown) => {
  const message = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  progress.status = 'error';
  progress.error = message;
  show(`error: ${message}`);
  $('status').classList.add('error');
  throw e;  // also to the console (and to a test's pageerror listener)
});
