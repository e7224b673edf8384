/**
 * Subgroup-matrix GEMM variants on raw Dawn (no tfjs), to find which staging pattern computes
 * the right product on the GPU and how fast (issue 13: the first kernels computed wrong numbers
 * on the H100 while the probe's storage-load GEMM was exact). C = A·B, M = N = K = 2048, operands
 * multiples of 1/64 in [-1, 1] (exact in f16), 512 sampled entries against a float64 product.
 *
 * On the GPU machine, after `../shared/gpu/prepare.sh tools/webgpu_tc/variants.ts`:
 *   source .gpu/on-device.sh && node .gpu/bundle/variants.js
 * Prints one JSON object; writes $OUT/variants.json when OUT is set.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { create, globals } from 'webgpu';

Object.assign(globalThis, globals);
const FLAGS = ['enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia'];
const S = 2048;
const report: Record<string, unknown> = { check: 'webgpu_tc variants v1' };
const started = Date.now();
const log = (m: string) => {
  process.stderr.write(`[variants ${((Date.now() - started) / 1000).toFixed(1)}s] ${m}\n`);
  if (process.env.OUT) writeFileSync(join(process.env.OUT, 'variants.partial.json'), JSON.stringify(report, null, 1));
};

const HEADER = `enable f16;
enable chromium_experimental_subgroup_matrix;
@group(0) @binding(0) var<storage, read> A32 : array<f32>;
@group(0) @binding(1) var<storage, read> B32 : array<f32>;
@group(0) @binding(2) var<storage, read> A16 : array<f16>;
@group(0) @binding(3) var<storage, read> B16 : array<f16>;
@group(0) @binding(4) var<storage, read_write> C : array<f32>;
`;
/** keeps every binding in the 'auto' layout (an unused one is dropped, and the bind group then fails) */
const TOUCH = 'if (wg.z > 1000u) { C[0] = A32[0] + B32[0] + f32(A16[0]) + f32(B16[0]); }';
const L = 'subgroup_matrix_left<f16, 16, 16>';
const R = 'subgroup_matrix_right<f16, 16, 16>';
const RES = 'subgroup_matrix_result<f32, 16, 16>';

/** accumulators c{i}_{j} for an mt × nt grid of 16×16 tiles */
function accs(mt: number, nt: number): string {
  const l: string[] = [];
  for (let i = 0; i < mt; i++) for (let j = 0; j < nt; j++) l.push(`var c${i}_${j} = ${RES}();`);
  return l.join('\n  ');
}
/** the K step over a slab: a from (src, offsetA(i), strideA), b from (src, offsetB(j), strideB) */
function step(mt: number, nt: number, a: (i: number) => string, b: (j: number) => string): string {
  const l: string[] = [];
  for (let i = 0; i < mt; i++) l.push(`let a${i} = subgroupMatrixLoad<${L}>(${a(i)});`);
  for (let j = 0; j < nt; j++) l.push(`let b${j} = subgroupMatrixLoad<${R}>(${b(j)});`);
  for (let i = 0; i < mt; i++) for (let j = 0; j < nt; j++) l.push(`c${i}_${j} = subgroupMatrixMultiplyAccumulate(a${i}, b${j}, c${i}_${j});`);
  return l.join('\n    ');
}
function storeC(mt: number, nt: number, row0: string, col0: string): string {
  const l: string[] = [];
  for (let i = 0; i < mt; i++) for (let j = 0; j < nt; j++) {
    l.push(`subgroupMatrixStore(&C, (${row0} + ${i * 16}u) * ${S}u + ${col0} + ${j * 16}u, c${i}_${j}, false, ${S}u);`);
  }
  return l.join('\n  ');
}

interface Variant { name: string; threads: number; block: number; code: string }

/** V0: the probe's GEMM, operands straight from f16 storage, one subgroup per 64×64 block. */
function storageVariant(): Variant {
  return { name: 'storage f16, 1 subgroup, 64x64', threads: 32, block: 64, code: `${HEADER}
@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wg : vec3<u32>) {
  ${TOUCH}
  let row0 = wg.y * 64u;
  let col0 = wg.x * 64u;
  ${accs(4, 4)}
  for (var k = 0u; k < ${S}u; k += 16u) {
    ${step(4, 4, i => `&A16, (row0 + ${i * 16}u) * ${S}u + k, false, ${S}u`, j => `&B16, k * ${S}u + col0 + ${j * 16}u, false, ${S}u`)}
  }
  ${storeC(4, 4, 'row0', 'col0')}
}` };
}

/**
 * Workgroup staging: `threads` invocations (threads/32 subgroups) stage an (rows × 32) slab of A
 * and a (32 × cols) slab of B as f16 (from f32 storage, or from f16 storage), each subgroup
 * multiplies its 64 × 64 part (subgroups laid out sgRows × sgCols); the result goes straight to C
 * or through a workgroup f32 block (`viaBlock`, one subgroup only). `pairs`: each invocation
 * writes two adjacent f16 of the slab (no two invocations write halves of one 32-bit word).
 */
function stagedVariant(o: { threads: number; sgRows: number; sgCols: number; from: 'f32' | 'f16'; viaBlock?: boolean; pairs?: boolean; broadcast?: boolean }): Variant {
  const rows = 64 * o.sgRows;
  const cols = 64 * o.sgCols;
  const depth = 32;
  const src = o.from === 'f32' ? ['A32', 'B32'] : ['A16', 'B16'];
  const conv = (e: string) => (o.from === 'f32' ? `f16(${e})` : e);
  const stageA = o.pairs
    ? `for (var i = lid * 2u; i < ${rows * depth}u; i += ${o.threads * 2}u) {
      let m = i / ${depth}u; let k = i % ${depth}u;
      As[i] = ${conv(`${src[0]}[(row0 + m) * ${S}u + k0 + k]`)};
      As[i + 1u] = ${conv(`${src[0]}[(row0 + m) * ${S}u + k0 + k + 1u]`)};
    }`
    : `for (var i = lid; i < ${rows * depth}u; i += ${o.threads}u) {
      let m = i / ${depth}u; let k = i % ${depth}u;
      As[i] = ${conv(`${src[0]}[(row0 + m) * ${S}u + k0 + k]`)};
    }`;
  const stageB = o.pairs
    ? `for (var i = lid * 2u; i < ${depth * cols}u; i += ${o.threads * 2}u) {
      let k = i / ${cols}u; let n = i % ${cols}u;
      Bs[i] = ${conv(`${src[1]}[(k0 + k) * ${S}u + col0 + n]`)};
      Bs[i + 1u] = ${conv(`${src[1]}[(k0 + k) * ${S}u + col0 + n + 1u]`)};
    }`
    : `for (var i = lid; i < ${depth * cols}u; i += ${o.threads}u) {
      let k = i / ${cols}u; let n = i % ${cols}u;
      Bs[i] = ${conv(`${src[1]}[(k0 + k) * ${S}u + col0 + n]`)};
    }`;
  const multi = o.threads > 32;
  const sg = multi ? `let sg = ${o.broadcast ? 'subgroupBroadcastFirst(lid / 32u)' : 'lid / 32u'}; let sr = (sg / ${o.sgCols}u) * 64u; let sc = (sg % ${o.sgCols}u) * 64u;` : 'let sr = 0u; let sc = 0u;';
  const inner = step(4, 4, i => `&As, (sr + ${i * 16}u) * ${depth}u + kk, false, ${depth}u`, j => `&Bs, kk * ${cols}u + sc + ${j * 16}u, false, ${cols}u`);
  let store: string;
  if (o.viaBlock) {
    const l: string[] = [];
    for (let i = 0; i < 4; i++) for (let j = 0; j < 4; j++) l.push(`subgroupMatrixStore(&Cs, ${i * 16 * cols + j * 16}u, c${i}_${j}, false, ${cols}u);`);
    store = `${l.join('\n  ')}
  workgroupBarrier();
  for (var i = lid; i < ${rows * cols}u; i += ${o.threads}u) { C[(row0 + i / ${cols}u) * ${S}u + col0 + i % ${cols}u] = Cs[i]; }`;
  } else {
    store = storeC(4, 4, 'row0 + sr', 'col0 + sc');
  }
  const name = `staged ${o.from}->wg f16, ${o.threads / 32} subgroup(s), ${rows}x${cols}${o.viaBlock ? ', via wg f32 block' : ''}${o.pairs ? ', pair writes' : ''}${o.broadcast ? ', sg by broadcast' : ''}`;
  return { name, threads: o.threads, block: rows, code: `${multi ? 'diagnostic(off, chromium.subgroup_matrix_uniformity);\n' : ''}${o.broadcast ? 'enable subgroups;\n' : ''}${HEADER}
var<workgroup> As : array<f16, ${rows * depth}>;
var<workgroup> Bs : array<f16, ${depth * cols}>;
${o.viaBlock ? `var<workgroup> Cs : array<f32, ${rows * cols}>;` : ''}
@compute @workgroup_size(${o.threads})
fn main(@builtin(workgroup_id) wg : vec3<u32>, @builtin(local_invocation_index) lid : u32) {
  ${TOUCH}
  let row0 = wg.y * ${rows}u;
  let col0 = wg.x * ${cols}u;
  ${sg}
  ${accs(4, 4)}
  for (var k0 = 0u; k0 < ${S}u; k0 += ${depth}u) {
    ${stageA}
    ${stageB}
    workgroupBarrier();
    for (var kk = 0u; kk < ${depth}u; kk += 16u) {
    ${inner}
    }
    workgroupBarrier();
  }
  ${store}
}` };
}

function halfBits(v: number): number {
  // v is a multiple of 1/64 in [-1, 1]: exact in f16
  const f = new Float32Array([v]);
  const u = new Uint32Array(f.buffer)[0];
  const sign = (u >>> 16) & 0x8000;
  const exp = ((u >>> 23) & 0xff) - 127 + 15;
  const mant = (u >>> 13) & 0x3ff;
  if (v === 0) return sign;
  return sign | (exp << 10) | mant;
}

async function main(): Promise<void> {
  const gpu = create(FLAGS);
  const adapter = await gpu.requestAdapter({ powerPreference: 'high-performance' });
  if (!adapter) throw new Error('no adapter');
  const features = ['shader-f16', 'chromium-experimental-subgroup-matrix', 'subgroups'].filter(f => adapter.features.has(f)) as GPUFeatureName[];
  report.features = features;
  report.adapter = (adapter.info as unknown as { description?: string }).description;
  const device = await adapter.requestDevice({ requiredFeatures: features,
    requiredLimits: { maxComputeWorkgroupStorageSize: adapter.limits.maxComputeWorkgroupStorageSize,
      maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize, maxBufferSize: adapter.limits.maxBufferSize } });
  const errors: string[] = [];
  device.addEventListener('uncapturederror', e => errors.push(String((e as GPUUncapturedErrorEvent).error.message).slice(0, 800)));
  let seed = 12345;
  const rand = () => { seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0; return seed / 2 ** 32; };
  const a = Float32Array.from({ length: S * S }, () => Math.round((rand() * 2 - 1) * 64) / 64);
  const b = Float32Array.from({ length: S * S }, () => Math.round((rand() * 2 - 1) * 64) / 64);
  const buf = (data: ArrayBufferView | number, usage: number) => {
    const size = typeof data === 'number' ? data : data.byteLength;
    const g = device.createBuffer({ size, usage: usage | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC });
    if (typeof data !== 'number') device.queue.writeBuffer(g, 0, data as unknown as ArrayBuffer);
    return g;
  };
  const S_ = GPUBufferUsage.STORAGE;
  const A32 = buf(a, S_), B32 = buf(b, S_);
  const A16 = buf(Uint16Array.from(a, halfBits), S_), B16 = buf(Uint16Array.from(b, halfBits), S_);
  const Cb = buf(S * S * 4, S_);
  const readback = device.createBuffer({ size: S * S * 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const samples = Array.from({ length: 512 }, () => [Math.floor(rand() * S), Math.floor(rand() * S)]);
  const expected = samples.map(([r, c]) => { let s = 0; for (let k = 0; k < S; k++) s += a[r * S + k] * b[k * S + c]; return s; });
  const variants = [
    storageVariant(),
    stagedVariant({ threads: 32, sgRows: 1, sgCols: 1, from: 'f32', viaBlock: true }),
    stagedVariant({ threads: 32, sgRows: 1, sgCols: 1, from: 'f32' }),
    stagedVariant({ threads: 32, sgRows: 1, sgCols: 1, from: 'f16' }),
    stagedVariant({ threads: 32, sgRows: 1, sgCols: 1, from: 'f32', pairs: true }),
    stagedVariant({ threads: 128, sgRows: 2, sgCols: 2, from: 'f32' }),
    stagedVariant({ threads: 128, sgRows: 2, sgCols: 2, from: 'f16' }),
    stagedVariant({ threads: 256, sgRows: 2, sgCols: 4, from: 'f32' }),
    stagedVariant({ threads: 128, sgRows: 2, sgCols: 2, from: 'f32', broadcast: true }),
  ];
  const results: unknown[] = [];
  report.results = results;
  for (const v of variants) {
    const entry: Record<string, unknown> = { name: v.name };
    results.push(entry);
    log(v.name);
    try {
      errors.length = 0;
      const module = device.createShaderModule({ code: v.code });
      const info = await module.getCompilationInfo();
      const msgs = info.messages.filter(m => m.type === 'error').map(m => `${m.lineNum}:${m.linePos} ${m.message}`);
      if (msgs.length) { entry.compileErrors = msgs; entry.code = v.code.slice(0, 3000); continue; }
      const pipeline = await device.createComputePipelineAsync({ layout: 'auto', compute: { module, entryPoint: 'main' } });
      const bind = device.createBindGroup({ layout: pipeline.getBindGroupLayout(0),
        entries: [A32, B32, A16, B16, Cb].map((buffer, binding) => ({ binding, resource: { buffer } })) });
      const dispatch = (n: number) => {
        const enc = device.createCommandEncoder();
        enc.clearBuffer(Cb);
        for (let i = 0; i < n; i++) {
          const pass = enc.beginComputePass();
          pass.setPipeline(pipeline);
          pass.setBindGroup(0, bind);
          pass.dispatchWorkgroups(S / (v.block === 64 ? 64 : (v.threads === 256 ? 256 : 128)), S / v.block, 1);
          pass.end();
        }
        device.queue.submit([enc.finish()]);
      };
      dispatch(1);
      const enc = device.createCommandEncoder();
      enc.copyBufferToBuffer(Cb, 0, readback, 0, S * S * 4);
      device.queue.submit([enc.finish()]);
      await readback.mapAsync(GPUMapMode.READ);
      const c = new Float32Array(readback.getMappedRange().slice(0));
      readback.unmap();
      let maxRel = 0;
      const scale = Math.max(...expected.map(Math.abs));
      samples.forEach(([r, col], i) => { maxRel = Math.max(maxRel, Math.abs(c[r * S + col] - expected[i]) / scale); });
      entry.maxRelError = maxRel;
      entry.sample = samples.slice(0, 3).map(([r, col], i) => [c[r * S + col], expected[i]]);
      await device.queue.onSubmittedWorkDone();
      const t0 = performance.now();
      dispatch(10);
      await device.queue.onSubmittedWorkDone();
      const ms = (performance.now() - t0) / 10;
      entry.ms = ms;
      entry.tflops = 2 * S ** 3 / (ms * 1e-3) / 1e12;
      entry.errors = [...errors];
    } catch (err) {
      entry.error = String((err as Error)?.message ?? err).slice(0, 800);
    }
    log(`${v.name}: ${JSON.stringify({ rel: entry.maxRelError, tflops: entry.tflops, err: entry.error ?? entry.compileErrors })}`);
  }
  const json = JSON.stringify(report, null, 1);
  process.stdout.write(json + '\n');
  if (process.env.OUT) writeFileSync(join(process.env.OUT, 'variants.json'), json);
  process.exit(0);
}
setTimeout(() => { report.watchdog = 'stopped at 100 s'; process.stdout.write(JSON.stringify(report, null, 1)); if (process.env.OUT) writeFileSync(join(process.env.OUT, 'variants.json'), JSON.stringify(report, null, 1)); process.exit(0); }, 100_000).unref();
main().catch(err => { report.fatal = String(err?.stack ?? err); process.stdout.write(JSON.stringify(report, null, 1)); process.exit(0); });
