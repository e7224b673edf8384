/**
 * Mocha root hooks: picks the backend from TFJS_BACKEND (cpu | wasm | webgpu), registers this
 * package's kernels for it, and turns an unexpected console.warn into a failure.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';  // registers the gradients in Node
import '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs-backend-wasm';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';

const backend = process.env.TFJS_BACKEND ?? 'cpu';
const realWarn = console.warn;
let warnings: string[] = [];

export const mochaHooks = {
  async beforeAll(this: Mocha.Context) {
    if (backend === 'webgpu') {
      // Dawn as navigator.gpu, the adapter found or a loud failure (src/backends/webgpu/dawn.ts)
      const { setupDawnWebGPU } = await import('../src/backends/webgpu/dawn.js');
      const adapter = await setupDawnWebGPU();
      console.log(`# webgpu adapter: ${adapter.description || adapter.vendor} (${adapter.featureLevel}, [${adapter.flags.join(' ')}])`);
    }
    if (!(await tf.setBackend(backend))) throw new Error(`TFJS_BACKEND='${backend}' could not be set`);
    await tf.ready();
    registerMoEKernels(backend);
    // The cpu backend's first tensor write prints a one-off "install tfjs-node" notice; take it
    // here, or it fails whichever test happens to create the first tensor.
    console.warn = (...args: unknown[]) => { if (!String(args[0]).includes('tfjs-node')) realWarn(...args); };
    tf.dispose(tf.scalar(0));
    console.warn = realWarn;
    console.log(`# backend: ${tf.getBackend()}`);
  },
  async afterAll() {
    if (backend === 'webgpu') (await import('../src/backends/webgpu/dawn.js')).releaseDawnWebGPU();
  },
  beforeEach() {
    warnings = [];
    console.warn = (...args: unknown[]) => { warnings.push(args.map(String).join(' ')); };
  },
  afterEach(this: Mocha.Context) {
    console.warn = realWarn;
    if (warnings.length > 0) {
      throw new Error(`unexpected console.warn in '${this.currentTest?.title}': ${warnings.join(' | ')}`);
    }
  },
};
