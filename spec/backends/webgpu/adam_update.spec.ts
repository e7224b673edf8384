/**
 * MoEAdamUpdate on webgpu (src/train/adam_update.ts, programs/adam_program.ts): Adam's update of a
 * variable in 2 programs (the parameter; both moments) instead of ~14 composed kernels (issue 15). Checked against torch.optim.Adam
 * (spec/fixtures/train/loop_reference.json) and a float64 replay of its formula on 2-D variables,
 * against the composed ops on the same backend (a LoRA training run of a tiny model gives the same
 * losses and parameters), and by its dispatch count. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFile } from 'node:fs/promises';
import { StepCounter } from '../../../bench/e2e/step_profile.js';
import { SeededRandom } from '../../../src/data/random.js';
import { ADAM_GROUPED_FLAG, ADAM_UPDATE, ADAM_UPDATE_KERNEL_FLAG } from '../../../src/train/adam_update.js';
import { Adam } from '../../../src/train/optimizer.js';
import { maxRelativeError } from '../../../src/util/numeric.js';
import { adamStepErrors, type AdamReference } from '../../helpers/adam_reference.js';
import { withTinyMoETraining } from '../../helpers/tiny_moe_adam.js';

/** Runs `fn` with Adam composed from tfjs ops (ADAM_UPDATE_KERNEL_FLAG false), then the kernel again. */
async function withComposedAdam<T>(fn: () => Promise<T>): Promise<T> {
  expect(tf.getKernel(ADAM_UPDATE, 'webgpu'), 'MoEAdamUpdate is registered on webgpu').to.not.equal(undefined);
  tf.env().set(ADAM_UPDATE_KERNEL_FLAG, false);
  try {
    return await fn();
  } finally {
    tf.env().set(ADAM_UPDATE_KERNEL_FLAG, true);
  }
}

describe('webgpu: MoEAdamUpdate (Adam in 2 programs per variable)', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    // the per-variable kernel, not the grouped in-place Adam that Adam uses by default (grouped_adam.spec.ts)
    tf.env().set(ADAM_GROUPED_FLAG, false);
  });
  after(() => tf.env().set(ADAM_GROUPED_FLAG, true));

  it('gives torch.optim.Adam\'s parameters (its own fixture) step after step', async () => {
    const ref = (JSON.parse(await readFile('spec/fixtures/train/loop_reference.json', 'utf8')) as { adam: AdamReference }).adam;
    const before = tf.memory().numTensors;
    (await adamStepErrors(ref)).forEach((err, step) => expect(err, `step ${step + 1}`).to.be.below(1e-6));
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });

  it('on 2-D variables: a float64 replay of torch\'s formula, the moments too, in 2 dispatches per variable', async () => {
    const rng = new SeededRandom(5);
    const shapes = [[7, 5], [3, 130]];
    const values = shapes.map(s => Float32Array.from({ length: s[0] * s[1] }, () => rng.next() * 2 - 1));
    const before = tf.memory().numTensors;
    const variables = shapes.map((s, i) => tf.tidy(() => tf.variable(tf.tensor2d(values[i], s as [number, number]))));
    const adam = new Adam(variables);
    const p = values.map(v => Array.from(v));
    const m = values.map(v => new Array<number>(v.length).fill(0));
    const v2 = values.map(v => new Array<number>(v.length).fill(0));
    const lrs = [1e-2, 3e-2, 5e-3];
    const counter = new StepCounter();
    for (let t = 1; t <= lrs.length; t++) {
      const grads = values.map(v => Float32Array.from({ length: v.length }, () => Math.fround(rng.next() * 4 - 2)));
      for (let i = 0; i < grads.length; i++) {
        for (let k = 0; k < grads[i].length; k++) {
          const g = grads[i][k];
          m[i][k] = 0.9 * m[i][k] + 0.1 * g;
          v2[i][k] = 0.999 * v2[i][k] + 0.001 * g * g;
          p[i][k] -= lrs[t - 1] / (1 - 0.9 ** t) * m[i][k] / (Math.sqrt(v2[i][k]) / Math.sqrt(1 - 0.999 ** t) + 1e-8);
        }
      }
      const tensors = grads.map((g, i) => tf.tensor2d(g, shapes[i] as [number, number]));
      counter.install();
      try {
        adam.apply(tensors, lrs[t - 1]);
      } finally {
        counter.uninstall();
      }
      tf.dispose(tensors);
    }
    expect(counter.programCounts, 'one program per output (param, moments) and variable').to.deep.equal({ AdamUpdateProgram: 2 * 2 * lrs.length });
    for (let i = 0; i < variables.length; i++) {
      expect(maxRelativeError(await variables[i].data(), p[i]), `param ${i}`).to.be.below(1e-6);
    }
    const saved = await adam.snapshot();
    saved.m.forEach((got, i) => expect(maxRelativeError(got, m[i]), `m ${i}`).to.be.below(1e-6));
    saved.v.forEach((got, i) => expect(maxRelativeError(got, v2[i]), `v ${i}`).to.be.below(1e-6));
    adam.dispose();
    tf.dispose(variables);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });

  it('a gradScale: a float64 replay of the scaled gradient\'s step; a 0 step leaves param and moments bit for bit', async () => {
    const rng = new SeededRandom(6);
    const shape: [number, number] = [3, 130];
    const n = shape[0] * shape[1];
    const start = Float32Array.from({ length: n }, () => rng.next() * 2 - 1);
    const before = tf.memory().numTensors;
    const variable = tf.tidy(() => tf.variable(tf.tensor2d(start, shape)));
    const adam = new Adam([variable]);
    const p = Array.from(start);
    const m = new Array<number>(n).fill(0);
    const v = new Array<number>(n).fill(0);
    const counter = new StepCounter();
    let t = 0;
    for (const [scale, lr] of [[0.37, 1e-2], [0, 3e-2], [1, 5e-3]] as const) {
      const g = Float32Array.from({ length: n }, () => Math.fround(rng.next() * 4 - 2));
      const beforeStep = { p: await variable.data(), moments: await adam.snapshot() };
      const grad = tf.tensor2d(g, shape);
      const s = tf.scalar(scale);
      counter.install();
      try {
        adam.apply([grad], lr, s);
      } finally {
        counter.uninstall();
      }
      tf.dispose([grad, s]);
      if (scale === 0) {
        adam.uncountStep();
        const after = await adam.snapshot();
        expect(Buffer.from((await variable.data() as Float32Array).buffer).equals(Buffer.from((beforeStep.p as Float32Array).buffer)), 'param of the 0 step').to.equal(true);
        expect(Buffer.from(after.m[0].buffer).equals(Buffer.from(beforeStep.moments.m[0].buffer)), 'm of the 0 step').to.equal(true);
        expect(Buffer.from(after.v[0].buffer).equals(Buffer.from(beforeStep.moments.v[0].buffer)), 'v of the 0 step').to.equal(true);
        continue;
      }
      t++;
      for (let k = 0; k < n; k++) {
        const gs = Math.fround(g[k] * scale);
        m[k] = 0.9 * m[k] + 0.1 * gs;
        v[k] = 0.999 * v[k] + 0.001 * gs * gs;
        p[k] -= lr / (1 - 0.9 ** t) * m[k] / (Math.sqrt(v[k]) / Math.sqrt(1 - 0.999 ** t) + 1e-8);
      }
    }
    expect(counter.programCounts, 'one program per output, the 0 step too').to.deep.equal({ AdamUpdateProgram: 2 * 3 });
    expect(adam.step, 'the steps applied').to.equal(2);
    expect(maxRelativeError(await variable.data(), p), 'param').to.be.below(1e-6);
    const saved = await adam.snapshot();
    expect(maxRelativeError(saved.m[0], m), 'm').to.be.below(1e-6);
    expect(maxRelativeError(saved.v[0], v), 'v').to.be.below(1e-6);
    adam.dispose();
    variable.dispose();
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });

  it('LoRA training of a tiny MoE model: the same losses and parameters as the composed ops, ~7× fewer dispatches', async () => {
    await withTinyMoETraining(async ({ variables, run }) => {
      const before = tf.memory().numTensors;
      const fused = await run(v => v.data());
      const composed = await withComposedAdam(() => run(v => v.data()));
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
      // the updates did something: B starts at 0, so later losses differ from the first
      expect(Math.abs(fused.losses[3] - fused.losses[0]), 'training moved the loss').to.be.above(1e-4);
      expect(maxRelativeError(fused.losses, composed.losses), `losses ${fused.losses} vs ${composed.losses}`).to.be.below(1e-5);
      fused.params.forEach((p, i) => expect(maxRelativeError(p, composed.params[i]), `variable ${variables[i].name}`).to.be.below(1e-4));
      expect(fused.counter.current.dispatches, 'fused: 2 per variable and step').to.equal(2 * variables.length * 4);
      expect(composed.counter.current.dispatches, 'composed: more than 6× as many').to.be.above(6 * fused.counter.current.dispatches);
    });
  });
});
