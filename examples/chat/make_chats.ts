/**
 * Writes the chat datasets of the chat example, the same bytes on every run (a seeded generator):
 *
 *   npx tsx examples/chat/make_chats.ts [--out examples/chat/data]
 *
 * - base_chats.jsonl: "repeat: w1 w2 w3" answered with the words in the same order; the tiny base
 *   model is trained on these from scratch (every token), so it knows the chat format and copying.
 * - chats.jsonl: "reverse: w1 w2 w3" answered with the words in reverse order: the fine-tuning set
 *   (the run config splits validation chats off it).
 * - question.json: a reverse question that is in neither file, for `tfjs-moe-lora generate --chat`.
 *
 * Each list is 3 different words of WORDS; every word is one Qwen3 token with and without a
 * leading space, so an answer is three tokens whatever the order.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

const WORDS = ['red', 'blue', 'green', 'black', 'white', 'gold', 'pink', 'gray', 'cat', 'dog', 'fish', 'bird',
  'bear', 'wolf', 'fox', 'sun', 'moon', 'star', 'tree', 'rock', 'rain', 'snow', 'wind', 'book'];
const QUESTION = ['fox', 'rain', 'gold'];

/** mulberry32: a seeded generator, the same sequence on every machine (Math.random cannot promise it). */
function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    let t = (state = (state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** `count` different lists of three different words, none equal to QUESTION. */
function wordLists(count: number, seed: number, taken: Set<string>): string[][] {
  const random = seededRandom(seed);
  const lists: string[][] = [];
  while (lists.length < count) {
    const list: string[] = [];
    while (list.length < 3) {
      const word = WORDS[Math.floor(random() * WORDS.length)];
      if (!list.includes(word)) list.push(word);
    }
    const key = list.join(' ');
    if (taken.has(key) || key === QUESTION.join(' ')) continue;
    taken.add(key);
    lists.push(list);
  }
  return lists;
}

const chat = (task: string, list: string[], answer: string[]) => JSON.stringify({ messages: [
  { role: 'user', content: `${task}: ${list.join(' ')}` }, { role: 'assistant', content: answer.join(' ') }] });

const at = process.argv.indexOf('--out');
const out = at >= 0 && process.argv[at + 1] ? process.argv[at + 1] : join(import.meta.dirname, 'data');
await mkdir(out, { recursive: true });
const taken = new Set<string>();
const files = {
  'base_chats.jsonl': wordLists(2000, 1, taken).map(list => chat('repeat', list, list)),
  'chats.jsonl': wordLists(400, 2, taken).map(list => chat('reverse', list, [...list].reverse())),
};
for (const [name, lines] of Object.entries(files)) {
  await writeFile(join(out, name), lines.join('\n') + '\n');
  console.log(`wrote ${join(out, name)} (${lines.length} chats)`);
}
await writeFile(join(out, 'question.json'), JSON.stringify({ messages: [{ role: 'user', content: `reverse: ${QUESTION.join(' ')}` }] }) + '\n');
console.log(`wrote ${join(out, 'question.json')}`);
