/**
 * src/browser.ts, the browser entry: it bundles for the browser platform with no Node module in
 * its graph (the Node entry does not), and what it exports is the Node entry's very same objects.
 */
import { expect } from 'chai';
import { build, type BuildFailure, type Metafile } from 'esbuild';
import * as browserEntry from '../src/browser.js';
import * as nodeEntry from '../src/index.js';

async function bundleForBrowser(entry: string): Promise<Metafile> {
  const result = await build({
    entryPoints: [entry], bundle: true, platform: 'browser', format: 'esm', write: false, metafile: true, logLevel: 'silent',
  });
  return result.metafile;
}

describe('browser entry (src/browser.ts)', () => {
  it('bundles for the browser without any Node module, with the fetch loader and without the file loaders', async () => {
    const inputs = Object.keys((await bundleForBrowser('src/browser.ts')).inputs);
    expect(inputs.filter(i => /^node:|^(fs|path|os|buffer|url)$/.test(i)), 'Node modules in the bundle').to.deep.equal([]);
    expect(inputs).to.include.members(['src/browser.ts', 'src/io/fetch_checkpoint.ts', 'src/io/safetensors_bytes.ts', 'src/plugin.ts',
      'src/io/peft.ts', 'src/data/hf_tokenizer.ts']);
    for (const nodeOnly of ['src/io/safetensors.ts', 'src/io/hf_checkpoint.ts', 'src/io/peft_files.ts', 'src/io/file_io_handler.ts']) {
      expect(inputs, nodeOnly).to.not.include(nodeOnly);
    }
  });

  it('is needed: the Node entry does not bundle for the browser', async () => {
    const failure = await bundleForBrowser('src/index.ts').then(() => null, (e: BuildFailure) => e);
    expect(failure, 'a build failure').to.not.equal(null);
    expect(failure!.errors.map(e => e.text).join('\n')).to.match(/Could not resolve "node:fs\/promises"/);
  });

  it('exports the very objects of the Node entry, without its file-system functions', () => {
    const names = Object.keys(browserEntry);
    expect(names).to.include.members(['register', 'fetchHFCheckpoint', 'loadHFCheckpointFrom', 'parseSafetensors',
      'buildMoECausalLM', 'SparseMoE', 'trainableVariables', 'registerMoEKernels', 'moeBlock',
      'loadPeftAdapterFrom', 'encodePeftAdapter', 'HFTokenizer']);
    for (const name of names) {
      expect((nodeEntry as Record<string, unknown>)[name], name).to.equal((browserEntry as Record<string, unknown>)[name]);
    }
    for (const nodeOnly of ['loadHFCheckpoint', 'readSafetensorsFile', 'loadPeftAdapter', 'savePeftAdapter', 'registerFileIOHandler']) {
      expect(names, nodeOnly).to.not.include(nodeOnly);
    }
  });
});
