/**
 * Gradient checkpointing for MoECausalLM, as transformers' `model.gradient_checkpointing_enable()`:
 * in a training pass every decoder layer runs as one `recompute` op (src/ops/recompute.ts), which
 * keeps only the layer's input for the backward pass and runs the layer again there. The
 * activations a step holds at its peak are then the L layer inputs plus one layer's, instead of
 * every layer's: one more forward per step for memory that no longer grows with the depth.
 *
 * The model stays the same functional LayersModel: enabling replaces `call` on this model object
 * (not on the class) by a walk of the same graph, segment by segment (embedding, each decoder
 * layer from its input to its `mlp_residual`, the final norm and head), that applies each layer
 * exactly as tfjs-layers' executor does (`layer.apply(inputs, kwargs)`, the same kwargs): the same
 * kernels on the same inputs, so the loss and the gradients are the plain run's, bit for bit.
 * Inference passes (training not true) and generation (a KV cache in the context) take the
 * plain path.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { insidePass, withPassConstants } from '../ops/pass_constants.js';
import { recompute, type RecomputeScope } from '../ops/recompute.js';
import { fail } from '../ops/validate.js';
import { describeValue } from '../util/describe.js';
import { currentSequenceContext, withSequenceContext } from './sequence_context.js';

type Kwargs = Record<string, unknown>;
type Call = (inputs: tf.Tensor | tf.Tensor[], kwargs: Kwargs) => tf.Tensor | tf.Tensor[];

/** The graph cut at the decoder layers' boundaries, found once when checkpointing is enabled. */
interface DecoderSegments {
  /** boundaries[i]: the residual stream entering decoder layer i; boundaries[L]: leaving the last */
  boundaries: tfl.SymbolicTensor[];
  /** the layers of decoder layer i (their trainable weights are the op's inputs) */
  layers: tfl.layers.Layer[][];
}

/** per enabled model, its segments (the own `call` property is the switch) */
const enabled = new WeakMap<tfl.LayersModel, DecoderSegments>();

const RESIDUAL = /^model\.layers\.(\d+)\.mlp_residual$/;

/**
 * Turns gradient checkpointing on or off for a model built by `buildMoECausalLM` (or loaded by
 * `loadHFCheckpoint`): with it on, `model.apply(ids, {training: true})` keeps for the backward
 * pass only each decoder layer's input and recomputes the layer there. Default off, as in
 * transformers. tfjs-layers' `fit()` does not go through `apply` and is not affected.
 *
 * ```js
 * setGradientCheckpointing(model, true);
 * const {value, grads} = tf.variableGrads(() => batchLoss(model, batch), trainableVariables(model));
 * ```
 */
export function setGradientCheckpointing(model: tfl.LayersModel, on: boolean): void {
  const op = 'setGradientCheckpointing';
  if (!(model instanceof tfl.LayersModel)) fail(op, `'model' must be a tfjs-layers LayersModel but got ${describeValue(model)}`);
  if (typeof on !== 'boolean') fail(op, `'on' must be a boolean but got ${describeValue(on)}`);
  const own = model as unknown as { call: Call };
  if (!on) {
    if (enabled.delete(model)) delete (own as Partial<typeof own>).call;
    return;
  }
  if (enabled.has(model)) return;
  const segments = decoderSegments(op, model);
  const plainCall = Object.getPrototypeOf(model).call as Call;
  enabled.set(model, segments);
  own.call = (inputs, kwargs) => (kwargs?.['training'] !== true || currentSequenceContext()?.kvCache != null ?
    plainCall.call(model, inputs, kwargs) :
    tf.tidy(() => [checkpointedForward(model, segments, Array.isArray(inputs) ? inputs[0] : inputs, kwargs)]));
}

/** Whether `setGradientCheckpointing(model, true)` is in effect. */
export function gradientCheckpointingEnabled(model: tfl.LayersModel): boolean {
  return enabled.has(model);
}

/** The decoder layers' boundaries and layers, or an error naming what the model lacks. */
function decoderSegments(op: string, model: tfl.LayersModel): DecoderSegments {
  const count = model.layers.filter(l => RESIDUAL.test(l.name)).length;
  if (count === 0 || model.inputs.length !== 1 || model.outputs.length !== 1) {
    fail(op, `the model '${model.name}' must be a decoder built by buildMoECausalLM (one input, one output, layers ` +
        `named 'model.layers.N.mlp_residual') but has ${count} such layers, ${model.inputs.length} input(s) and ` +
        `${model.outputs.length} output(s)`);
  }
  const boundaries: tfl.SymbolicTensor[] = [];
  for (let i = 0; i < count; i++) {
    // a layer's input and output: its one node in this graph (the embedding, tied to the head, has two)
    const first = model.getLayer(`model.layers.${i}.input_layernorm`);
    const residual = model.getLayer(`model.layers.${i}.mlp_residual`);
    if (i === 0) boundaries.push(first.input as tfl.SymbolicTensor);
    else if (first.input !== boundaries[i]) fail(op, `decoder layer ${i} of '${model.name}' does not start where layer ${i - 1} ends`);
    boundaries.push(residual.output as tfl.SymbolicTensor);
  }
  const layers = boundaries.slice(1).map((end, i) => {
    const { layers: inside, outside } = layersBetween(boundaries[i], end);
    // a recomputed layer gets its input and the trainables as the op's inputs, nothing else from the graph
    if (outside !== null) fail(op, `decoder layer ${i} of '${model.name}' reads '${outside}', which is computed outside it`);
    return inside;
  });
  const head = layersBetween(boundaries[count], model.outputs[0]).outside;
  if (head !== null) fail(op, `the layers after the last decoder layer of '${model.name}' read '${head}', which is computed before it`);
  return { boundaries, layers };
}

/** The layers that compute `end` from `start` (each once), and a graph input it reads besides `start`, if any. */
function layersBetween(start: tfl.SymbolicTensor, end: tfl.SymbolicTensor): { layers: tfl.layers.Layer[]; outside: string | null } {
  const found = new Set<tfl.layers.Layer>();
  const seen = new Set<number>([start.id]);
  let outside: string | null = null;
  const walk = (t: tfl.SymbolicTensor) => {
    if (seen.has(t.id)) return;
    seen.add(t.id);
    if (t.inputs.length === 0) outside ??= t.name;
    else found.add(t.sourceLayer as tfl.layers.Layer);
    t.inputs.forEach(walk);
  };
  walk(end);
  return { layers: [...found], outside };
}

/**
 * The value of `target` given the values in `known`: each layer applied once, after its inputs,
 * with the executor's arguments (the list of input values, the call's kwargs). Every path from
 * `target` ends in `known` (decoderSegments checked the layers' segments).
 */
function evaluate(target: tfl.SymbolicTensor, known: Map<number, tf.Tensor>, kwargs: Kwargs): tf.Tensor {
  const value = known.get(target.id);
  if (value !== undefined) return value;
  const inputs = target.inputs.map(t => evaluate(t, known, kwargs));
  const outputs = (target.sourceLayer as tfl.layers.Layer).apply(inputs, kwargs) as tf.Tensor | tf.Tensor[];
  const out = Array.isArray(outputs) ? outputs[target.outputTensorIndex ?? 0] : outputs;
  known.set(target.id, out);
  return out;
}

/** logits of `ids`, each decoder layer a recompute op; the embedding and the head as usual. */
function checkpointedForward(model: tfl.LayersModel, segments: DecoderSegments, ids: tf.Tensor, kwargs: Kwargs): tf.Tensor {
  const { boundaries, layers } = segments;
  let h = evaluate(boundaries[0], new Map([[model.inputs[0].id, ids]]), kwargs);
  // the backward pass runs after the forward's sequence context (and pass) ended: it is entered
  // again, so the recomputed layer sees the same masks, positions, dropout seed and training flag
  const context = currentSequenceContext();
  const pass = insidePass();
  const scope: RecomputeScope = context !== null ? run => withSequenceContext(context, run) :
    pass ? run => withPassConstants(run) : run => run();
  for (let i = 0; i < layers.length; i++) {
    const trainables = layers[i].flatMap(l => l.trainableWeights.map(w => w.read()));
    const start = boundaries[i];
    const end = boundaries[i + 1];
    h = recompute(x => evaluate(end, new Map([[start.id, x]]), kwargs), h, trainables, scope);
  }
  return evaluate(model.outputs[0], new Map([[boundaries.at(-1)!.id, h]]), kwargs);
}
