/**
 * The WebGPU specs (spec/backends/webgpu/) as one plain entry, for the GPU machine where there is
 * no npm, mocha CLI or tsx: ../shared/gpu/prepare.sh bench/webgpu_specs.ts bundles mocha, the
 * root hooks of spec/setup.ts and the spec files into .gpu/bundle/webgpu_specs.js; there:
 *   source .gpu/on-device.sh && TFJS_BACKEND=webgpu node .gpu/bundle/webgpu_specs.js
 * Here, `TFJS_BACKEND=webgpu npx tsx bench/webgpu_specs.ts` runs the same (npm run test:webgpu is
 * the usual way).
 */
import Mocha from 'mocha';
// the specs compare with the cpu backend (user_paths: the same path on cpu)
import '@tensorflow/tfjs-backend-cpu';

process.env.TFJS_BACKEND ??= 'webgpu';
const mocha = new Mocha({ reporter: 'spec', timeout: 600000 });
// the BDD globals (describe, it, before, ...) must exist before the spec modules run
mocha.suite.emit('pre-require', globalThis, 'webgpu_specs', mocha);
const { mochaHooks } = await import('../spec/setup.js');
mocha.rootHooks(mochaHooks as Mocha.RootHookObject);
// the specs of spec/backends/webgpu/ (what `npm run test:webgpu` runs on Mesa), listed: the bundler
// follows static imports only. Left out: load_memory (it runs the load bench's child script, which
// is not bundled; tools/gpu_load/ measures the GPU machine) and tensor_cores (its setup cases are
// for an adapter without tensor cores, Mesa's; tools/webgpu_tc/check.ts is the GPU's).
await import('../spec/backends/webgpu/dawn.spec.js');
await import('../spec/backends/webgpu/kernels.spec.js');
await import('../spec/backends/webgpu/batch_mat_mul.spec.js');
await import('../spec/backends/webgpu/routing.spec.js');
await import('../spec/backends/webgpu/experts.spec.js');
await import('../spec/backends/webgpu/packed_experts.spec.js');
await import('../spec/backends/webgpu/quantized_experts.spec.js');
await import('../spec/backends/webgpu/sequence_context.spec.js');
await import('../spec/backends/webgpu/generate.spec.js');
await import('../spec/backends/webgpu/user_paths.spec.js');
await import('../spec/backends/webgpu/load_to_device.spec.js');
await import('../spec/backends/webgpu/memory_limits.spec.js');
await import('../spec/backends/webgpu/bench.spec.js');
await import('../spec/backends/webgpu/train.spec.js');
await import('../spec/backends/webgpu/adam_update.spec.js');
await import('../spec/backends/webgpu/step_profile.spec.js');
await import('../spec/backends/webgpu/subgroup_matrix_emulator.spec.js');
mocha.run(failures => process.exit(failures > 0 ? 1 : 0));
