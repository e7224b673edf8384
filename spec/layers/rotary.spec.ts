import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { applyRotary, rotaryTables } from '../../src/layers/rotary.js';
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

  it('rejects bad sizes', () => {
    expect(() => rotaryTables(4, 7, 1e4)).to.throw("`rotaryTables()`: 'headDim' must be even but got 7");
    expect(() => rotaryTables(0, 8, 1e4)).to.throw("`rotaryTables()`: 'seqLen' must be >= 1 but got 0");
    expect(() => rotaryTables(4, 8, 0)).to.throw("`rotaryTables()`: 'theta' must be > 0 but got 0");
    expect(() => rotaryTables(4, 8, 1e4, -1)).to.throw("`rotaryTables()`: 'first' must be >= 0 but got -1");
  });
});
