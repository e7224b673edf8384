import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { applyRotary, ropeFrequencies, rotaryTables, rotaryTablesAt, type YarnRope } from '../../src/layers/rotary.js';
import { yarn64 } from '../helpers/attention64.js';
import { asF32, expectClose, expectNoLeak, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

/** float64 rotate-half rope on x [N, S, D]. */
function rope64(x: Float64Array, n: number, s: number, d: number, theta: number): Float64Array {
  const out = new Float64Array(x.length);
  const half = d / 2;
  for (let a = 0; a < n; a++) {
    for (let p = 0; p < s; p++) {
      for (let i = 0; i < half; i++) {
        const angle = p / theta ** ((2 * i) / d);
        const c = Math.cos(angle);
        const sn = Math.sin(angle);
        const base = (a * s + p) * d;
        const x1 = x[base + i];
        const x2 = x[base + i + half];
        out[base + i] = x1 * c - x2 * sn;
        out[base + i + half] = x2 * c + x1 * sn;
      }
    }
  }
  return out;
}

describe('rotary embeddings', () => {
  it('tables hold cos/sin of p·theta^(-2i/D), repeated over both halves', () => {
    expectNoLeak(() => {
      const { cos, sin } = rotaryTables(5, 8, 10000);
      expect(cos.shape).to.deep.equal([5, 8]);
      const c = cos.dataSync();
      const s = sin.dataSync();
      for (let p = 0; p < 5; p++) {
        for (let i = 0; i < 4; i++) {
          const angle = p / 10000 ** (i / 4);
          expect(c[p * 8 + i]).to.be.closeTo(Math.cos(angle), 1e-7);
          expect(c[p * 8 + i + 4]).to.equal(c[p * 8 + i]);
          expect(s[p * 8 + i]).to.be.closeTo(Math.sin(angle), 1e-7);
          expect(s[p * 8 + i + 4]).to.equal(s[p * 8 + i]);
        }
      }
      tf.dispose([cos, sin]);
    });
  });

  it('tables from a first position (a generation step after cached tokens) are the rows of the full table', () => {
    expectNoLeak(() => {
      const full = rotaryTables(9, 8, 10000);
      const part = rotaryTables(3, 8, 10000, 6);
      expect(Array.from(part.cos.dataSync())).to.deep.equal(Array.from(full.cos.dataSync().slice(6 * 8)));
      expect(Array.from(part.sin.dataSync())).to.deep.equal(Array.from(full.sin.dataSync().slice(6 * 8)));
      tf.dispose([full.cos, full.sin, part.cos, part.sin]);
    });
  });

  it('applyRotary matches a float64 reference, gradient equal to finite differences', () => {
    const rng = new Rng(3);
    const [n, s, d, theta] = [2, 4, 6, 100];
    const x = asF32(rng.array(n * s * d));
    const g = asF32(rng.array(n * s * d));
    const xt = tensorOf(x, [n, s, d]) as tf.Tensor3D;
    const gt = tensorOf(g, [n, s, d]);
    const { cos, sin } = rotaryTables(s, d, theta);
    expectNoLeak(() => {
      const y = applyRotary(xt, cos, sin);
      expectClose(y, rope64(x, n, s, d, theta), 1e-6, 'forward');
      const dx = tf.grad((a: tf.Tensor) => tf.sum(tf.mul(applyRotary(a as tf.Tensor3D, cos, sin), gt)))(xt);
      const fd = finiteDifferences(v => rope64(v, n, s, d, theta).reduce((acc, val, i) => acc + val * g[i], 0), x);
      expectClose(dx, fd, 1e-5, 'dx');
      tf.dispose([y, dx]);
    });
    tf.dispose([xt, gt, cos, sin]);
  });

  describe('YaRN (gpt-oss: factor 32, beta 32/1, original context 4096, theta 150000)', () => {
    const yarn: YarnRope = {
      kind: 'yarn', factor: 32, originalMaxPositionEmbeddings: 4096, betaFast: 32, betaSlow: 1, truncate: false,
      attentionFactor: 0.1 * Math.log(32) + 1,
    };
    for (const truncate of [false, true]) {
      it(`frequencies and tables (truncate ${truncate}): cos and sin of p·f_i times the attention factor`, () => {
        const scaling = { ...yarn, truncate };
        const want = yarn64(16, 150000, scaling);
        const { inverseFrequencies, attentionFactor } = ropeFrequencies(16, 150000, scaling);
        inverseFrequencies.forEach((f, i) => expect(f, `f_${i}`).to.be.closeTo(want[i], 1e-12 * want[0]));
        expect(attentionFactor).to.be.closeTo(1.34657359, 1e-8);
        // the fastest dimension keeps theta's frequency, the slowest is divided by the factor
        expect(inverseFrequencies[0]).to.equal(1);
        expect(inverseFrequencies[7]).to.be.closeTo(150000 ** (-14 / 16) / 32, 1e-15);
        expectNoLeak(() => {
          const { cos, sin } = rotaryTables(6, 16, 150000, 3, scaling);
          const [c, sn] = [cos.dataSync(), sin.dataSync()];
          for (let p = 0; p < 6; p++) {
            for (let i = 0; i < 8; i++) {
              for (const at of [i, i + 8]) {
                expect(c[p * 16 + at]).to.be.closeTo(Math.cos((p + 3) * want[i]) * attentionFactor, 1e-6);
                expect(sn[p * 16 + at]).to.be.closeTo(Math.sin((p + 3) * want[i]) * attentionFactor, 1e-6);
              }
            }
          }
          // per-token positions gather the same rows
          const positions = tf.tensor2d([[3, 8]], [1, 2], 'int32');
          const at = rotaryTablesAt(positions, 16, 150000, 9, scaling);
          expect(Array.from(at.cos.dataSync())).to.deep.equal(Array.from(c.slice(0, 16)).concat(Array.from(c.slice(5 * 16, 6 * 16))));
          tf.dispose([cos, sin, at.cos, at.sin, positions]);
        });
      });
    }

    it('truncate rounds the ramp to whole dimensions: the two settings differ inside the ramp only', () => {
      const a = ropeFrequencies(16, 150000, yarn).inverseFrequencies;
      const b = ropeFrequencies(16, 150000, { ...yarn, truncate: true }).inverseFrequencies;
      expect(a[0]).to.equal(b[0]);
      expect(a[7]).to.equal(b[7]);
      expect(Array.from(a).some((f, i) => Math.abs(f - b[i]) > 1e-6 * f)).to.equal(true);
    });
  });

  it('rejects bad sizes', () => {
    expect(() => rotaryTables(4, 7, 1e4)).to.throw("`rotaryTables()`: 'headDim' must be even but got 7");
    expect(() => rotaryTables(0, 8, 1e4)).to.throw("`rotaryTables()`: 'seqLen' must be >= 1 but got 0");
    expect(() => rotaryTables(4, 8, 0)).to.throw("`rotaryTables()`: 'theta' must be > 0 but got 0");
    expect(() => rotaryTables(4, 8, 1e4, -1)).to.throw("`rotaryTables()`: 'first' must be >= 0 but got -1");
  });
});
