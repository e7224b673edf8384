/**
 * LoRA on the plain linear projections of a layer (attention q/k/v/o, the dense MLP's
 * gate/up/down), as PEFT's `lora.Linear` applies it:
 *
 *   y = x·Wᵀ + b + s · (dropout(x)·Aᵀ)·Bᵀ,   s = alpha / r  (alpha / √r with rsLoRA)
 *
 * with A [r, in] (PEFT's init: kaiming-uniform a = √5, i.e. U(±1/√in)) and B [out, r] = 0, the
 * base frozen. The adapter state lives on the wrapping layer (a `LinearLoRA` it owns), keyed by
 * adapter name, with per-projection r and alpha (PEFT's rank_pattern / alpha_pattern). The
 * branch is computed in `loraBranch` only and ΔW = s·B·A in `linearDeltaWeight` only: every
 * projection, merge and export go through them.
 *
 * Dropout acts on the branch input only and only in a training pass (`training` of the current
 * SequenceContext); its mask is drawn from a seed derived from the pass's `dropoutSeed` and the
 * module's full name, so a resumed run redraws the masks of the uninterrupted one.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { assertInteger, fail } from '../ops/validate.js';
import { protectString, restoreString } from './config_strings.js';
import { addToDenseWeight, denseWeightOf, packedDenseFormat } from './dense_storage.js';
import { HOST_BACKENDS } from './embedding.js';
import { releaseLayerVariables } from './layer_variables.js';
import { currentSequenceContext } from './sequence_context.js';
import { dropoutSeedOf, loraDropoutMask } from '../ops/lora/dropout.js';
import { loraBranchForward, loraLinear, type LinearLoRABranch } from '../ops/lora/linear.js';
import { denseWeightMatMul } from '../ops/packed.js';

/** The projections of RotaryAttention and SwiGLUMLP that take LoRA, under HF's module names. */
export const ATTENTION_PROJECTIONS = ['q_proj', 'k_proj', 'v_proj', 'o_proj'] as const;
export const MLP_PROJECTIONS = ['gate_proj', 'up_proj', 'down_proj'] as const;

/** r and alpha of one adapted projection. */
export interface LinearLoRAModule {
  r: number;
  alpha: number;
}

/** A linear-layer adapter as getConfig() writes it. */
export interface LinearAdapterConfig {
  name: string;
  /** projection ('q_proj') → its rank and alpha */
  modules: Record<string, LinearLoRAModule>;
  /** scaling alpha/√r instead of alpha/r */
  rsLoRA?: boolean;
  /** PEFT's lora_dropout: probability of zeroing an element of the branch input; default 0 */
  dropout?: number;
}

interface LinearFactors {
  A: tfl.LayerVariable;
  B: tfl.LayerVariable;
  scaling: number;
}

interface LinearAdapterState {
  config: LinearAdapterConfig;
  factors: Record<string, LinearFactors>;
}

/** s = alpha / r, or alpha / √r with rsLoRA (PEFT's scaling). */
export function loraScaling(r: number, alpha: number, rsLoRA: boolean): number {
  return alpha / (rsLoRA ? Math.sqrt(r) : r);
}

// the mask helpers live with the ops (the router and expert ops draw masks the same way)
export { dropoutSeedOf, loraDropoutMask };

/**
 * The keep mask of one adapter's branch input in this pass (0 or 1/(1 − p), [N, in]), or
 * undefined: dropout acts only in a training SequenceContext and with p > 0. `key` names the
 * module and adapter (it seeds the mask).
 */
export function branchDropoutMask(shape: [number, number], dropout: number, key: string): tf.Tensor2D | undefined {
  const context = currentSequenceContext();
  if (!(dropout > 0 && context?.training === true)) return undefined;
  const seed = context.dropoutSeed === undefined ? undefined : dropoutSeedOf(context.dropoutSeed, key);
  return loraDropoutMask(shape, dropout, seed) as tf.Tensor2D;
}

/**
 * The LoRA branch of one adapted projection: s · (dropout(x)·Aᵀ)·Bᵀ for x [N, in], A [r, in],
 * B [out, r]; dropout only when the current SequenceContext is a training pass and p > 0.
 * `key` names the module and adapter (it seeds the mask). Composed on the tape: the reference
 * that `loraLinear` (what `LinearLoRA.apply` trains with) is checked against; both compute the
 * branch with `loraBranchForward`.
 */
export function loraBranch(x: tf.Tensor2D, A: tf.Tensor2D, B: tf.Tensor2D, scaling: number,
    dropout: number, key: string): tf.Tensor2D {
  return tf.tidy(() => {
    const mask = branchDropoutMask(x.shape, dropout, key);
    const input = mask === undefined ? x : tf.mul(x, mask) as tf.Tensor2D;
    return loraBranchForward(input, A, B, scaling).branch;  // [N, out]
  });
}

/** ΔW = s·B·A [out, in] of one adapted projection. */
export function linearDeltaWeight(A: tf.Tensor2D, B: tf.Tensor2D, scaling: number): tf.Tensor2D {
  return tf.tidy(() => tf.mul(tf.matMul(B, A), scaling) as tf.Tensor2D);
}

/** What a LinearLoRA needs from the layer that owns it. */
export interface LinearLoRAOwner {
  layer: tfl.layers.Layer;
  /** the projections that may be adapted ('q_proj', ...) */
  projections: readonly string[];
  /** a projection's [out, in] weight variable */
  weight(projection: string): tfl.LayerVariable;
  /** every base variable of the layer (frozen while an adapter exists) */
  baseWeights(): tfl.LayerVariable[];
}

/**
 * The LoRA adapters of one layer's linear projections: adapters keyed by name, a list of active
 * ones, a disabled flag and merged adapters, changed through methods (PEFT's LoraLayer state).
 */
export class LinearLoRA {
  private readonly adapters = new Map<string, LinearAdapterState>();
  private pending: LinearAdapterConfig[];
  private active: string[];
  private disabled = false;
  private merged: string[] = [];
  private baseTrainable: Map<tfl.LayerVariable, boolean> | null = null;

  constructor(private readonly owner: LinearLoRAOwner, saved: LinearAdapterConfig[] = [], active?: string[]) {
    this.pending = saved.map(c => ({ ...c, modules: { ...c.modules } }));
    this.active = active ?? this.pending.map(c => c.name);
  }

  private get op(): string {
    return `${this.owner.layer.getClassName()}.addAdapter`;
  }

  private check(config: LinearAdapterConfig): void {
    const op = this.op;
    if (config == null || typeof config !== 'object') fail(op, `'config' must be {name, modules} but got ${String(config)}`);
    if (typeof config.name !== 'string' || !/^[A-Za-z0-9_-]+$/.test(config.name)) {
      fail(op, `'name' must be letters, digits, '_' or '-' but got ${JSON.stringify(config.name)}`);
    }
    if (this.names().includes(config.name)) fail(op, `an adapter named '${config.name}' already exists (adapters: ${this.names().join(', ')})`);
    const modules = Object.entries(config.modules ?? {});
    if (modules.length === 0) {
      fail(op, `'modules' must name at least one of ${this.owner.projections.map(p => `'${p}'`).join(', ')} but got ${JSON.stringify(config.modules)}`);
    }
    for (const [projection, m] of modules) {
      if (!this.owner.projections.includes(projection)) {
        fail(op, `'modules' must name projections among ${this.owner.projections.map(p => `'${p}'`).join(', ')} but got '${projection}'`);
      }
      assertInteger(op, `modules.${projection}.r`, m.r, 1);
      if (typeof m.alpha !== 'number' || !Number.isFinite(m.alpha) || m.alpha <= 0) {
        fail(op, `'modules.${projection}.alpha' must be a finite number > 0 but got ${String(m.alpha)}`);
      }
    }
    const p = config.dropout ?? 0;
    if (typeof p !== 'number' || !(p >= 0 && p < 1)) fail(op, `'dropout' must be a number in [0, 1) but got ${String(p)}`);
  }

  /** Adds an adapter (PEFT init: A ~ U(±1/√in), B = 0; 'random': B too, for tests), active at once. */
  add(config: LinearAdapterConfig, init: 'peft' | 'random' = 'peft'): void {
    this.check(config);
    const copy = { ...config, modules: { ...config.modules } };
    if (!this.owner.layer.built) this.pending.push(copy);
    else this.create(copy, init, false);
    this.active.push(config.name);
  }

  /** Creates the adapters given to the constructor; the owner calls it at the end of build(). */
  buildPending(): void {
    const pending = this.pending;
    this.pending = [];
    for (const config of pending) this.create(config, 'peft', true);
  }

  private create(config: LinearAdapterConfig, init: 'peft' | 'random', inBuild: boolean): void {
    const layer = this.owner.layer;
    const addWeight = (layer as unknown as { addWeight: tfl.layers.Layer['addWeight'] }).addWeight.bind(layer);
    // outside build() tfjs applies no name scope: scope by hand like the base weights
    const base = this.owner.weight(Object.keys(config.modules)[0]).originalName;
    const scope = !inBuild && base.startsWith(`${layer.name}/`) ? `${layer.name}/` : '';
    const factors: Record<string, LinearFactors> = {};
    for (const [projection, m] of Object.entries(config.modules)) {
      const weight = this.owner.weight(projection);
      const [out, inSize] = packedDenseFormat(weight)?.shape ?? weight.shape as number[];
      if (m.r > Math.min(out, inSize)) {
        fail(this.op, `'modules.${projection}.r' must be <= min(out, in) = ${Math.min(out, inSize)} of ${projection} [${out}, ${inSize}] but got ${m.r}`);
      }
      const bound = 1 / Math.sqrt(inSize);
      const uniform = tfl.initializers.randomUniform({ minval: -bound, maxval: bound });
      const key = `${scope}lora_${config.name}_${projection}`;
      factors[projection] = {
        A: addWeight(`${key}_A`, [m.r, inSize], 'float32', uniform, undefined, true),
        B: addWeight(`${key}_B`, [out, m.r], 'float32', init === 'peft' ? tfl.initializers.zeros() : uniform, undefined, true),
        scaling: loraScaling(m.r, m.alpha, config.rsLoRA ?? false),
      };
    }
    this.adapters.set(config.name, { config, factors });
    if (this.baseTrainable === null) this.baseTrainable = new Map(this.owner.baseWeights().map(v => [v, v.trainable]));
    for (const v of this.owner.baseWeights()) v.trainable = false;
  }

  /** Removes an adapter and disposes its variables; after the last one the base is trainable as before. */
  remove(name: string): void {
    const pending = this.pending.findIndex(c => c.name === name);
    if (pending >= 0) {
      this.pending.splice(pending, 1);
      this.active = this.active.filter(a => a !== name);
      return;
    }
    const state = this.state(name, 'removeAdapter');
    if (this.merged.includes(name)) fail(`${this.owner.layer.getClassName()}.removeAdapter`, `adapter '${name}' is merged; unmerge it first`);
    const vars = Object.values(state.factors).flatMap(f => [f.A, f.B]);
    releaseLayerVariables(this.owner.layer, vars);
    this.adapters.delete(name);
    if (this.adapters.size === 0 && this.baseTrainable !== null) {
      for (const [v, trainable] of this.baseTrainable) v.trainable = trainable;
      this.baseTrainable = null;
    }
    this.active = this.active.filter(a => a !== name);
  }

  names(): string[] {
    return [...this.adapters.keys(), ...this.pending.map(c => c.name)];
  }

  /** Whether a variable of the layer is an adapter factor (not a base weight). */
  owns(variable: tfl.LayerVariable): boolean {
    return [...this.adapters.values()].some(s => Object.values(s.factors).some(f => f.A === variable || f.B === variable));
  }

  /** An adapter's settings (a pending one's too), or undefined. */
  config(name: string): LinearAdapterConfig | undefined {
    const c = this.adapters.get(name)?.config ?? this.pending.find(p => p.name === name);
    return c === undefined ? undefined : { ...c, modules: { ...c.modules } };
  }

  /** An adapter's A and B variables and scaling per projection. */
  factors(name: string): Readonly<Record<string, Readonly<LinearFactors>>> {
    return this.state(name, 'adapter').factors;
  }

  private state(name: string, method: string): LinearAdapterState {
    const s = this.adapters.get(name);
    if (s === undefined) {
      fail(`${this.owner.layer.getClassName()}.${method}`, `no adapter '${name}'${this.owner.layer.built ? '' : ' (build the layer first)'}; ` +
          `adapters: ${this.names().join(', ') || 'none'}`);
    }
    return s;
  }

  get activeAdapters(): readonly string[] { return [...this.active]; }
  setActive(names: string[]): void {
    const unknown = names.filter(n => !this.names().includes(n));
    if (unknown.length > 0) fail(`${this.owner.layer.getClassName()}.setActiveAdapters`, `unknown adapters ${unknown.join(', ')}; adapters: ${this.names().join(', ') || 'none'}`);
    this.active = [...names];
  }
  get adaptersDisabled(): boolean { return this.disabled; }
  setDisabled(disabled: boolean): void { this.disabled = disabled; }
  get mergedAdapters(): readonly string[] { return [...this.merged]; }

  /** ΔW = s·B·A [out, in] of one adapter on one projection. */
  deltaWeight(name: string, projection: string): tf.Tensor2D {
    const f = this.state(name, 'deltaWeight').factors[projection];
    if (f === undefined) {
      fail(`${this.owner.layer.getClassName()}.deltaWeight`, `adapter '${name}' does not adapt '${projection}' ` +
          `(it adapts ${Object.keys(this.state(name, 'deltaWeight').factors).join(', ')})`);
    }
    return linearDeltaWeight(f.A.read() as tf.Tensor2D, f.B.read() as tf.Tensor2D, f.scaling);
  }

  /** W += ΔW on every projection of the adapter; a merged adapter is no longer applied separately. */
  merge(name: string): void {
    const state = this.state(name, 'mergeAdapter');
    if (this.merged.includes(name)) fail(`${this.owner.layer.getClassName()}.mergeAdapter`, `adapter '${name}' is already merged`);
    this.assertRepackable(`${this.owner.layer.getClassName()}.mergeAdapter`, name, Object.keys(state.factors));
    for (const projection of Object.keys(state.factors)) this.addToWeight(projection, this.deltaWeight(name, projection), 1);
    this.merged.push(name);
  }

  unmerge(name: string): void {
    const state = this.state(name, 'unmergeAdapter');
    if (!this.merged.includes(name)) fail(`${this.owner.layer.getClassName()}.unmergeAdapter`, `adapter '${name}' is not merged`);
    this.assertRepackable(`${this.owner.layer.getClassName()}.unmergeAdapter`, name, Object.keys(state.factors));
    for (const projection of Object.keys(state.factors)) this.addToWeight(projection, this.deltaWeight(name, projection), -1);
    this.merged = this.merged.filter(m => m !== name);
  }

  /**
   * Re-packing a packed 16-bit base reads it to the host, synchronously here (merging is
   * synchronous): refused up front on a backend that cannot (webgpu), before anything changed.
   */
  private assertRepackable(op: string, name: string, projections: readonly string[]): void {
    if (HOST_BACKENDS.includes(tf.getBackend())) return;
    const packed = projections.find(p => packedDenseFormat(this.owner.weight(p)) !== undefined);
    if (packed === undefined) return;
    fail(op, `adapter '${name}' adapts '${packed}', whose weight is stored packed (${packedDenseFormat(this.owner.weight(packed))!.kind}): ` +
        `re-packing it reads it synchronously, which the ${tf.getBackend()} backend cannot do; load the model with ` +
        "denseDtype 'float32', or use mergeAdapterIntoCheckpoint");
  }

  /** W ± ΔW; a packed 16-bit base is decoded, added to and packed again (rounded to its kind). */
  private addToWeight(projection: string, delta: tf.Tensor, sign: 1 | -1): void {
    addToDenseWeight(this.owner.weight(projection), delta, sign);
    delta.dispose();
  }

  /**
   * A projection with its applied adapters (active, not merged, not disabled):
   * x·Wᵀ + b + Σ loraBranch(x). x [N, in] → [N, out]. With the base frozen (always, while an
   * adapter exists) this is one `loraLinear` op, its own gradient off tfjs's tape; a trainable
   * base (full fine-tuning) takes the composed path, whose tape gives W and b their gradients.
   */
  apply(x: tf.Tensor2D, projection: string, bias: tfl.LayerVariable | null): tf.Tensor2D {
    const weight = this.owner.weight(projection);
    const applied: Array<{ f: LinearFactors; dropout: number; key: string }> = [];
    for (const name of this.disabled ? [] : this.active) {
      if (this.merged.includes(name)) continue;
      const state = this.adapters.get(name);
      const f = state?.factors[projection];
      if (f !== undefined) applied.push({ f, dropout: state!.config.dropout ?? 0, key: `${this.owner.layer.name}.${projection}/${name}` });
    }
    return tf.tidy(() => {
      const W = denseWeightOf(weight);  // float32, or packed 16-bit (frozen): read in each product (denseWeightMatMul)
      if (!weight.trainable && bias?.trainable !== true) {
        const branches: LinearLoRABranch[] = applied.map(({ f, dropout, key }) => ({
          A: f.A.read() as tf.Tensor2D, B: f.B.read() as tf.Tensor2D, scaling: f.scaling,
          mask: branchDropoutMask([x.shape[0], x.shape[1]], dropout, key),
        }));
        return loraLinear(x, W, bias === null ? null : bias.read() as tf.Tensor1D, branches);
      }
      let y = denseWeightMatMul(x, W, true, null);  // [N, out]
      if (bias !== null) y = tf.add(y, bias.read());
      for (const { f, dropout, key } of applied) {
        y = tf.add(y, loraBranch(x, f.A.read() as tf.Tensor2D, f.B.read() as tf.Tensor2D, f.scaling, dropout, key));
      }
      return y;
    });
  }

  /**
   * The adapters as getConfig() writes them, every string and key in a form tfjs's save/load
   * rewriting leaves alone (see config_strings.ts); `LinearLoRA.savedAdapters` reads them back.
   */
  getConfig(): { loraAdapters: SavedLinearAdapter[]; activeLoraAdapters: string[] } {
    const configs = [...[...this.adapters.values()].map(s => s.config), ...this.pending];
    return {
      loraAdapters: configs.map(c => ({
        name: c.name, rslora: c.rsLoRA ?? false, dropout: c.dropout ?? 0,
        modules: Object.entries(c.modules).map(([projection, m]) => ({ projection: protectString(projection), r: m.r, alpha: m.alpha })),
      })),
      activeLoraAdapters: this.active.map(protectString),
    };
  }

  /** The adapters and active names a getConfig() wrote (absent: none). */
  static savedAdapters(saved: SavedLinearAdapter[] | undefined, active: string[] | undefined):
      { adapters: LinearAdapterConfig[]; active: string[] | undefined } {
    const adapters = (saved ?? []).map(a => ({
      name: a.name, rsLoRA: a.rslora, dropout: a.dropout,
      modules: Object.fromEntries(a.modules.map(m => [restoreString(m.projection), { r: m.r, alpha: m.alpha }])),
    }));
    return { adapters, active: active?.map(restoreString) };
  }
}

/** A linear adapter in a layer config (only keys and strings that survive tfjs save/load). */
export interface SavedLinearAdapter {
  name: string;
  rslora: boolean;
  dropout: number;
  modules: Array<{ projection: string; r: number; alpha: number }>;
}
