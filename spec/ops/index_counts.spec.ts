/**
 * indexCounts against counts made in JS: top-k lists (0/1), repeated indices, one-hots of a
 * single index, rank 3; its gradient (zeros for the indices, so lists on the tape go in); no
 * tensor left behind. Runs on every backend (the reason it exists: src/ops/index_counts.ts).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { indexCounts } from '../../src/ops/index_counts.js';
import { expectNoLeak } from '../helpers/numeric.js';

/** counts[row][c] = occurrences of c in lists[row], flattened. */
function counts64(lists: number[][], depth: number): number[] {
  return lists.flatMap(list => Array.from({ length: depth }, (_, c) => list.filter(i => i === c).length));
}

describe('indexCounts', () => {
  const cases: Array<[string, number[][], number[], number]> = [
    ['top-k lists (distinct): 0/1', [[0, 2], [3, 1], [2, 0]], [3, 2], 4],
    ['repeated indices: counts', [[1, 1, 1], [0, 2, 0]], [2, 3], 3],
    ['one index a row: a one-hot', [[4], [0], [2]], [3, 1], 5],
    ['rank 3 [2, 2, 2]', [[0, 1], [1, 1], [2, 0], [0, 0]], [2, 2, 2], 3],
    ['depth 1', [[0], [0]], [2, 1], 1],
  ];
  for (const [name, lists, shape, depth] of cases) {
    it(`${name}: float32 counts of each class, shape [..., ${depth}]`, () => {
      const indices = tf.tensor(lists.flat(), shape, 'int32');
      expectNoLeak(() => {
        const c = indexCounts(indices, depth);
        expect(c.dtype).to.equal('float32');
        expect(c.shape).to.deep.equal([...shape.slice(0, -1), depth]);
        expect(Array.from(c.dataSync())).to.deep.equal(counts64(lists, depth));
        c.dispose();
      });
      indices.dispose();
    });
  }

  it('takes index lists on the tape: their gradient is zeros, the rest flows past', () => {
    const logits = tf.tensor2d([[0.5, 2, -1], [1, 0, 3]]);
    expectNoLeak(() => {
      const g = tf.grad((x: tf.Tensor) => {
        // the experts depend on x through a leaf with a gradient, as Routing.experts does
        const chosen = tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => ({
          value: tf.topk(args[0] as tf.Tensor, 2).indices,
          gradFunc: () => tf.zerosLike(args[0] as tf.Tensor),
        }))(x);
        return tf.sum(tf.mul(tf.softmax(x), indexCounts(chosen, 3)));
      })(logits);
      // d Σ softmax(x)·m / dx with m the 0/1 mask of the top 2: softmax's Jacobian times m
      const p = [[0.5, 2, -1], [1, 0, 3]].map(r => { const e = r.map(Math.exp); const s = e.reduce((a, b) => a + b); return e.map(v => v / s); });
      const m = [[1, 1, 0], [1, 0, 1]];
      const want = p.flatMap((pr, t) => {
        const dot = pr.reduce((a, v, j) => a + v * m[t][j], 0);
        return pr.map((v, i) => v * (m[t][i] - dot));
      });
      Array.from(g.dataSync()).forEach((v, i) => expect(v).to.be.closeTo(want[i], 1e-6));
      g.dispose();
    });
    logits.dispose();
  });
});
