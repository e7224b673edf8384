/**
 * The training loop's arithmetic against transformers and torch themselves
 * (spec/fixtures/train/loop_reference.json, made on the GPU machine by
 * tools/train/make_loop_reference.py): the learning rate of every step of get_scheduler's
 * constant_with_warmup / linear / cosine, torch.optim.Adam's parameters after steps with a changing
 * rate, and clip_grad_norm_'s total norm and clipped gradients.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFile } from 'node:fs/promises';
import { clipByGlobalNorm } from '../../src/train/optimizer.js';
import { learningRateAt, type LRScheduler } from '../../src/train/schedule.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { adamStepErrors, type AdamReference } from '../helpers/adam_reference.js';

interface ScheduleReference { lr: number; warmup_steps: number; total_steps: number; lrs: number[] }
interface Reference {
  schedules: Record<LRScheduler, ScheduleReference>;
  adam: AdamReference;
  clip: { grads: number[][]; shapes: number[][]; cases: Array<{ max_norm: number; norm: number; clipped: number[][] }> };
}


describe('train/loop_reference (transformers get_scheduler, torch Adam and clip_grad_norm_)', () => {
  let reference: Reference;
  before(async () => {
    reference = JSON.parse(await readFile('spec/fixtures/train/loop_reference.json', 'utf8')) as Reference;
  });

  for (const scheduler of ['constant', 'linear', 'cosine'] as const) {
    it(`${scheduler}: the learning rate of every step`, () => {
      const ref = reference.schedules[scheduler];
      expect(ref.lrs).to.have.length(ref.total_steps);
      const options = { lr: ref.lr, totalSteps: ref.total_steps, warmupSteps: ref.warmup_steps };
      // step s (1-based) is the optimizer step after s - 1 scheduler steps, as in the reference
      ref.lrs.forEach((lr, i) => expect(learningRateAt(scheduler, i + 1, options), `step ${i + 1}`).to.be.closeTo(lr, 1e-15));
    });
  }

  it('Adam: the parameters after each step equal torch.optim.Adam\'s (float32)', async () => {
    (await adamStepErrors(reference.adam)).forEach((err, step) => expect(err, `step ${step + 1}`).to.be.below(1e-6));
  });

  it('clipByGlobalNorm: the norm and the clipped gradients of clip_grad_norm_', async () => {
    const ref = reference.clip;
    for (const c of ref.cases) {
      const grads = ref.grads.map((g, i) => tf.tensor(g, ref.shapes[i]));
      const { grads: clipped, norm } = await clipByGlobalNorm(grads, c.max_norm);
      expect(norm, `max_norm ${c.max_norm}`).to.be.closeTo(c.norm, 1e-6 * c.norm);
      for (let i = 0; i < clipped.length; i++) {
        expect(maxRelativeError(await clipped[i].data(), c.clipped[i]), `max_norm ${c.max_norm} grad ${i}`).to.be.below(1e-6);
      }
      tf.dispose([...grads, ...clipped]);
    }
  });
});
