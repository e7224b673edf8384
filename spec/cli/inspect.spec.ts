import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { formatInspect, inspectDir, type InspectReport } from '../../src/cli/commands/inspect.js';
import { fileIO } from '../../src/io/file_io_handler.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import { inspectModel } from '../../src/models/inspect.js';
import { registerMoELayerDescriptor } from '../../src/patch/descriptor.js';
import { register, unregister } from '../../src/plugin.js';
import { cleanup, fixtureConfig, fixtureDir, tempDir } from '../io/checkpoint_helpers.js';
import { runMain as run } from './run_cli.js';

const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';

/** Element counts of a safetensors file's tensors, by name. */
async function elementCounts(path: string): Promise<Map<string, number>> {
  const file = await readSafetensorsFile(path);
  return new Map(file.names().map(n => [n, file.info(n).shape.reduce((a, b) => a * b, 1)]));
}
const sum = (m: Map<string, number>, keep: (name: string) => boolean = () => true) =>
  [...m].filter(([n]) => keep(n)).reduce((s, [, v]) => s + v, 0);

describe('cli/inspect', () => {
  afterEach(() => unregister());
  after(cleanup);

  describe('inspectModel', () => {
    it('reports a mixtral checkpoint: routing, E K H I from config.json, params equal to the checkpoint\'s', async () => {
      const config = await fixtureConfig('mixtral');
      const model = await loadHFCheckpoint(fixtureDir('mixtral'));
      try {
        const r = inspectModel(model);
        const counts = await elementCounts(join(fixtureDir('mixtral'), 'model.safetensors'));
        const [E, H, I] = [config.num_local_experts, config.hidden_size, config.intermediate_size] as number[];
        expect(r).to.deep.include({ name: 'moe_causal_lm', modelType: 'mixtral', registered: false });
        expect(r.moeLayers.map(l => l.name)).to.deep.equal(['model.layers.0.mlp', 'model.layers.1.mlp']);
        for (const [index, l] of r.moeLayers.entries()) {
          const block = sum(counts, n => n.startsWith(`model.layers.${index}.block_sparse_moe.`));
          expect(l).to.deep.equal({
            name: `model.layers.${index}.mlp`, className: 'SparseMoE', decoderLayer: index, family: 'mixtral',
            routing: { kind: 'softmaxTopK', topK: config.num_experts_per_tok, renormalize: true },
            experts: E, topK: 2, hidden: H, intermediate: I, sharedExpert: null, adapters: [], adaptersDisabled: false,
            params: { base: block, lora: 0, total: block }, patched: false, kernel: 'reference',
          });
          // router + fused gate_up + down, per HF's shapes
          expect(block).to.equal(E * H + E * 2 * I * H + E * H * I);
        }
        expect(r.totals).to.deep.equal({
          moeLayers: 2, params: sum(counts), trainableParams: sum(counts),
          moeParams: sum(counts, n => n.includes('.block_sparse_moe.')), loraParams: 0, adapters: [],
        });
      } finally {
        model.dispose();
      }
    });

    it('reports a PEFT adapter\'s r, alpha, targets, state and sizes, and a gated shared expert (qwen2_moe)', async () => {
      const config = await fixtureConfig('qwen2_moe');
      const adapterConfig = JSON.parse(await readFile(join(fixtureDir('qwen2_moe'), 'adapter', 'adapter_config.json'), 'utf8'));
      const adapterCounts = await elementCounts(join(fixtureDir('qwen2_moe'), 'adapter', 'adapter_model.safetensors'));
      const model = await loadHFCheckpoint(fixtureDir('qwen2_moe'));
      try {
        await loadPeftAdapter(model, join(fixtureDir('qwen2_moe'), 'adapter'));
        const layers = sparseMoELayers(model);
        layers[1].mergeAdapter('default');
        const r = inspectModel(model);
        for (const [index, l] of r.moeLayers.entries()) {
          const lora = sum(adapterCounts, n => n.startsWith(`base_model.model.model.layers.${index}.mlp.`));
          expect(lora).to.be.greaterThan(0);
          expect(l.sharedExpert).to.deep.equal({ intermediate: config.shared_expert_intermediate_size, gated: true });
          expect(l.routing).to.deep.equal({ kind: 'softmaxTopK', topK: 2, renormalize: false });
          expect(l.adapters).to.deep.equal([{
            name: 'default', r: adapterConfig.r, alpha: adapterConfig.lora_alpha, rsLoRA: false,
            scaling: adapterConfig.lora_alpha / adapterConfig.r,
            targets: ['experts.gate_up', 'experts.down', 'router'], active: true, merged: index === 1, params: lora,
          }]);
          expect(l.params.lora).to.equal(lora);
          expect(l.params.total).to.equal(l.params.base + lora);
        }
        expect(r.totals.loraParams).to.equal(sum(adapterCounts));
        // loading an adapter freezes everything else, as PEFT does
        expect(r.totals.trainableParams).to.equal(sum(adapterCounts));
        expect(r.totals.adapters).to.deep.equal(['default']);

        layers[0].setActiveAdapters([]);
        layers[0].disableAdapters();
        const after = inspectModel(model).moeLayers[0];
        expect(after.adapters[0]).to.include({ active: false, merged: false });
        expect(after.adaptersDisabled).to.equal(true);
      } finally {
        model.dispose();
      }
    });

    it('says patched (and which kernel) exactly while register() is in effect', async () => {
      const model = await loadHFCheckpoint(fixtureDir('qwen3_moe'));
      try {
        expect(inspectModel(model).moeLayers.map(l => [l.patched, l.kernel])).to.deep.equal([[false, 'reference'], [false, 'reference']]);
        const handle = register({ expertKernel: 'fused', models: [model] });
        const on = inspectModel(model);
        expect(on.registered).to.equal(true);
        expect(on.moeLayers.map(l => [l.patched, l.kernel])).to.deep.equal([[true, 'fused'], [true, 'fused']]);
        register({ expertKernel: 'reference', models: [model] });
        expect(inspectModel(model).moeLayers.map(l => l.kernel)).to.deep.equal(['reference', 'reference']);
        handle.unregister();
        const off = inspectModel(model);
        expect(off.registered).to.equal(false);
        expect(off.moeLayers.every(l => !l.patched)).to.equal(true);
      } finally {
        model.dispose();
      }
    });

    it('reports a user MoE class through its descriptor; adapter sizes from PEFT\'s layouts', () => {
      const [E, H, I, r] = [4, 6, 5, 2];
      class TinyMoE extends tfl.layers.Layer {
        static className = 'InspectSpecTinyMoE';
        names: string[] = [];
        override build(): void {
          this.addWeight('router', [E, H], 'float32', tfl.initializers.zeros());
          this.addWeight('gate_up', [E, 2 * I, H], 'float32', tfl.initializers.zeros());
          this.addWeight('down', [E, H, I], 'float32', tfl.initializers.zeros());
          this.built = true;
        }
      }
      tf.serialization.registerClass(TinyMoE);
      const remove = registerMoELayerDescriptor<TinyMoE>({
        className: 'InspectSpecTinyMoE', layerClass: TinyMoE, matches: l => l instanceof TinyMoE,
        getBlockWeights: l => ({
          router: { weight: l.weights[0].read() as tf.Tensor2D },
          experts: { gateUp: l.weights[1].read() as tf.Tensor3D, down: l.weights[2].read() as tf.Tensor3D },
        }),
        getBlockConfig: () => ({ routing: { kind: 'softmaxTopK', topK: 2, renormalize: true }, activation: { kind: 'swiglu' } }),
        lora: {
          targets: ['experts.gate_up', 'router'],
          adapterNames: l => l.names,
          adapterConfig: (_, name) => ({ name, r, alpha: 4, targets: ['experts.gate_up', 'router'] }),
          add: (l, c) => { l.names.push(c.name); },
          remove: (l, name) => { l.names = l.names.filter(n => n !== name); },
        },
      });
      const layer = new TinyMoE({ name: 'tiny' });
      const input = tfl.input({ shape: [H] });
      const model = tfl.model({ inputs: input, outputs: layer.apply(input) as tfl.SymbolicTensor });
      try {
        layer.names.push('mine');
        const [l] = inspectModel(model).moeLayers;
        const lora = r * E * (H + 2 * I) + r * (H + E);
        expect(l).to.deep.equal({
          name: 'tiny', className: 'InspectSpecTinyMoE', decoderLayer: null, family: null,
          routing: { kind: 'softmaxTopK', topK: 2, renormalize: true }, experts: E, topK: 2, hidden: H, intermediate: I,
          sharedExpert: null, adaptersDisabled: null,
          adapters: [{ name: 'mine', r, alpha: 4, rsLoRA: false, scaling: 2, targets: ['experts.gate_up', 'router'], active: null, merged: null, params: lora }],
          // the class keeps no adapter variables: every weight is base, the adapter's size is computed
          params: { base: E * H + E * 2 * I * H + E * H * I - lora, lora, total: E * H + E * 2 * I * H + E * H * I },
          patched: false, kernel: null,
        });
      } finally {
        remove();
        model.dispose();
      }
    });
  });

  describe('inspectDir and the command', () => {
    const argv = (extra: Record<string, unknown> = {}) =>
      ({ model: fixtureDir('mixtral'), json: false, register: false, backend: BACKEND, ...extra });

    it('--register shows what register() patches and adds, then undoes it', async () => {
      const r = await inspectDir(argv({ register: true, 'lora-rank': '3', 'lora-alpha': '6', 'lora-targets': 'experts.down,router' }));
      expect(r.register).to.deep.include({ backend: BACKEND, expertKernel: 'fused', patchedClasses: ['SparseMoE'] });
      expect(r.register!.adaptersAdded).to.deep.equal(['model.layers.0.mlp', 'model.layers.1.mlp']);
      expect(r.registered).to.equal(true);
      const [E, H, I] = [8, 64, 96];
      const lora = 3 * E * (I + H) + 3 * (H + E);
      for (const l of r.moeLayers) {
        expect(l).to.deep.include({ patched: true, kernel: 'fused' });
        expect(l.adapters).to.deep.equal([{
          name: 'default', r: 3, alpha: 6, rsLoRA: false, scaling: 2, targets: ['experts.down', 'router'],
          active: true, merged: false, params: lora,
        }]);
      }
      expect(r.totals.trainableParams).to.equal(2 * lora);
      expect(r.source).to.deep.equal({ dir: fixtureDir('mixtral'), format: 'hf' });
      // nothing of it stays in this process
      const plain = await inspectDir(argv());
      expect(plain.registered).to.equal(false);
      expect(plain.register).to.equal(null);
      expect(plain.moeLayers.every(l => !l.patched && l.adapters.length === 0)).to.equal(true);
    });

    it('prints the report; --json prints the same report as one JSON object', async () => {
      const backend = ['--backend', BACKEND];
      const text = await run(['inspect', '--model', fixtureDir('mixtral'), ...backend]);
      expect(text.code, text.stderr).to.equal(0);
      const report = await inspectDir(argv());
      expect(text.stdout).to.equal(formatInspect(report));
      expect(text.stdout.split('\n').slice(0, 6)).to.deep.equal([
        `inspect ${fixtureDir('mixtral')} (HF checkpoint): mixtral model 'moe_causal_lm', 2 MoE layers`,
        'register() not in effect in this process: no layer is patched (--register shows what it would patch)',
        '  model.layers.0.mlp  SparseMoE  mixtral routing softmaxTopK (K 2, renormalize)',
        '    E 8, K 2, H 64, I 96; shared expert: none',
        "    params 147,968 (base 147,968, LoRA 0); patched: no, runs its own call ('reference' kernel)",
        '  model.layers.1.mlp  SparseMoE  mixtral routing softmaxTopK (K 2, renormalize)',
      ]);
      const json = await run(['inspect', '--model', fixtureDir('mixtral'), '--json', ...backend]);
      expect(json.code).to.equal(0);
      expect(JSON.parse(json.stdout) as InspectReport).to.deep.equal(JSON.parse(JSON.stringify(report)));
      expect(Object.keys(JSON.parse(json.stdout))).to.have.members(['source', 'name', 'modelType', 'registered', 'moeLayers', 'totals', 'register']);
    });

    it('reads a TF.js model folder too', async () => {
      const model = await loadHFCheckpoint(fixtureDir('olmoe'));
      const dir = await tempDir();
      try {
        await loadPeftAdapter(model, join(fixtureDir('olmoe'), 'adapter'), { name: 'mine' });
        await model.save(fileIO(dir));
        const fromHF = inspectModel(model);
        const r = await inspectDir(argv({ model: dir }));
        expect(r.source.format).to.equal('tfjs');
        expect(r.moeLayers).to.deep.equal(fromHF.moeLayers);
        expect(r.totals).to.deep.equal(fromHF.totals);
      } finally {
        model.dispose();
      }
    });

    it('exits 2 with one line for bad arguments, 1 with the message for a model it cannot load', async () => {
      const backend = ['--backend', BACKEND];
      const cases: Array<[string[], string]> = [
        [['inspect'], 'Missing required argument: model'],
        [['inspect', '--model', 'no/such/dir'], "--model: 'no/such/dir' is not a directory"],
        [['inspect', '--model', 'spec/fixtures'],
          "--model: 'spec/fixtures' is neither an HF checkpoint (config.json + model.safetensors or " +
          'model.safetensors.index.json) nor a TF.js LayersModel (model.json)'],
        [['inspect', '--model', fixtureDir('mixtral'), '--from', 'tfjs'], `--model: '${fixtureDir('mixtral')}' is not a TF.js LayersModel (model.json)`],
        [['inspect', '--model', fixtureDir('mixtral'), '--lora-rank', '4'], '--lora-rank is a register() flag: it needs --register'],
        [['inspect', '--model', fixtureDir('mixtral'), '--register', '--lora-rank', '0', '--lora-alpha', '1'],
          'command line: 1 problem with the plugin args: - --lora-rank: lora.r: expected an integer >= 1 but got 0 (number)'],
        [['inspect', '--model', fixtureDir('mixtral'), '--register', '--lora-rank', '65', '--lora-alpha', '1', '--lora-targets', 'experts.gate_up'],
          'command line: 2 problems with the plugin args: ' +
          "- --lora-rank: models[0] layer 'model.layers.0.mlp' (SparseMoE): lora.r: expected <= min(in, out) = 64 of experts.gate_up (per expert [out 2I = 192, in H = 64]) but got 65 " +
          "- --lora-rank: models[0] layer 'model.layers.1.mlp' (SparseMoE): lora.r: expected <= min(in, out) = 64 of experts.gate_up (per expert [out 2I = 192, in H = 64]) but got 65"],
      ];
      for (const [args, message] of cases) {
        const r = await run([...args, ...backend]);
        expect(r.code, args.join(' ')).to.equal(2);
        expect(r.stderr).to.equal(`tfjs-moe-lora: ${message} (see tfjs-moe-lora --help)\n`);
        expect(r.stdout).to.equal('');
      }
      // every family loads whole now: a setting the graph does not implement is what exits 1
      const unapplied = await tempDir();
      await writeFile(join(unapplied, 'config.json'), JSON.stringify({ ...(await fixtureConfig('mixtral')), attention_dropout: 0.1 }));
      await copyFile(join(fixtureDir('mixtral'), 'model.safetensors'), join(unapplied, 'model.safetensors'));
      const refused = await run(['inspect', '--model', unapplied, ...backend]);
      expect(refused.code).to.equal(1);
      expect(refused.stderr).to.equal("tfjs-moe-lora: error: `moeCausalLMConfigFromHF()`: attention dropout is not implemented: " +
          "'config.attention_dropout' must be 0 but got 0.1 (number)\n");
    });

    it('--help lists the options and exits 0', async () => {
      const r = await run(['inspect', '--help']);
      expect(r.code).to.equal(0);
      for (const flag of ['--model', '--from', '--json', '--register', '--backend', '--lora-rank']) expect(r.stdout).to.include(flag);
    });
  });
});
