/**
 * Headless Chromium on the browser example, for the browser specs: the binary, its flags, a fresh
 * profile and the page's errors and responses, and the wait for the page's training to end.
 */
import { existsSync } from 'node:fs';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import type { PageProgress } from '../../examples/browser/main.js';

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
