/**
 * A `file://` IOHandler for Node without tfjs-node: `model.save('file://dir')` writes
 * `dir/model.json` and `dir/weights.bin` in the layout tfjs-node writes (model.json holds
 * modelTopology, weightsManifest [{paths: ['weights.bin'], weights}], format, generatedBy,
 * convertedBy, and trainingConfig / userDefinedMetadata when present), and
 * `tf.loadLayersModel('file://dir/model.json')` reads it back (any number of weight files,
 * relative to model.json, concatenated in manifest order).
 */
import * as tf from '@tensorflow/tfjs-core';
import { constants as bufferConstants } from 'node:buffer';
import { writeFile, type FileHandle } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { MoELoraError } from '../errors.js';
import { writeArtifactFolder } from '../util/atomic.js';
import { describeValue } from '../util/describe.js';
import {
  confinedPath, openArtifactFolder, openRegularFile, pathKind, readFully, readJSONFile,
} from '../util/files.js';

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

  /**
   * Reads model.json and its weight files. Every path of `weightsManifest` is confined to the
   * folder of model.json (no absolute paths, no `..`, no links out), must be a regular file, and
   * each group's files must hold exactly the bytes its weights need: all checked before a byte
   * of weights is read.
   */
  async load(): Promise<tf.io.ModelArtifacts> {
    let jsonPath: string;
    if (this.path.endsWith('.json') && await pathKind(this.path) !== 'directory') {
      jsonPath = this.path;
      await openArtifactFolder(dirname(jsonPath), 'file:// load: model folder');
    } else {
      jsonPath = join(await openArtifactFolder(this.path, 'file:// load: model folder'), MODEL_JSON);
    }
    const modelJSON = await readJSONFile(jsonPath, 'file:// load: model.json') as tf.io.ModelJSON;
    if (modelJSON === null || typeof modelJSON !== 'object' || modelJSON.modelTopology == null) {
      throw new FileIOError(`file:// load: '${jsonPath}' has no 'modelTopology'`);
    }
    const dir = dirname(jsonPath);
    const groups = checkManifest(modelJSON.weightsManifest, jsonPath);
    return tf.io.getModelArtifactsForJSON(modelJSON, async () => {
      const specs: tf.io.WeightsManifestEntry[] = [];
      const buffers: ArrayBuffer[] = [];
      for (const [g, group] of groups.entries()) {
        const expected = group.weights.reduce((n, s) => n + s.shape.reduce((a, b) => a * b, 1) * bytesPer(s), 0);
        const opened: Array<{ path: string; handle: FileHandle; size: number }> = [];
        try {
          for (const p of group.paths) {
            const path = await confinedPath(dir, p, `file:// load: weightsManifest[${g}] path of '${jsonPath}'`);
            opened.push({ path, ...await openRegularFile(path, `file:// load: weight file named in '${jsonPath}'`) });
          }
          const size = opened.reduce((n, f) => n + f.size, 0);
          if (size !== expected) {
            throw new FileIOError(
                `file:// load: the weight files of weightsManifest[${g}] in '${jsonPath}' ` +
                `(${opened.map(f => `'${f.path}'`).join(', ')}) hold ${size} bytes but its weights need ${expected}`);
          }
          for (const f of opened) {
            const bytes = new Uint8Array(f.size);
            await readFully(f.handle, bytes, 0, `file:// load: weight file '${f.path}'`);
            buffers.push(bytes.buffer);
          }
        } finally {
          await Promise.all(opened.map(f => f.handle.close()));
        }
        specs.push(...group.weights);
      }
      return [specs, tf.io.CompositeArrayBuffer.join(buffers)];
    });
  }
}

/**
 * `weightsManifest` checked as far as loading relies on it: groups of `{paths, weights}` whose
 * weights have a name, a dtype and a shape of non-negative integers, and whose total size fits in
 * one buffer (tfjs joins all weights into one).
 */
function checkManifest(manifest: unknown, jsonPath: string): tf.io.WeightsManifestConfig {
  if (manifest == null) return [];
  const where = `file:// load: '${jsonPath}'`;
  if (!Array.isArray(manifest)) {
    throw new FileIOError(`${where}: 'weightsManifest' must be an array of {paths, weights} but got ${describeValue(manifest)}`);
  }
  const problems: string[] = [];
  let total = 0;
  manifest.forEach((group: unknown, g) => {
    const { paths, weights } = (group ?? {}) as { paths?: unknown; weights?: unknown };
    if (!Array.isArray(paths) || !paths.every(p => typeof p === 'string')) {
      problems.push(`weightsManifest[${g}].paths must be an array of file names but is ${describeValue(paths)}`);
    }
    if (!Array.isArray(weights)) {
      problems.push(`weightsManifest[${g}].weights must be an array but is ${describeValue(weights)}`);
      return;
    }
    weights.forEach((w: unknown, i) => {
      const spec = (w ?? {}) as { name?: unknown; shape?: unknown; dtype?: unknown };
      const at = `weightsManifest[${g}].weights[${i}]`;
      if (typeof spec.name !== 'string') problems.push(`${at}.name must be a string but is ${describeValue(spec.name)}`);
      if (typeof spec.dtype !== 'string') problems.push(`${at}.dtype must be a string but is ${describeValue(spec.dtype)}`);
      if (!Array.isArray(spec.shape) || !spec.shape.every(d => Number.isSafeInteger(d) && d >= 0)) {
        problems.push(`${at}.shape must be an array of non-negative integers but is ${describeValue(spec.shape)}`);
      } else {
        total += spec.shape.reduce((a: number, b: number) => a * b, 1) * bytesPer(w as tf.io.WeightsManifestEntry);
      }
    });
  });
  if (problems.length === 0 && total > bufferConstants.MAX_LENGTH) {
    problems.push(`its weights need ${total} bytes, more than the largest buffer this runtime can hold ` +
        `(${bufferConstants.MAX_LENGTH} bytes)`);
  }
  if (problems.length > 0) {
    throw new FileIOError(`${where}: ${problems.length} problem${problems.length > 1 ? 's' : ''} in 'weightsManifest':\n  ` +
        problems.join('\n  '));
  }
  return manifest as tf.io.WeightsManifestConfig;
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
