/**
 * A worker of quantizeWorkerPool (quantize_pool.ts): quantizes one expert per message, from its
 * 16-bit halves, with the same functions as the main thread (decodeBFloat16Into /
 * decodeFloat16Into, quantizeExpertInto), so its words are the main thread's bit for bit. Replies
 * {id, words} (the words' buffer transferred) or {id, failed: true}: the pool then quantizes that
 * expert on the main thread, which throws the loader's own error.
 */
import { parentPort } from 'node:worker_threads';
import { quantizeExpertInto, type QuantizedLayout } from '../ops/quantized.js';
import { decodeBFloat16Into, decodeFloat16Into } from '../util/half.js';

export interface QuantizeRequest {
  id: number;
  layout: QuantizedLayout;
  /** each part's dtype (BF16 or F16) and its count of halves, in order */
  parts: Array<{ dtype: string; count: number }>;
  /** every part's halves, one after the other (owned: transferred here) */
  halves: Uint16Array;
}
export type QuantizeReply = { id: number; words: Int32Array } | { id: number; failed: true };

let block = new Float32Array(0);   // one expert's float32 values, reused

parentPort!.on('message', ({ id, layout, parts, halves }: QuantizeRequest) => {
  try {
    if (block.length < halves.length) block = new Float32Array(halves.length);
    let at = 0;
    for (const { dtype, count } of parts) {
      const part = halves.subarray(at, at + count);
      if (dtype === 'BF16') decodeBFloat16Into(part, block, at);
      else decodeFloat16Into(part, block, at);
      at += count;
    }
    const words = new Int32Array(layout.wordsPerExpert);
    quantizeExpertInto(layout, block, 0, words, 0);
    parentPort!.postMessage({ id, words } satisfies QuantizeReply, [words.buffer]);
  } catch {
    parentPort!.postMessage({ id, failed: true } satisfies QuantizeReply);
  }
});
