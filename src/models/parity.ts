/**
 * Block parity against a Hugging Face fixture: loads the MoE block named in golden.json from the
 * checkpoint, runs it forward and backward with this package's ops, and measures every output,
 * input gradient and parameter gradient against the ones transformers computed.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor, Tensor2D } from '@tensorflow/tfjs-core';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { selectBackend } from '../cli/backend.js';
import { blockLayerIndex, loadMoEBlockWeights } from '../io/hf_block.js';
import { readSafetensorsFile, type SafetensorsFile } from '../io/safetensors.js';
import { readTextFile } from '../util/files.js';
import { moeBlock } from '../ops/moe_block.js';
import { routerLogits } from '../ops/lora/router_logits.js';
import { referenceRoute } from '../ops/reference/routing.js';
import type { ExpertKernel, MoEBlockConfig, MoEBlockWeights, Routing } from '../ops/types.js';
import { maxRelativeError } from '../util/numeric.js';
import { familyOf, moeBlockConfigFromHF, type HFConfig, type ModelType } from './families.js';
import {
  disposeMoEBlockWeights, trainableWeightFields, withWeightFields, type WeightField,
} from './weight_fields.js';
import { MoELoraError } from '../errors.js';

/** A fixture that is incomplete or inconsistent: the user's input, not a bug of this package. */
export class FixtureError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'FixtureError';
    Object.setPrototypeOf(this, FixtureError.prototype);
  }
}

export const DEFAULT_PARITY_TOLERANCE = 1e-4;

export interface BlockParityOptions {
  /** set this backend first (default: the active one) */
  backend?: string;
  /** the block kernel under test (default 'fused') */
  expertKernel?: ExpertKernel;
  /** the largest max relative error that passes (default 1e-4) */
  tolerance?: number;
}

export interface ParityComparison {
  /**
   * the golden tensor's name without 'block.': 'out', 'dx', 'grad.<param>', and where the fixture
   * has them 'router.logits' [T, E], 'router.weights' [T, K], 'router_logits' (gpt-oss: [T, K])
   */
  name: string;
  maxRelError: number;
  pass: boolean;
}

export interface RoutingMismatch {
  token: number;
  /** sorted expert ids */
  expected: number[];
  actual: number[];
}

export interface BlockParityResult {
  fixture: string;
  family: ModelType;
  block: string;
  layer: number;
  backend: string;
  expertKernel: string;
  tokens: number;
  tolerance: number;
  comparisons: ParityComparison[];
  /** what the chosen experts were compared with */
  routingReference: 'golden router indices' | 'golden router logits' | 'reference expert kernel';
  routingIdentical: boolean;
  routingMismatches: RoutingMismatch[];
  /** every comparison within tolerance and identical routing */
  pass: boolean;
}

const REQUIRED_FILES = ['config.json', 'model.safetensors', 'golden.json', 'golden.safetensors'];
const REQUIRED_GOLDEN = ['block.x', 'block.out', 'block.g', 'block.dx'];
const GRAD_PREFIX = 'block.grad.';

async function readJson(path: string): Promise<Record<string, unknown>> {
  const text = await readTextFile(path, 'fixture file');  // a FIFO or a folder is refused, not read
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new FixtureError(`${path} is not valid JSON: ${(e as Error).message}`);
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new FixtureError(`${path} must hold a JSON object`);
  }
  return value as Record<string, unknown>;
}

/** The parameter each golden gradient belongs to; every golden and every parameter paired once. */
function pairGradients(
    fixture: string, family: ModelType, parameters: Readonly<Record<string, WeightField>>,
    golden: SafetensorsFile, trainable: Array<[WeightField, Tensor]>): Array<[string, number]> {
  const names = golden.names().filter(n => n.startsWith(GRAD_PREFIX));
  const fields = trainable.map(([f]) => f);
  const problems: string[] = [];
  const pairs: Array<[string, number]> = [];
  const claimed = new Set<number>();
  for (const name of names) {
    const param = name.slice(GRAD_PREFIX.length);
    const field = parameters[param];
    const index = field === undefined ? -1 : fields.indexOf(field);
    if (field === undefined) {
      problems.push(`'${name}' is no parameter of a ${family} block (known: ${Object.keys(parameters).join(', ')})`);
    } else if (index < 0) {
      problems.push(`'${name}' belongs to '${field}', which the loaded block does not have`);
    } else {
      const expected = golden.info(name).shape;
      const actual = trainable[index][1].shape;
      if (expected.join() !== actual.join()) {
        problems.push(`'${name}' has shape [${expected}] but its parameter '${field}' has [${actual}]`);
      }
      pairs.push([name, index]);
      claimed.add(index);
    }
  }
  trainable.forEach(([field], i) => {
    if (!claimed.has(i)) problems.push(`the block parameter '${field}' has no golden gradient`);
  });
  if (problems.length > 0) {
    throw new FixtureError(`${fixture}: the golden gradients do not match the block's parameters:\n  ` +
        problems.join('\n  '));
  }
  return pairs;
}

/** Per token, the chosen experts as a sorted list (read asynchronously: webgpu too). */
async function expertSets(experts: Tensor2D): Promise<number[][]> {
  const [t, k] = experts.shape;
  const ids = await experts.data();
  return Array.from({ length: t }, (_, i) => Array.from(ids.subarray(i * k, (i + 1) * k)).sort((a, b) => a - b));
}

function compareRouting(expected: number[][], actual: number[][]): RoutingMismatch[] {
  const out: RoutingMismatch[] = [];
  expected.forEach((e, token) => {
    if (e.join() !== actual[token].join()) out.push({ token, expected: e, actual: actual[token] });
  });
  return out;
}

/** Each row sorted in descending order: top-k weights compared without caring how K is ordered. */
async function rowsDescending(t: Tensor2D): Promise<Float32Array> {
  const [rows, cols] = t.shape;
  const data = Float32Array.from(await t.data());
  for (let r = 0; r < rows; r++) data.subarray(r * cols, (r + 1) * cols).sort().reverse();
  return data;
}

/** [T, K] weights at their experts' columns of a [T, E] zero matrix. */
async function scatterByExpert(weights: Tensor2D, experts: Tensor2D, numExperts: number): Promise<Float32Array> {
  const [t, k] = weights.shape;
  const w = await weights.data();
  const e = await experts.data();
  const out = new Float32Array(t * numExperts);
  for (let i = 0; i < t * k; i++) out[Math.floor(i / k) * numExperts + e[i]] += w[i];
  return out;
}

interface Loaded {
  fixture: string;
  config: HFConfig;
  family: ModelType;
  blockName: string;
  layer: number;
  blockConfig: MoEBlockConfig;
  golden: SafetensorsFile;
  weights: MoEBlockWeights;
}

async function loadFixture(fixture: string): Promise<Loaded> {
  if (!existsSync(fixture) || !statSync(fixture).isDirectory()) {
    throw new FixtureError(`fixture directory '${fixture}' does not exist`);
  }
  const missing = REQUIRED_FILES.filter(f => !existsSync(join(fixture, f)));
  if (missing.length > 0) {
    throw new FixtureError(`fixture '${fixture}' lacks ${missing.join(', ')}` +
        (missing.length === REQUIRED_FILES.length ? ' (is it a fixture directory?)' : ''));
  }
  const config = await readJson(join(fixture, 'config.json')) as HFConfig;
  const meta = await readJson(join(fixture, 'golden.json'));
  const family = familyOf(config).modelType;
  const blockConfig = moeBlockConfigFromHF(config);
  if (typeof meta['block'] !== 'string') {
    throw new FixtureError(`${join(fixture, 'golden.json')} must name the block, e.g. "block": "model.layers.1.mlp"`);
  }
  const blockName = meta['block'];
  const layer = blockLayerIndex(blockName);
  const golden = await readSafetensorsFile(join(fixture, 'golden.safetensors'));
  const goldenPath = join(fixture, 'golden.safetensors');
  const absent = REQUIRED_GOLDEN.filter(n => !golden.has(n));
  if (absent.length > 0) throw new FixtureError(`${goldenPath} lacks ${absent.join(', ')}`);
  const xShape = golden.info('block.x').shape;
  const hidden = config['hidden_size'];
  if (xShape.length < 2 || xShape[xShape.length - 1] !== hidden) {
    throw new FixtureError(`${goldenPath}: 'block.x' must have shape [..., H = hidden_size = ${hidden}] ` +
        `but has [${xShape}]`);
  }
  for (const name of REQUIRED_GOLDEN.slice(1)) {
    const shape = golden.info(name).shape;
    if (shape.join() !== xShape.join()) {
      throw new FixtureError(`${goldenPath}: '${name}' must have the shape of 'block.x' [${xShape}] but has [${shape}]`);
    }
  }
  const model = await readSafetensorsFile(join(fixture, 'model.safetensors'));
  const weights = await loadMoEBlockWeights(model, config, layer);
  return { fixture, config, family, blockName, layer, blockConfig, golden, weights };
}

/**
 * Runs the block of a fixture directory (config.json, model.safetensors, golden.json,
 * golden.safetensors) and compares it with the golden tensors: out, dx, every `block.grad.*`,
 * `block.router_logits` when present, and the chosen experts per token.
 *
 * ```js
 * const r = await runBlockParity('spec/fixtures/hf/mixtral', {backend: 'wasm'});
 * r.pass;  // true
 * r.comparisons;  // [{name: 'out', maxRelError: 2.1e-7, pass: true}, ...]
 * ```
 */
export async function runBlockParity(
    fixture: string, options: BlockParityOptions = {}): Promise<BlockParityResult> {
  const expertKernel = options.expertKernel ?? 'fused';
  const tolerance = options.tolerance ?? DEFAULT_PARITY_TOLERANCE;
  if (options.backend !== undefined) await selectBackend(options.backend);
  const loaded = await loadFixture(fixture);
  const { golden, weights, blockConfig } = loaded;
  const owned: Tensor[] = [];
  const own = <T extends Tensor>(t: T): T => { owned.push(t); return t; };
  try {
    const xGolden = own(await golden.tensor('block.x'));
    const hidden = xGolden.shape[xGolden.rank - 1];
    const tokens = xGolden.size / hidden;
    const x = own(tf.reshape(xGolden, [tokens, hidden]) as Tensor2D);     // [T, H]
    const g = own(tf.reshape(own(await golden.tensor('block.g')), [tokens, hidden]) as Tensor2D);  // [T, H]

    const trainable = trainableWeightFields(weights);
    const pairs = pairGradients(fixture, loaded.family, familyOf(loaded.config).parameters, golden, trainable);
    const fields = trainable.map(([f]) => f);

    // The parameters are inputs of the traced function, so each one gets its gradient.
    const kept: { routing?: Routing } = {};
    const block = (xIn: Tensor, ...params: Tensor[]): Tensor => {
      const w = withWeightFields(weights, fields.map((f, i) => [f, params[i]] as [WeightField, Tensor]));
      const result = moeBlock(xIn as Tensor2D, w, blockConfig, { expertKernel, trainExpertWeights: true });
      // kept past the traced scope, which disposes everything f does not return
      kept.routing = {
        weights: own(tf.keep(result.routing.weights)), experts: own(tf.keep(result.routing.experts)),
        logits: own(tf.keep(result.routing.logits)),
      };
      return result.out;
    };
    const { value: out, grads } = tf.valueAndGrads(block)([x, ...trainable.map(([, t]) => t)], g);
    own(out);
    grads.forEach(own);
    const chosen = kept.routing!;

    const comparisons: ParityComparison[] = [];
    const compare = (name: string, actual: ArrayLike<number>, expected: ArrayLike<number>) => {
      const maxRelError = maxRelativeError(actual, expected);
      comparisons.push({ name, maxRelError, pass: maxRelError <= tolerance });
    };
    const goldenData = async (name: string) => own(await golden.tensor(name)).data();
    compare('out', await out.data(), await goldenData('block.out'));
    compare('dx', await grads[0].data(), await goldenData('block.dx'));
    for (const [name, index] of pairs) {
      compare(name.slice('block.'.length), await grads[index + 1].data(), await goldenData(name));
    }

    const numExperts = weights.router.weight.shape[0];
    const topK = blockConfig.routing.topK;
    const goldenMatrix = async (name: string, width: number, what: string): Promise<Tensor2D> => {
      const shape = golden.info(name).shape;
      if (shape.reduce((a, b) => a * b, 1) !== tokens * width || shape[shape.length - 1] !== width) {
        throw new FixtureError(`${fixture}: '${name}' has shape [${shape}] but the ${loaded.family} ` +
            `block's ${what} is [${tokens}, ${width}]`);
      }
      return own(tf.reshape(own(await golden.tensor(name)), [tokens, width]) as Tensor2D);
    };

    // The router's outputs, where the fixture has them. [T, E] logits are the routing truth
    // the reference routing starts from when the chosen indices themselves are not stored.
    let goldenLogits: Tensor2D | undefined;
    if (golden.has('block.router.logits')) {
      goldenLogits = await goldenMatrix('block.router.logits', numExperts, 'router logits [T, E]');
      compare('router.logits', await chosen.logits.data(), await goldenLogits.data());
    }
    if (golden.has('block.router_logits')) {
      // gpt-oss's block returns its top-k weights [T, K] under this name; the others their logits.
      if (blockConfig.routing.kind === 'topKSoftmax') {
        const w = await goldenMatrix('block.router_logits', topK, 'top-k routing weights [T, K]');
        compare('router_logits', await rowsDescending(chosen.weights), await rowsDescending(w));
      } else {
        const logits = await goldenMatrix('block.router_logits', numExperts, 'router logits [T, E]');
        compare('router_logits', await chosen.logits.data(), await logits.data());
        goldenLogits ??= logits;
      }
    }
    let goldenIndices: number[][] | undefined;
    if (golden.has('block.router.indices')) {
      const indices = await goldenMatrix('block.router.indices', topK, 'chosen experts [T, K]');
      goldenIndices = await expertSets(indices);
      const bad = goldenIndices.flat().find(e => !(Number.isInteger(e) && e >= 0 && e < numExperts));
      if (bad !== undefined) {
        throw new FixtureError(`${fixture}: 'block.router.indices' holds expert ${bad}, outside [0, ${numExperts})`);
      }
    }
    if (golden.has('block.router.weights')) {
      const w = await goldenMatrix('block.router.weights', topK, 'routing weights [T, K]');
      if (golden.has('block.router.indices')) {
        // scattered to [T, E] by expert id: K's order is free (glm4_moe's top-k is unsorted)
        const indices = await goldenMatrix('block.router.indices', topK, 'chosen experts [T, K]');
        compare('router.weights', await scatterByExpert(chosen.weights, chosen.experts, numExperts),
            await scatterByExpert(w, indices, numExperts));
      } else {
        compare('router.weights', await rowsDescending(chosen.weights), await rowsDescending(w));
      }
    }

    let expectedExperts: number[][];
    let routingReference: BlockParityResult['routingReference'];
    if (goldenIndices !== undefined) {
      expectedExperts = goldenIndices;
      routingReference = 'golden router indices';
    } else if (goldenLogits !== undefined) {
      const ref = referenceRoute(goldenLogits, blockConfig.routing, weights.router.correctionBias);
      expectedExperts = await expertSets(ref.experts);
      tf.dispose([ref.weights, ref.experts, ref.logits]);
      routingReference = 'golden router logits';
    } else {
      // the reference kernel's routing (referenceMoEBlock routes so): its expert loop is not
      // needed for the chosen experts, and it reads them synchronously, which webgpu cannot
      const logits = routerLogits(x, weights.router);
      const ref = referenceRoute(logits, blockConfig.routing, weights.router.correctionBias);
      expectedExperts = await expertSets(ref.experts);
      tf.dispose([logits, ref.weights, ref.experts, ref.logits]);
      routingReference = 'reference expert kernel';
    }
    const routingMismatches = compareRouting(expectedExperts, await expertSets(chosen.experts));
    const routingIdentical = routingMismatches.length === 0;
    return {
      fixture,
      family: loaded.family,
      block: loaded.blockName,
      layer: loaded.layer,
      backend: tf.getBackend(),
      expertKernel,
      tokens,
      tolerance,
      comparisons,
      routingReference,
      routingIdentical,
      routingMismatches,
      pass: routingIdentical && comparisons.every(c => c.pass),
    };
  } finally {
    tf.dispose(owned);
    disposeMoEBlockWeights(weights);
  }
}
