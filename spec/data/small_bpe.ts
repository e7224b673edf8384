/**
 * A small byte-level BPE tokenizer.json (the GPT-2 / Qwen layout: ByteLevel pre-tokenizer and
 * decoder, a BPE model over the 256 byte symbols plus merges) learned from a text, for specs that
 * need a real BPE file with a vocabulary small enough for a tiny model.
 */

/** GPT-2's bytes_to_unicode: each byte as a printable character. */
function byteSymbols(): string[] {
  const printable = new Set<number>();
  for (let b = 33; b <= 126; b++) printable.add(b);
  for (let b = 161; b <= 172; b++) printable.add(b);
  for (let b = 174; b <= 255; b++) printable.add(b);
  const out: string[] = [];
  let n = 0;
  for (let b = 0; b < 256; b++) out.push(String.fromCodePoint(printable.has(b) ? b : 256 + n++));
  return out;
}

export const END_OF_TEXT = '<|endoftext|>';

/**
 * The tokenizer.json object of a byte-level BPE with `merges` merges learned greedily from `text`
 * (most frequent adjacent pair first) and `<|endoftext|>` as an added special token (the last id).
 */
export function smallBPETokenizerJSON(text: string, merges: number): Record<string, unknown> {
  const symbols = byteSymbols();
  const vocab: Record<string, number> = {};
  symbols.forEach((s, i) => { vocab[s] = i; });
  const bytes = new TextEncoder();
  // words as ByteLevel's regex roughly splits them: an optional leading space and a run of non-space
  const words = (text.match(/ ?\S+|\s+/g) ?? []).map(w => [...bytes.encode(w)].map(b => symbols[b]));
  const mergeList: string[] = [];
  for (let m = 0; m < merges; m++) {
    const counts = new Map<string, number>();
    for (const w of words) for (let i = 0; i + 1 < w.length; i++) {
      const key = `${w[i]} ${w[i + 1]}`;
      counts.set(key, (counts.get(key) ?? 0) + 1);
    }
    let best: string | null = null;
    for (const [k, c] of counts) if (best === null || c > counts.get(best)! || (c === counts.get(best) && k < best)) best = k;
    if (best === null) break;
    const [a, b] = best.split(' ');
    mergeList.push(best);
    vocab[a + b] = Object.keys(vocab).length;
    for (const w of words) for (let i = 0; i + 1 < w.length; i++) if (w[i] === a && w[i + 1] === b) w.splice(i, 2, a + b);
  }
  const endId = Object.keys(vocab).length;
  return {
    version: '1.0', truncation: null, padding: null,
    added_tokens: [{ id: endId, content: END_OF_TEXT, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }],
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null,
      fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges: mergeList,
    },
  };
}
