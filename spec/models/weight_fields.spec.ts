import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import {
  TRAINABLE_FIELDS, disposeMoEBlockWeights, getWeightField, trainableWeightFields, withWeightFields,
} from '../../src/models/weight_fields.js';
import type { MoEBlockWeights } from '../../src/ops/types.js';

function block(): MoEBlockWeights {
  return {
    router: { weight: tf.zeros([4, 2]), correctionBias: tf.zeros([4]) },
    experts: { gateUp: tf.zeros([4, 6, 2]), down: tf.zeros([4, 2, 3]), layout: 'outIn' },
    shared: { gate: tf.zeros([5, 2]), up: tf.zeros([5, 2]), down: tf.zeros([2, 5]), sigmoidGate: tf.zeros([1, 2]) },
  };
}

describe('models/weight_fields', () => {
  it('lists the trainable tensors present, in a fixed order, without the selection bias', () => {
    const w = block();
    expect(trainableWeightFields(w).map(([f]) => f)).to.deep.equal([
      'router.weight', 'experts.gateUp', 'experts.down', 'shared.gate', 'shared.up', 'shared.down',
      'shared.sigmoidGate',
    ]);
    expect(trainableWeightFields(w)[1][1]).to.equal(w.experts.gateUp);
    expect(TRAINABLE_FIELDS).to.not.include('router.correctionBias');
    disposeMoEBlockWeights(w);
  });

  it('reads and replaces fields without mutating the input', () => {
    const w = block();
    const replacement = tf.ones([4, 6, 2]);
    const copy = withWeightFields(w, [['experts.gateUp', replacement]]);
    expect(getWeightField(copy, 'experts.gateUp')).to.equal(replacement);
    expect(getWeightField(w, 'experts.gateUp')).to.equal(w.experts.gateUp);
    expect(copy.experts.down).to.equal(w.experts.down);
    expect(copy.experts.layout).to.equal('outIn');
    expect(copy.router.correctionBias).to.equal(w.router.correctionBias);
    expect(getWeightField(w, 'router.bias')).to.equal(undefined);
    expect(() => withWeightFields(w, [['router.bias', replacement]])).to.throw(
        "withWeightFields: the block has no 'router.bias' to replace");
    const noShared = { router: w.router, experts: w.experts };
    expect(() => withWeightFields(noShared, [['shared.up', replacement]])).to.throw(
        "withWeightFields: the block has no 'shared.up' to replace");
    replacement.dispose();
    disposeMoEBlockWeights(w);
  });

  it('disposes every tensor of a block, LoRA factors included', () => {
    const before = tf.memory().numTensors;
    const w = block();
    w.router.lora = [{ A: tf.zeros([1, 2]), B: tf.zeros([4, 1]), scaling: 2 }];
    w.experts.gateUpLoRA = [{ A: tf.zeros([4, 2]), B: tf.zeros([6, 4]), scaling: 2 }];
    w.experts.downLoRA = [{ A: tf.zeros([4, 3]), B: tf.zeros([2, 4]), scaling: 2 }];
    disposeMoEBlockWeights(w);
    expect(tf.memory().numTensors).to.equal(before);
  });
});
