/**
 * The load benchmark with a small config: the bf16 writer (rounding, HF's shard names and index,
 * values the loader reads back), the loads in child processes and what they report, its argument
 * checks, and the CLI's `bench --config load` checks. No timings are asserted.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { readdir, readFile, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import {
  benchLoad, formatLoadBenchTable, olmoeConfig, qwen3MoeConfig, ROUTED_EXPERT_TENSOR, writeRandomBF16Checkpoint,
} from '../../src/bench/load_bench.js';
import { sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import { unpackExpertWeight } from '../../src/ops/packed.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { configTensorPlan } from '../../src/io/hf_checkpoint_core.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import type { HFConfig } from '../../src/models/families.js';
import { estimateLoadMemory } from '../../src/models/memory.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { encodeBFloat16 } from '../../src/util/half.js';
import { cleanup, fixtureConfig, tempDir } from '../io/checkpoint_helpers.js';
import { rejection } from '../helpers/rejection.js';

const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';

describe('bench/load_bench', () => {
  after(cleanup);

  it('rounds float32 to bfloat16 to nearest even', () => {
    const f32 = new Float32Array(new Uint32Array([0x3f800000, 0xc0200000, 0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff]).buffer);
    // 1, -2.5, a tie (even below), a tie (even above), just above a tie, just below one
    expect(Array.from(encodeBFloat16(f32))).to.deep.equal([0x3f80, 0xc020, 0x3f80, 0x3f82, 0x3f81, 0x3f80]);
  });

  it('writes every tensor of a config in bf16 shards with HF names and index, which the loader reads', async () => {
    const config = await fixtureConfig('olmoe');
    const dir = await tempDir();
    const written = await writeRandomBF16Checkpoint(dir, config, { seed: 3, maxShardBytes: 40_000 });
    const plan = configTensorPlan(config).all;
    const n = written.shards.length;
    expect(n).to.be.greaterThan(2);
    expect(written.shards).to.deep.equal(Array.from({ length: n }, (_, i) => `model-${String(i + 1).padStart(5, '0')}-of-${String(n).padStart(5, '0')}.safetensors`));
    expect((await readdir(dir)).sort()).to.deep.equal(['config.json', 'model.safetensors.index.json', ...written.shards].sort());
    const index = JSON.parse(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8'));
    const sizes = plan.map(e => 2 * e.shape.reduce((a, b) => a * b, 1));
    expect(index.metadata.total_size).to.equal(sizes.reduce((a, b) => a + b, 0));
    expect(written.totalBytes).to.equal(index.metadata.total_size);
    expect(written.largestTensorBytes).to.equal(Math.max(...sizes));
    expect(Object.keys(index.weight_map).sort()).to.deep.equal(plan.map(e => e.name).sort());
    for (const shard of written.shards) {
      const file = await readSafetensorsFile(join(dir, shard));
      const names = file.names();
      expect(names.every(name => index.weight_map[name] === shard && file.info(name).dtype === 'BF16'), shard).to.equal(true);
      // a shard overflows 40 000 bytes only when one tensor alone does
      const bytes = names.reduce((s, name) => s + 2 * file.info(name).shape.reduce((a, b) => a * b, 1), 0);
      expect(bytes <= 40_000 || names.length === 1, shard).to.equal(true);
    }
    const before = tf.memory().numTensors;
    const model = await loadHFCheckpoint(dir);
    const values = model.getLayer('model.embed_tokens').getWeights()[0].dataSync() as Float32Array;
    const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
    expect(bits.every(b => (b & 0xffff) === 0)).to.equal(true);  // every value a bfloat16
    expect(values.every(v => Math.abs(v) <= 0.0351)).to.equal(true);
    expect(new Set(values).size).to.be.greaterThan(1000);
    model.dispose();
    expect(tf.memory().numTensors - before).to.equal(0);
  });

  it('zeroExperts: the routed experts are holes (zeros, no disk), the rest random; nf4 and int4 loads of the zeros are zeros', async () => {
    // experts of 32 KiB each (hidden 64, moe_intermediate 256): runs of whole file-system blocks
    const config: HFConfig = { ...await fixtureConfig('qwen3_moe'), moe_intermediate_size: 256 };
    const dense = await tempDir();
    const sparse = await tempDir();
    const full = await writeRandomBF16Checkpoint(dense, config, { seed: 5 });
    const written = await writeRandomBF16Checkpoint(sparse, config, { seed: 5, zeroExperts: true });
    const plan = configTensorPlan(config).all;
    const expertBytes = plan.filter(e => ROUTED_EXPERT_TENSOR.test(e.name)).reduce((n, e) => n + 2 * e.shape.reduce((a, b) => a * b, 1), 0);
    expect(plan.some(e => /shared_expert/.test(e.name) && ROUTED_EXPERT_TENSOR.test(e.name))).to.equal(false);
    expect(written).to.deep.include({ totalBytes: full.totalBytes, zeroBytes: expertBytes, shards: full.shards });
    expect(full.zeroBytes).to.equal(0);
    const file = join(sparse, written.shards[0]);
    const { size, blocks } = await stat(file);
    expect(size).to.equal((await stat(join(dense, full.shards[0]))).size);
    // on the disk: the file less its experts, give or take one 4 KiB block at each end of a layer's run of experts
    expect(blocks * 512).to.be.at.most(size - expertBytes + 2 * 4096 * (config['num_hidden_layers'] as number));
    const tensors = await readSafetensorsFile(file);
    for (const name of tensors.names()) {
      const t = await tensors.tensor(name);
      const values = t.dataSync();
      const zeros = values.every(v => v === 0);
      expect(zeros, name).to.equal(ROUTED_EXPERT_TENSOR.test(name));
      t.dispose();
    }
    // the quantizers on all-zero groups (absmax 0, int4's max − min 0): codes of 0, no NaN, and the model runs
    const before = tf.memory().numTensors;
    for (const expertDtype of ['nf4', 'int4'] as const) {
      const model = await loadHFCheckpoint(sparse, { expertDtype });
      for (const layer of sparseMoELayers(model)) {
        for (const which of ['gate_up', 'down'] as const) {
          const w = unpackExpertWeight(layer.expertWeight(which));
          expect(Array.from(await w.data()).every(v => v === 0), `${expertDtype} ${which}`).to.equal(true);
          w.dispose();
        }
      }
      const input = tf.tensor2d([[1, 2, 3, 4]], [1, 4], 'int32');
      const logits = model.apply(input, { training: false }) as tf.Tensor;
      expect(Array.from(await logits.data()).every(Number.isFinite), expertDtype).to.equal(true);
      tf.dispose([input, logits]);
      model.dispose();
    }
    expect(tf.memory().numTensors - before).to.equal(0);
    expect(qwen3MoeConfig()).to.deep.include({
      num_hidden_layers: 48, hidden_size: 2048, num_experts: 128, num_experts_per_tok: 8, moe_intermediate_size: 768,
      vocab_size: 151936, num_attention_heads: 32, num_key_value_heads: 4, head_dim: 128,
    });
  });

  it('loads the checkpoint once per expert dtype in child processes and reports memory, RSS and time', async () => {
    const config = await fixtureConfig('olmoe');
    const seen: string[] = [];
    const cases = await benchLoad({ config, backend: BACKEND === 'wasm' ? 'wasm' : 'cpu', onCase: c => seen.push(c.expertDtype) });
    expect(seen).to.deep.equal(['stored', 'float32']);
    const float32 = cases[1];
    expect(float32.numBytes).to.equal(estimateLoadMemory(config).bytes);
    expect(float32.estimateFloat32Bytes).to.equal(float32.numBytes);
    // the bf16 experts stay packed with 'stored': 2 bytes an element
    const packed = estimateLoadMemory(config, { expertBytesPerElement: 2 });
    expect(cases[0].numBytes).to.equal(packed.bytes);
    for (const c of cases) {
      expect(c).to.deep.include({ layers: 2, shards: 1, loadPeakBytes: c.peakRss - c.rssBefore, rssTargetBytes: Math.round(1.1 * c.numBytes + c.largestWeightBytes) });
      expect(c.rssBefore).to.be.greaterThan(0);
      expect(c.peakRss).to.be.at.least(c.rssBefore);
      expect(c.seconds).to.be.greaterThan(0);
      expect(c.hostValueBytesAfter).to.equal(0);  // cpu and wasm: the weights are host memory, nothing is counted
      expect(c.peakHostBytes).to.be.at.least(0);
      expect(c.largestWeightBytes).to.equal((c.expertDtype === 'stored' ? packed : estimateLoadMemory(config)).largest.bytes);
    }
    expect(formatLoadBenchTable(cases)).to.match(/numBytes stored \/ float32: \d\.\d{3} \(target <= 0\.55\)\n$/);

    // denseDtype 'stored': the dense weights too held as their bf16 words, 2 bytes an element
    const [words] = await benchLoad({ config, backend: BACKEND === 'wasm' ? 'wasm' : 'cpu', expertDtypes: ['stored'], denseDtype: 'stored' });
    expect(words.numBytes).to.equal(estimateLoadMemory(config, { expertBytesPerElement: 2, denseStorage: 'bf16' }).bytes);
    expect(words.numBytes).to.be.below(cases[0].numBytes);

    // a load that fails in its child is named, with the child's message
    let file = '';
    const failing = await rejection(benchLoad({
      config, backend: 'cpu', expertDtypes: ['float32'],
      onWritten: async ({ dir }) => { file = join(dir, 'model.safetensors'); await truncate(file, 10); },
    }));
    expect(failing.message).to.match(new RegExp(`^\`benchLoad\\(\\)\`: the float32 load on cpu failed \\(exit code 1\\): safetensors file '${file}': header length \\d+ exceeds the 2 bytes that follow the length field`));
  });

  it('checks its arguments, and the CLI its flags', async () => {
    const msg = async (options: Parameters<typeof benchLoad>[0]) => {
      const e = await rejection(benchLoad(options));
      expect(e).to.be.instanceOf(OpArgumentError);
      return e.message;
    };
    expect(await msg({ layers: 0 })).to.equal("`benchLoad()`: 'layers' must be >= 1 but got 0");
    expect(await msg({ backend: 'webgl' })).to.equal("`benchLoad()`: 'backend' must be one of 'cpu', 'wasm', 'webgpu' but got 'webgl'");
    expect(await msg({ expertDtypes: [] })).to.equal("`benchLoad()`: 'expertDtypes' must name at least one of stored, float32");
    expect(await msg({ expertDtypes: ['f16' as never] })).to.equal("`benchLoad()`: 'expertDtypes' must be one of 'stored', 'float32' but got 'f16'");
    expect(await msg({ denseDtype: 'f16' as never })).to.equal("`benchLoad()`: 'denseDtype' must be one of 'stored', 'float32' but got 'f16'");
    expect(olmoeConfig()).to.deep.include({ hidden_size: 2048, num_hidden_layers: 16, num_experts: 64, num_experts_per_tok: 8, intermediate_size: 1024, vocab_size: 50304, num_attention_heads: 16 });
    const run = (args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'bench', ...args], { encoding: 'utf8' });
    const cases: Array<[string[], string]> = [
      [['--config', 'load', '--expert-dtype', 'f16'], "--expert-dtype: 'f16' is not one of stored, float32"],
      [['--config', 'load', '--layers', '17'], '--layers must be an integer from 1 to 16 but got 17'],
      [['--config', 'S', '--layers', '2'], '--layers is for --config load, not S'],
    ];
    for (const [args, message] of cases) {
      const r = run(args);
      expect(r.status, args.join(' ')).to.equal(2);
      expect(r.stderr, args.join(' ')).to.contain(message);
    }
  });
});
