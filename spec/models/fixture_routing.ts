/**
 * Spec helper: the routing of a fixture's block on `block.x` against the router outputs the
 * fixture recorded (`block.router.output.N`: the int32 chosen experts [T, K] and the float
 * weights [T, K] of the same shape), per token as sets (transformers' top-k may be unsorted).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFileSync } from 'node:fs';
import { blockLayerIndex, loadMoEBlockWeights } from '../../src/io/hf_block.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { type HFConfig, moeBlockConfigFromHF } from '../../src/models/families.js';
import { disposeMoEBlockWeights } from '../../src/models/weight_fields.js';
import { moeBlock } from '../../src/ops/moe_block.js';
import { expectClose } from '../helpers/numeric.js';

/** Checks chosen experts (identical sets) and weights (<= 1e-5 relative, matched by expert) for every token. */
export async function expectFixtureRouting(dir: string, expertKernel: string): Promise<void> {
  const golden = JSON.parse(readFileSync(`${dir}/golden.json`, 'utf8')) as { config: HFConfig; block: string };
  const g = await readSafetensorsFile(`${dir}/golden.safetensors`);
  const model = await readSafetensorsFile(`${dir}/model.safetensors`);
  const outputs = g.names().filter(n => n.startsWith('block.router.output.'));
  const indexName = outputs.find(n => g.info(n).dtype === 'I32')!;
  const weightName = outputs.find(n => g.info(n).dtype !== 'I32' && g.info(n).shape.join() === g.info(indexName).shape.join())!;
  const before = tf.memory().numTensors;
  const weights = await loadMoEBlockWeights(model, golden.config, blockLayerIndex(golden.block));
  const [xs, idx, w] = await Promise.all(['block.x', indexName, weightName].map(n => g.tensor(n)));
  const [T, K] = idx.shape;
  const x = tf.reshape(xs, [T, xs.shape[xs.rank - 1]]) as tf.Tensor2D;
  const { out, routing } = moeBlock(x, weights, moeBlockConfigFromHF(golden.config), { expertKernel });
  const byExpert = (e: ArrayLike<number>, v: ArrayLike<number>) => Array.from({ length: T }, (_, t) => {
    const pairs = Array.from({ length: K }, (_, k) => [e[t * K + k], v[t * K + k]]).sort((a, b) => a[0] - b[0]);
    return { experts: pairs.map(p => p[0]), weights: pairs.map(p => p[1]) };
  });
  const ours = byExpert(routing.experts.dataSync(), routing.weights.dataSync());
  const theirs = byExpert(idx.dataSync(), w.dataSync());
  expect(ours.map(r => r.experts), 'chosen experts per token').to.deep.equal(theirs.map(r => r.experts));
  expectClose(ours.flatMap(r => r.weights), theirs.flatMap(r => r.weights), 1e-5, 'routing weights');
  tf.dispose([out, routing.weights, routing.experts, routing.logits, xs, idx, w, x]);
  disposeMoEBlockWeights(weights);
  expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
}
