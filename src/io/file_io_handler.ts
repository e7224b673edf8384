/**
 * A `file://` IOHandler for Node without tfjs-node: `model.save('file://dir')` writes
 * `dir/model.json` and `dir/weights.bin` in the layout tfjs-node writes (model.json holds
 * modelTopology, weightsManifest [{paths: ['weights.bin'], weights}], format, generatedBy,
 * convertedBy, and trainingConfig / userDefinedMetadata when present), and
 * `tf.loadLayersModel('file://dir/model.json')` reads it back (any number of weight files,
 * relative to model.json, concatenated in manifest order).
 */
import * as tf from '@tensorflow/tfjs-core';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { MoELoraError } from '../errors.js';
import { writeArtifactFolder } from '../util/atomic.js';

export const FILE_SCHEME = 'file://';
const MODEL_JSON = 'model.json';
const WEIGHTS_BIN = 'weights.bin';

/** Thrown for an unusable path or a malformed model.json / weights file. */
export class FileIOError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'FileIOError';
    Object.setPrototypeOf(this, FileIOError.prototype);
  }
}

function stripScheme(url: string): string {
  return url.startsWith(FILE_SCHEME) ? url.slice(FILE_SCHEME.length) : url;
}

/** The files of a TF.js model folder: a save replaces them all, e.g. old weight shards. */
const isTFJSModelFile = (name: string) => name === MODEL_JSON || name.endsWith('.bin');

/**
 * The handler for one path: a directory when saving, model.json (or a directory holding one)
 * when loading. A save writes model.json and weights.bin as one atomic artifact
 * (writeArtifactFolder): a process killed at any instant leaves the old model or the new one;
 * old *.bin shards go, other files (a README) stay.
 */
export class NodeFileIOHandler implements tf.io.IOHandler {
  readonly path: string;

  constructor(path: string) {
    if (typeof path !== 'string' || path.length === 0) {
      throw new FileIOError(`\`fileIO()\`: 'path' must be a non-empty string but got ${JSON.stringify(path)}`);
    }
    this.path = resolve(stripScheme(path));
  }

  async save(artifacts: tf.io.ModelArtifacts): Promise<tf.io.SaveResult> {
    if (artifacts.modelTopology instanceof ArrayBuffer) {
      throw new FileIOError(
          `file:// save to '${this.path}': binary (GraphDef) topologies are not supported, only JSON`);
    }
    if (this.path.endsWith('.json')) {
      throw new FileIOError(
          `file:// save: the path must be a directory (model.json and weights.bin are written into it) ` +
          `but got '${this.path}'; use 'file://${dirname(this.path)}'`);
    }
    const weightSpecs = artifacts.weightSpecs ?? [];
    const weightData = artifacts.weightData === undefined ?
        new ArrayBuffer(0) : tf.io.CompositeArrayBuffer.join(artifacts.weightData);
    const modelJSON: tf.io.ModelJSON = {
      modelTopology: artifacts.modelTopology ?? {},
      format: artifacts.format,
      generatedBy: artifacts.generatedBy,
      convertedBy: artifacts.convertedBy,
      weightsManifest: [{ paths: [WEIGHTS_BIN], weights: weightSpecs }],
    };
    if (artifacts.trainingConfig != null) modelJSON.trainingConfig = artifacts.trainingConfig;
    if (artifacts.signature != null) modelJSON.signature = artifacts.signature;
    if (artifacts.userDefinedMetadata != null) modelJSON.userDefinedMetadata = artifacts.userDefinedMetadata;
    if (artifacts.modelInitializer != null) modelJSON.modelInitializer = artifacts.modelInitializer;
    if (artifacts.initializerSignature != null) modelJSON.initializerSignature = artifacts.initializerSignature;

    // one artifact: a model.json on disk always has its own weights next to it
    await writeArtifactFolder(this.path, async dir => {
      await writeFile(join(dir, WEIGHTS_BIN), new Uint8Array(weightData));
      await writeFile(join(dir, MODEL_JSON), JSON.stringify(modelJSON));
    }, { owns: isTFJSModelFile, what: `file:// save to '${this.path}'` });
    const topologyBytes = Buffer.byteLength(JSON.stringify(modelJSON.modelTopology), 'utf8');
    return {
      modelArtifactsInfo: {
        dateSaved: new Date(),
        modelTopologyType: 'JSON',
        modelTopologyBytes: topologyBytes,
        weightSpecsBytes: Buffer.byteLength(JSON.stringify(weightSpecs), 'utf8'),
        weightDataBytes: weightData.byteLength,
      },
    };
  }

  async load(): Promise<tf.io.ModelArtifacts> {
    let jsonPath = this.path;
    const info = await stat(jsonPath).catch(() => null);
    if (info === null) throw new FileIOError(`file:// load: '${jsonPath}' does not exist`);
    if (info.isDirectory()) jsonPath = join(jsonPath, MODEL_JSON);
    let modelJSON: tf.io.ModelJSON;
    try {
      modelJSON = JSON.parse(await readFile(jsonPath, 'utf8')) as tf.io.ModelJSON;
    } catch (e) {
      throw new FileIOError(`file:// load: cannot read '${jsonPath}' as JSON: ${(e as Error).message}`);
    }
    if (modelJSON === null || typeof modelJSON !== 'object' || modelJSON.modelTopology == null) {
      throw new FileIOError(`file:// load: '${jsonPath}' has no 'modelTopology'`);
    }
    const dir = dirname(jsonPath);
    return tf.io.getModelArtifactsForJSON(modelJSON, async manifest => {
      const specs: tf.io.WeightsManifestEntry[] = [];
      const buffers: ArrayBuffer[] = [];
      for (const group of manifest) {
        for (const p of group.paths) {
          const file = join(dir, p);
          const bytes = await readFile(file).catch(() => {
            throw new FileIOError(`file:// load: weight file '${file}' named in '${jsonPath}' cannot be read`);
          });
          buffers.push(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer);
        }
        specs.push(...group.weights);
      }
      const weightData = tf.io.CompositeArrayBuffer.join(buffers);
      const expected = specs.reduce((n, s) => n + s.shape.reduce((a, b) => a * b, 1) * bytesPer(s), 0);
      if (weightData.byteLength !== expected) {
        throw new FileIOError(
            `file:// load: the weight files of '${jsonPath}' hold ${weightData.byteLength} bytes but its ` +
            `weightsManifest describes ${expected}`);
      }
      return [specs, weightData];
    });
  }
}

function bytesPer(spec: tf.io.WeightsManifestEntry): number {
  if (spec.quantization) {
    const q = spec.quantization.dtype;
    return q === 'uint8' ? 1 : q === 'uint16' || q === 'float16' ? 2 : 4;
  }
  return spec.dtype === 'bool' ? 1 : 4;
}

/**
 * A file:// handler for `path` (same as what the registered router returns).
 *
 * ```js
 * await model.save(fileIO('/tmp/my-model'));
 * ```
 */
export function fileIO(path: string): NodeFileIOHandler {
  return new NodeFileIOHandler(path);
}

function fileRouter(url: string | string[]): tf.io.IOHandler | null {
  if (Array.isArray(url)) return null;
  return typeof url === 'string' && url.startsWith(FILE_SCHEME) ? new NodeFileIOHandler(url) : null;
}

// A flag on globalThis, so a second copy of this module (dual ESM/CJS load) does not register
// a second router: two handlers for one URL make tfjs refuse the save.
const REGISTERED = Symbol.for('tfjs-moe-lora.fileIORegistered');

/**
 * Registers the file:// save and load routers. Idempotent; returns false when they were already
 * registered (by this function) or when another file:// handler is registered (tfjs-node).
 *
 * ```js
 * registerFileIOHandler();
 * await model.save('file:///tmp/my-model');
 * const again = await tf.loadLayersModel('file:///tmp/my-model/model.json');
 * ```
 */
export function registerFileIOHandler(): boolean {
  const g = globalThis as Record<symbol, unknown>;
  if (g[REGISTERED] === true) return false;
  if (tf.io.getSaveHandlers('file:///probe').length > 0) return false;
  // tfjs's IORouter type says IOHandler, but its registry skips routers that return null
  tf.io.registerSaveRouter(fileRouter as Parameters<typeof tf.io.registerSaveRouter>[0]);
  tf.io.registerLoadRouter(fileRouter as Parameters<typeof tf.io.registerSaveRouter>[0]);
  g[REGISTERED] = true;
  return true;
}
