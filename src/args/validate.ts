/**
 * Checks plugin args against the schema (types, ranges, unknown keys, cross-field rules) and
 * fills in the defaults. Every problem is collected; the caller throws them together. The rules
 * that need the models (routing against E, LoRA rank against the weights) are in
 * src/patch/model_rules.ts.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { EXPERT_LORA_TARGETS } from '../layers/sparse_moe.js';
import { isTargetSpelling } from '../patch/linear_targets.js';
import { PluginArgsError, type PluginArgsProblem } from './errors.js';
import {
  ARG_ALIASES, EXPERT_DROPOUT_NEEDS_SPLIT, childSpecs, keyOf,
  type ArgSpec, type ModelOrLayer, type ResolvedLoRAArgs, type ResolvedPluginArgs,
} from './schema.js';
import { suggestName } from './suggest.js';

/** How a value reads in a message: strings quoted, the type of odd values named. */
export function describeValue(value: unknown): string {
  if (value === undefined) return 'nothing';
  if (value === null) return 'null';
  if (typeof value === 'string') return `'${value}'`;
  if (typeof value === 'number') return Number.isNaN(value) ? 'NaN' : String(value);
  if (typeof value === 'boolean') return String(value);
  if (value instanceof tf.Tensor) return `a ${value.dtype} tensor of shape [${value.shape}]`;
  if (Array.isArray(value)) return value.length <= 6 ? `[${value.map(describeValue).join(', ')}]` : `an array of length ${value.length}`;
  if (typeof value === 'function') return 'a function';
  const name = (value as object).constructor?.name;
  return name && name !== 'Object' ? `a ${name}` : 'an object';
}

function withType(value: unknown): string {
  const d = describeValue(value);
  return typeof value === 'string' || typeof value === 'number' || typeof value === 'boolean' ? `${d} (${typeof value})` : d;
}

const ADAPTER_NAME = /^[A-Za-z0-9_-]+$/;

/** What a spec expects, as the message says it. */
export function expectation(spec: ArgSpec): string {
  switch (spec.kind) {
    case 'enum': return `one of ${spec.values!.map(v => `'${v}'`).join(', ')}`;
    case 'boolean': return 'a boolean';
    case 'integer': return `an integer >= ${spec.min}`;
    case 'number': {
      if (spec.above !== undefined) return `a finite number > ${spec.above}`;
      return `a number in [${spec.min}, ${spec.below})`;
    }
    case 'name': return "a name of letters, digits, '_' or '-'";
    case 'targets': return `a non-empty list of ${spec.values!.map(v => `'${v}'`).join(', ')} or module names ending in one`;
    case 'pattern': return `an object {module-name key: ${spec.min !== undefined ? `an integer >= ${spec.min}` : `a number > ${spec.above}`}}`;
    case 'models': return 'an array of tf.LayersModel or tf.layers.Layer';
    case 'object': return `an object {${childSpecs(spec.path).map(c => keyOf(c.path) + (c.required ? '' : '?')).join(', ')}}`;
  }
}

export class Collector {
  readonly problems: PluginArgsProblem[] = [];
  add(arg: string, message: string): void {
    this.problems.push({ arg, message });
  }
  expected(spec: ArgSpec, value: unknown, extra = ''): void {
    this.add(spec.path, `${spec.path}: expected ${expectation(spec)} but got ${withType(value)}${extra}`);
  }
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof tf.Tensor);
}

function checkUnknownKeys(c: Collector, parent: string, obj: Record<string, unknown>): void {
  const known = childSpecs(parent).map(s => keyOf(s.path));
  for (const key of Object.keys(obj)) {
    if (known.includes(key)) continue;
    const path = parent ? `${parent}.${key}` : key;
    const hint = suggestName(key, known, ARG_ALIASES);
    c.add(path, `${path}: unknown argument (expected one of ${known.join(', ')})` +
        (hint ? `; did you mean '${parent ? `${parent}.` : ''}${hint}'?` : ''));
  }
}

/** One scalar arg (of any spec table: the run config uses it too): its value if valid (or the default when absent), undefined after a problem. */
export function checkScalar(c: Collector, spec: ArgSpec, value: unknown): unknown {
  if (value === undefined) {
    if (spec.required) {
      c.add(spec.path, `${spec.path}: expected ${expectation(spec)} but got nothing (required when '${spec.path.split('.')[0]}' is given)`);
      return undefined;
    }
    return Array.isArray(spec.default) ? [...spec.default] : spec.default;
  }
  switch (spec.kind) {
    case 'enum':
      if (typeof value === 'string' && spec.values!.includes(value)) return value;
      break;
    case 'boolean':
      if (typeof value === 'boolean') return value;
      break;
    case 'integer':
      if (typeof value === 'number' && Number.isInteger(value) && value >= spec.min!) return value;
      break;
    case 'number':
      if (typeof value === 'number' && Number.isFinite(value) &&
          (spec.min === undefined || value >= spec.min) && (spec.above === undefined || value > spec.above) &&
          (spec.below === undefined || value < spec.below)) {
        return value;
      }
      break;
    case 'name':
      if (typeof value === 'string' && ADAPTER_NAME.test(value)) return value;
      break;
    case 'targets':
      return checkTargets(c, spec, value);
    case 'pattern':
      return checkPattern(c, spec, value);
    case 'models':
      return checkModels(c, spec, value);
    case 'object':
      throw new Error(`checkScalar: '${spec.path}' is an object arg`);
  }
  c.expected(spec, value);
  return undefined;
}

function checkPattern(c: Collector, spec: ArgSpec, value: unknown): Record<string, number> | undefined {
  if (value === undefined) return { ...(spec.default as Record<string, number>) };
  if (!isPlainObject(value)) {
    c.expected(spec, value);
    return undefined;
  }
  let ok = true;
  for (const [key, v] of Object.entries(value)) {
    let regexOk = key.length > 0;
    try { new RegExp(key); } catch { regexOk = false; }
    if (!regexOk) {
      ok = false;
      c.add(spec.path, `${spec.path}: expected keys that are regular expressions but got ${describeValue(key)}`);
    }
    const good = spec.min !== undefined ? typeof v === 'number' && Number.isInteger(v) && v >= spec.min :
      typeof v === 'number' && Number.isFinite(v) && v > spec.above!;
    if (!good) {
      ok = false;
      c.add(spec.path, `${spec.path}[${JSON.stringify(key)}]: expected ${spec.min !== undefined ? `an integer >= ${spec.min}` : `a number > ${spec.above}`} but got ${withType(v)}`);
    }
  }
  return ok ? { ...value } as Record<string, number> : undefined;
}

function checkTargets(c: Collector, spec: ArgSpec, value: unknown): string[] | undefined {
  if (!Array.isArray(value) || value.length === 0) {
    c.expected(spec, value);
    return undefined;
  }
  let ok = true;
  value.forEach((t, i) => {
    if (typeof t === 'string' && isTargetSpelling(t)) return;
    ok = false;
    const hint = typeof t === 'string' ? suggestName(t.slice(t.lastIndexOf('.') + 1), spec.values!) ?? suggestName(t, spec.values!) : undefined;
    c.add(spec.path, `${spec.path}[${i}]: expected one of ${spec.values!.map(v => `'${v}'`).join(', ')} ` +
        `(module names may have a path before the projection: 'self_attn.q_proj') but got ` +
        `${withType(t)}${hint ? `; did you mean '${hint}'?` : ''}`);
  });
  const dup = value.find((t, i) => value.indexOf(t) !== i);
  if (dup !== undefined) {
    ok = false;
    c.add(spec.path, `${spec.path}: expected each target once but got ${describeValue(dup)} ` +
        `${value.filter(t => t === dup).length} times`);
  }
  return ok ? [...value] as string[] : undefined;
}

function isModelOrLayer(v: unknown): v is ModelOrLayer {
  return v instanceof tfl.LayersModel || v instanceof tfl.layers.Layer;
}

function checkModels(c: Collector, spec: ArgSpec, value: unknown): ModelOrLayer[] | undefined {
  if (!Array.isArray(value)) {
    c.expected(spec, value);
    return undefined;
  }
  let ok = true;
  value.forEach((m, i) => {
    if (isModelOrLayer(m)) return;
    ok = false;
    c.add(spec.path, `models[${i}]: expected a tf.LayersModel or a tf.layers.Layer but got ${withType(m)}`);
  });
  return ok ? [...value] : undefined;
}

/** The args as far as they are valid: a field is undefined when its value had a problem. */
export type PartialResolvedArgs = {
  [K in keyof ResolvedPluginArgs]?: K extends 'lora' ? Partial<ResolvedLoRAArgs> | null : ResolvedPluginArgs[K];
};

/**
 * Every schema problem of `args` (not the rules against the models), and the args as far as they
 * are valid, defaults filled in.
 */
export function collectArgProblems(args: unknown): { problems: PluginArgsProblem[]; resolved: PartialResolvedArgs } {
  const c = new Collector();
  const resolved: Record<string, unknown> = {};
  if (args === undefined) args = {};
  if (!isPlainObject(args)) {
    c.add('args', `args: expected an object {${childSpecs('').map(s => `${keyOf(s.path)}?`).join(', ')}} but got ${withType(args)}`);
    return { problems: c.problems, resolved: {} };
  }
  checkUnknownKeys(c, '', args);
  for (const spec of childSpecs('')) {
    const key = keyOf(spec.path);
    if (spec.kind !== 'object') {
      resolved[key] = checkScalar(c, spec, args[key]);
      continue;
    }
    const value = args[key];
    if (value === undefined || value === null) {
      resolved[key] = null;
      continue;
    }
    if (!isPlainObject(value)) {
      c.add(spec.path, `${spec.path}: expected ${expectation(spec)}, or null for none, but got ${withType(value)}`);
      continue;
    }
    checkUnknownKeys(c, spec.path, value);
    const sub: Record<string, unknown> = {};
    for (const child of childSpecs(spec.path)) sub[keyOf(child.path)] = checkScalar(c, child, value[keyOf(child.path)]);
    resolved[key] = sub;
  }
  checkCrossFields(c, resolved as PartialResolvedArgs);
  return { problems: c.problems, resolved: resolved as PartialResolvedArgs };
}

/** Rules between fields of the args themselves. */
function checkCrossFields(c: Collector, args: PartialResolvedArgs): void {
  const lora = args.lora;
  if (lora == null || lora.dropout === undefined || lora.dropout === 0) return;
  // only when the targets are known: the rule depends on them
  if (lora.targets === undefined || args.loraMode !== 'materialize') return;
  const experts = lora.targets.filter(t => (EXPERT_LORA_TARGETS as readonly string[]).includes(t));
  if (experts.length > 0) {
    c.add('loraMode', `loraMode: expected 'split' or 'auto' with lora.dropout ${lora.dropout} on expert targets ` +
        `(${experts.join(', ')}) but got 'materialize': ${EXPERT_DROPOUT_NEEDS_SPLIT}`);
  }
}

/**
 * Validates args against the schema alone (no models) and returns them with every default filled
 * in; throws one PluginArgsError listing every problem.
 *
 * ```js
 * validatePluginArgs({lora: {r: 8, alpha: 16}});
 * // {expertKernel: 'fused', loraMode: 'auto', strict: false, models: [],
 * //  lora: {r: 8, alpha: 16, dropout: 0, rsLoRA: false, targets: ['experts.gate_up', 'experts.down'], adapterName: 'default'}}
 * ```
 */
export function validatePluginArgs(args: unknown): ResolvedPluginArgs {
  const { problems, resolved } = collectArgProblems(args);
  if (problems.length > 0) throw new PluginArgsError(problems);
  return resolved as ResolvedPluginArgs;
}
