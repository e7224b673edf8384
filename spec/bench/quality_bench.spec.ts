/**
 * Issue 14's training-quality check, short: LoRA on the example's model for a few steps with
 * float32 experts and with 4-bit ones (int4 in groups of 64, nf4), same seed, windows and adapter
 * init; the 4-bit runs' held-out loss must be within 5 % of float32's (the issue's target, which
 * the full 200-step run in docs/quantized.md meets too). Also: the quantization really changed the
 * base (else the comparison could not fail), training really lowered the loss, nothing is left
 * behind, and the argument checks.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { benchLoRAQuality, formatQualityTable, type QualityBenchOptions } from '../../src/bench/quality_bench.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { isRegistered } from '../../src/plugin.js';

describe('bench/benchLoRAQuality', () => {
  let dir: string;
  let val: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'quality-bench-'));
    // the first 1024 held-out characters (of the 6017 the full run scores), to stay fast
    val = join(dir, 'val.txt');
    writeFileSync(val, readFileSync(resolve('examples/data/target_val.txt'), 'utf8').slice(0, 1024));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('LoRA on int4 and nf4 experts reaches a held-out loss within 5 % of float32 experts\' (8 steps, same seed)', async () => {
    const before = tf.memory().numTensors;
    const seen: string[] = [];
    const r = await benchLoRAQuality({ steps: 8, val, onRow: row => seen.push(row.expertDtype) });
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    expect(isRegistered(), 'the plugin is unregistered again').to.equal(false);
    expect(seen).to.deep.equal(['float32', 'int4', 'nf4']);
    expect(r).to.include({ steps: 8, lr: 1e-2, rank: 4, alpha: 8, batch: 8, seq: 64, seed: 1, backend: tf.getBackend() });
    const [f32, ...fourBit] = r.rows;
    expect(f32.vsBaseline).to.equal(0);
    // training worked: from about 3 nats per character to about 1 in 8 steps
    expect(f32.adaptedLoss, 'float32 LoRA loss').to.be.below(0.5 * f32.baseLoss);
    for (const row of fourBit) {
      // the experts really are quantized: the base alone scores differently
      expect(Math.abs(row.baseLoss - f32.baseLoss), `${row.expertDtype} base vs float32 base`).to.be.above(1e-3);
      expect(row.adaptedLoss, `${row.expertDtype} LoRA loss`).to.be.below(0.5 * row.baseLoss);
      expect(row.vsBaseline).to.be.closeTo(row.adaptedLoss / f32.adaptedLoss - 1, 1e-12);
      expect(Math.abs(row.vsBaseline), `${row.expertDtype}: ${(100 * row.vsBaseline).toFixed(2)} % from float32`).to.be.below(0.05);
    }
    const table = formatQualityTable(r);
    expect(table).to.include('vs float32').and.include('nf4').and.include(`${r.rows[1].adaptedLoss.toFixed(4)}`);
  });

  const bad: Array<[string, QualityBenchOptions, RegExp]> = [
    ['an empty dtype list', { expertDtypes: [] }, /'expertDtypes' must be a non-empty list but got \[\]/],
    ['an unknown dtype', { expertDtypes: ['float32', 'bf16' as never] }, /'expertDtypes\[1\]' must be one of .*'nf4'.* but got 'bf16'/],
    ['steps 0', { steps: 0 }, /'steps' must be >= 1 but got 0/],
    ['a fractional batch', { batch: 2.5 }, /'batch' must be an integer but got 2.5/],
    ['a negative seed', { seed: -1 }, /'seed' must be >= 0 but got -1/],
    ['lr 0', { lr: 0 }, /'lr' must be > 0 but got 0/],
    ['lr Infinity', { lr: Infinity }, /'lr' must be a finite number but got Infinity/],
    ['alpha NaN', { alpha: NaN }, /'alpha' must be a finite number but got NaN/],
  ];
  for (const [what, options, message] of bad) {
    it(`refuses ${what}`, async () => {
      let err: unknown;
      await benchLoRAQuality(options).catch(e => { err = e; });
      expect(err).to.be.instanceOf(OpArgumentError);
      expect((err as Error).message).to.match(message).and.match(/benchLoRAQuality/);
    });
  }

  it('refuses a model folder without config.json, naming it', async () => {
    let err: unknown;
    await benchLoRAQuality({ model: dir }).catch(e => { err = e; });
    expect(err).to.be.instanceOf(OpArgumentError);
    expect((err as Error).message).to.include(`'model' must be a Hugging Face checkpoint folder with config.json but '${dir}' has none`);
  });

  it('refuses options that are not an object', async () => {
    let err: unknown;
    await benchLoRAQuality(null as never).catch(e => { err = e; });
    expect((err as Error).message).to.match(/'options' must be an object but got null/);
  });
});
