/**
 * The Dawn setup of the webgpu specs: the backend really is Dawn's WebGPU (not a silent fall back),
 * this package's kernels are registered on it, and a missing adapter is a loud error.
 * Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { setupDawnWebGPU } from '../../../src/backends/webgpu/dawn.js';
import { moeKernelNames } from '../../../src/backends/register_all_kernels.js';

describe('webgpu: Dawn setup', () => {
  it('runs on the webgpu backend with every MoE kernel registered', () => {
    expect(tf.getBackend()).to.equal('webgpu');
    const names = moeKernelNames('webgpu');
    expect(names).to.include.members(['WebGPUMoEDispatchPlan', 'WebGPUMoEGroupedMatMul', 'WebGPUMoEGroupedWeightGrad', 'WebGPUMoESoftmaxTopK']);
    for (const name of names) expect(tf.getKernel(name, 'webgpu'), name).to.not.equal(undefined);
  });

  it('throws when no attempt gives an adapter', async () => {
    let error: Error | undefined;
    try {
      await setupDawnWebGPU({ attempts: [{ flags: ['adapter=no such adapter'], featureLevel: 'core' }] });
    } catch (err) {
      error = err as Error;
    }
    expect(error?.message).to.match(/^setupDawnWebGPU: no WebGPU adapter \(requestAdapter\(\) returned null or threw for \[adapter=no such adapter\] core/);
    expect(tf.getBackend()).to.equal('webgpu');
  });
});
