/**
 * `tfjs-moe-lora merge`: a PEFT adapter folded into its base model, written as an HF checkpoint
 * (mergeAdapterIntoCheckpoint): in the source dtype, sharded like save_pretrained, with the
 * model folder's tokenizer and generation files.
 */
import { existsSync, statSync } from 'node:fs';
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { mergeAdapterIntoCheckpoint, type MergeResult } from '../../io/merge.js';
import { outputFolderProblem } from '../../util/output_folder.js';
import { BACKENDS, selectBackend } from '../backend.js';
import { UsageError } from '../errors.js';
import { checkMaxShardSize, hfSaveOptions, maxShardSizeOf, type HFSaveArgs } from '../hf_save_options.js';
import type { ExpertDtype } from '../../io/hf_block.js';
import { expertDtypeOption } from '../plugin_options.js';

export interface MergeArgs extends HFSaveArgs {
  model: string;
  adapter: string;
  out: string;
  overwrite: boolean;
  backend: string;
  /** the experts the adapter was trained on (a quantized one: merged into its dequantized values, written bf16) */
  expertDtype?: ExpertDtype;
  int4GroupSize?: number;
  requantize: boolean;
}

export const command = 'merge';
export const describe = 'Merge a PEFT adapter into its base model and write an HF checkpoint (source dtype, ' +
    'sharded, tokenizer files copied)';

const isDir = (p: string) => existsSync(p) && statSync(p).isDirectory();

/** The checks that need no file contents, before any work. */
function checkArgs(argv: Partial<MergeArgs>): string | true {
  const { model, adapter, out, maxShardSize } = argv as MergeArgs;
  if (!isDir(model)) return `--model: '${model}' is not a directory`;
  if (!isDir(adapter)) return `--adapter: '${adapter}' is not a directory`;
  if (argv.requantize === true && !['int8', 'int4', 'nf4', 'nf4-dq', 'mxfp4'].includes(argv.expertDtype ?? '')) {
    return `--requantize needs a quantized --expert-dtype (int8, int4, nf4, nf4-dq, mxfp4) but got ${argv.expertDtype ?? 'none'}`;
  }
  const shardProblem = checkMaxShardSize(maxShardSize);
  if (shardProblem !== true) return shardProblem;
  return outputFolderProblem(out, { name: '--out', overwrite: argv.overwrite === true, inputs: { '--model': model, '--adapter': adapter } });
}

export function builder(yargs: Argv): Argv<MergeArgs> {
  return expertDtypeOption(hfSaveOptions(yargs, 'the merged checkpoint'), "the routed experts the adapter was trained on: " +
      "int8/int4/nf4/mxfp4 merge into the values the quantized experts stand for and write bf16 unless --dtype says " +
      "otherwise; 'stored' (default) and 'float32' as for loading")
      .option('requantize', {
        type: 'boolean', default: false,
        describe: 'with a quantized --expert-dtype: quantize the merged experts again and report the largest change',
      })
      .option('model', {
        type: 'string', demandOption: true, requiresArg: true,
        describe: 'the base model folder: an HF checkpoint (config.json + safetensors) or a TF.js model (model.json)',
      })
      .option('adapter', {
        type: 'string', demandOption: true, requiresArg: true,
        describe: 'the PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to merge',
      })
      .option('out', {
        type: 'string', demandOption: true, requiresArg: true,
        describe: 'the folder to write the merged HF checkpoint to (created; a model already in it is replaced ' +
            'only with --overwrite; other files stay)',
      })
      .option('overwrite', { type: 'boolean', default: false, describe: 'replace a model already in --out' })
      .option('backend', {
        type: 'string', choices: BACKENDS, default: 'cpu', requiresArg: true, describe: 'tfjs backend',
      })
      .check(argv => checkArgs(argv as Partial<MergeArgs>))
      .example('$0 merge --model spec/fixtures/hf/olmoe --adapter spec/fixtures/hf/olmoe/adapter --out /tmp/olmoe-merged', '')
      .example('$0 merge --model ./OLMoE-1B-7B --adapter ./my-adapter --out ./merged --max-shard-size 5GB', '') as
      unknown as Argv<MergeArgs>;
}

/** Runs the merge (argument problems are UsageErrors; a load or write that fails throws its own error). */
export async function mergeCommand(argv: MergeArgs): Promise<MergeResult> {
  const bad = checkArgs(argv);
  if (bad !== true) throw new UsageError(bad);
  await selectBackend(argv.backend);
  return mergeAdapterIntoCheckpoint(argv.model, argv.adapter, argv.out, {
    dtype: argv.dtype, maxShardSize: maxShardSizeOf(argv.maxShardSize), expertDtype: argv.expertDtype,
    int4GroupSize: argv.int4GroupSize, requantize: argv.requantize,
  });
}

/** The report: what was merged, the files written with their sizes, the dtype. */
export function formatMerge(argv: Pick<MergeArgs, 'model' | 'adapter' | 'out'>, r: MergeResult): string {
  const size = (b: number) => b < 1024 ? `${b} B` : b < 1 << 20 ? `${(b / 1024).toFixed(1)} KiB` :
    b < 1 << 30 ? `${(b / (1 << 20)).toFixed(1)} MiB` : `${(b / (1 << 30)).toFixed(2)} GiB`;
  const a = r.adapter;
  const lines = [
    `merge ${argv.model} + adapter ${argv.adapter} (r ${a.r}, alpha ${a.alpha}, ${a.targets.join(', ')}; ` +
        `${a.layers.length} layers) → ${argv.out} (HF checkpoint, ${r.saved.dtype})`,
    ...r.saved.shards.map(s => `  ${s.name}  ${size(s.bytes)}`),
    ...(r.saved.copied.length > 0 ? [`  copied: ${r.saved.copied.join(', ')}`] : []),
    ...(r.requantizeMaxChange !== undefined ? [`  re-quantized experts: largest change ${r.requantizeMaxChange.toPrecision(3)}`] : []),
    ...a.notes.map(n => `note: ${n}`),
  ];
  return `${lines.join('\n')}\n`;
}

export async function handler(argv: ArgumentsCamelCase<MergeArgs>): Promise<void> {
  process.stdout.write(formatMerge(argv, await mergeCommand(argv)));
}
