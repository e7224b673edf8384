/**
 * Writes the Tala corpora (generateCorpus, src/data/synthetic.ts) that the shipped model and the example use:
 * examples/data/{base,target}_{train,val}.txt. Deterministic: the same files on every run.
 *
 *   npx tsx examples/make_data.ts [--out examples/data]
 *
 * base_train.txt (400 kB) is not committed (it is only needed to retrain the shipped model);
 * the other three are.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CORPUS_STYLES, EXAMPLE_CORPORA, generateCorpus } from 'tfjs-moe-lora';

const at = process.argv.indexOf('--out');
const out = at >= 0 && process.argv[at + 1] ? process.argv[at + 1] : join(import.meta.dirname, 'data');
await mkdir(out, { recursive: true });
for (const style of CORPUS_STYLES) {
  const corpus = generateCorpus(style, EXAMPLE_CORPORA[style]);
  for (const split of ['train', 'val'] as const) {
    const path = join(out, `${style}_${split}.txt`);
    await writeFile(path, corpus[split]);
    console.log(`wrote ${path} (${corpus[split].length} characters)`);
  }
}
