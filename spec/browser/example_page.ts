/**
 * Headless Chromium on the browser example, for the browser specs: the example built and served,
 * the binary, its flags, a fresh profile and the page's errors and responses, the wait for the
 * page's training to end, and the cleanup.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { buildBrowserExample, type BuildOptions } from '../../examples/browser/build.js';
import type { PageProgress } from '../../examples/browser/main.js';
import { serveStatic, type StaticServer } from '../../examples/browser/serve.js';

/** The browser binary: CHROMIUM, or Debian's chromium (.ci/browser.sh installs it). */
export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

/** --disable-gpu: no WebGPU adapter, so the page picks wasm. */
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

export interface ExamplePage {
  context: BrowserContext;
  page: Page;
  pageErrors: string[];
  consoleErrors: string[];
  responses: Array<{ status: number; path: string }>;
}

/**
 * Chromium with a fresh profile (a folder made here, pushed to `temps` for the caller to remove)
 * and one page recording its uncaught errors, console errors and responses.
 */
export async function openExamplePage(temps: string[], viewport: { width: number; height: number }): Promise<ExamplePage> {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`no browser at ${CHROMIUM}: install Debian's chromium (.ci/browser.sh does) or set CHROMIUM`);
  }
  const userDataDir = await mkdtemp(join(tmpdir(), 'moe-lora-chromium-'));
  temps.push(userDataDir);
  // a persistent context is how playwright takes a user data dir of ours: a fresh, empty one
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, viewport,
  });
  const page = context.pages()[0] ?? await context.newPage();
  const opened: ExamplePage = { context, page, pageErrors: [], consoleErrors: [], responses: [] };
  page.on('pageerror', e => opened.pageErrors.push(e.message));
  page.on('console', m => { if (m.type() === 'error') opened.consoleErrors.push(m.text()); });
  page.on('response', r => { opened.responses.push({ status: r.status(), path: new URL(r.url()).pathname }); });
  return opened;
}

/** Opens `url` and waits until the page's training is done or failed; its progress then. */
export async function trainOnPage(page: Page, url: string, timeoutMs: number, pollingMs: number): Promise<PageProgress> {
  await page.goto(url);
  await page.waitForFunction(() => {
    const p = (window as unknown as { __moeLoRA?: PageProgress }).__moeLoRA;
    return p !== undefined && (p.done || p.error !== null);
  }, null, { timeout: timeoutMs, polling: pollingMs });
  return page.evaluate(() => (window as unknown as { __moeLoRA: PageProgress }).__moeLoRA);
}

/** The example built, served and open in Chromium; close() ends all three and removes `temps`. */
export interface ExampleSite extends ExamplePage {
  server: StaticServer;
  close(): Promise<void>;
}

/**
 * Builds the example into a folder of its own (pushed to `temps`), serves it at '/' with `mounts`
 * beside it (a longer prefix wins: '/model/' replaces the build's model) and opens the page.
 */
export async function openExampleSite(temps: string[], options: {
  build?: Omit<BuildOptions, 'outDir'>; mounts?: Record<string, string>; viewport: { width: number; height: number };
}): Promise<ExampleSite> {
  const outDir = await mkdtemp(join(tmpdir(), 'moe-lora-browser-dist-'));
  temps.push(outDir);
  await buildBrowserExample({ ...options.build, outDir });
  const server = await serveStatic({ '/': outDir, ...options.mounts });
  const opened = await openExamplePage(temps, options.viewport);
  return {
    ...opened, server,
    async close() {
      await opened.context.close();
      await server.close();
      for (const dir of temps) await rm(dir, { recursive: true, force: true });
    },
  };
}
