/**
 * `tfjs-moe-lora convert`: between the on-disk forms of a model and its adapters.
 *
 * - `--from hf --to tfjs`: an HF checkpoint → a TF.js LayersModel folder (model.json + weights.bin);
 * - `--from tfjs --to hf`: back, in the Hub's layout (saveHFCheckpoint);
 * - `--adapter DIR`: a PEFT adapter loaded into the model (HF or TF.js) → a TF.js folder holding both;
 * - `--to peft`: a TF.js model's LoRA adapter (`--adapter-name`) → a PEFT adapter folder.
 *
 * Every conversion copies float32 values unchanged, so each round trip gives back the same numbers;
 * `--to hf` writes each tensor in the dtype it had in the HF checkpoint the model came from (a TF.js
 * folder remembers it), so bf16 stays bf16. The input folder's tokenizer and generation files
 * (tokenizer.json, tokenizer_config.json, ...: CHECKPOINT_COMPANION_FILES) go with the model to
 * --to hf and --to tfjs.
 */
import type { DenseDtype } from '../../io/hf_checkpoint_core.js';
import { existsSync, statSync } from 'node:fs';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { fileIO } from '../../io/file_io_handler.js';
import { readCompanionFiles, saveHFCheckpoint } from '../../io/hf_save.js';
import type { ExpertDtype } from '../../io/hf_block.js';
import { denseDtypeOption, expertDtypeOption } from '../plugin_options.js';
import { loadModelDir, modelDirFormat, MODEL_DIR_FORMATS, ModelDirError, type ModelDirFormat } from '../../io/model_dir.js';
import type { LoadedPeftAdapter } from '../../io/peft.js';
import { loadPeftAdapter, savePeftAdapter } from '../../io/peft_files.js';
import { sparseMoELayers } from '../../layers/moe_causal_lm.js';
import { writeFileAtomically } from '../../util/atomic.js';
import { outputFolderProblem } from '../../util/output_folder.js';
import { BACKENDS, selectBackend } from '../backend.js';
import { UsageError } from '../errors.js';
import { checkMaxShardSize, hfSaveOptions, maxShardSizeOf, type HFSaveArgs } from '../hf_save_options.js';

export const CONVERT_TARGETS = ['hf', 'tfjs', 'peft'] as const;
export type ConvertTarget = typeof CONVERT_TARGETS[number];

export interface ConvertArgs extends HFSaveArgs {
  input: string;
  output: string;
  from?: ModelDirFormat;
  to?: ConvertTarget;
  adapter?: string;
  adapterName: string;
  overwrite: boolean;
  backend: string;
  /** 'stored' (default), 'float32' or a quantized kind, for an HF checkpoint's experts */
  expertDtype?: ExpertDtype;
  /** with expertDtype 'int4': its group size */
  int4GroupSize?: number;
  /** 'stored' or 'float32' (default), for an HF checkpoint's attention and embedding */
  denseDtype?: DenseDtype;
}

/** What a conversion did. */
export interface ConvertResult {
  input: string;
  from: ModelDirFormat;
  output: string;
  to: ConvertTarget;
  /** the PEFT adapter loaded (with --adapter) */
  adapter: LoadedPeftAdapter | null;
  /** the files in the output folder after writing, with their sizes in bytes */
  files: Array<{ name: string; bytes: number }>;
  /** things worth knowing (an adapter dropped by --to hf, a lora_dropout not applied) */
  notes: string[];
}

export const command = 'convert';
export const describe = 'Convert a model between an HF checkpoint and a TF.js LayersModel folder, and LoRA ' +
    'adapters between PEFT and the TF.js model';

const isDir = (p: string) => existsSync(p) && statSync(p).isDirectory();

/** The checks that need no file contents; the format-dependent ones run in convertModel. */
function checkArgs(argv: Partial<ConvertArgs>): string | true {
  const { input, output, adapter, to } = argv as ConvertArgs;
  if (!isDir(input)) return `--input: '${input}' is not a directory`;
  if (adapter !== undefined && !isDir(adapter)) return `--adapter: '${adapter}' is not a directory`;
  if (to === undefined && adapter === undefined) return '--to: say what to write (hf, tfjs or peft), or pass --adapter';
  const hfFlag = (['dtype', 'maxShardSize'] as const).find(k => argv[k] !== undefined);
  if (hfFlag !== undefined && to !== 'hf') {
    return `--${hfFlag === 'dtype' ? 'dtype' : 'max-shard-size'} is for an HF checkpoint (--to hf) but --to is ${to ?? 'tfjs (with --adapter)'}`;
  }
  const shardProblem = checkMaxShardSize(argv.maxShardSize);
  if (shardProblem !== true) return shardProblem;
  if (adapter !== undefined && to !== undefined && to !== 'tfjs') {
    return `--adapter loads a PEFT adapter into the model and writes a TF.js folder, so --to must be tfjs (got ${to}); ` +
        'to write a model\'s adapter as PEFT, use --to peft without --adapter';
  }
  return outputFolderProblem(output, { name: '--output', overwrite: argv.overwrite === true, inputs: { '--input': input, '--adapter': adapter } });
}

export function builder(yargs: Argv): Argv<ConvertArgs> {
  const y0 = hfSaveOptions(yargs, 'an HF --output')
      .option('input', {
        alias: 'model', type: 'string', demandOption: true, requiresArg: true,
        describe: 'the model folder: an HF checkpoint (config.json + model.safetensors) or a TF.js model (model.json)',
      })
      .option('output', {
        type: 'string', demandOption: true, requiresArg: true,
        describe: 'the folder to write (created; a model or adapter already in it is replaced only with --overwrite; ' +
            'other files stay)',
      })
      .option('from', {
        type: 'string', choices: MODEL_DIR_FORMATS, requiresArg: true,
        describe: "the input folder's format (default: detected from its files)",
      })
      .option('to', {
        type: 'string', choices: CONVERT_TARGETS, requiresArg: true,
        describe: 'what to write: hf (checkpoint), tfjs (LayersModel folder) or peft (the model\'s adapter); ' +
            'default with --adapter: tfjs',
      })
      .option('adapter', {
        type: 'string', requiresArg: true,
        describe: 'a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to load into the model',
      })
      .option('adapter-name', {
        type: 'string', default: 'default', requiresArg: true,
        describe: 'the adapter\'s name on the model\'s layers (loaded with --adapter, written with --to peft)',
      })
      .option('overwrite', { type: 'boolean', default: false, describe: 'replace a model or adapter already in --output' })
      .option('backend', {
        type: 'string', choices: BACKENDS, default: 'cpu', requiresArg: true, describe: 'tfjs backend',
      });
  return denseDtypeOption(expertDtypeOption(y0, "an HF --input's routed experts: 'stored' keeps BF16/F16 ones 16-bit and MXFP4 ones " +
      "MXFP4 (packed in a TF.js output), 'float32' widens them, int8/int4/nf4/mxfp4 quantize them (a TF.js output keeps them quantized)"))
      .check(argv => checkArgs(argv as Partial<ConvertArgs>))
      .example('$0 convert --from hf --to tfjs --input spec/fixtures/hf/mixtral --output /tmp/mixtral-tfjs', '')
      .example('$0 convert --from tfjs --to hf --input /tmp/mixtral-tfjs --output /tmp/mixtral-hf', '')
      .example('$0 convert --to hf --input ./my-model --output ./my-model-bf16 --dtype bfloat16 --max-shard-size 5GB', '')
      .example('$0 convert --adapter spec/fixtures/hf/mixtral/adapter --model spec/fixtures/hf/mixtral ' +
          '--output /tmp/mixtral-lora', '')
      .example('$0 convert --to peft --input /tmp/mixtral-lora --output /tmp/mixtral-adapter', '') as unknown as Argv<ConvertArgs>;
}

async function listFiles(dir: string): Promise<Array<{ name: string; bytes: number }>> {
  const names = (await readdir(dir)).sort();
  return Promise.all(names.map(async name => ({ name, bytes: (await stat(join(dir, name))).size })));
}

/**
 * Runs one conversion. Argument problems that need the folders' contents (a folder of neither
 * format, a conversion to its own format) are UsageErrors; a load or write that fails throws the
 * loader's or writer's own error.
 */
export async function convertModel(argv: ConvertArgs): Promise<ConvertResult> {
  const bad = checkArgs(argv);
  if (bad !== true) throw new UsageError(bad);
  let from: ModelDirFormat;
  try {
    from = await modelDirFormat(argv.input, argv.from);
  } catch (e) {
    if (e instanceof ModelDirError) throw new UsageError(`--input: ${e.message}`);
    throw e;
  }
  const to: ConvertTarget = argv.to ?? 'tfjs';
  if (to === from && argv.adapter === undefined) {
    throw new UsageError(`--input is ${from === 'hf' ? 'an HF checkpoint' : 'a TF.js model'} already: nothing to convert to ${to}`);
  }
  await selectBackend(argv.backend);
  const { model } = await loadModelDir(argv.input, {
    format: from, expertDtype: argv.expertDtype, int4GroupSize: argv.int4GroupSize, denseDtype: argv.denseDtype,
  });
  const notes: string[] = [];
  let adapter: LoadedPeftAdapter | null = null;
  try {
    if (argv.adapter !== undefined) {
      adapter = await loadPeftAdapter(model, argv.adapter, { name: argv.adapterName });
      notes.push(...adapter.notes);
    }
    switch (to) {
      case 'tfjs': {
        // read before the save, so a bad tokenizer file fails before anything is written
        const companions = await readCompanionFiles(argv.input, '--input');
        await model.save(fileIO(argv.output));
        // the TF.js folder's own save is atomic; each file beside it is replaced atomically too
        for (const [name, data] of Object.entries(companions)) {
          await writeFileAtomically(join(argv.output, name), data, `convert: '${name}'`);
        }
        break;
      }
      case 'hf': {
        const adapters = [...new Set(sparseMoELayers(model).flatMap(l => l.adapterNames()))];
        const merged = [...new Set(sparseMoELayers(model).flatMap(l => [...l.mergedAdapters]))];
        await saveHFCheckpoint(model, argv.output, {
          sourceFolder: argv.input, dtype: argv.dtype, maxShardSize: maxShardSizeOf(argv.maxShardSize),
        });
        if (adapters.length > 0) {
          notes.push(`the model's adapters (${adapters.join(', ')}) are not part of an HF checkpoint` +
              (merged.length > 0 ? ` (merged ones, ${merged.join(', ')}, are in its weights)` : '') +
              `; write one as PEFT with: convert --to peft --input ${argv.input} --adapter-name NAME --output DIR`);
        }
        break;
      }
      case 'peft':
        await savePeftAdapter(model, argv.output, { name: argv.adapterName });
        break;
    }
  } finally {
    model.dispose();
  }
  return { input: argv.input, from, output: argv.output, to, adapter, files: await listFiles(argv.output), notes };
}

const LABEL: Record<ConvertTarget, string> = { hf: 'HF checkpoint', tfjs: 'TF.js LayersModel', peft: 'PEFT adapter' };

/** The report: what was read, what was written (files and sizes), notes. */
export function formatConvert(r: ConvertResult): string {
  const size = (b: number) => b < 1024 ? `${b} B` : b < 1 << 20 ? `${(b / 1024).toFixed(1)} KiB` : `${(b / (1 << 20)).toFixed(1)} MiB`;
  const a = r.adapter;
  const lines = [
    `convert ${r.input} (${LABEL[r.from]})` +
        (a ? ` + adapter '${a.name}' (r ${a.r}, alpha ${a.alpha}, ${a.targets.join(', ')}; ${a.layers.length} layers)` : '') +
        ` → ${r.output} (${LABEL[r.to]})`,
    ...r.files.map(f => `  ${f.name}  ${size(f.bytes)}`),
    ...r.notes.map(n => `note: ${n}`),
  ];
  return `${lines.join('\n')}\n`;
}

export async function handler(argv: ArgumentsCamelCase<ConvertArgs>): Promise<void> {
  process.stdout.write(formatConvert(await convertModel(argv)));
}
