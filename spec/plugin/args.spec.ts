/**
 * The validation table: every rule of the plugin args with a good and a bad case and the exact
 * line it gives, through register() (schema rules and the rules against the models).
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { PluginArgsError } from '../../src/args/errors.js';
import { EXPERT_DROPOUT_NEEDS_SPLIT, type PluginArgs } from '../../src/args/schema.js';
import { editDistance, suggestName } from '../../src/args/suggest.js';
import { validatePluginArgs } from '../../src/args/validate.js';
import { SparseMoE } from '../../src/layers/sparse_moe.js';
import { registerMoELayerDescriptor } from '../../src/patch/descriptor.js';
import { register, unregister } from '../../src/plugin.js';
import { BARE_DESCRIPTOR, BareMoE, TOY_DESCRIPTOR, ToyMoE, builtToy } from '../helpers/toy_moe.js';

const ALL_TARGETS = "'experts.gate_up', 'experts.down', 'router', 'shared.gate', 'shared.up', 'shared.down', 'shared.sigmoid_gate', 'all-linear', " +
    "'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'";
const PATH_NOTE = "(module names may have a path before the projection: 'self_attn.q_proj')";

/** The problem lines register(args) gives; [] when it registers (then it unregisters again). */
function problemsOf(args: unknown): string[] {
  try {
    register(args as PluginArgs).unregister();
    return [];
  } catch (err) {
    if (err instanceof PluginArgsError) return err.problems.map(p => p.message);
    throw err;
  }
}

interface Row { rule: string; good: () => unknown; bad: () => unknown; message: string }

describe('plugin args: the validation table', () => {
  const layers: tfl.layers.Layer[] = [];
  const removers: Array<() => void> = [];
  let plain: SparseMoE;
  let shared: SparseMoE;
  let denseModel: tfl.LayersModel;
  let moeModel: tfl.LayersModel;
  const toy = (name: string, numExperts: number, routing: ToyMoE['routing']) => {
    const l = builtToy({ name, numExperts, intermediateSize: 3, routing });
    layers.push(l);
    return l;
  };

  before(() => {
    removers.push(registerMoELayerDescriptor(TOY_DESCRIPTOR), registerMoELayerDescriptor(BARE_DESCRIPTOR));
    plain = new SparseMoE({ name: 'plain', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } });
    plain.build([null, 8]);
    shared = new SparseMoE({ name: 'shared', numExperts: 6, intermediateSize: 4, routing: { kind: 'softmaxTopK', topK: 2 },
      sharedExpert: { intermediateSize: 5, gated: true } });
    shared.build([null, 8]);
    layers.push(plain, shared);
    const input = tfl.input({ shape: [8] });
    denseModel = tfl.model({ inputs: input, outputs: tfl.layers.dense({ units: 8 }).apply(input) as tfl.SymbolicTensor });
    const input2 = tfl.input({ shape: [3, 8] });
    const moe = new SparseMoE({ name: 'in_model', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 1 } });
    moeModel = tfl.model({ inputs: input2, outputs: moe.apply(input2) as tfl.SymbolicTensor });
  });

  after(() => {
    unregister();
    removers.forEach(r => r());
    layers.forEach(l => l.weights.forEach(w => w.dispose()));
    denseModel.dispose();
    moeModel.dispose();
  });

  const lora = { r: 2, alpha: 4 };
  const rows: Row[] = [
    // ---- the schema ----
    { rule: 'args is an object', good: () => ({}), bad: () => 3,
      message: 'args: expected an object {expertKernel?, loraMode?, strict?, models?, lora?} but got 3 (number)' },
    { rule: 'unknown key: did you mean (edit distance)', good: () => ({ expertKernel: 'fused' }), bad: () => ({ expertKernal: 'fused' }),
      message: "expertKernal: unknown argument (expected one of expertKernel, loraMode, strict, models, lora); did you mean 'expertKernel'?" },
    { rule: 'unknown key: did you mean (case and separators)', good: () => ({ loraMode: 'auto' }), bad: () => ({ lora_mode: 'auto' }),
      message: "lora_mode: unknown argument (expected one of expertKernel, loraMode, strict, models, lora); did you mean 'loraMode'?" },
    { rule: 'unknown key: nothing close', good: () => ({ strict: false }), bad: () => ({ learningRate: 1e-4 }),
      message: 'learningRate: unknown argument (expected one of expertKernel, loraMode, strict, models, lora)' },
    { rule: 'unknown lora key: PEFT spelling', good: () => ({ lora: { ...lora, dropout: 0 } }), bad: () => ({ lora: { ...lora, lora_dropout: 0 } }),
      message: "lora.lora_dropout: unknown argument (expected one of r, alpha, dropout, rsLoRA, targets, rankPattern, alphaPattern, adapterName); did you mean 'lora.dropout'?" },
    { rule: "expertKernel is 'fused' | 'reference'", good: () => ({ expertKernel: 'reference' }), bad: () => ({ expertKernel: 'fast' }),
      message: "expertKernel: expected one of 'fused', 'reference' but got 'fast' (string)" },
    { rule: "loraMode is 'materialize' | 'split' | 'auto'", good: () => ({ loraMode: 'split' }), bad: () => ({ loraMode: 'merge' }),
      message: "loraMode: expected one of 'materialize', 'split', 'auto' but got 'merge' (string)" },
    { rule: 'strict is a boolean', good: () => ({ strict: true }), bad: () => ({ strict: 'yes' }),
      message: "strict: expected a boolean but got 'yes' (string)" },
    { rule: 'models is an array', good: () => ({ models: [moeModel] }), bad: () => ({ models: moeModel }),
      message: 'models: expected an array of tf.LayersModel or tf.layers.Layer but got a LayersModel' },
    { rule: 'models holds models and layers', good: () => ({ models: [moeModel, plain] }), bad: () => ({ models: [moeModel, 'model.json'] }),
      message: "models[1]: expected a tf.LayersModel or a tf.layers.Layer but got 'model.json' (string)" },
    { rule: 'lora is an object or null', good: () => ({ lora: null }), bad: () => ({ lora: 8 }),
      message: 'lora: expected an object {r, alpha, dropout?, rsLoRA?, targets?, rankPattern?, alphaPattern?, adapterName?}, or null for none, but got 8 (number)' },
    { rule: 'lora.r is required', good: () => ({ lora }), bad: () => ({ lora: { alpha: 4 } }),
      message: "lora.r: expected an integer >= 1 but got nothing (required when 'lora' is given)" },
    { rule: 'lora.r is an integer', good: () => ({ lora: { ...lora, r: 3 } }), bad: () => ({ lora: { ...lora, r: 2.5 } }),
      message: 'lora.r: expected an integer >= 1 but got 2.5 (number)' },
    { rule: 'lora.r >= 1', good: () => ({ lora: { ...lora, r: 1 } }), bad: () => ({ lora: { ...lora, r: 0 } }),
      message: 'lora.r: expected an integer >= 1 but got 0 (number)' },
    { rule: 'lora.alpha is required', good: () => ({ lora }), bad: () => ({ lora: { r: 2 } }),
      message: "lora.alpha: expected a finite number > 0 but got nothing (required when 'lora' is given)" },
    { rule: 'lora.alpha > 0', good: () => ({ lora: { ...lora, alpha: 0.5 } }), bad: () => ({ lora: { ...lora, alpha: 0 } }),
      message: 'lora.alpha: expected a finite number > 0 but got 0 (number)' },
    { rule: 'lora.alpha is finite', good: () => ({ lora: { ...lora, alpha: 64 } }), bad: () => ({ lora: { ...lora, alpha: Infinity } }),
      message: 'lora.alpha: expected a finite number > 0 but got Infinity (number)' },
    { rule: 'lora.dropout is in [0, 1)', good: () => ({ lora: { ...lora, dropout: 0 } }), bad: () => ({ lora: { ...lora, dropout: 1 } }),
      message: 'lora.dropout: expected a number in [0, 1) but got 1 (number)' },
    { rule: 'lora.dropout on expert targets needs split LoRA (auto picks it)',
      good: () => ({ loraMode: 'auto', lora: { ...lora, dropout: 0.05 } }),
      bad: () => ({ loraMode: 'materialize', lora: { ...lora, dropout: 0.05 } }),
      message: `loraMode: expected 'split' or 'auto' with lora.dropout 0.05 on expert targets (experts.gate_up, experts.down) but got 'materialize': ${EXPERT_DROPOUT_NEEDS_SPLIT}` },
    { rule: 'lora.dropout on the router and shared targets in any loraMode',
      good: () => ({ loraMode: 'materialize', lora: { ...lora, dropout: 0.1, targets: ['router', 'shared.up'] } }),
      bad: () => ({ loraMode: 'materialize', lora: { ...lora, dropout: 0.1, targets: ['router', 'experts.down'] } }),
      message: `loraMode: expected 'split' or 'auto' with lora.dropout 0.1 on expert targets (experts.down) but got 'materialize': ${EXPERT_DROPOUT_NEEDS_SPLIT}` },
    { rule: 'lora.rsLoRA is a boolean', good: () => ({ lora: { ...lora, rsLoRA: true } }), bad: () => ({ lora: { ...lora, rsLoRA: 1 } }),
      message: 'lora.rsLoRA: expected a boolean but got 1 (number)' },
    { rule: 'lora.targets is a non-empty list', good: () => ({ lora: { ...lora, targets: ['router'] } }), bad: () => ({ lora: { ...lora, targets: [] } }),
      message: `lora.targets: expected a non-empty list of ${ALL_TARGETS} or module names ending in one but got []` },
    { rule: 'lora.targets are known (did you mean)', good: () => ({ lora: { ...lora, targets: ['experts.gate_up'] } }),
      bad: () => ({ lora: { ...lora, targets: ['experts.gateup'] } }),
      message: `lora.targets[0]: expected one of ${ALL_TARGETS} ${PATH_NOTE} but got 'experts.gateup' (string); did you mean 'experts.gate_up'?` },
    { rule: 'lora.targets has no repeats', good: () => ({ lora: { ...lora, targets: ['router', 'experts.down'] } }),
      bad: () => ({ lora: { ...lora, targets: ['router', 'experts.down', 'router'] } }),
      message: "lora.targets: expected each target once but got 'router' 2 times" },
    { rule: 'lora.adapterName is a plain name', good: () => ({ lora: { ...lora, adapterName: 'my-adapter_2' } }),
      bad: () => ({ lora: { ...lora, adapterName: 'my adapter' } }),
      message: "lora.adapterName: expected a name of letters, digits, '_' or '-' but got 'my adapter' (string)" },
    // ---- against the models ----
    { rule: 'every model has an MoE layer', good: () => ({ models: [moeModel] }), bad: () => ({ models: [denseModel] }),
      message: 'models[0]: expected a model or layer with at least one MoE layer (classes with a descriptor: ToyMoE, BareMoE, ' +
          'SparseMoE) but found none; register a descriptor for its MoE layer class with registerMoELayerDescriptor' },
    { rule: 'the routing kind is registered', good: () => ({ models: [toy('toy_kind_ok', 4, { kind: 'topKSoftmax', topK: 2 })] }),
      bad: () => ({ models: [toy('toy_kind', 4, { kind: 'expertChoice' as never, topK: 2 })] }),
      message: "models[0] layer 'toy_kind' (ToyMoE): routing.kind: expected one of 'softmaxTopK', 'topKSoftmax', " +
          "'sigmoidGroupTopK', 'softmaxGroupTopK', 'softmaxGroupLimitedGreedy', 'softmaxBiasedTopK', 'topKSigmoid' " +
          "but got 'expertChoice'" },
    { rule: 'K <= E', good: () => ({ models: [toy('toy_k_ok', 4, { kind: 'softmaxTopK', topK: 4 })] }),
      bad: () => ({ models: [toy('toy_k', 4, { kind: 'softmaxTopK', topK: 5 })] }),
      message: "models[0] layer 'toy_k' (ToyMoE): routing.topK: expected an integer in [1, numExperts = 4] (K <= E) but got 5" },
    { rule: 'nGroup divides E', good: () => ({ models: [toy('toy_g_ok', 6, { kind: 'sigmoidGroupTopK', topK: 2, nGroup: 3, topkGroup: 2 })] }),
      bad: () => ({ models: [toy('toy_g', 6, { kind: 'sigmoidGroupTopK', topK: 2, nGroup: 4, topkGroup: 2 })] }),
      message: "models[0] layer 'toy_g' (ToyMoE): routing.nGroup: expected a divisor of numExperts (6) but got 4" },
    { rule: 'topkGroup <= nGroup', good: () => ({ models: [toy('toy_tg_ok', 8, { kind: 'softmaxGroupTopK', topK: 2, nGroup: 2, topkGroup: 2 })] }),
      bad: () => ({ models: [toy('toy_tg', 8, { kind: 'softmaxGroupTopK', topK: 2, nGroup: 2, topkGroup: 3 })] }),
      message: "models[0] layer 'toy_tg' (ToyMoE): routing.topkGroup: expected an integer in [1, nGroup = 2] but got 3" },
    { rule: 'topkGroup·(E/nGroup) >= K',
      good: () => ({ models: [toy('toy_kept_ok', 8, { kind: 'softmaxGroupLimitedGreedy', topK: 2, nGroup: 4, topkGroup: 1 })] }),
      bad: () => ({ models: [toy('toy_kept', 8, { kind: 'softmaxGroupLimitedGreedy', topK: 3, nGroup: 4, topkGroup: 1 })] }),
      message: "models[0] layer 'toy_kept' (ToyMoE): routing.topK: expected <= topkGroup·(E/nGroup) = 1·(8/4) = 2 " +
          '(the experts of the kept groups) but got 3' },
    { rule: 'LoRA rank <= min(in, out) of expert weights', good: () => ({ models: [plain], lora: { r: 3, alpha: 4, targets: ['experts.down'] } }),
      bad: () => ({ models: [plain], lora: { r: 4, alpha: 4, targets: ['experts.down'] } }),
      message: "models[0] layer 'plain' (SparseMoE): lora.r: expected <= min(in, out) = 3 of experts.down (per expert " +
          '[out H = 8, in I = 3]) but got 4' },
    { rule: 'LoRA rank <= min(in, out) of the router', good: () => ({ models: [plain], lora: { r: 4, alpha: 4, targets: ['router'] } }),
      bad: () => ({ models: [plain], lora: { r: 5, alpha: 4, targets: ['router'] } }),
      message: "models[0] layer 'plain' (SparseMoE): lora.r: expected <= min(in, out) = 4 of router ([out E = 4, in H = 8]) but got 5" },
    { rule: 'LoRA rank <= min(in, out) of shared projections', good: () => ({ models: [shared], lora: { r: 5, alpha: 4, targets: ['shared.down'] } }),
      bad: () => ({ models: [shared], lora: { r: 6, alpha: 4, targets: ['shared.down'] } }),
      message: "models[0] layer 'shared' (SparseMoE): lora.r: expected <= min(in, out) = 5 of shared.down ([out H = 8, in I_s = 5]) but got 6" },
    { rule: 'LoRA rank against a layer not built yet: the sizes known so far',
      good: () => ({ models: [unbuilt('unbuilt_ok')], lora: { r: 3, alpha: 4, targets: ['experts.down'] } }),
      bad: () => ({ models: [unbuilt('unbuilt')], lora: { r: 4, alpha: 4, targets: ['experts.down'] } }),
      message: "models[0] layer 'unbuilt' (SparseMoE): lora.r: expected <= min(in, out) = 3 of experts.down (per expert " +
          '[out H = ? (not built), in I = 3]) but got 4' },
    { rule: 'shared targets only on layers with a shared expert',
      good: () => ({ models: [shared], lora: { ...lora, targets: ['shared.gate', 'shared.up', 'experts.down'] } }),
      bad: () => ({ models: [plain], lora: { ...lora, targets: ['shared.gate', 'shared.up', 'experts.down'] } }),
      message: "models[0] layer 'plain' (SparseMoE): lora.targets: expected shared-expert targets only on a layer with a " +
          "shared expert, but the layer has none and got 'shared.gate', 'shared.up'" },
    { rule: 'LoRA needs a descriptor with lora hooks', good: () => ({ models: [builtToy({ name: 'bare_ok', numExperts: 4, intermediateSize: 3,
      routing: { kind: 'softmaxTopK', topK: 2 } }, 6, BareMoE)] }),
      bad: () => ({ models: [builtToy({ name: 'bare', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } }, 6, BareMoE)], lora }),
      message: "models[0] layer 'bare' (BareMoE): lora: expected a layer that takes LoRA adapters but the BareMoE descriptor has " +
          "no 'lora' hooks (register it with lora: {targets, adapterNames, add, remove}, or leave lora out)" },
    { rule: 'targets the descriptor supports', good: () => ({ models: [toy('toy_t_ok', 4, { kind: 'softmaxTopK', topK: 2 })], lora: { ...lora, targets: ['router'] } }),
      bad: () => ({ models: [toy('toy_t', 4, { kind: 'softmaxTopK', topK: 2 })], lora: { ...lora, targets: ['router', 'experts.down'] } }),
      message: "models[0] layer 'toy_t' (ToyMoE): lora.targets: expected targets that ToyMoE supports ('router') but got 'experts.down'" },
    { rule: 'an existing adapter of that name matches the args',
      good: () => { userAdapter(); return { models: [shared], lora: { r: 2, alpha: 4, targets: ['experts.down'] } }; },
      bad: () => { userAdapter(); return { models: [shared], lora: { r: 4, alpha: 8 } }; },
      message: "models[0] layer 'shared' (SparseMoE): lora: expected the layer's existing adapter 'default' to match the args " +
          '(r = 4, alpha = 8, rsLoRA = false, targets experts.gate_up, experts.down) but it has r = 2, alpha = 4, rsLoRA = false, ' +
          'targets experts.down; remove it or choose another lora.adapterName' },
    { rule: 'user layers are built', good: () => ({ models: [toy('toy_built', 4, { kind: 'softmaxTopK', topK: 2 })] }),
      bad: () => ({ models: [new ToyMoE({ name: 'toy_unbuilt', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } })] }),
      message: "models[0] layer 'toy_unbuilt' (ToyMoE): expected a built layer (call the model once or build the layer) to " +
          'check it against the args, but it is not built' },
  ];

  function unbuilt(name: string) {
    return new SparseMoE({ name, numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } });
  }

  function userAdapter() {
    if (!shared.adapterNames().includes('default')) shared.addAdapter({ name: 'default', r: 2, alpha: 4, targets: ['experts.down'] });
  }

  for (const row of rows) {
    it(row.rule, () => {
      expect(problemsOf(row.good()), 'good case').to.deep.equal([]);
      expect(problemsOf(row.bad()), 'bad case').to.deep.equal([row.message]);
    });
  }

  it('collects every problem into one PluginArgsError, a line each, naming arg, expected and actual', () => {
    let error: unknown;
    try {
      register({ expertKernel: 'fast', stict: true, models: [plain], lora: { r: 0, alpha: -1, targets: ['router', 'shared'] } } as never);
    } catch (err) {
      error = err;
    }
    expect(error).to.be.instanceOf(PluginArgsError);
    expect(error).to.be.instanceOf(Error);
    const e = error as PluginArgsError;
    expect(e.name).to.equal('PluginArgsError');
    expect(e.message).to.equal([
      'register(): 5 problems with the plugin args:',
      "  - stict: unknown argument (expected one of expertKernel, loraMode, strict, models, lora); did you mean 'strict'?",
      "  - expertKernel: expected one of 'fused', 'reference' but got 'fast' (string)",
      '  - lora.r: expected an integer >= 1 but got 0 (number)',
      '  - lora.alpha: expected a finite number > 0 but got -1 (number)',
      `  - lora.targets[1]: expected one of ${ALL_TARGETS} ${PATH_NOTE} but got 'shared' (string); did you mean 'shared.up'?`,
    ].join('\n'));
    expect(e.problems.map(p => p.arg)).to.deep.equal(['stict', 'expertKernel', 'lora.r', 'lora.alpha', 'lora.targets']);
  });

  it('schema and model problems come together; one problem says "1 problem"', () => {
    const k = toy('toy_both', 4, { kind: 'softmaxTopK', topK: 6 });
    expect(() => register({ loraMode: 'fast' as never, models: [k] })).to.throw(PluginArgsError,
      "register(): 2 problems with the plugin args:\n  - loraMode: expected one of 'materialize', 'split', 'auto' but got 'fast' (string)\n" +
      "  - models[0] layer 'toy_both' (ToyMoE): routing.topK: expected an integer in [1, numExperts = 4] (K <= E) but got 6");
    expect(() => register({ strict: 1 as never })).to.throw(PluginArgsError,
      'register(): 1 problem with the plugin args:\n  - strict: expected a boolean but got 1 (number)');
  });

  it('validatePluginArgs fills in every default', () => {
    expect(validatePluginArgs(undefined)).to.deep.equal({ expertKernel: 'fused', loraMode: 'auto', strict: false, models: [], lora: null });
    expect(validatePluginArgs({ lora: { r: 8, alpha: 16 } }).lora).to.deep.equal({
      r: 8, alpha: 16, dropout: 0, rsLoRA: false, targets: ['experts.gate_up', 'experts.down'], rankPattern: {}, alphaPattern: {}, adapterName: 'default',
    });
  });

  it('suggestions: edit distance, separators and case, aliases, nothing when far', () => {
    expect(editDistance('kitten', 'sitting')).to.equal(3);
    expect(editDistance('', 'abc')).to.equal(3);
    expect(suggestName('expert-kernel', ['expertKernel', 'loraMode'])).to.equal('expertKernel');
    expect(suggestName('lora_alpha', ['r', 'alpha'], { lora_alpha: 'alpha' })).to.equal('alpha');
    expect(suggestName('alhpa', ['r', 'alpha'])).to.equal('alpha');
    expect(suggestName('zzz', ['r', 'alpha'])).to.equal(undefined);
  });

  it('nothing is registered after a failed register()', () => {
    expect(problemsOf({ strict: 'no' })).to.have.length(1);
    // a layer created now runs its own call: the failed register() patched nothing
    const t = toy('toy_after_fail', 4, { kind: 'softmaxTopK', topK: 2 });
    const x = tf.ones([2, 6]);
    tf.dispose([t.apply(x) as tf.Tensor, x]);
    expect((t as ToyMoE).ownCalls).to.equal(1);
  });
});
