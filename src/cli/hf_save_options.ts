/**
 * The flags of every command that writes an HF checkpoint (merge, convert --to hf): the weights'
 * dtype and the largest shard, as save_pretrained takes them.
 */
import type { Argv } from 'yargs';
import { CheckpointError } from '../io/hf_checkpoint_core.js';
import { HF_SAVE_DTYPES, parseShardSize, type HFSaveDtype } from '../io/hf_save.js';

export interface HFSaveArgs {
  dtype?: HFSaveDtype;
  maxShardSize?: string;
}

/** Adds --dtype and --max-shard-size (`what` names the checkpoint the command writes). */
export function hfSaveOptions<T>(yargs: Argv<T>, what: string): Argv<T & HFSaveArgs> {
  return yargs
      .option('dtype', {
        type: 'string', choices: HF_SAVE_DTYPES, requiresArg: true,
        describe: `dtype of ${what}'s weights: source (default: each tensor as it was on disk) or one for all`,
      })
      .option('max-shard-size', {
        type: 'string', requiresArg: true,
        describe: `the largest weight file of ${what}, in bytes or like '5GB', '2GiB' (default 50GB, as transformers 5)`,
      }) as unknown as Argv<T & HFSaveArgs>;
}

/** --max-shard-size as saveHFCheckpoint takes it: a byte count, or a size with a unit. */
export function maxShardSizeOf(flag: string | undefined): number | string | undefined {
  return flag === undefined ? undefined : /^\d+$/.test(flag) ? Number(flag) : flag;
}

/** The problem of a --max-shard-size flag, or true. */
export function checkMaxShardSize(flag: string | undefined): string | true {
  try {
    if (flag !== undefined) parseShardSize(maxShardSizeOf(flag)!);
  } catch (e) {
    if (e instanceof CheckpointError) return `--max-shard-size: ${e.message.replace(/^`[^`]*`: /, '')}`;
    throw e;
  }
  return true;
}
