import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { BackendError, selectBackend } from '../../src/cli/backend.js';

describe('cli/backend', () => {
  it('sets the backend the tests run on', async () => {
    const name = process.env.TFJS_BACKEND ?? 'cpu';
    await selectBackend(name);
    expect(tf.getBackend()).to.equal(name);
  });

  it('rejects an unknown backend', async () => {
    let err: unknown;
    try { await selectBackend('webgl'); } catch (e) { err = e; }
    expect(err).to.be.instanceOf(BackendError);
    expect((err as Error).message).to.equal("unknown backend 'webgl'; choose one of cpu, wasm, webgpu");
  });

  it('says which package to install when a backend package is missing', async () => {
    const importer = async (specifier: string) => {
      if (specifier === '@tensorflow/tfjs-backend-wasm') {
        throw Object.assign(new Error(`Cannot find package '${specifier}' imported from x.js`),
            { code: 'ERR_MODULE_NOT_FOUND' });
      }
      return {};
    };
    let err: unknown;
    try { await selectBackend('wasm', {}, importer); } catch (e) { err = e; }
    expect(err).to.be.instanceOf(BackendError);
    expect((err as Error).message).to.equal("the 'wasm' backend needs the package @tensorflow/tfjs-backend-wasm, " +
        'which is not installed (npm install @tensorflow/tfjs-backend-wasm@^4.22.0)');
  });

  it('webgpu: says which package Dawn needs, and why Dawn could not start, as BackendErrors', async () => {
    if (tf.getBackend() === 'webgpu') return;  // kept as it is there (spec/backends/webgpu/user_paths.spec.ts)
    const missing = async (specifier: string) => {
      if (specifier === 'webgpu') {
        throw Object.assign(new Error(`Cannot find package '${specifier}' imported from x.js`), { code: 'ERR_MODULE_NOT_FOUND' });
      }
      return {};
    };
    let err: unknown;
    try { await selectBackend('webgpu', {}, missing); } catch (e) { err = e; }
    expect(err).to.be.instanceOf(BackendError);
    expect((err as Error).message).to.equal("the 'webgpu' backend (Dawn, in Node) needs the package webgpu, " +
        'which is not installed (npm install webgpu@^0.6.2)');
    let released = 0;
    const noAdapter = async () => ({
      setupDawnWebGPU: async () => { throw new Error('setupDawnWebGPU: no WebGPU adapter'); },
      releaseDawnWebGPU: () => { released++; },
    });
    err = undefined;
    try { await selectBackend('webgpu', {}, async () => ({}), noAdapter); } catch (e) { err = e; }
    expect(err).to.be.instanceOf(BackendError);
    expect((err as Error).message).to.equal("the 'webgpu' backend could not start: setupDawnWebGPU: no WebGPU adapter");
    expect(tf.getBackend(), 'the backend in use stays').to.equal(process.env.TFJS_BACKEND ?? 'cpu');
    expect(released, 'nothing to release: Dawn never started').to.equal(0);
  });

  it('passes on other import failures untouched', async () => {
    const broken = new Error('SyntaxError in a dependency');
    let err: unknown;
    try { await selectBackend('cpu', {}, async () => { throw broken; }); } catch (e) { err = e; }
    expect(err).to.equal(broken);
  });
});
