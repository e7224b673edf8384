/**
 * Where one training step spends its work (issue 15: 1.3 s per step on an H200 where the experts'
 * FLOPs need ~0.12 s): per phase (forward, backward, optimizer, the loss read), the tfjs kernels
 * run (by name), the GPU programs dispatched (webgpu: by program class), the GPU→host reads
 * (backend read/readSync; webgpu: buffers mapped with mapAsync), the queue submits, and the host
 * time the phase's JS took. On webgpu with timestamp-query, a second step can be timed on the GPU:
 * milliseconds per program class.
 *
 * Counting wraps methods of the engine and the backend instance for the length of one step and
 * restores them after; it does not change what the step computes.
 */
import * as tf from '@tensorflow/tfjs-core';
import { SUBMIT_FLOPS_FLAG } from '../../src/backends/webgpu/kernels.js';
import { ownDispatchListeners } from '../../src/backends/webgpu/own_dispatch.js';
import { fail } from '../../src/ops/validate.js';

/** The phases of one step, in order. */
export const STEP_PHASES = ['forward', 'backward', 'optimizer', 'lossRead'] as const;
export type StepPhase = typeof STEP_PHASES[number];

/** What one phase did. */
export interface PhaseCounts {
  /** wall ms of the phase on the host (recording only, unless the phase waits on the GPU: lossRead) */
  hostMs: number;
  /** tfjs kernels run through the engine (nested ones, gradients' too) */
  kernels: number;
  /** GPU programs recorded (webgpu's runWebGPUProgram; 0 elsewhere) */
  dispatches: number;
  /** backend.read / readSync calls (a host read of a tensor's values; may hit a cached copy) */
  reads: number;
  /** buffers mapped back to the host (webgpu's getBufferData: a real GPU→host copy and wait) */
  mapReads: number;
  /** queue submits (webgpu) */
  submits: number;
  /** tensors whose values went from the host to the GPU (webgpu's uploadToGPU of a tensor made from values) */
  uploads: number;
  /** GPU buffers created (webgpu: the pool had none free of that size and usage, or an upload's staging buffer) */
  bufferCreates: number;
}

/** One profiled step. */
export interface StepProfile {
  backend: string;
  phases: Record<StepPhase, PhaseCounts>;
  /** the whole step's counts */
  total: PhaseCounts;
  /** per phase: tfjs kernel name → how many times it ran */
  kernelCounts: Record<StepPhase, Record<string, number>>;
  /** per phase: program class → dispatches (webgpu) */
  programCounts: Record<StepPhase, Record<string, number>>;
  /**
   * program class → {count, ms} from GPU timestamps of a second, separately timed step; null when
   * the backend has none (not webgpu, or no timestamp-query: Mesa's software adapter)
   */
  gpuMsByProgram: Record<string, { count: number; ms: number }> | null;
  /** Σ gpuMsByProgram ms */
  gpuMs: number | null;
  /**
   * the same timed step by program class, output shape and shader key ("SubgroupMatrixMatMulProgram
   * [2048,2048] moeSubgroupMatMul_rows_..."): which products of a class cost what (a class serves
   * experts, dense projections and the LM head alike); null where gpuMsByProgram is, or when the
   * recorded programs and the timestamps do not line up one to one
   */
  gpuMsBySite: Record<string, { count: number; ms: number }> | null;
  /**
   * webgpu: host ms per phase of another step recorded with no submit before the loss read
   * (tfjs's WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE and SUBMIT_FLOPS_FLAG out of reach), so forward,
   * backward and optimizer are the host's recording alone and lossRead is the GPU's work that was
   * left when recording ended; null elsewhere
   */
  recordOnlyMs: Record<StepPhase, number> | null;
  /**
   * webgpu, with `recordRepeats` > 1: the record-only step's samples per phase, wall ms and the
   * process's CPU ms (process.cpuUsage: on a shared host less noisy than wall time; nothing runs on
   * the GPU's threads while recording); recordOnlyMs is then the median wall ms; null elsewhere
   */
  recordOnlySamples: { wallMs: Record<StepPhase, number[]>; cpuMs: Record<StepPhase, number[]> } | null;
}

const zeroCounts = (): PhaseCounts => ({ hostMs: 0, kernels: 0, dispatches: 0, reads: 0, mapReads: 0, submits: 0, uploads: 0, bufferCreates: 0 });

type AnyFn = (...args: unknown[]) => unknown;

/**
 * Counts what runs while installed: `install()` wraps the engine's runKernel and the backend's
 * program, read and submit methods; `uninstall()` puts the originals back.
 */
export class StepCounter {
  /** the counts since the last reset */
  current: PhaseCounts = zeroCounts();
  kernelCounts: Record<string, number> = {};
  programCounts: Record<string, number> = {};
  private restore: Array<() => void> = [];

  install(): void {
    if (this.restore.length > 0) fail('StepCounter.install', 'the counter is already installed');
    const engine = tf.engine() as unknown as Record<string, AnyFn>;
    const backend = tf.backend() as unknown as Record<string, AnyFn>;
    const wrap = (target: Record<string, AnyFn>, method: string, count: (args: unknown[]) => void) => {
      const original = target[method];
      if (typeof original !== 'function') return;
      const own = Object.prototype.hasOwnProperty.call(target, method);
      target[method] = function (this: unknown, ...args: unknown[]) {
        count(args);
        return original.apply(this, args);
      };
      this.restore.push(() => {
        if (own) target[method] = original;
        else delete target[method];
      });
    };
    wrap(engine, 'runKernel', args => {
      const name = String(args[0]);
      this.kernelCounts[name] = (this.kernelCounts[name] ?? 0) + 1;
      this.current.kernels++;
    });
    wrap(backend, 'runWebGPUProgram', args => {
      const name = (args[0] as { constructor: { name: string } }).constructor.name;
      this.programCounts[name] = (this.programCounts[name] ?? 0) + 1;
      this.current.dispatches++;
    });
    // own pipelines (the grouped Adam, the weight gradients' pair sums) record their dispatches outside runWebGPUProgram
    const own = (program: string) => {
      this.programCounts[program] = (this.programCounts[program] ?? 0) + 1;
      this.current.dispatches++;
    };
    ownDispatchListeners.add(own);
    this.restore.push(() => ownDispatchListeners.delete(own));
    // one read of a tensor, whichever method the caller used: cpu's read calls its readSync
    // synchronously, which is not counted again
    let reading = false;
    const read = backend['read'];
    if (typeof read === 'function') {
      const own = Object.prototype.hasOwnProperty.call(backend, 'read');
      backend['read'] = function (this: unknown, ...args: unknown[]) {
        reading = true;
        try {
          return read.apply(this, args);
        } finally {
          reading = false;
        }
      };
      this.restore.push(() => {
        if (own) backend['read'] = read;
        else delete backend['read'];
      });
    }
    wrap(backend, 'read', () => this.current.reads++);
    wrap(backend, 'readSync', () => { if (!reading) this.current.reads++; });
    wrap(backend, 'getBufferData', () => this.current.mapReads++);
    wrap(backend, 'submitQueue', () => this.current.submits++);
    const tensorMap = backend['tensorMap'] as unknown as { get(id: unknown): { values?: unknown; resource?: unknown } | undefined } | undefined;
    wrap(backend, 'uploadToGPU', args => {
      const data = tensorMap?.get(args[0]);
      if (data != null && data.resource == null && data.values != null) this.current.uploads++;
    });
    const device = backend['device'] as unknown as Record<string, AnyFn> | undefined;
    if (device != null) wrap(device, 'createBuffer', () => this.current.bufferCreates++);
  }

  /** Starts counting afresh (the next phase). */
  reset(): void {
    this.current = zeroCounts();
    this.kernelCounts = {};
    this.programCounts = {};
  }

  uninstall(): void {
    for (const undo of this.restore.reverse()) undo();
    this.restore = [];
  }
}

/** What a profiled step runs: the gradients of `loss` with respect to `variables`, then `apply`. */
export interface StepFunctions {
  /** the loss of the step's batch (called inside the gradient tape) */
  loss: () => tf.Scalar;
  variables: tf.Variable[];
  /** the optimizer's update, given the gradients in the variables' order (e.g. Adam.apply at the step's lr) */
  apply: (grads: tf.Tensor[]) => void;
}

/**
 * One training step (tf.variableGrads, then the update), with `mark` called where each phase ends:
 * where the loss function returns, so forward and backward are told apart, after the gradients,
 * after the update and after the loss was read. Returns the loss.
 */
export async function trainingStep(step: StepFunctions, mark: (phase: StepPhase) => void = () => {}): Promise<number> {
  const { value, grads } = tf.variableGrads(() => {
    const loss = step.loss();
    mark('forward');
    return loss;
  }, step.variables);
  mark('backward');
  const list = step.variables.map(v => grads[v.name]);
  step.apply(list);
  tf.dispose(list);
  mark('optimizer');
  const [loss] = await value.data();
  value.dispose();
  mark('lossRead');
  return loss;
}

/**
 * Runs one step with counters, on webgpu a second one recorded without submits (recordOnlyMs) and,
 * where the backend times programs on the GPU, a third under backend.time; returns the profile and
 * the steps' losses. Every step trains: the caller's variables and optimizer move on by 1 to 3 steps.
 *
 * ```js
 * const adam = new Adam(variables);
 * const {profile} = await profileTrainingStep({loss: () => nextTokenLoss(model, ids), variables, apply: g => adam.apply(g, 1e-3)});
 * profile.phases.optimizer.dispatches;
 * ```
 */
export async function profileTrainingStep(step: StepFunctions, options: { gpuTimes?: boolean; recordRepeats?: number } = {}):
    Promise<{ profile: StepProfile; losses: number[] }> {
  const counter = new StepCounter();
  const phases = Object.fromEntries(STEP_PHASES.map(p => [p, zeroCounts()])) as Record<StepPhase, PhaseCounts>;
  const kernelCounts = Object.fromEntries(STEP_PHASES.map(p => [p, {}])) as StepProfile['kernelCounts'];
  const programCounts = Object.fromEntries(STEP_PHASES.map(p => [p, {}])) as StepProfile['programCounts'];
  const sortedByCount = (counts: Record<string, number>) =>
    Object.fromEntries(Object.entries(counts).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0])));
  let since = performance.now();
  const losses: number[] = [];
  counter.install();
  try {
    losses.push(await trainingStep(step, phase => {
      const now = performance.now();
      phases[phase] = { ...counter.current, hostMs: now - since };
      kernelCounts[phase] = sortedByCount(counter.kernelCounts);
      programCounts[phase] = sortedByCount(counter.programCounts);
      counter.reset();
      since = now;
    }));
  } finally {
    counter.uninstall();
  }
  let recordOnlyMs: StepProfile['recordOnlyMs'] = null;
  let recordOnlySamples: StepProfile['recordOnlySamples'] = null;
  if (tf.getBackend() === 'webgpu') {
    const flags = { WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE: tf.env().getNumber('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE'), [SUBMIT_FLOPS_FLAG]: tf.env().getNumber(SUBMIT_FLOPS_FLAG) };
    tf.env().set('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE', Number.MAX_SAFE_INTEGER);
    tf.env().set(SUBMIT_FLOPS_FLAG, Infinity);
    const samples = () => Object.fromEntries(STEP_PHASES.map(p => [p, [] as number[]])) as Record<StepPhase, number[]>;
    const wallMs = samples();
    const cpuMs = samples();
    const cpuNow = () => { const { user, system } = process.cpuUsage(); return (user + system) / 1000; };
    try {
      for (let repeat = 0; repeat < Math.max(1, options.recordRepeats ?? 1); repeat++) {
        let from = performance.now();
        let cpuFrom = cpuNow();
        losses.push(await trainingStep(step, phase => {
          const now = performance.now();
          const cpu = cpuNow();
          wallMs[phase].push(now - from);
          cpuMs[phase].push(cpu - cpuFrom);
          from = now;
          cpuFrom = cpu;
        }));
      }
    } finally {
      for (const [flag, value] of Object.entries(flags)) tf.env().set(flag, value);
    }
    const median = (xs: number[]) => { const s = [...xs].sort((a, b) => a - b); return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };
    recordOnlyMs = Object.fromEntries(STEP_PHASES.map(p => [p, median(wallMs[p])])) as Record<StepPhase, number>;
    if ((options.recordRepeats ?? 1) > 1) recordOnlySamples = { wallMs, cpuMs };
  }

  const total = zeroCounts();
  for (const p of STEP_PHASES) for (const k of Object.keys(total) as Array<keyof PhaseCounts>) total[k] += phases[p][k];

  let gpuMsByProgram: StepProfile['gpuMsByProgram'] = null;
  let gpuMsBySite: StepProfile['gpuMsBySite'] = null;
  const backend = tf.backend() as unknown as { supportTimestampQuery?: boolean };
  if ((options.gpuTimes ?? true) && tf.getBackend() === 'webgpu' && backend.supportTimestampQuery === true) {
    // the step's recording under backend.time: every program gets a timestamp pair (and its own
    // pass), so this step's wall time means nothing; only the GPU ms per program are kept
    let value: tf.Scalar | undefined;
    // each program as it is recorded, in the order tfjs times them (own pipelines' passes too)
    const sites: string[] = [];
    const webgpu = tf.backend() as unknown as Record<string, AnyFn>;
    const run = webgpu['runWebGPUProgram'];
    webgpu['runWebGPUProgram'] = function (this: unknown, ...args: unknown[]) {
      const program = args[0] as { constructor: { name: string }; outputShape: number[]; shaderKey?: string };
      sites.push(`${program.constructor.name} [${program.outputShape.join(',')}] ${(program.shaderKey ?? '').slice(0, 72)}`);
      return run.apply(this, args);
    };
    const ownSite = (program: string) => { sites.push(program); };
    ownDispatchListeners.add(ownSite);
    const timing = await tf.time(() => {
      const { value: v, grads } = tf.variableGrads(step.loss, step.variables);
      const list = step.variables.map(x => grads[x.name]);
      step.apply(list);
      tf.dispose(list);
      value = v;
    }).finally(() => {
      delete webgpu['runWebGPUProgram'];
      if (webgpu['runWebGPUProgram'] !== run) webgpu['runWebGPUProgram'] = run;
      ownDispatchListeners.delete(ownSite);
    }) as unknown as { getExtraProfileInfo?: () => unknown };
    losses.push((await value!.data())[0]);
    value!.dispose();
    const times = programTimes(timing.getExtraProfileInfo?.());
    gpuMsByProgram = {};
    for (const { name, ms } of times) {
      const entry = gpuMsByProgram[name] ??= { count: 0, ms: 0 };
      entry.count++;
      entry.ms += ms;
    }
    if (sites.length === times.length && times.every((t, i) => sites[i].startsWith(t.name))) {
      gpuMsBySite = {};
      times.forEach(({ ms }, i) => {
        const entry = gpuMsBySite![sites[i]] ??= { count: 0, ms: 0 };
        entry.count++;
        entry.ms += ms;
      });
    }
  }
  const gpuMs = gpuMsByProgram === null ? null : Object.values(gpuMsByProgram).reduce((s, e) => s + e.ms, 0);
  return {
    profile: {
      backend: tf.getBackend(), phases, total, recordOnlyMs, recordOnlySamples, kernelCounts, programCounts, gpuMsByProgram, gpuMs, gpuMsBySite,
    },
    losses,
  };
}

/**
 * The per-program GPU times of tfjs-webgpu's time() result: its getExtraProfileInfo() returns them
 * joined into one string, 'MatMulPackedProgram2: 0.12, ReduceProgram2: 0.01' (4.22), not the
 * array its typings suggest; both are read.
 *
 * ```js
 * programTimes('A: 1.5, B: 0.25');  // [{name: 'A', ms: 1.5}, {name: 'B', ms: 0.25}]
 * ```
 */
export function programTimes(info: unknown): Array<{ name: string; ms: number }> {
  if (Array.isArray(info)) return info.map(e => ({ name: String(e.name), ms: Number(e.ms) }));
  if (typeof info !== 'string' || info.length === 0) return [];
  return info.split(', ').map(part => {
    const colon = part.lastIndexOf(': ');
    return { name: part.slice(0, colon), ms: Number(part.slice(colon + 2)) };
  });
}
