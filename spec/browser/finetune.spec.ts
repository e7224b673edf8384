/**
 * The browser example end to end: build the bundle, serve it on 127.0.0.1, open it in Debian's
 * headless Chromium (playwright-core, no browser download) and watch it train. Run by
 * `npm run test:browser` (.ci/browser.sh installs chromium first), not by `npm test`.
 *
 * CHROMIUM overrides the browser binary (default /usr/bin/chromium); BROWSER_MODEL the checkpoint
 * folder the page is built with (default: the build's); BROWSER_SCREENSHOT the screenshot's path
 * (default a file in a fresh temporary folder, printed).
 */
import { expect } from 'chai';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { buildBrowserExample } from '../../examples/browser/build.js';
import type { PageProgress } from '../../examples/browser/main.js';
import { serveStatic, type StaticServer } from '../../examples/browser/serve.js';

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const STEPS = 20;
/** page load + wasm start + STEPS steps; a step of the tiny checkpoint takes well under a second */
const TRAINING_TIMEOUT_MS = 150_000;

const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

describe('browser example (headless Chromium)', function () {
  this.timeout(TRAINING_TIMEOUT_MS + 60_000);
  const temps: string[] = [];
  let server: StaticServer | undefined;
  let context: BrowserContext | undefined;
  let page: Page;
  const pageErrors: string[] = [];
  const consoleErrors: string[] = [];
  const failedRequests: string[] = [];

  before(async function () {
    if (!existsSync(CHROMIUM)) {
      throw new Error(`no browser at ${CHROMIUM}: install Debian's chromium (.ci/browser.sh does) or set CHROMIUM`);
    }
    const outDir = await mkdtemp(join(tmpdir(), 'moe-lora-browser-dist-'));
    temps.push(outDir);
    await buildBrowserExample({ outDir, modelDir: process.env.BROWSER_MODEL });
    server = await serveStatic({ '/': outDir });
    const userDataDir = await mkdtemp(join(tmpdir(), 'moe-lora-chromium-'));
    temps.push(userDataDir);
    // a persistent context is how playwright takes a user data dir of ours: a fresh, empty one
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, viewport: { width: 800, height: 640 },
    });
    page = context.pages()[0] ?? await context.newPage();
    page.on('pageerror', e => pageErrors.push(e.message));
    page.on('console', m => { if (m.type() === 'error') consoleErrors.push(m.text()); });
    page.on('response', r => { if (r.status() >= 400) failedRequests.push(`${r.status()} ${new URL(r.url()).pathname}`); });
  });

  after(async () => {
    await context?.close();
    await server?.close();
    for (const dir of temps) await rm(dir, { recursive: true, force: true });
  });

  it(`loads the checkpoint, trains LoRA on experts + router for ${STEPS} steps on wasm, and the loss falls`, async () => {
    const started = Date.now();
    await page.goto(`${server!.url}/index.html?steps=${STEPS}`);
    await page.waitForFunction(() => {
      const p = (window as unknown as { __moeLoRA?: PageProgress }).__moeLoRA;
      return p !== undefined && (p.done || p.error !== null);
    }, null, { timeout: TRAINING_TIMEOUT_MS, polling: 250 });
    const progress = await page.evaluate(() => (window as unknown as { __moeLoRA: PageProgress }).__moeLoRA);
    const seconds = (Date.now() - started) / 1000;

    expect(progress.error, 'the page reports no error').to.equal(null);
    expect(pageErrors, 'uncaught page errors').to.deep.equal([]);
    // a checkpoint without tokenizer.json (the fixture) is fine: the page trains on random ids,
    // and Chromium logs the 404 of its probe as a console error
    const optional = ['404 /model/tokenizer.json'];
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
});
