/**
 * 8-bit floats: OCP float8 e4m3fn (torch.float8_e4m3fn, safetensors 'F8_E4M3') to float32, exact.
 * 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN, the
 * largest finite value is 448. DeepSeek-V3's Hub checkpoints store their linear weights so.
 */
let e4m3Table: Float32Array | null = null;

/** All 256 e4m3fn values as float32 (exact), indexed by their bits; built on first use. */
export function float8E4M3Values(): Float32Array {
  if (e4m3Table === null) {
    e4m3Table = new Float32Array(256);
    for (let b = 0; b < 256; b++) {
      const sign = b & 0x80 ? -1 : 1;
      const exponent = (b >> 3) & 0xf;
      const mantissa = b & 0x7;
      if (exponent === 0xf && mantissa === 0x7) e4m3Table[b] = NaN;
      else if (exponent === 0) e4m3Table[b] = sign * mantissa * 2 ** -9;  // zero and subnormals: m/8 · 2^−6
      else e4m3Table[b] = sign * (1 + mantissa / 8) * 2 ** (exponent - 7);
    }
  }
  return e4m3Table;
}

/**
 * e4m3fn bytes → float32.
 *
 * ```js
 * decodeFloat8E4M3(Uint8Array.of(0x38, 0x7e, 0xb8));  // Float32Array [1, 448, -1]
 * ```
 */
export function decodeFloat8E4M3(bytes: Uint8Array): Float32Array {
  const table = float8E4M3Values();
  const out = new Float32Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) out[i] = table[bytes[i]];
  return out;
}
