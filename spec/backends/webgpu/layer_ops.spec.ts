/**
 * The decoder's fused layer ops (rmsNorm, applyRotary) on webgpu: their op specs read
 * asynchronously, so they run here unchanged (and on cpu and wasm from spec/ops/); applyRotary
 * runs webgpu's MoERotary there. Here: what that kernel saves, counted.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { StepCounter } from '../../../bench/e2e/step_profile.js';
import { applyRotary, ROTARY } from '../../../src/ops/rotary.js';
import { rotaryTables } from '../../../src/layers/rotary.js';
import '../../ops/rms_norm.spec.js';
import '../../ops/rotary.spec.js';

describe('webgpu: applyRotary runs MoERotary (issue 15)', () => {
  it('one program forward and one for the gradient, instead of a Reverse, two products and a sum each', async () => {
    expect(tf.getKernel(ROTARY, 'webgpu'), 'MoERotary is registered on webgpu').to.not.equal(undefined);
    const { cos, sin } = rotaryTables(5, 8, 100);
    const x = tf.randomNormal([6, 5, 8]) as tf.Tensor3D;
    const before = tf.memory().numTensors;
    const counter = new StepCounter();
    counter.install();
    let dx: tf.Tensor;
    try {
      dx = tf.grad((a: tf.Tensor) => tf.sum(applyRotary(a as tf.Tensor3D, cos, sin)))(x);
    } finally {
      counter.uninstall();
    }
    await dx.data();
    const { RotaryProgram, ...others } = counter.programCounts;
    expect(RotaryProgram, 'rope and its transpose').to.equal(2);
    // what the sum and its gradient add around the op: no Reverse, no BinaryOp of the rotation's
    expect(others).to.not.have.any.keys('ReverseProgram');
    expect(others.BinaryOpProgram ?? 0, `the other programs: ${JSON.stringify(others)}`).to.equal(0);
    dx.dispose();
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    tf.dispose([cos, sin, x]);
  });
});
