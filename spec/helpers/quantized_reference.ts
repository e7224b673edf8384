/**
 * The quantized formats decoded by their definitions, independently of src/ops/quantized.ts's
 * decoder: bytes read through a DataView, values in float64 by the textbook formulas, rounded to
 * float32 where the format computes in float32 (int4's q − zero, then its product; NF4's product).
 *   int8:  scale·q                 (q a signed byte)
 *   int4:  scale·(q − zero)        (q a nibble 0 … 15, scale and zero float32)
 *   nf4:   NF4[q]·absmax           (bitsandbytes' 16 values, written out here again)
 *   nf4-dq: NF4[q]·absmax, absmax = map[a]·nested + offset (a the group's byte; nested and offset
 *          those of its block of 256 groups; map the expert's 256 stored floats), both rounded to float32
 *   mxfp4: E2M1[q]·2^(e − 127)     (e an unsigned byte)
 */
import type { QuantizedLayout } from '../../src/ops/quantized.js';

const NF4 = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
];
const E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6];

/** Every expert of `words` decoded into the logical [E, rows, cols] order, float32 values. */
export function referenceDecode(layout: QuantizedLayout, experts: number, words: Int32Array): Float32Array {
  const { kind, outputs: O, inputs: N, groupSize: G, scaleWord, zeroWord, inputAxis } = layout;
  const gpr = Math.ceil(N / G);
  const view = new DataView(words.buffer, words.byteOffset, words.byteLength);
  const out = new Float32Array(experts * O * N);
  const f32 = Math.fround;
  for (let e = 0; e < experts; e++) {
    const byte0 = 4 * e * layout.wordsPerExpert;
    for (let o = 0; o < O; o++) {
      for (let i = 0; i < N; i++) {
        const s = o * N + i;
        const grp = o * gpr + Math.floor(i / G);
        let v: number;
        if (kind === 'int8') {
          v = view.getInt8(byte0 + s) * view.getFloat32(byte0 + 4 * scaleWord + 4 * grp, true);
        } else {
          const b = view.getUint8(byte0 + Math.floor(s / 2));
          const q = s % 2 === 0 ? b & 15 : b >> 4;
          if (kind === 'int4') {
            const scale = view.getFloat32(byte0 + 4 * scaleWord + 4 * grp, true);
            const zero = view.getFloat32(byte0 + 4 * zeroWord + 4 * grp, true);
            v = scale * f32(q - zero);
          } else if (kind === 'nf4') {
            v = NF4[q] * view.getFloat32(byte0 + 4 * scaleWord + 4 * grp, true);
          } else if (kind === 'nf4-dq') {
            const a = view.getUint8(byte0 + 4 * scaleWord + grp);
            const block = Math.floor(grp / 256);
            const absmax = f32(f32(view.getFloat32(byte0 + 4 * layout.mapWord + 4 * a, true) *
                view.getFloat32(byte0 + 4 * layout.nestedWord + 4 * block, true)) + view.getFloat32(byte0 + 4 * layout.offsetWord + 4 * block, true));
            v = NF4[q] * absmax;
          } else {
            v = E2M1[q] * 2 ** (view.getUint8(byte0 + 4 * scaleWord + grp) - 127);
          }
        }
        out[e * O * N + (inputAxis === 2 ? o * N + i : i * O + o)] = f32(v);
      }
    }
  }
  return out;
}
