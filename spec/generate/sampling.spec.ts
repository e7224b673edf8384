/**
 * Sampling's logits processing against a float64 port of transformers' own warpers
 * (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, generation/logits_process.py, applied
 * in that order as `_get_logits_processor` does), and the seeded draw.
 */
import { expect } from 'chai';
import { SeededRandom } from '../../src/data/random.js';
import { drawToken, processLogits, softmax } from '../../src/generate/sampling.js';

/** HF's warpers, line by line in float64 (min_tokens_to_keep = 1, filter_value = -inf). */
function hfReference(logits: number[], temperature: number, topK: number, topP: number): number[] {
  let scores = logits.map(v => v);
  if (temperature !== 1.0) scores = scores.map(v => v / temperature);             // scores / temperature
  if (topK !== 0) {
    const k = Math.min(Math.max(topK, 1), scores.length);
    const kth = [...scores].sort((a, b) => b - a)[k - 1];                             // torch.topk(scores, k)[0][..., -1]
    scores = scores.map(v => (v < kth ? -Infinity : v));
  }
  if (topP < 1.0) {
    const sortedIdx = scores.map((_, i) => i).sort((a, b) => scores[a] - scores[b]); // torch.sort(descending=False)
    const sorted = sortedIdx.map(i => scores[i]);
    const max = Math.max(...sorted);
    const e = sorted.map(v => Math.exp(v - max));
    const z = e.reduce((s, v) => s + v, 0);
    let cum = 0;
    const remove = e.map(v => (cum += v / z) <= 1 - topP);                          // cumulative_probs <= (1 - top_p)
    remove[remove.length - 1] = false;                                               // [..., -min_tokens_to_keep:] = 0
    const out = [...scores];
    sortedIdx.forEach((i, r) => { if (remove[r]) out[i] = -Infinity; });
    scores = out;
  }
  return scores;
}

// distinct values, no two sums landing exactly on a top-p boundary
const LOGITS = [0.31, -1.7, 2.24, 0.05, 1.12, -0.43, 3.01, -2.6, 0.88, 1.57, -0.09, 2.63];

describe('generate/sampling', () => {
  const cases: Array<[number, number, number]> = [
    [1, 0, 1], [0.7, 0, 1], [1, 5, 1], [1, 0, 0.8], [0.5, 4, 0.9], [1.3, 7, 0.6], [2, 50, 0.3], [1, 1, 1],
    [0.9, 12, 0.999], [3, 3, 0.05], [0.25, 0, 0.95],
  ];
  for (const [t, k, p] of cases) {
    it(`temperature ${t}, top-k ${k}, top-p ${p}: the scores of transformers' warpers`, () => {
      const ours = Array.from(processLogits(Float32Array.from(LOGITS), { temperature: t, topK: k, topP: p }));
      // the float32 logits, as the model gives them
      const ref = hfReference(Array.from(Float32Array.from(LOGITS)), t, k, p);
      expect(ours.map(v => v === -Infinity)).to.deep.equal(ref.map(v => v === -Infinity));
      ours.forEach((v, i) => { if (v !== -Infinity) expect(v).to.be.closeTo(ref[i], 1e-12); });
    });
  }

  it('top-k keeps every token tied with the k-th; top-p always keeps the most likely token', () => {
    const tied = processLogits([1, 2, 2, 3, 0], { temperature: 1, topK: 2, topP: 1 });
    expect(Array.from(tied)).to.deep.equal([-Infinity, 2, 2, 3, -Infinity]);
    expect(Array.from(tied)).to.deep.equal(hfReference([1, 2, 2, 3, 0], 1, 2, 1));
    const one = processLogits([0, 9, 1], { temperature: 1, topK: 0, topP: 1e-9 });
    expect(Array.from(one)).to.deep.equal([-Infinity, 9, -Infinity]);
  });

  it('draws with the softmax\'s frequencies, never a removed token, the same ids for the same seed', () => {
    const scores = processLogits(LOGITS, { temperature: 0.8, topK: 6, topP: 0.9 });
    const probs = softmax(scores);
    const rng = new SeededRandom(11);
    const counts = new Array<number>(LOGITS.length).fill(0);
    const n = 20000;
    const draws: number[] = [];
    for (let i = 0; i < n; i++) draws.push(drawToken(scores, rng));
    draws.forEach(d => { counts[d]++; });
    counts.forEach((c, i) => {
      if (probs[i] === 0) expect(c, `token ${i} was removed`).to.equal(0);
      // binomial standard deviation at n = 20000 is at most 0.0036: 4 of them
      else expect(c / n, `token ${i}`).to.be.closeTo(probs[i], 0.015);
    });
    const again = new SeededRandom(11);
    expect(draws.slice(0, 50)).to.deep.equal(Array.from({ length: 50 }, () => drawToken(scores, again)));
  });

  it('refuses bad settings and empty logits, naming the argument', () => {
    const bad: Array<[Record<string, number>, string]> = [
      [{ temperature: 0 }, "'temperature' must be > 0 when sampling but got 0 (0 means greedy: doSample false)"],
      [{ temperature: NaN }, "'temperature' must be a finite number but got NaN"],
      [{ topK: -1 }, "'topK' must be >= 0 but got -1"],
      [{ topK: 1.5 }, "'topK' must be an integer but got 1.5"],
      [{ topP: 0 }, "'topP' must be in (0, 1] but got 0"],
      [{ topP: 1.5 }, "'topP' must be in (0, 1] but got 1.5"],
    ];
    for (const [change, message] of bad) {
      expect(() => processLogits([1, 2], { temperature: 1, topK: 0, topP: 1, ...change })).to.throw(`\`processLogits()\`: ${message}`);
    }
    expect(() => processLogits([], { temperature: 1, topK: 0, topP: 1 })).to.throw("`processLogits()`: 'logits' must hold at least one value");
  });
});
