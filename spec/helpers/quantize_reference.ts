/**
 * The quantizers as their formulas read (src/ops/quantized.ts's doc), written plainly and slowly,
 * independently of the fast quantizer there: the oracle of spec/ops/quantize_fast.spec.ts. This
 * is the loop the package shipped before the quantizer was made fast (one closure per group, the
 * nearest code by walking the midpoints), so "bit-exact with it" means "bit-exact with before".
 *   int8:  scale = f32(absmax / 127) per output, q = clamp(round(v / scale), −127, 127)
 *   int4:  scale = f32((max − min) / 15), zero = f32(−min / scale) (min ≤ 0 ≤ max),
 *          q = clamp(round(v / scale + zero), 0, 15)
 *   nf4:   absmax per group, q = the code whose NF4 value is nearest v / absmax (a tie: the lower)
 *   nf4-dq: bitsandbytes' rule: q = argmin_c |f32(clamp(f32(v · f32(1 / absmax))) − NF4[c])| (lowest
 *          on ties, NaN → 0), then the absmax as quantize_blockwise of absmax − f32(mean) in blocks
 *          of 256 with the dynamic map (the same argmin), brute force over every code
 *   mxfp4: e = clamp(⌊log2 absmax⌋ − 2, −127, 127), q = the nearest e2m1 of v / 2^e (saturating
 *          at ±6, a tie: the smaller magnitude), the scale byte e + 127
 * Non-finite values throw, naming the first one met in output-major, group, input order.
 */
import { BNB_DYNAMIC_MAP, type QuantizedLayout } from '../../src/ops/quantized.js';

const NF4 = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
].map(Math.fround);
const NF4_MIDPOINTS = Array.from({ length: 15 }, (_, c) => (NF4[c] + NF4[c + 1]) / 2);
const E2M1_MAGNITUDE_MIDPOINTS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5];

function nearestNF4(x: number): number {
  let c = 0;
  while (c < 15 && x > NF4_MIDPOINTS[c]) c++;
  return c;
}

function nearestE2M1(x: number): number {
  const m = Math.abs(x);
  let c = 0;
  while (c < 7 && m > E2M1_MAGNITUDE_MIDPOINTS[c]) c++;
  return c === 0 ? 0 : (x < 0 ? 8 : 0) | c;
}

function exponentOf(x: number): number {
  let e = Math.floor(Math.log2(x));
  if (2 ** e > x) e--;
  if (2 ** (e + 1) <= x) e++;
  return e;
}

/** One expert's words [wordsPerExpert] from its values (logical layout, at values[vOff …]). */
export function referenceQuantizeExpert(layout: QuantizedLayout, values: Float32Array, vOff: number): Int32Array {
  const { kind, outputs, inputs, groupSize, groupsPerOutput, scaleWord, zeroWord, inputAxis } = layout;
  const words = new Int32Array(layout.wordsPerExpert);
  const floats = new Float32Array(words.buffer);
  const f32 = Math.fround;
  const oStride = inputAxis === 2 ? inputs : 1;
  const iStride = inputAxis === 2 ? 1 : outputs;
  const groupAbsmax: number[] = [];   // nf4-dq: every group's, quantized at the end
  const setCode = (s: number, q: number) => {
    if (kind === 'int8') words[s >> 2] |= (q & 255) << (8 * (s & 3));
    else words[s >> 3] |= (q & 15) << (4 * (s & 7));
  };
  for (let o = 0; o < outputs; o++) {
    for (let g = 0; g < groupsPerOutput; g++) {
      const group = o * groupsPerOutput + g;
      const start = g * groupSize;
      const end = Math.min(inputs, start + groupSize);
      const at = (i: number) => values[vOff + o * oStride + i * iStride];
      let min = 0;
      let max = 0;
      for (let i = start; i < end; i++) {
        const v = at(i);
        if (!Number.isFinite(v)) throw new Error(`'values' must be finite to be quantized (${kind}) but holds ${v}`);
        if (v < min) min = v;
        if (v > max) max = v;
      }
      const absmax = Math.max(max, -min);
      let code: (v: number) => number;
      if (kind === 'int8') {
        const scale = f32(absmax / 127);
        floats[scaleWord + group] = scale;
        code = v => scale === 0 ? 0 : Math.max(-127, Math.min(127, Math.round(v / scale)));
      } else if (kind === 'int4') {
        const scale = f32((max - min) / 15);
        const zero = scale === 0 ? 0 : f32(-min / scale);
        floats[scaleWord + group] = scale;
        floats[zeroWord + group] = zero;
        code = v => scale === 0 ? 0 : Math.max(0, Math.min(15, Math.round(v / scale + zero)));
      } else if (kind === 'nf4') {
        floats[scaleWord + group] = absmax;
        code = v => absmax === 0 ? 7 : nearestNF4(v / absmax);
      } else if (kind === 'nf4-dq') {
        groupAbsmax.push(absmax);
        const inverse = f32(1 / absmax);
        code = v => argminCode(f32(v * inverse), NF4);
      } else {
        const e = absmax === 0 ? 0 : Math.max(-127, Math.min(127, exponentOf(absmax) - 2));
        words[scaleWord + (group >> 2)] |= (e + 127) << (8 * (group & 3));
        code = v => nearestE2M1(v / 2 ** e);
      }
      for (let i = start; i < end; i++) setCode(o * inputs + i, code(at(i)));
    }
  }
  if (kind === 'nf4-dq') {
    // the absmax quantized as bitsandbytes' quantize_blockwise of absmax − mean, blocks of 256
    const offset = f32(groupAbsmax.reduce((a, b) => a + b, 0) / groupAbsmax.length);
    for (let start = 0, block = 0; start < groupAbsmax.length; start += 256, block++) {
      const centred = groupAbsmax.slice(start, start + 256).map(a => f32(a - offset));
      const nested = Math.max(...centred.map(Math.abs));
      floats[layout.nestedWord + block] = nested;
      floats[layout.offsetWord + block] = offset;
      const inverse = f32(1 / nested);
      centred.forEach((c, k) => { words[scaleWord + ((start + k) >> 2)] |= argminCode(f32(c * inverse), BNB_DYNAMIC_MAP) << (8 * ((start + k) & 3)); });
    }
    floats.set(BNB_DYNAMIC_MAP, layout.mapWord);
  }
  return words;
}

/** torch.argmin(|f32(clamp(x, −1, 1) − code)|): the lowest index on ties; NaN → 0 (its first index). */
function argminCode(x: number, code: ArrayLike<number>): number {
  if (Number.isNaN(x)) return 0;
  const v = Math.min(1, Math.max(-1, x));
  let best = 0;
  for (let k = 1; k < code.length; k++) if (Math.abs(Math.fround(v - code[k])) < Math.abs(Math.fround(v - code[best]))) best = k;
  return best;
}
