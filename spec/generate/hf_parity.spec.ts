/**
 * generate() against transformers' own generate() (spec/fixtures/generate/hf_generation.json, made on
 * the GPU machine by tools/generate/make_hf_generation_reference.py from the whole-model fixtures):
 * greedy tokens with and without the KV cache, the logits of every step, greedy with the fixture's
 * PEFT adapter, and the temperature / top-k / top-p warpers.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { readFile, writeFile, cp } from 'node:fs/promises';
import { join } from 'node:path';
import { generate } from '../../src/generate/generate.js';
import { processLogits } from '../../src/generate/sampling.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { cleanup, fixtureDir, tempDir } from '../io/checkpoint_helpers.js';
import { maxRelativeError } from '../../src/util/numeric.js';

interface ModelReference {
  prompt: number[];
  greedy: number[];
  greedy_no_cache: number[];
  step_logits: number[][];
  adapter_greedy?: number[];
  config_changes: Record<string, unknown>;
}
interface WarperCase { logits: number[]; temperature: number; top_k: number; top_p: number; scores: Array<number | null> }
interface Reference { new_tokens: number; models: Record<string, ModelReference>; warpers: WarperCase[] }

const REFERENCE = 'spec/fixtures/generate/hf_generation.json';


/** The fixture's folder, or a copy with config.json changed as the reference changed it. */
async function modelFolder(arch: string, changes: Record<string, unknown>): Promise<string> {
  if (Object.keys(changes).length === 0) return fixtureDir(arch);
  const dir = await tempDir('hf-generation-');
  await cp(fixtureDir(arch), dir, { recursive: true });
  const config = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
  await writeFile(join(dir, 'config.json'), JSON.stringify({ ...config, ...changes }));
  return dir;
}

describe('generate/hf_parity (transformers generate)', function () {
  this.timeout(120_000);
  let reference: Reference;
  before(async () => {
    reference = JSON.parse(await readFile(REFERENCE, 'utf8')) as Reference;
  });
  after(cleanup);

  const ARCHS = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', 'glm4_moe', 'gpt_oss', 'mixtral_window'];
  for (const name of ARCHS) {
    it(`${name}: greedy tokens with and without the cache, and every step's logits`, async () => {
      const ref = reference.models[name];
      expect(ref, `${name} in ${REFERENCE}`).to.not.equal(undefined);
      const arch = name === 'mixtral_window' ? 'mixtral' : name;
      const model = await loadHFCheckpoint(await modelFolder(arch, ref.config_changes));
      const before = tf.memory().numTensors;
      try {
        // transformers' own cache check first: the reference is consistent with itself
        expect(ref.greedy_no_cache).to.deep.equal(ref.greedy);
        const options = { maxNewTokens: reference.new_tokens, eosTokenIds: [] };
        const cached = await generate(model, ref.prompt, options);
        expect(Array.from(cached.ids)).to.deep.equal(ref.greedy);
        const uncached = await generate(model, ref.prompt, { ...options, useCache: false });
        expect(Array.from(uncached.ids)).to.deep.equal(ref.greedy);
        // step i's logits are the full sequence's logits at position prompt + i - 1
        const sequence = [...ref.prompt, ...ref.greedy];
        const logits = tf.tidy(() => {
          const all = model.predict(tf.tensor2d([sequence], [1, sequence.length], 'int32')) as tf.Tensor;
          return tf.slice(all, [0, ref.prompt.length - 1, 0], [1, ref.greedy.length, -1]);
        });
        const values = await logits.data();
        logits.dispose();
        const vocab = ref.step_logits[0].length;
        for (let step = 0; step < ref.greedy.length; step++) {
          const row = values.subarray(step * vocab, (step + 1) * vocab);
          expect(maxRelativeError(row, ref.step_logits[step]), `step ${step}`).to.be.below(1e-4);
        }
        expect(tf.memory().numTensors).to.equal(before);
      } finally {
        model.dispose();
      }
    });
  }

  for (const arch of ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', 'glm4_moe', 'gpt_oss']) {
    it(`${arch}: greedy with the fixture's PEFT adapter`, async () => {
      const ref = reference.models[arch];
      expect(ref.adapter_greedy, `${arch}.adapter_greedy`).to.be.an('array');
      const model = await loadHFCheckpoint(fixtureDir(arch)) as tfl.LayersModel;
      try {
        await loadPeftAdapter(model, join(fixtureDir(arch), 'adapter'));
        const r = await generate(model, ref.prompt, { maxNewTokens: reference.new_tokens, eosTokenIds: [] });
        expect(Array.from(r.ids)).to.deep.equal(ref.adapter_greedy);
        // the adapter changes what is generated, so the comparison above is not the base model's again
        expect(ref.adapter_greedy).to.not.deep.equal(ref.greedy);
      } finally {
        model.dispose();
      }
    });
  }

  it('processLogits gives the scores of transformers\' temperature, top-k and top-p warpers', () => {
    expect(reference.warpers.length).to.be.above(10);
    for (const c of reference.warpers) {
      const scores = processLogits(Float32Array.from(c.logits), { temperature: c.temperature, topK: c.top_k, topP: c.top_p });
      const label = `T ${c.temperature} k ${c.top_k} p ${c.top_p} on [${c.logits.slice(0, 3)}...]`;
      for (let i = 0; i < scores.length; i++) {
        if (c.scores[i] === null) expect(scores[i], `${label} [${i}]`).to.equal(-Infinity);
        else expect(scores[i], `${label} [${i}]`).to.be.closeTo(c.scores[i]!, 1e-12);
      }
    }
  });
});
