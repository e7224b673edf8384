/**
 * Builds the browser example into a folder any static server can serve:
 *   index.html, main.js (+ .map; esbuild bundle of main.ts, tfjs included),
 *   the tfjs wasm binaries, and model/ (a copy of the checkpoint's HF files).
 *
 *   npx tsx examples/browser/build.ts [--model <checkpoint dir>] [--out <dir>] [--minify]
 *
 * (`npm run build:browser` runs it with the defaults.)
 */
import { build } from 'esbuild';
import { copyFile, mkdir, readdir, rm, stat } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));

/** Where `npm run build:browser` puts the page. */
export const DIST_DIR = join(here, 'dist');
/** The checkpoint the page trains by default (copied to <out>/model/): the shipped model, with its tokenizer.json. */
export const DEFAULT_MODEL_DIR = join(here, '../models/tala-moe');

/** tfjs's wasm binaries, wherever node_modules has the backend (this repository or a project that installed the package). */
const WASM_DIR = join(dirname(createRequire(import.meta.url).resolve('@tensorflow/tfjs-backend-wasm/package.json')), 'dist');
const WASM_FILES = ['tfjs-backend-wasm.wasm', 'tfjs-backend-wasm-simd.wasm', 'tfjs-backend-wasm-threaded-simd.wasm'];

/** The files of an HF checkpoint folder the page fetches; other files (fixtures' goldens) stay behind. */
const MODEL_FILE = /^(config\.json|tokenizer\.json|tokenizer_config\.json|generation_config\.json|model\.safetensors|model\.safetensors\.index\.json|model-\d+-of-\d+\.safetensors)$/;

export interface BuildOptions {
  outDir?: string;
  modelDir?: string;
  minify?: boolean;
}

export interface BuildResult {
  outDir: string;
  /** size of main.js in bytes */
  bundleBytes: number;
  /** the checkpoint files copied to <outDir>/model/ */
  modelFiles: string[];
}

export async function buildBrowserExample(options: BuildOptions = {}): Promise<BuildResult> {
  const outDir = resolve(options.outDir ?? DIST_DIR);
  const modelDir = resolve(options.modelDir ?? DEFAULT_MODEL_DIR);
  const modelFiles = (await readdir(modelDir).catch(() => [] as string[])).filter(f => MODEL_FILE.test(f)).sort();
  if (!modelFiles.includes('config.json')) {
    throw new Error(`--model '${modelDir}' is not an HF checkpoint folder (no config.json)`);
  }
  await rm(outDir, { recursive: true, force: true });
  await mkdir(join(outDir, 'model'), { recursive: true });
  await build({
    entryPoints: [join(here, 'main.ts')],
    outfile: join(outDir, 'main.js'),
    bundle: true,
    format: 'esm',
    platform: 'browser',
    target: 'es2022',
    sourcemap: true,
    minify: options.minify ?? false,
    logLevel: 'warning',
  });
  await copyFile(join(here, 'index.html'), join(outDir, 'index.html'));
  for (const f of WASM_FILES) await copyFile(join(WASM_DIR, f), join(outDir, f));
  for (const f of modelFiles) await copyFile(join(modelDir, f), join(outDir, 'model', f));
  return { outDir, bundleBytes: (await stat(join(outDir, 'main.js'))).size, modelFiles };
}

function flag(argv: string[], name: string): string | undefined {
  const at = argv.indexOf(`--${name}`);
  if (at === -1) return undefined;
  const value = argv[at + 1];
  if (value === undefined || value.startsWith('--')) throw new Error(`--${name} needs a value`);
  return value;
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const argv = process.argv.slice(2);
  try {
    const result = await buildBrowserExample({
      outDir: flag(argv, 'out'), modelDir: flag(argv, 'model'), minify: argv.includes('--minify'),
    });
    console.log(`built ${relative(process.cwd(), result.outDir) || '.'}: main.js ${(result.bundleBytes / 1e6).toFixed(2)} MB, ` +
        `model/ ${result.modelFiles.join(', ')}`);
  } catch (e) {
    console.error(`build:browser: ${(e as Error).message}`);
    process.exit(1);
  }
}
