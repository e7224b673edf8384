/**
 * The examples run from an installed package, as a user's copy does: the package is built and
 * `npm pack`ed, unpacked into a project in a temporary folder next to a copy of examples/, and
 * each example runs there briefly, resolving 'tfjs-moe-lora' to the packed dist/ (no tsconfig
 * paths, no src/). Once per spec run (about 15 s), in `before`.
 *
 * The tarball is unpacked with tar, not `npm install`: offline, npm cannot resolve the package's
 * dependencies (the npm cache holds their tarballs but not the registry metadata: ENOTCACHED), and
 * a project whose node_modules links to this repository's packages must never be handed to npm,
 * which prunes what it did not install, through the links. The dependencies the package declares
 * (and the examples' own: echarts, esbuild) are linked one package at a time from this
 * repository's node_modules; a declared one that is missing there fails the spec.
 */
import { expect } from 'chai';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { cp, mkdir, readFile, readdir, symlink, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { cleanup, tempDir } from '../io/checkpoint_helpers.js';

const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';
const REPO = resolve('.');
const MODULES = join(REPO, 'node_modules');
const TSX = join(MODULES, '.bin', 'tsx');
/** What the examples import besides the package and Node (a user's project installs these too). */
const EXAMPLE_DEPENDENCIES = ['echarts', 'esbuild', 'yargs', '@tensorflow/tfjs-core', '@tensorflow/tfjs-layers',
  '@tensorflow/tfjs-backend-cpu', '@tensorflow/tfjs-backend-wasm', '@tensorflow/tfjs-backend-webgpu'];

interface PackageJSON {
  name: string; version: string;
  dependencies?: Record<string, string>; peerDependencies?: Record<string, string>;
  peerDependenciesMeta?: Record<string, { optional?: boolean }>;
}

/** `name` of this repository's node_modules as node_modules/<name> of `project`, a link per package. */
async function linkPackage(project: string, name: string): Promise<void> {
  const target = join(project, 'node_modules', name);
  if (existsSync(target)) return;
  await mkdir(dirname(target), { recursive: true });
  await symlink(join(MODULES, name), target, 'dir');
}

/** The import specifiers of a TypeScript file (static and literal dynamic imports). */
async function importsOf(path: string): Promise<string[]> {
  const text = await readFile(path, 'utf8');
  return [...text.matchAll(/^\s*(?:import|export)\s[^;]*?from\s+'([^']+)'|^\s*import\s+'([^']+)'|import\('([^']+)'\)/gm)]
      .map(m => m[1] ?? m[2] ?? m[3]);
}

async function typeScriptFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory() && !['out', 'dist', 'node_modules'].includes(entry.name)) out.push(...await typeScriptFiles(path));
    else if (entry.isFile() && entry.name.endsWith('.ts')) out.push(path);
  }
  return out;
}

describe('examples from the installed package (npm pack, unpacked into a fresh project)', function () {
  this.timeout(180_000);
  let project: string;
  let packed: PackageJSON;
  let tarballFiles: string[];
  const run = (args: string[]) => spawnSync(TSX, args, { cwd: project, encoding: 'utf8', env: { ...process.env, FORCE_COLOR: '0' } });

  before(async () => {
    const work = await tempDir('installed-package-');
    // the package as `npm publish` would pack it: its files whitelist, dist/ built from src/ by tsc
    const stage = join(work, 'stage');
    await mkdir(stage);
    for (const f of ['package.json', 'README.md', 'bin']) await cp(join(REPO, f), join(stage, f), { recursive: true });
    // the build's own settings (no source maps: they would name a src/ the package does not ship)
    execFileSync(process.execPath, [join(MODULES, 'typescript/bin/tsc'), '-p', 'tsconfig.build.json', '--outDir', join(stage, 'dist')],
        { cwd: REPO, stdio: 'pipe' });
    const tarball = execFileSync('npm', ['pack', '--ignore-scripts', '--silent', '--pack-destination', work],
        { cwd: stage, encoding: 'utf8' }).trim().split('\n').pop()!;
    tarballFiles = execFileSync('tar', ['-tzf', join(work, tarball)], { encoding: 'utf8' }).trim().split('\n');

    project = join(work, 'project');
    const installed = join(project, 'node_modules', 'tfjs-moe-lora');
    await mkdir(installed, { recursive: true });
    execFileSync('tar', ['-xzf', join(work, tarball), '-C', installed, '--strip-components=1']);
    packed = JSON.parse(await readFile(join(installed, 'package.json'), 'utf8')) as PackageJSON;
    const optional = (name: string) => packed.peerDependenciesMeta?.[name]?.optional === true;
    for (const name of [...Object.keys(packed.dependencies ?? {}), ...Object.keys(packed.peerDependencies ?? {}), ...EXAMPLE_DEPENDENCIES]) {
      if (!existsSync(join(MODULES, name))) {
        if (optional(name)) continue;
        throw new Error(`'${name}', which the package or the examples need, is not in ${MODULES}`);
      }
      await linkPackage(project, name);
    }
    await writeFile(join(project, 'package.json'), JSON.stringify({
      name: 'user-project', private: true, type: 'module', dependencies: { 'tfjs-moe-lora': `file:${tarball}` },
    }));
    await cp(join(REPO, 'examples'), join(project, 'examples'), {
      recursive: true, filter: src => !/[/\\]examples[/\\](out|browser[/\\]dist)$/.test(src),
    });
  });
  after(cleanup);

  it('packs dist/ with both entries and their types, and no sources or specs', () => {
    for (const f of ['package/package.json', 'package/dist/index.js', 'package/dist/index.d.ts', 'package/dist/browser.js',
      'package/dist/browser.d.ts', 'package/bin/tfjs-moe-lora.js']) {
      expect(tarballFiles, f).to.include(f);
    }
    expect(tarballFiles.filter(f => /^package\/(src|spec|examples|tools)\//.test(f))).to.deep.equal([]);
    expect(tarballFiles.filter(f => f.endsWith('.map')), 'source maps of a src/ the package does not ship').to.deep.equal([]);
    expect(packed.name).to.equal('tfjs-moe-lora');
  });

  it('every example imports only packages and its own files', async () => {
    const files = await typeScriptFiles(join(project, 'examples'));
    expect(files.length).to.be.at.least(6);
    for (const file of files) {
      for (const spec of await importsOf(file)) {
        const relative = spec.startsWith('.');
        const inside = relative && resolve(dirname(file), spec).startsWith(join(project, 'examples'));
        expect(!relative || inside, `${file.slice(project.length + 1)} imports '${spec}'`).to.equal(true);
        if (/^tfjs-moe-lora(\/|$)/.test(spec)) expect(['tfjs-moe-lora', 'tfjs-moe-lora/browser'], spec).to.include(spec);
      }
    }
  });

  it('make_data.ts writes the committed corpora byte for byte', async () => {
    const out = join(project, 'data-copy');
    const r = run(['examples/make_data.ts', '--out', out]);
    expect(r.status, r.stderr).to.equal(0);
    for (const f of ['target_train.txt', 'target_val.txt', 'base_val.txt']) {
      expect((await readFile(join(out, f))).equals(await readFile(join(REPO, 'examples/data', f))), f).to.equal(true);
    }
  });

  it('finetune.ts trains a few steps and writes an adapter that loads', async () => {
    const out = join(project, 'run');
    const val = join(project, 'val.txt');
    const heldOut = (await readFile(join(REPO, 'examples/data/target_val.txt'), 'utf8')).split('\n').slice(0, 6).join('\n');
    await writeFile(val, `${heldOut}\n`);
    const r = run(['examples/finetune.ts', '--backend', BACKEND, '--steps', '2', '--batch', '2', '--seq', '16', '--val', val, '--out', out]);
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/validation loss on held-out target text/);
    const log = JSON.parse(await readFile(join(out, 'log.json'), 'utf8')) as { stepsDone: number; losses: number[] };
    expect(log.stepsDone).to.equal(2);
    expect(log.losses.every(Number.isFinite)).to.equal(true);
    const model = await loadHFCheckpoint(join(REPO, 'examples/models/tala-moe'));
    expect(await loadPeftAdapter(model, join(out, 'adapter'))).to.include({ r: 4, alpha: 8 });
    model.dispose();
  });

  it('browser/build.ts bundles the page from the installed package\'s browser entry', async () => {
    const out = join(project, 'page');
    const r = run(['examples/browser/build.ts', '--out', out]);
    expect(r.status, r.stderr).to.equal(0);
    const sources = (JSON.parse(await readFile(join(out, 'main.js.map'), 'utf8')) as { sources: string[] }).sources;
    const files = sources.map(s => resolve(out, s));
    // what the page uses, from the packed dist/ (browser.js itself only re-exports: no code of its own in the map)
    for (const f of ['io/peft.js', 'data/hf_tokenizer.js', 'io/fetch_checkpoint.js', 'plugin.js']) {
      expect(files, f).to.include(join(project, 'node_modules/tfjs-moe-lora/dist', f));
    }
    expect(files.filter(f => f.startsWith(REPO + '/src/')), 'files of this repository\'s src/').to.deep.equal([]);
    expect((await readdir(join(out, 'model'))).sort()).to.deep.equal(['config.json', 'model.safetensors', 'tokenizer.json']);
    expect(existsSync(join(out, 'tfjs-backend-wasm.wasm'))).to.equal(true);
  });
});
