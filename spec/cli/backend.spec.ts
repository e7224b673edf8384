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
    expect((err as Error).message).to.equal("unknown backend 'webgl'; choose one of cpu, wasm");
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
    try { await selectBackend('wasm', importer); } catch (e) { err = e; }
    expect(err).to.be.instanceOf(BackendError);
    expect((err as Error).message).to.equal("the 'wasm' backend needs the package @tensorflow/tfjs-backend-wasm, " +
        'which is not installed (npm install @tensorflow/tfjs-backend-wasm@^4.22.0)');
  });

  it('passes on other import failures untouched', async () => {
    const broken = new Error('SyntaxError in a dependency');
    let err: unknown;
    try { await selectBackend('cpu', async () => { throw broken; }); } catch (e) { err = e; }
    expect(err).to.equal(broken);
  });
});
