/**
 * Subgroup-matrix GEMM variants on raw Dawn (no tfjs), issue 13: which patterns compute the right
 * product on the GPU and how fast, and the package's own SubgroupMatrixMatMulProgram run outside
 * tfjs (its WGSL under a minimal stand-in of tfjs's preamble) on a grouped problem with padding
 * rows, so that a wrong result there is the shader's and a right one points at the integration.
 * The staged variants' index math is the package programs' (src/backends/webgpu/programs/
 * subgroup_matrix_core.ts; WGSL in variant_codes.ts).
 *
 * Problems: 2048³, and config Q's up projection per expert (16 experts × 1024 rows, N 1536, K 2048).
 * Operands are multiples of 1/64 in [-1, 1] (exact in f16; every partial sum exact in f32), 512
 * sampled entries against a float64 product: a right kernel gives maxRelError 0.
 *
 * On the GPU machine, after `../shared/gpu/prepare.sh tools/webgpu_tc/variants.ts`:
 *   source .gpu/on-device.sh && node .gpu/bundle/variants.js
 * Here (Mesa): `EGL_PLATFORM=surfaceless npx tsx tools/webgpu_tc/variants.ts` reports that the
 * adapter has no subgroup matrices and exits 0; with VARIANTS_HARNESS=1 it first runs the harness
 * (buffers, bind groups, read back, check, timing) on a plain f32 GEMM, then the package's MatMul
 * program's plumbing with the matrices stood in for (DRY_KINDS=weightGrad: the weight gradient's).
 * Times: 10 back-to-back dispatches in one pass, `ms` from timestamp queries where the device has
 * them (the pass's GPU time; `wallMs`: submit to done, as variants v1 reported).
 * Prints one JSON object; writes $OUT/variants.json when OUT is set (variants.partial.json after
 * every step). Stops starting variants after TIME_BUDGET_MS.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { create, globals } from 'webgpu';
import { SubgroupMatrixMatMulProgram, SubgroupMatrixWeightGradProgram } from '../../src/backends/webgpu/programs/subgroup_matrix_program.js';
import {
  packageProgramShader, plainVariant, type Problem, stagedVariant, standInMatrices, stagedVariants, storageVariant, type Variant,
} from './variant_codes.js';

Object.assign(globalThis, globals);
const FLAGS = ['enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia'];
const TIME_BUDGET_MS = 60_000;
const PROBLEMS: Problem[] = [
  { name: '2048^3', batch: 1, M: 2048, N: 2048, K: 2048 },
  { name: 'Q up: 16 x (1024 x 1536 x 2048)', batch: 16, M: 1024, N: 1536, K: 2048 },
];
const report: Record<string, unknown> = { check: 'webgpu_tc variants v2', budgetMs: TIME_BUDGET_MS };
const started = Date.now();
const write = (name: string) => {
  if (process.env.OUT) writeFileSync(join(process.env.OUT, name), JSON.stringify(report, null, 1));
};
const log = (m: string) => {
  process.stderr.write(`[variants ${((Date.now() - started) / 1000).toFixed(1)}s] ${m}\n`);
  write('variants.partial.json');
};
function finish(): never {
  report.elapsedMs = Date.now() - started;
  process.stdout.write(JSON.stringify(report, null, 1) + '\n');
  write('variants.json');
  process.exit(0);
}

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);
function halfBits(v: number): number {
  // v is a multiple of 1/64 in [-1, 1]: exact in f16
  if (v === 0) return 0;
  scratchF32[0] = v;
  const u = scratchU32[0];
  return ((u >>> 16) & 0x8000) | ((((u >>> 23) & 0xff) - 127 + 15) << 10) | ((u >>> 13) & 0x3ff);
}

let seed = 12345;
const rand = () => { seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0; return seed / 2 ** 32; };
const sixtyFourths = (n: number) => Float32Array.from({ length: n }, () => Math.round((rand() * 2 - 1) * 64) / 64);

interface Runner {
  device: GPUDevice;
  errors: string[];
  buffer(data: ArrayBufferView | number): GPUBuffer;
  /** compiles, runs once, reads `out` back, times `repeat` runs; fills entry */
  run(entry: Record<string, unknown>, code: string, buffers: GPUBuffer[], out: GPUBuffer, uniforms: GPUBuffer | undefined,
      dispatch: [number, number, number], flops: number, check: (c: Float32Array) => number): Promise<void>;
}

function runner(device: GPUDevice): Runner {
  const errors: string[] = [];
  const querySet = device.features.has('timestamp-query') ? device.createQuerySet({ type: 'timestamp', count: 2 }) : undefined;
  const stamps = querySet && device.createBuffer({ size: 16, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC });
  const stampsRead = querySet && device.createBuffer({ size: 16, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  device.addEventListener('uncapturederror', e => errors.push(String((e as GPUUncapturedErrorEvent).error.message).slice(0, 800)));
  const buffer = (data: ArrayBufferView | number) => {
    const size = typeof data === 'number' ? data : data.byteLength;
    const g = device.createBuffer({ size, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC });
    if (typeof data !== 'number') device.queue.writeBuffer(g, 0, data as unknown as ArrayBuffer);
    return g;
  };
  return {
    device, errors, buffer,
    async run(entry, code, buffers, out, uniforms, dispatch, flops, check) {
      errors.length = 0;
      const module = device.createShaderModule({ code });
      const info = await module.getCompilationInfo();
      const msgs = info.messages.filter(m => m.type === 'error').map(m => `${m.lineNum}:${m.linePos} ${m.message}`);
      if (msgs.length) { entry.compileErrors = msgs.slice(0, 5); return; }
      const pipeline = await device.createComputePipelineAsync({ layout: 'auto', compute: { module, entryPoint: 'main' } });
      const entries: GPUBindGroupEntry[] = buffers.map((b, binding) => ({ binding, resource: { buffer: b } }));
      if (uniforms) entries.push({ binding: buffers.length, resource: { buffer: uniforms } });
      const bind = device.createBindGroup({ layout: pipeline.getBindGroupLayout(0), entries });
      const go = (n: number, timed = false) => {
        const enc = device.createCommandEncoder();
        enc.clearBuffer(out);
        const pass = enc.beginComputePass(timed && querySet ? { timestampWrites: { querySet, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 } } : {});
        pass.setPipeline(pipeline);
        pass.setBindGroup(0, bind);
        for (let i = 0; i < n; i++) pass.dispatchWorkgroups(...dispatch);
        pass.end();
        if (timed && querySet) {
          enc.resolveQuerySet(querySet, 0, 2, stamps!, 0);
          enc.copyBufferToBuffer(stamps!, 0, stampsRead!, 0, 16);
        }
        device.queue.submit([enc.finish()]);
      };
      go(1);
      const readback = device.createBuffer({ size: out.size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
      const enc = device.createCommandEncoder();
      enc.copyBufferToBuffer(out, 0, readback, 0, out.size);
      device.queue.submit([enc.finish()]);
      await readback.mapAsync(GPUMapMode.READ);
      const c = new Float32Array(readback.getMappedRange().slice(0));
      readback.unmap();
      readback.destroy();
      entry.maxRelError = check(c);
      await device.queue.onSubmittedWorkDone();
      const t0 = performance.now();
      go(10, true);
      await device.queue.onSubmittedWorkDone();
      entry.wallMs = (performance.now() - t0) / 10;
      let ms = entry.wallMs as number;
      if (querySet) {
        // the pass's own GPU time (timestamp queries), without the submit and the wait
        await stampsRead!.mapAsync(GPUMapMode.READ);
        const [begin, end] = new BigUint64Array(stampsRead!.getMappedRange().slice(0));
        stampsRead!.unmap();
        ms = Number(end - begin) / 1e6 / 10;
        entry.gpuMs = ms;
      }
      entry.ms = ms;
      entry.tflops = flops / (ms * 1e-3) / 1e12;
      entry.errors = [...errors];
    },
  };
}

/** max |c − expected| / max |expected| over 512 sampled entries of the batched GEMM. */
function gemmCheck(p: Problem, a: Float32Array, b: Float32Array): (c: Float32Array) => number {
  const samples = Array.from({ length: 512 }, () => [Math.floor(rand() * p.batch), Math.floor(rand() * p.M), Math.floor(rand() * p.N)]);
  const expected = samples.map(([z, r, col]) => {
    let s = 0;
    for (let k = 0; k < p.K; k++) s += a[(z * p.M + r) * p.K + k] * b[(z * p.K + k) * p.N + col];
    return s;
  });
  const scale = Math.max(...expected.map(Math.abs));
  return c => samples.reduce((worst, [z, r, col], i) =>
    Math.max(worst, Math.abs(c[(z * p.M + r) * p.N + col] - expected[i]) / scale), 0);
}

async function gemmVariants(r: Runner, p: Problem, results: unknown[], only?: (p: Problem) => Variant[]): Promise<void> {
  const a = sixtyFourths(p.batch * p.M * p.K);
  const b = sixtyFourths(p.batch * p.K * p.N);
  const check = gemmCheck(p, a, b);
  const A32 = r.buffer(a), B32 = r.buffer(b);
  const A16 = r.buffer(Uint16Array.from(a, halfBits)), B16 = r.buffer(Uint16Array.from(b, halfBits));
  const C = r.buffer(p.batch * p.M * p.N * 4);
  // bindings 5, 6: the f16 buffers again, read as vec4<f16>
  const buffers = [A32, B32, A16, B16, C, A16, B16];
  const variants: Variant[] = only ? only(p) : [
    storageVariant(p, { sgRows: 2, sgCols: 2, tilesM: 4, tilesN: 8 }),
    ...stagedVariants().map(o => stagedVariant(p, o)),
    storageVariant(p, { sgRows: 2, sgCols: 2, tilesM: 4, tilesN: 4 }),
    storageVariant(p, { sgRows: 1, sgCols: 1, tilesM: 4, tilesN: 4 }),
  ];
  for (const v of variants) {
    const entry: Record<string, unknown> = { problem: p.name, name: v.name };
    results.push(entry);
    if (Date.now() - started > TIME_BUDGET_MS) { entry.skipped = 'out of time budget'; continue; }
    log(`${p.name}: ${v.name}`);
    try {
      await r.run(entry, v.code, buffers, C, undefined, [p.N / v.blockCols, p.M / v.blockRows, p.batch], 2 * p.batch * p.M * p.N * p.K, check);
    } catch (err) {
      entry.error = String((err as Error)?.message ?? err).slice(0, 800);
    }
    log(`${v.name}: ${JSON.stringify({ rel: entry.maxRelError, tflops: entry.tflops, err: entry.error ?? entry.compileErrors })}`);
  }
  for (const g of [A32, B32, A16, B16, C]) g.destroy();
}

/**
 * The package's programs under a minimal stand-in of tfjs's preamble (packageProgramShader), on 2
 * experts of 1024 padded rows, 1000 real each (the padding rows hold values that must not count):
 * 'matmul', SubgroupMatrixMatMulProgram ('rows' source, [E, N, K] f32 weight read along k, N 1536,
 * K 2048; padding rows must come out 0), 'matmul-if' the same with its K loop inside
 * if (e >= 0) as on the wrong run, 'weightGrad' SubgroupMatrixWeightGradProgram (rows × rows,
 * dW [E, 1536, 2048]; right in tfjs on that run: the control). `dryRun`: a small problem with the
 * matrices stood in for (Mesa: the plumbing only).
 */
async function packageProgram(r: Runner, results: unknown[], kind: 'matmul' | 'matmul-if' | 'weightGrad', dryRun = false): Promise<void> {
  const [perExpert, real, N, K] = dryRun ? [128, 100, 128, 64] : [1024, 1000, 1536, 2048];
  const E = 2, capacity = E * perExpert;
  const grad = kind === 'weightGrad';
  const entry: Record<string, unknown> = { problem: 'grouped rows', name: grad
    ? 'package SubgroupMatrixWeightGradProgram (rows x rows, dW [E, P, Q])'
    : `package SubgroupMatrixMatMulProgram (rows, f32 weight [E, N, K])${kind === 'matmul-if' ? ', K loop inside if (e >= 0) as on 2026-12-05' : ''}` };
  results.push(entry);
  log(String(entry.name));
  const program = grad
    ? new SubgroupMatrixWeightGradProgram([E, N, K], E, N, K, { left: 'rows', right: 'rows', scaleLeft: false, scaled: false }, 32)
    : new SubgroupMatrixMatMulProgram(capacity, N, { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false }, 32);
  const shader = packageProgramShader(program, kind === 'matmul-if');
  // the dry run's f32 slabs at half length, within Mesa's 32 KiB (its numbers are no product anyway)
  const code = dryRun
    ? standInMatrices(shader).replace(/(var<workgroup> [AB]s : array<f32, )(\d+)>/g, (_, head: string, n: string) => `${head}${Number(n) / 2}>`)
    : shader;
  const pr = Int32Array.from({ length: capacity }, (_, row) => (row % perExpert < real ? row : -1));
  const seg = Int32Array.from([0, perExpert, capacity, real, real]);
  const uniformData = new ArrayBuffer(48);
  // matmul: A [capacity, K], W [E, N, K]; weightGrad: L [capacity, N], R [capacity, K]
  const a = sixtyFourths(capacity * (grad ? N : K));
  const w = sixtyFourths(grad ? capacity * K : E * N * K);
  let samples: number[][];
  let expected: number[];
  let inputs: GPUBuffer[];
  let outLength: number;
  if (grad) {
    outLength = E * N * K;
    new Int32Array(uniformData, 0, 7).set([N, K, 1, E, N * K, K, 1]);
    new Float32Array(uniformData, 28, 3).set([1, 0, 0]);
    samples = Array.from({ length: 512 }, () => [Math.floor(rand() * E), Math.floor(rand() * N), Math.floor(rand() * K)]);
    expected = samples.map(([e, p, q]) => {
      let s = 0;
      for (let row = e * perExpert; row < e * perExpert + real; row++) s += a[row * N + p] * w[row * K + q];
      return s;
    });
    inputs = [r.buffer(outLength * 4), r.buffer(a), r.buffer(w), r.buffer(seg)];
  } else {
    outLength = capacity * N;
    new Int32Array(uniformData, 0, 8).set([capacity, N, K, 1, E, N * K, K, 1]);
    new Float32Array(uniformData, 32, 3).set([1, 0, 0]);
    samples = Array.from({ length: 512 }, (_, i) => [
      i < 32 ? Math.floor(rand() * E) * perExpert + real + Math.floor(rand() * (perExpert - real)) : Math.floor(rand() * capacity),
      Math.floor(rand() * N)]);
    expected = samples.map(([row, n]) => {
      if (pr[row] < 0) return 0;
      const e = Math.floor(row / perExpert);
      let s = 0;
      for (let k = 0; k < K; k++) s += a[row * K + k] * w[(e * N + n) * K + k];
      return s;
    });
    inputs = [r.buffer(outLength * 4), r.buffer(a), r.buffer(w), r.buffer(seg), r.buffer(pr)];
  }
  const at = (sample: number[]) => (grad ? (sample[0] * N + sample[1]) * K + sample[2] : sample[0] * N + sample[1]);
  const scale = Math.max(...expected.map(Math.abs));
  const uniforms = r.device.createBuffer({ size: 48, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
  r.device.queue.writeBuffer(uniforms, 0, uniformData);
  try {
    await r.run(entry, code, inputs, inputs[0], uniforms, program.dispatch, 2 * E * (grad ? real : perExpert) * N * K,
        c => samples.reduce((worst, sample, i) => Math.max(worst, Math.abs(c[at(sample)] - expected[i]) / scale), 0));
  } catch (err) {
    entry.error = String((err as Error)?.message ?? err).slice(0, 800);
  }
  log(`package program: ${JSON.stringify({ rel: entry.maxRelError, tflops: entry.tflops, err: entry.error ?? entry.compileErrors })}`);
  for (const g of [...inputs, uniforms]) g.destroy();
}

async function main(): Promise<void> {
  // Vulkan (the GPU machine); else Mesa's GL, only to report what it lacks
  const adapter = await create(FLAGS).requestAdapter({ powerPreference: 'high-performance' }) ??
      await create([...FLAGS, 'backend=opengles']).requestAdapter({ featureLevel: 'compatibility' });
  if (!adapter) throw new Error('no adapter');
  const features = ['shader-f16', 'chromium-experimental-subgroup-matrix', 'subgroups', 'timestamp-query'].filter(f => adapter.features.has(f)) as GPUFeatureName[];
  report.features = features;
  report.adapter = (adapter.info as unknown as { description?: string }).description;
  const lacking = ['shader-f16', 'chromium-experimental-subgroup-matrix'].filter(f => !adapter.features.has(f));
  if (lacking.length > 0) {
    report.noSubgroupMatrix = `no subgroup matrix: the adapter lacks ${lacking.join(' and ')}`;
    log(String(report.noSubgroupMatrix));
    if (process.env.VARIANTS_HARNESS !== '1') finish();
    // dry run of the harness (buffers, bind groups, read back, check, timing) with a plain f32 GEMM
    // and the package program's plumbing (bindings, uniforms, dispatch) with the matrices stood in for: its numbers are no product
    const device = await adapter.requestDevice({ requiredLimits: { maxComputeWorkgroupStorageSize: adapter.limits.maxComputeWorkgroupStorageSize } });
    const results: unknown[] = [];
    report.results = results;
    const r = runner(device);
    await gemmVariants(r, { name: 'harness', batch: 2, M: 64, N: 64, K: 64 }, results, p => [plainVariant(p)]);
    // one program per process (DRY_KINDS=weightGrad for the other): on Mesa's GL a second one after the
    // first, with its half-length stand-in slabs, brings the process down
    await packageProgram(r, results, process.env.DRY_KINDS === 'weightGrad' ? 'weightGrad' : 'matmul', true);
    finish();
  }
  const device = await adapter.requestDevice({ requiredFeatures: features,
    requiredLimits: { maxComputeWorkgroupStorageSize: adapter.limits.maxComputeWorkgroupStorageSize,
      maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize, maxBufferSize: adapter.limits.maxBufferSize } });
  report.maxComputeWorkgroupStorageSize = device.limits.maxComputeWorkgroupStorageSize;
  const r = runner(device);
  const results: unknown[] = [];
  report.results = results;
  for (const kind of ['matmul', 'matmul-if', 'weightGrad'] as const) await packageProgram(r, results, kind);
  for (const p of PROBLEMS) await gemmVariants(r, p, results);
  finish();
}
setTimeout(() => { report.watchdog = 'stopped at 100 s'; finish(); }, 100_000).unref();
main().catch(err => { report.fatal = String(err?.stack ?? err); finish(); });
