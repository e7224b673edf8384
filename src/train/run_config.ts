/**
 * `train --config run.yaml`: a run described in a YAML file with axolotl's key names where they
 * apply (base_model, datasets, adapter, lora_r, micro_batch_size, gradient_accumulation_steps,
 * learning_rate, lr_scheduler, warmup_steps, output_dir, ...) and the `train` flags' names in
 * snake_case for the rest (data, val, init_config, backend, metrics). Parsed with `yaml`
 * (eemeli/yaml) and checked with the same machinery as register()'s args (src/args/): every
 * problem at once, "did you mean" for unknown keys; the lora_* keys go through register()'s own
 * schema. The result is `train` flag values: flags given on the command line win over the file.
 */
import { parse } from 'yaml';
import type { PluginArgsProblem } from '../args/errors.js';
import type { ArgSpec } from '../args/schema.js';
import { checkScalar, collectArgProblems, Collector, describeValue } from '../args/validate.js';
import { suggestName } from '../args/suggest.js';
import { DATASET_TYPES, type DatasetType } from '../data/datasets_formats.js';
import type { DatasetSpec } from '../data/datasets.js';
import { readTextFile } from '../util/files.js';
import { TrainError } from './errors.js';
import { LR_SCHEDULERS } from './schedule.js';

/** Bad keys or values in a run config: every problem, a line each. */
export class RunConfigError extends TrainError {
  readonly problems: readonly string[];
  constructor(path: string, problems: string[]) {
    const n = problems.length;
    super(`the run config '${path}' has ${n} problem${n === 1 ? '' : 's'}:\n${problems.map(p => `  - ${p}`).join('\n')}`);
    this.name = 'RunConfigError';
    this.problems = [...problems];
    Object.setPrototypeOf(this, RunConfigError.prototype);
  }
}

type RunKeyKind = ArgSpec['kind'] | 'string' | 'datasets' | 'adapter' | 'strings';

interface RunKeySpec {
  /** the YAML key */
  key: string;
  kind: RunKeyKind;
  /** the `train` flag it sets (camelCase field of the parsed flags) */
  field?: string;
  /** the register() arg it sets */
  lora?: string;
  values?: readonly string[];
  min?: number;
  above?: number;
  below?: number;
}

/** Every key a run config may hold. */
export const RUN_CONFIG_KEYS: readonly RunKeySpec[] = [
  { key: 'base_model', kind: 'string', field: 'model' },
  { key: 'init_config', kind: 'string', field: 'initConfig' },
  { key: 'data', kind: 'string', field: 'data' },
  { key: 'val', kind: 'string', field: 'val' },
  // axolotl's key for where the tokenizer is (here: a from-scratch run's tokenizer folder)
  { key: 'tokenizer_config', kind: 'string', field: 'tokenizer' },
  { key: 'datasets', kind: 'datasets', field: 'datasets' },
  { key: 'adapter', kind: 'adapter' },
  { key: 'lora_r', kind: 'integer', lora: 'r' },
  { key: 'lora_alpha', kind: 'number', lora: 'alpha' },
  { key: 'lora_dropout', kind: 'number', lora: 'dropout' },
  { key: 'lora_target_modules', kind: 'strings', lora: 'targets' },
  { key: 'lora_target_linear', kind: 'boolean' },
  { key: 'sequence_len', kind: 'integer', min: 1, field: 'seq' },
  { key: 'sample_packing', kind: 'boolean', field: 'samplePacking' },
  { key: 'train_on_inputs', kind: 'boolean', field: 'trainOnInputs' },
  { key: 'micro_batch_size', kind: 'integer', min: 1, field: 'batch' },
  { key: 'gradient_accumulation_steps', kind: 'integer', min: 1, field: 'gradAccum' },
  { key: 'num_epochs', kind: 'number', above: 0, field: 'numEpochs' },
  { key: 'max_steps', kind: 'integer', min: 1, field: 'steps' },
  { key: 'learning_rate', kind: 'number', above: 0, field: 'lr' },
  { key: 'lr_scheduler', kind: 'enum', values: LR_SCHEDULERS, field: 'lrScheduler' },
  { key: 'warmup_steps', kind: 'integer', min: 0, field: 'warmupSteps' },
  { key: 'warmup_ratio', kind: 'number', min: 0, below: 1, field: 'warmupRatio' },
  { key: 'max_grad_norm', kind: 'number', above: 0, field: 'maxGradNorm' },
  // axolotl's key; transformers' TrainingArguments(gradient_checkpointing=True)
  { key: 'gradient_checkpointing', kind: 'boolean', field: 'gradientCheckpointing' },
  { key: 'val_set_size', kind: 'number', min: 0, below: Infinity, field: 'valSetSize' },
  { key: 'eval_steps', kind: 'integer', min: 1, field: 'evalEvery' },
  { key: 'save_steps', kind: 'integer', min: 1, field: 'saveEvery' },
  { key: 'save_total_limit', kind: 'integer', min: 1, field: 'saveTotalLimit' },
  { key: 'output_dir', kind: 'string', field: 'out' },
  { key: 'seed', kind: 'integer', min: 0, field: 'seed' },
  // the CLI's BACKENDS (src/cli/backend.ts, which src/train does not import); a spec keeps them equal
  { key: 'backend', kind: 'enum', values: ['cpu', 'wasm', 'webgpu'], field: 'backend' },
  { key: 'metrics', kind: 'string', field: 'metrics' },
  { key: 'stop_on_no_gradient', kind: 'boolean', field: 'stopOnNoGradient' },
];

/** Other spellings a user may bring (the flags', HF TrainingArguments'), for "did you mean". */
const RUN_CONFIG_ALIASES: Readonly<Record<string, string>> = {
  lr: 'learning_rate', model: 'base_model', out: 'output_dir', steps: 'max_steps', epochs: 'num_epochs',
  batch: 'micro_batch_size', batch_size: 'micro_batch_size', per_device_train_batch_size: 'micro_batch_size',
  grad_accum: 'gradient_accumulation_steps', seq: 'sequence_len', max_seq_length: 'sequence_len',
  num_train_epochs: 'num_epochs', lr_scheduler_type: 'lr_scheduler', rank: 'lora_r', r: 'lora_r', alpha: 'lora_alpha',
  target_modules: 'lora_target_modules', lora_targets: 'lora_target_modules',
};

/** lora.* paths of register()'s args → the YAML keys that set them. */
const LORA_KEY_OF: Readonly<Record<string, string>> = Object.fromEntries(
    RUN_CONFIG_KEYS.filter(s => s.lora !== undefined).map(s => [`lora.${s.lora}`, s.key]));

const DATASET_KEYS = ['path', 'type', 'field'];

function checkDatasets(problems: string[], value: unknown): DatasetSpec[] | undefined {
  if (!Array.isArray(value) || value.length === 0) {
    problems.push(`datasets: expected a non-empty list of {path, type, field?} but got ${describeValue(value)}`);
    return undefined;
  }
  const out: DatasetSpec[] = [];
  value.forEach((d, i) => {
    if (d === null || typeof d !== 'object' || Array.isArray(d)) {
      problems.push(`datasets[${i}]: expected {path, type, field?} but got ${describeValue(d)}`);
      return;
    }
    const entry = d as Record<string, unknown>;
    for (const key of Object.keys(entry)) {
      if (DATASET_KEYS.includes(key)) continue;
      const hint = suggestName(key, DATASET_KEYS);
      problems.push(`datasets[${i}].${key}: unknown key (expected one of ${DATASET_KEYS.join(', ')})${hint ? `; did you mean '${hint}'?` : ''}`);
    }
    for (const key of ['path', 'type']) {
      if (typeof entry[key] !== 'string' || (entry[key] as string).length === 0) {
        problems.push(`datasets[${i}].${key}: expected a non-empty string but got ${describeValue(entry[key])}`);
      }
    }
    const type = entry['type'];
    if (typeof type === 'string' && type.length > 0 && !DATASET_TYPES.includes(type as DatasetType)) {
      const hint = suggestName(type, DATASET_TYPES);
      problems.push(`datasets[${i}].type: expected one of ${DATASET_TYPES.join(', ')} but got '${type}'${hint ? `; did you mean '${hint}'?` : ''}`);
    }
    if (entry['field'] !== undefined && typeof entry['field'] !== 'string') {
      problems.push(`datasets[${i}].field: expected a string but got ${describeValue(entry['field'])}`);
    }
    out.push({ path: entry['path'] as string, type: type as DatasetType, ...(entry['field'] === undefined ? {} : { field: entry['field'] as string }) });
  });
  return out;
}

/**
 * A parsed run config → the `train` flag values it sets (camelCase, e.g. {model, lr, gradAccum,
 * loraRank}), or a RunConfigError with every problem. `path` names the file in messages.
 *
 * ```js
 * runConfigFlags(parse('base_model: my-model\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlearning_rate: 1e-3'), 'run.yaml');
 * // {model: 'my-model', lr: 0.001, 'lora-rank': 8, 'lora-alpha': 16}
 * ```
 */
export function runConfigFlags(config: unknown, path: string): Record<string, unknown> {
  if (config === null || typeof config !== 'object' || Array.isArray(config)) {
    throw new RunConfigError(path, [`expected a mapping of keys (base_model, datasets, ...) but got ${describeValue(config)}`]);
  }
  const values = config as Record<string, unknown>;
  const problems: string[] = [];
  const known = RUN_CONFIG_KEYS.map(s => s.key);
  for (const key of Object.keys(values)) {
    if (known.includes(key)) continue;
    const hint = suggestName(key, known, RUN_CONFIG_ALIASES);
    problems.push(`${key}: unknown key${hint ? `; did you mean '${hint}'?` : ` (the keys: ${known.join(', ')})`}`);
  }
  const flags: Record<string, unknown> = {};
  const lora: Record<string, unknown> = {};
  const collector = new Collector();
  for (const spec of RUN_CONFIG_KEYS) {
    const value = values[spec.key];
    if (value === undefined || (value === null && spec.kind !== 'adapter')) continue;
    let checked: unknown;
    switch (spec.kind) {
      case 'string':
        if (typeof value === 'string' && value.length > 0) checked = value;
        else problems.push(`${spec.key}: expected a non-empty string but got ${describeValue(value)}`);
        break;
      case 'datasets':
        checked = checkDatasets(problems, value);
        break;
      case 'adapter':
        if (value === 'lora' || value === null) checked = value;
        else problems.push(`adapter: expected 'lora' or null (full fine-tuning) but got ${describeValue(value)}`);
        break;
      case 'strings':
        // a list or one string; the names themselves are register()'s to check
        checked = typeof value === 'string' ? [value] : value;
        break;
      default:
        if (spec.lora !== undefined) {
          checked = value;  // register()'s schema checks it below
        } else {
          checked = checkScalar(collector, { path: spec.key, kind: spec.kind, values: spec.values, min: spec.min,
            above: spec.above, below: spec.below, description: '' }, value);
        }
    }
    if (checked === undefined) continue;
    if (spec.lora !== undefined) lora[spec.lora] = checked;
    else if (spec.field !== undefined) flags[spec.field] = checked;
  }
  if (values['lora_target_linear'] === true) {
    // axolotl's lora_target_linear: every linear layer, PEFT's 'all-linear'
    lora['targets'] = [...((lora['targets'] as string[] | undefined) ?? []), 'all-linear'];
  }
  problems.push(...collector.problems.map(p => p.message));
  const adapter = values['adapter'];
  const loraKeys = RUN_CONFIG_KEYS.filter(s => (s.lora !== undefined || s.key === 'lora_target_linear') && values[s.key] !== undefined);
  if (adapter === 'lora') {
    const checked = collectArgProblems({ lora });
    problems.push(...checked.problems.map((p: PluginArgsProblem) => {
      const key = LORA_KEY_OF[p.arg] ?? LORA_KEY_OF[p.arg.replace(/\[\d+\]$/, '')];
      return key === undefined ? p.message : `${key}: ${p.message}`;
    }));
    for (const [name, value] of Object.entries(lora)) flags[`lora.${name}`] = value;
  } else if (loraKeys.length > 0) {
    problems.push(`${loraKeys.map(s => s.key).join(', ')}: need adapter: lora (without it every weight is trained)`);
  }
  if (values['warmup_steps'] !== undefined && values['warmup_ratio'] !== undefined) {
    problems.push('warmup_steps, warmup_ratio: give one of them, not both');
  }
  if (problems.length > 0) throw new RunConfigError(path, problems);
  return flags;
}

/**
 * Reads and checks a run config file (see runConfigFlags).
 *
 * ```js
 * const flags = await readRunConfig('run.yaml');
 * ```
 */
export async function readRunConfig(path: string): Promise<Record<string, unknown>> {
  const text = await readTextFile(path, 'the run config');
  let config: unknown;
  try {
    config = parse(text);
  } catch (e) {
    throw new RunConfigError(path, [`not valid YAML: ${(e as Error).message.split('\n')[0]}`]);
  }
  return runConfigFlags(config, path);
}
