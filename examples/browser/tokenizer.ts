/**
 * Just enough of a Hugging Face tokenizer.json to turn the page's target text into token ids:
 * the vocabulary of its model, split as a 'WordLevel' model over words splits (words and
 * punctuation runs) or else by greedy longest match over the vocabulary (exact for character
 * vocabularies, close enough for BPE to feed a demo). Not a general tokenizer.
 */

export interface PageTokenizer {
  vocabSize: number;
  encode(text: string): number[];
  decode(ids: readonly number[]): string;
}

interface TokenizerJSON {
  model?: { type?: string; vocab?: Record<string, number> | Array<[string, number]>; unk_token?: string };
  added_tokens?: Array<{ id: number; content: string }>;
}

/** A tokenizer from a parsed tokenizer.json; throws an Error naming what it cannot read. */
export function tokenizerFromJSON(json: unknown): PageTokenizer {
  const model = (json as TokenizerJSON | null)?.model;
  const raw = model?.vocab;
  if (raw == null || typeof raw !== 'object') {
    throw new Error(`tokenizer.json: expected model.vocab (an object or a list) but got ${JSON.stringify(raw)}`);
  }
  const idOf = new Map<string, number>(
      Array.isArray(raw) ? raw.map(([token], id): [string, number] => [token, id]) : Object.entries(raw));
  for (const t of (json as TokenizerJSON).added_tokens ?? []) idOf.set(t.content, t.id);
  const tokenOf = new Map([...idOf].map(([token, id]): [number, string] => [id, token]));
  const unk = model?.unk_token !== undefined ? idOf.get(model.unk_token) : undefined;
  const longest = Math.max(...[...idOf.keys()].map(t => t.length));
  // a WordLevel model over single characters (plus bracketed specials like '<unk>') is a
  // character tokenizer: match characters, not words
  const special = /^<[^<>]+>$|^\[[^[\]]+\]$/;
  const wordLevel = model?.type === 'WordLevel' && [...idOf.keys()].some(t => t.length > 1 && !special.test(t));

  const encode = (text: string): number[] => {
    const ids: number[] = [];
    if (wordLevel) {
      for (const word of text.match(/\w+|[^\w\s]+/gu) ?? []) {
        const id = idOf.get(word) ?? unk;
        if (id !== undefined) ids.push(id);
      }
      return ids;
    }
    for (let at = 0; at < text.length;) {
      let len = Math.min(longest, text.length - at);
      while (len > 0 && !idOf.has(text.slice(at, at + len))) len--;
      if (len === 0) {
        if (unk !== undefined) ids.push(unk);
        at += 1;
      } else {
        ids.push(idOf.get(text.slice(at, at + len))!);
        at += len;
      }
    }
    return ids;
  };
  const decode = (ids: readonly number[]) => ids.map(id => tokenOf.get(id) ?? '').join(wordLevel ? ' ' : '');
  return { vocabSize: Math.max(...idOf.values()) + 1, encode, decode };
}
