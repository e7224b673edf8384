/** `tfjs-moe-lora bench`: the MoE block forward+backward, fused vs reference, on one backend. */
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { BENCH_BACKENDS, selectBenchBackend } from '../../bench/backend.js';
import {
  BENCH_CONFIGS, BENCH_LORA_CASES, CPU_SEGMENT_SUMS, benchMoEBlock, formatBenchTable, type BenchLoRA,
  type CpuSegmentSum,
} from '../../bench/block_bench.js';

interface BenchArgs {
  config: string;
  backend: string;
  lora: BenchLoRA[];
  iters: number;
  warmup: number;
  seed: number;
  json: boolean;
  allowAnyBackend: boolean;
  cpuSegmentSum: CpuSegmentSum;
  profile: boolean;
  rank?: number;
}

export const command = 'bench';
export const describe = 'Time the MoE block forward+backward (fused vs reference kernel) and its peak memory';

/** 'none,split' and repeated flags alike, as one list. */
function loraList(values: string[]): string[] {
  return values.flatMap(v => String(v).split(',')).map(v => v.trim()).filter(v => v !== '');
}

export function builder(yargs: Argv): Argv<BenchArgs> {
  return yargs
      .option('config', {
        type: 'string', choices: Object.keys(BENCH_CONFIGS), default: 'S', requiresArg: true,
        describe: 'shape: S (T=1024 H=256 I=128 E=8 K=2) for cpu/wasm, M1 and Q for webgpu, XS a smoke test',
      })
      .option('backend', {
        type: 'string', choices: BENCH_BACKENDS, default: 'wasm', requiresArg: true, describe: 'tfjs backend',
      })
      .option('lora', {
        type: 'string', array: true, default: [...BENCH_LORA_CASES], requiresArg: true,
        coerce: loraList,
        describe: `cases, comma-separated: none (full fine-tuning), or router + expert LoRA with the base ` +
            `frozen in mode materialize, split or auto`,
      })
      .option('iters', { type: 'number', default: 5, requiresArg: true, describe: 'timed steps per kernel (median)' })
      .option('warmup', { type: 'number', default: 1, requiresArg: true, describe: 'untimed steps per kernel first' })
      .option('seed', { type: 'number', default: 1, requiresArg: true, describe: 'seed of the random inputs' })
      .option('json', { type: 'boolean', default: false, describe: 'print one JSON array, one object per case' })
      .option('allow-any-backend', {
        type: 'boolean', default: false, describe: 'run a config on a backend it is not sized for',
      })
      .option('rank', {
        type: 'number', requiresArg: true, describe: 'LoRA rank of the adapter cases (default: the config\'s, 8 for S)',
      })
      .option('profile', {
        type: 'boolean', default: false, describe: 'also report the time per kernel of one profiled step',
      })
      .option('cpu-segment-sum', {
        type: 'string', choices: CPU_SEGMENT_SUMS, default: 'stock' as const, requiresArg: true,
        describe: 'cpu: tfjs-cpu\'s UnsortedSegmentSum (quadratic; tf.gather\'s gradient in the reference) ' +
            'or a linear one for the run',
      })
      .check(argv => {
        const bad = (argv.lora as string[]).filter(l => !(BENCH_LORA_CASES as readonly string[]).includes(l));
        if (bad.length > 0) return `--lora: '${bad[0]}' is not one of ${BENCH_LORA_CASES.join(', ')}`;
        for (const name of ['iters', 'warmup', 'seed', 'rank'] as const) {
          const v = argv[name] as number | undefined;
          if (v === undefined) continue;
          const min = name === 'iters' || name === 'rank' ? 1 : 0;
          if (!Number.isInteger(v) || v < min) return `--${name} must be an integer >= ${min} but got ${v}`;
        }
        const c = BENCH_CONFIGS[argv.config as string];
        if (!c.backends.includes(argv.backend as string) && argv.allowAnyBackend !== true) {
          return `--config ${argv.config} is sized for ${c.backends.join(', ')}, not ${argv.backend} ` +
              `(--allow-any-backend runs it anyway)`;
        }
        return true;
      })
      .example('$0 bench', 'config S on wasm, every LoRA case')
      .example('$0 bench --backend cpu --lora none,auto --iters 9', '')
      .example('$0 bench --backend webgpu --config M1 --json', '') as unknown as Argv<BenchArgs>;
}

export async function handler(argv: ArgumentsCamelCase<BenchArgs>): Promise<void> {
  const release = await selectBenchBackend(argv.backend);
  try {
    const cases = await benchMoEBlock({
      config: argv.config, lora: argv.lora, iters: argv.iters, warmup: argv.warmup, seed: argv.seed,
      allowAnyBackend: argv.allowAnyBackend, cpuSegmentSum: argv.cpuSegmentSum,
      profile: argv.profile, rank: argv.rank,
    });
    process.stdout.write(argv.json ? `${JSON.stringify(cases)}\n` : formatBenchTable(cases));
  } finally {
    release();
  }
}
