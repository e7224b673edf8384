/**
 * 16-bit floats, the one place they are converted: IEEE binary16 and bfloat16 to float32
 * (exact) and back, rounded to nearest even exactly as torch's `.to(torch.float16 / bfloat16)`
 * (checked bit for bit against torch: spec/io/safetensors_writer.spec.ts). The safetensors format
 * and the packed expert weights (src/ops/packed.ts) both use these.
 */
let f16Table: Float32Array | null = null;

/** All 65536 binary16 values as float32 (exact), indexed by their bits; built on first use. */
export function float16Values(): Float32Array {
  if (f16Table === null) {
    f16Table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) f16Table[h] = float16Value(h);
  }
  return f16Table;
}

/** IEEE binary16 → float32, through the table of all 65536 values. */
export function decodeFloat16(bits: Uint16Array): Float32Array {
  return decodeFloat16Into(bits, new Float32Array(bits.length), 0);
}

/** decodeFloat16 into out[offset …] (a buffer reused across tensors); returns `out`. */
export function decodeFloat16Into(bits: Uint16Array, out: Float32Array, offset: number): Float32Array {
  const table = float16Values();
  for (let i = 0; i < bits.length; i++) out[offset + i] = table[bits[i]];
  return out;
}

function float16Value(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const mantissa = h & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;  // zero and subnormals
  if (exponent === 0x1f) return mantissa === 0 ? sign * Infinity : NaN;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

/** bfloat16 → float32: bfloat16 is the high half of a float32, so this is exact. */
export function decodeBFloat16(bits: Uint16Array): Float32Array {
  return decodeBFloat16Into(bits, new Float32Array(bits.length), 0);
}

/** decodeBFloat16 into out[offset …] (a buffer reused across tensors), written as bits; returns `out`. */
export function decodeBFloat16Into(bits: Uint16Array, out: Float32Array, offset: number): Float32Array {
  const wide = new Int32Array(out.buffer, out.byteOffset, out.length);
  for (let i = 0; i < bits.length; i++) wide[offset + i] = bits[i] << 16;
  return out;
}

/**
 * float32 → bfloat16 bits, rounded to nearest even as torch's `.to(torch.bfloat16)` does (NaN
 * becomes 0x7FC0, as in torch). Exact for values that came from bfloat16.
 *
 * ```js
 * encodeBFloat16(new Float32Array([1, 1 + 2 ** -8]));  // Uint16Array [0x3F80, 0x3F80]: the tie goes to even
 * ```
 */
export function encodeBFloat16(values: Float32Array): Uint16Array {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < out.length; i++) {
    const u = bits[i];
    if ((u & 0x7fffffff) > 0x7f800000) {
      out[i] = 0x7fc0;
    } else {
      out[i] = (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;  // carries into the exponent (up to infinity) as it should
    }
  }
  return out;
}

/**
 * float32 → IEEE binary16 bits, rounded to nearest even (as torch's `.to(torch.float16)`):
 * overflow gives ±infinity, tiny values subnormals or ±0, NaN a quiet NaN.
 *
 * ```js
 * encodeFloat16(new Float32Array([1, 65520, 2 ** -25]));  // Uint16Array [0x3C00, 0x7C00, 0x0000]
 * ```
 */
export function encodeFloat16(values: Float32Array): Uint16Array {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < out.length; i++) out[i] = float16Bits(bits[i]);
  return out;
}

function float16Bits(u: number): number {
  const sign = (u >>> 16) & 0x8000;
  const exponent = (u >>> 23) & 0xff;
  const mantissa = u & 0x7fffff;
  if (exponent === 0xff) return sign | (mantissa === 0 ? 0x7c00 : 0x7e00);
  const e = exponent - 127 + 15;  // the binary16 exponent field this value would have
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    // subnormal (or zero): the value in units of 2^-24, rounded; below half a unit it is zero
    if (e < -10) return sign;
    const m = mantissa | 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rest = m & ((1 << shift) - 1);
    let r = m >>> shift;
    if (rest > half || (rest === half && (r & 1) === 1)) r++;
    return sign | r;  // r = 0x400 is the smallest normal, as it should be
  }
  let r = (e << 10) | (mantissa >>> 13);
  const rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (r & 1) === 1)) r++;  // a carry into the exponent is right (up to infinity)
  return sign | r;
}
