/**
 * `tfjs-moe-lora bench`: the MoE block forward+backward, fused vs reference, on one backend; or,
 * with `--config example`, whole training steps of the example's model (tokens/s); or, with
 * `--config load`, loading a bf16 checkpoint of OLMoE-1B-7B's shapes (memory, peak RSS, time).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { withLinearCpuSegmentSum } from '../../backends/cpu/unsorted_segment_sum.js';
import { useThreadedWasm } from '../../backends/wasm/threads_node.js';
import { wasmThreadsFlagProblem } from '../plugin_options.js';
import { BENCH_BACKENDS, selectBenchBackend } from '../../bench/backend.js';
import {
  BENCH_CONFIGS, BENCH_EXPERT_STORAGES, BENCH_LORA_CASES, CPU_SEGMENT_SUMS, type BenchExpertStorage, benchMoEBlock, formatBenchTable, type BenchLoRA,
  type CpuSegmentSum,
} from '../../bench/block_bench.js';
import {
  LOAD_BENCH_CONFIG, LOAD_BENCH_EXPERT_DTYPES, benchLoad, formatLoadBenchTable, type LoadBenchExpertDtype,
} from '../../bench/load_bench.js';
import { TRAIN_BENCH_CONFIG, benchTrainingStep, formatTrainBenchTable } from '../../bench/train_bench.js';

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
  model?: string;
  text?: string;
  reference: boolean;
  layers?: number;
  expertDtype?: string[];
  expertStorage: BenchExpertStorage;
  wasmThreads?: number;
}

export const command = 'bench';
export const describe = 'Time the MoE block forward+backward, or a training step of the example model (fused vs reference kernel), and peak memory';

/** 'none,split' and repeated flags alike, as one list. */
function loraList(values: string[]): string[] {
  return values.flatMap(v => String(v).split(',')).map(v => v.trim()).filter(v => v !== '');
}

export function builder(yargs: Argv): Argv<BenchArgs> {
  return yargs
      .option('config', {
        type: 'string', choices: [...Object.keys(BENCH_CONFIGS), TRAIN_BENCH_CONFIG, LOAD_BENCH_CONFIG], default: 'S', requiresArg: true,
        describe: 'block shape: S (T=1024 H=256 I=128 E=8 K=2) for cpu/wasm, M1 and Q for webgpu, XS a smoke test; ' +
            `or ${TRAIN_BENCH_CONFIG}: Adam steps of the example model (LoRA r 4 on experts + router, 8 × 64 tokens), tokens/s; ` +
            `or ${LOAD_BENCH_CONFIG}: write a random bf16 checkpoint of OLMoE-1B-7B's shapes in 5 GB shards to a temporary ` +
            'folder and load it (a child process per load): tensor bytes, peak RSS, time',
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
      .option('reference', {
        type: 'boolean', default: true,
        describe: 'also time the reference kernel; --no-reference times the fused kernel alone (Q on webgpu: the reference runs out of GPU memory)',
      })
      .option('model', {
        type: 'string', requiresArg: true,
        describe: `--config ${TRAIN_BENCH_CONFIG}: HF checkpoint folder with tokenizer.json (default: the repository's examples/models/tala-moe)`,
      })
      .option('text', {
        type: 'string', requiresArg: true,
        describe: `--config ${TRAIN_BENCH_CONFIG}: training text (default: the repository's examples/data/target_train.txt)`,
      })
      .option('layers', {
        type: 'number', requiresArg: true,
        describe: `--config ${LOAD_BENCH_CONFIG}: decoder layers of the checkpoint (default 16, OLMoE-1B-7B's: 13.8 GB of bf16)`,
      })
      .option('expert-dtype', {
        type: 'string', array: true, requiresArg: true, coerce: loraList,
        describe: `--config ${LOAD_BENCH_CONFIG}: the loads to run, comma-separated, each passed to the loader as ` +
            `expertDtype: ${LOAD_BENCH_EXPERT_DTYPES.join(', ')} (default both)`,
      })
      .option('expert-storage', {
        type: 'string', choices: BENCH_EXPERT_STORAGES, default: 'float32' as const, requiresArg: true,
        describe: 'block configs: the routed experts as float32 tensors, or packed bf16 / f16 halves (frozen: LoRA cases only)',
      })
      .option('cpu-segment-sum', {
        type: 'string', choices: CPU_SEGMENT_SUMS, default: 'stock' as const, requiresArg: true,
        describe: 'cpu: tfjs-cpu\'s UnsortedSegmentSum (quadratic; tf.gather\'s gradient in the reference) ' +
            'or a linear one for the run',
      })
      .option('wasm-threads', {
        type: 'number', requiresArg: true,
        describe: 'block configs on wasm: tfjs-wasm\'s threaded SIMD build with this many XNNPACK threads (1 to 8), ' +
            'the package\'s loops split over the cores left beside them (default: the single-threaded build tfjs loads in Node)',
      })
      .check(argv => {
        const threads = wasmThreadsFlagProblem(argv.wasmThreads as number | undefined, argv.backend as string);
        if (threads !== null) return threads;
        if (argv.wasmThreads !== undefined && argv.config === LOAD_BENCH_CONFIG) {
          return `--wasm-threads is not an option of --config ${LOAD_BENCH_CONFIG}`;
        }
        const bad = (argv.lora as string[]).filter(l => !(BENCH_LORA_CASES as readonly string[]).includes(l));
        if (bad.length > 0) return `--lora: '${bad[0]}' is not one of ${BENCH_LORA_CASES.join(', ')}`;
        for (const name of ['iters', 'warmup', 'seed', 'rank'] as const) {
          const v = argv[name] as number | undefined;
          if (v === undefined) continue;
          const min = name === 'iters' || name === 'rank' ? 1 : 0;
          if (!Number.isInteger(v) || v < min) return `--${name} must be an integer >= ${min} but got ${v}`;
        }
        for (const name of ['layers', 'expert-dtype'] as const) {
          if (argv[name] !== undefined && argv.config !== LOAD_BENCH_CONFIG) return `--${name} is for --config ${LOAD_BENCH_CONFIG}, not ${argv.config}`;
        }
        if (argv.config === LOAD_BENCH_CONFIG) {
          const layers = argv.layers as number | undefined;
          if (layers !== undefined && (!Number.isInteger(layers) || layers < 1 || layers > 16)) {
            return `--layers must be an integer from 1 to 16 but got ${layers}`;
          }
          const bad = ((argv.expertDtype as string[] | undefined) ?? []).filter(d => !(LOAD_BENCH_EXPERT_DTYPES as readonly string[]).includes(d));
          if (bad.length > 0) return `--expert-dtype: '${bad[0]}' is not one of ${LOAD_BENCH_EXPERT_DTYPES.join(', ')}`;
          for (const name of ['model', 'text', 'profile'] as const) {
            if (argv[name] !== undefined && argv[name] !== false) return `--${name} is not an option of --config ${LOAD_BENCH_CONFIG}`;
          }
          return true;
        }
        if (argv.config === TRAIN_BENCH_CONFIG) {
          if (argv.profile === true) return `--profile times the kernels of a block config, not --config ${TRAIN_BENCH_CONFIG}`;
          return true;
        }
        for (const name of ['model', 'text'] as const) {
          if (argv[name] !== undefined) return `--${name} is for --config ${TRAIN_BENCH_CONFIG}, not ${argv.config}`;
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
      .example('$0 bench --backend webgpu --config M1 --json', '')
      .example(`$0 bench --config ${TRAIN_BENCH_CONFIG} --lora auto`, 'tokens/s of the example\'s training step on wasm')
      .example(`$0 bench --config ${LOAD_BENCH_CONFIG} --backend cpu --layers 4`, 'loading a bf16 OLMoE-shaped checkpoint of 4 layers') as unknown as Argv<BenchArgs>;
}

export async function handler(argv: ArgumentsCamelCase<BenchArgs>): Promise<void> {
  if (argv.config === LOAD_BENCH_CONFIG) {
    // each load runs in a child process with its own backend: none is set up here
    const cases = await benchLoad({
      layers: argv.layers, backend: argv.backend, seed: argv.seed,
      expertDtypes: argv.expertDtype as LoadBenchExpertDtype[] | undefined,
      onWritten: w => void process.stderr.write(`wrote ${w.shards.length} shard(s), ${w.totalBytes} bytes of bf16, in ${w.seconds.toFixed(1)} s\n`),
    });
    process.stdout.write(argv.json ? `${JSON.stringify(cases)}\n` : formatLoadBenchTable(cases));
    return;
  }
  let releaseThreads = () => {};
  if (argv.wasmThreads !== undefined) {
    const threaded = await useThreadedWasm(argv.wasmThreads);
    releaseThreads = threaded.release;
    process.stderr.write(`wasm: threaded SIMD build, ${threaded.threads} XNNPACK threads, ${threaded.loopWorkers} loop workers\n`);
  }
  const release = await selectBenchBackend(argv.backend);
  try {
    if (argv.config === TRAIN_BENCH_CONFIG) {
      const run = () => benchTrainingStep({
        model: argv.model, text: argv.text, lora: argv.lora, iters: argv.iters, warmup: argv.warmup, seed: argv.seed,
        rank: argv.rank,
      });
      const cases = tf.getBackend() === 'cpu' && argv.cpuSegmentSum === 'linear' ? await withLinearCpuSegmentSum(run) : await run();
      process.stdout.write(argv.json ? `${JSON.stringify(cases)}\n` : formatTrainBenchTable(cases));
      return;
    }
    const cases = await benchMoEBlock({
      config: argv.config, lora: argv.lora, iters: argv.iters, warmup: argv.warmup, seed: argv.seed,
      allowAnyBackend: argv.allowAnyBackend, cpuSegmentSum: argv.cpuSegmentSum,
      profile: argv.profile, rank: argv.rank, reference: argv.reference, expertStorage: argv.expertStorage,
    });
    process.stdout.write(argv.json ? `${JSON.stringify(cases)}\n` : formatBenchTable(cases));
  } finally {
    release();
    releaseThreads();
  }
}
