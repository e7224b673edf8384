/**
 * GPU time of LoRA's scaled rank-sized products on webgpu (issue 15): MoEScaledMatMul
 * (ScaledMatMulProgram, one dispatch) against what it replaced, tf.mul(tf.matMul(a, b), s) (tfjs's
 * own product program and a BinaryOp), at OLMoE-1B-7B's shapes (hidden 2048, r 16, 64 experts):
 * forward s·(x·Aᵀ), backward s·(dy·B), the router's s·(dy·B). The kernel removes a dispatch (host
 * time); this checks what it costs on the GPU, where a hand-written tile may be slower than tfjs's.
 * Prints one JSON line per shape: ms per call (wall, 50 calls after 5 warm-up, one read at the end)
 * for each path and for the program with 1 and with 4 rows per thread (the kernel picks by rows:
 * scaledMatMulRowsPerThread, a guess this is to check), kernel ms from tf.time where the adapter
 * has timestamp queries, and the largest relative difference of the two results.
 *   Mesa (checks it runs):  EGL_PLATFORM=surfaceless npx tsx tools/lora_products/bench.ts --tokens 64
 *   GPU machine:            npx tsx tools/lora_products/bench.ts --tokens 512,2048,4096
 */
import * as tf from '@tensorflow/tfjs-core';
import { commandLineFlag, setUpNarrowWebGPU } from '../../bench/e2e/narrow_setup.js';
import { SCALED_MATMUL, scaledMatMul } from '../../src/ops/scaled_matmul.js';
import { ScaledMatMulProgram, scaledMatMulRowsPerThread } from '../../src/backends/webgpu/programs/scaled_matmul_program.js';

await setUpNarrowWebGPU();
if (tf.getKernel(SCALED_MATMUL, 'webgpu') == null) throw new Error('MoEScaledMatMul is not registered on webgpu');
const CALLS = 50;
const WARMUP = 5;

/** ms per call of `run` (its result disposed each time but the last, read once) */
async function msPerCall(run: () => tf.Tensor): Promise<number> {
  for (let i = 0; i < WARMUP; i++) await run().data().then(() => {}, () => {});
  tf.engine().startScope();
  const start = performance.now();
  let last: tf.Tensor = run();
  for (let i = 1; i < CALLS; i++) {
    last.dispose();
    last = run();
  }
  await last.data();
  const ms = (performance.now() - start) / CALLS;
  tf.engine().endScope();
  return ms;
}

const rank = Number(commandLineFlag('rank', '16'));
for (const tokens of commandLineFlag('tokens', '512,2048,4096').split(',').map(Number)) {
  const shapes: Array<{ name: string; m: number; k: number; n: number; transposeB: boolean }> = [
    { name: 'forward s·(x·Aᵀ), q/k/v/o', m: tokens, k: 2048, n: rank, transposeB: true },
    { name: 'backward s·(dy·B), q/k/v/o', m: tokens, k: 2048, n: rank, transposeB: false },
    { name: 'backward s·(dy·B), router', m: tokens, k: 64, n: rank, transposeB: false },
  ];
  for (const s of shapes) {
    const a = tf.randomNormal([s.m, s.k]) as tf.Tensor2D;
    const b = tf.randomNormal(s.transposeB ? [s.n, s.k] : [s.k, s.n]) as tf.Tensor2D;
    const scale = tf.scalar(2);
    const kernel = () => scaledMatMul(a, b, s.transposeB, 2);
    const backend = tf.backend() as unknown as { runWebGPUProgram: (...args: unknown[]) => tf.TensorInfo };
    const tiled = (rowsPerThread: 1 | 4) => () => {
      const program = new ScaledMatMulProgram(s.m, s.n, s.transposeB, rowsPerThread);
      return tf.engine().makeTensorFromTensorInfo(backend.runWebGPUProgram(program, [a, b], 'float32', program.uniformsFor(s.k, 2)));
    };
    const composed = () => tf.tidy(() => tf.mul(tf.matMul(a, b, false, s.transposeB), scale));
    const [yk, yc] = [kernel(), composed()];
    const [dk, dc] = [await yk.data(), await yc.data()];
    let maxAbs = 0, maxDiff = 0;
    for (let i = 0; i < dc.length; i++) {
      maxAbs = Math.max(maxAbs, Math.abs(dc[i]));
      maxDiff = Math.max(maxDiff, Math.abs(dk[i] - dc[i]));
    }
    tf.dispose([yk, yc]);
    const kernelMs = async (run: () => tf.Tensor) => {
      try {
        const t = await tf.time(() => { run().dispose(); });
        return t.kernelMs;
      } catch {
        return null;
      }
    };
    process.stdout.write(`${JSON.stringify({
      shape: s.name, a: [s.m, s.k], b: s.transposeB ? [s.n, s.k] : [s.k, s.n],
      scaledMatMulMs: await msPerCall(kernel), matMulThenMulMs: await msPerCall(composed),
      rowsPerThreadPicked: scaledMatMulRowsPerThread(s.m), oneRowPerThreadMs: await msPerCall(tiled(1)), fourRowsPerThreadMs: await msPerCall(tiled(4)),
      scaledMatMulKernelMs: await kernelMs(kernel), matMulThenMulKernelMs: await kernelMs(composed),
      maxRelativeDifference: maxDiff / maxAbs,
    })}\n`);
    tf.dispose([a, b, scale]);
  }
}
process.exit(0);
