/**
 * One-shot WebGPU capability probe, straight on Dawn (npm `webgpu`), without tfjs (issue 13's
 * "verify first, in one short run"): what the adapter offers under each Dawn toggle set, whether
 * f16 and chromium_experimental_subgroup_matrix shaders compile and compute the right numbers, which
 * dimension order the subgroup matrix types really use, and a crude f16 GEMM throughput.
 *
 * Here (Mesa, no f16 or subgroup matrices: reported as findings):
 *   EGL_PLATFORM=surfaceless npx tsx tools/webgpu_probe/probe.ts
 * On the GPU machine, after `../shared/gpu/prepare.sh tools/webgpu_probe/probe.ts` here:
 *   source .gpu/on-device.sh && OUT=$OUT node .gpu/bundle/probe.js
 * Prints one JSON object on stdout (progress on stderr) and writes it to $OUT/probe.json when OUT
 * is set. Exits 0 whatever features are missing; 1 only when no flag set gives any adapter.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { create, globals } from 'webgpu';

Object.assign(globalThis, globals);

// Whole run stays under a minute on the H200; each await is bounded too, so one hung step
// (a shader compile, a GPU fault) costs its own bound and is recorded, not the whole probe.
const TOTAL_BUDGET_MS = 55_000;
const STEP_TIMEOUT_MS = 10_000;
const started = Date.now();

const ENABLE_UNSAFE = 'enable-dawn-features=allow_unsafe_apis';
const ENABLE_UNSAFE_F16 = 'enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia';
const FLAG_SETS: string[][] = [[], [ENABLE_UNSAFE], [ENABLE_UNSAFE_F16]];
// Added only for the device tests (step 2): timestamps at full resolution for the GEMM timings.
const TIMING_FLAG = 'disable-dawn-features=timestamp_quantization';

const report: Record<string, unknown> = { probe: 'webgpu_probe v1', startedAt: new Date(started).toISOString() };
// Every Dawn instance and adapter made stays referenced to the end: with Mesa's GL backend a
// bundled run crashed or hung in the first dispatch once earlier instances could be collected.
const keepAlive: unknown[] = [];

/**
 * Progress on stderr, and the report so far in $OUT/probe.partial.json: a hang inside Dawn blocks
 * the event loop (no timeout or watchdog fires), so what finished before it must already be on disk.
 */
function log(msg: string): void {
  process.stderr.write(`[probe ${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}\n`);
  if (process.env.OUT) writeFileSync(join(process.env.OUT, 'probe.partial.json'), JSON.stringify({ ...report, lastStep: msg }, null, 1));
}
const errorText = (err: unknown) => String((err as Error)?.message ?? err);

let finished = false;
function finish(exitCode: number): never {
  if (!finished) {
    finished = true;
    report.elapsedMs = Date.now() - started;
    const json = JSON.stringify(report, null, 1);
    process.stdout.write(json + '\n');
    if (process.env.OUT) writeFileSync(join(process.env.OUT, 'probe.json'), json);
  }
  // Dawn keeps the process alive while a GPU instance lives: leave explicitly.
  process.exit(exitCode);
}

function withTimeout<T>(promise: Promise<T>, what: string, ms = STEP_TIMEOUT_MS): Promise<T> {
  const left = TOTAL_BUDGET_MS - (Date.now() - started);
  const bound = Math.max(1, Math.min(ms, left));
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout after ${bound} ms: ${what}`)), bound);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------------
// Dumping Dawn's objects: their fields are prototype getters, so JSON.stringify sees nothing.

function dumpValue(value: unknown, depth = 0): unknown {
  if (value == null || typeof value !== 'object') return typeof value === 'function' ? undefined : value;
  if (depth > 4) return '[too deep]';
  if (Array.isArray(value) || (typeof (value as { length?: unknown }).length === 'number' &&
      typeof (value as { [Symbol.iterator]?: unknown })[Symbol.iterator] === 'function')) {
    return Array.from(value as ArrayLike<unknown>, v => dumpValue(v, depth + 1));
  }
  const out: Record<string, unknown> = {};
  const names = new Set<string>();
  for (let o: object | null = value; o != null && o !== Object.prototype; o = Object.getPrototypeOf(o)) {
    for (const name of Object.getOwnPropertyNames(o)) if (name !== 'constructor') names.add(name);
  }
  for (const name of names) {
    let v: unknown;
    try { v = (value as Record<string, unknown>)[name]; } catch (err) { v = `[getter threw: ${errorText(err)}]`; }
    const dumped = dumpValue(v, depth + 1);
    if (dumped !== undefined) out[name] = dumped;
  }
  return out;
}

const KEY_LIMITS = ['maxBufferSize', 'maxStorageBufferBindingSize', 'maxComputeWorkgroupStorageSize',
  'maxComputeInvocationsPerWorkgroup', 'maxComputeWorkgroupSizeX', 'maxComputeWorkgroupsPerDimension',
  'maxStorageBuffersPerShaderStage', 'minStorageBufferOffsetAlignment', 'maxSubgroupSize', 'minSubgroupSize'];

function allLimits(limits: GPUSupportedLimits): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [name, v] of Object.entries(dumpValue(limits) as Record<string, unknown>)) {
    if (typeof v === 'number') out[name] = v;
  }
  return out;
}

interface MatrixConfig { componentType: string; resultComponentType: string; M: number; N: number; K: number }

function matrixConfigs(info: GPUAdapterInfo): MatrixConfig[] {
  const raw = (info as unknown as { subgroupMatrixConfigs?: unknown }).subgroupMatrixConfigs;
  if (raw == null) return [];
  return (dumpValue(raw) as Array<Record<string, unknown>>).map(c => ({
    componentType: String(c.componentType), resultComponentType: String(c.resultComponentType),
    M: Number(c.M), N: Number(c.N), K: Number(c.K),
  }));
}

// ---------------------------------------------------------------------------------------------
// Step 1: adapters under each flag set.

interface AdapterFound { flags: string[]; featureLevel: 'core' | 'compatibility'; gpu: GPU; adapter: GPUAdapter }

async function requestAdapter(flags: string[], featureLevel: 'core' | 'compatibility') {
  const gpu = create(flags);
  keepAlive.push(gpu);
  const adapter = await withTimeout(gpu.requestAdapter(
      { powerPreference: 'high-performance', featureLevel } as GPURequestAdapterOptions), `requestAdapter [${flags}]`);
  keepAlive.push(adapter);
  return { gpu, adapter };
}

async function surveyAdapters(): Promise<AdapterFound[]> {
  const survey: unknown[] = [];
  report.adapters = survey;
  const found: AdapterFound[] = [];
  const attempts: Array<{ flags: string[]; featureLevel: 'core' | 'compatibility' }> = [];
  for (const flags of FLAG_SETS) {
    attempts.push({ flags, featureLevel: 'core' });
    attempts.push({ flags: [...flags, 'backend=opengles'], featureLevel: 'compatibility' });
  }
  for (const { flags, featureLevel } of attempts) {
    const entry: Record<string, unknown> = { flags, featureLevel };
    survey.push(entry);
    try {
      const { gpu, adapter } = await requestAdapter(flags, featureLevel);
      if (adapter == null) { entry.adapter = null; continue; }
      const info = dumpValue(adapter.info) as Record<string, unknown>;
      const limits = allLimits(adapter.limits);
      entry.info = info;
      entry.subgroupMatrixConfigs = matrixConfigs(adapter.info);
      entry.features = [...adapter.features].map(String).sort();
      entry.keyLimits = Object.fromEntries(KEY_LIMITS.filter(k => k in limits).map(k => [k, limits[k]]));
      entry.limits = limits;
      found.push({ flags, featureLevel, gpu, adapter });
      log(`[${flags.join(' ')}] ${featureLevel}: ${info.vendor} ${info.description}; ` +
          `${(entry.features as string[]).length} features, ${(entry.subgroupMatrixConfigs as unknown[]).length} matrix configs`);
    } catch (err) {
      entry.error = errorText(err).split('\n')[0];
    }
  }
  return found;
}

// ---------------------------------------------------------------------------------------------
// Running one compute shader with every error Dawn reports captured as text.

interface ShaderRun { ok: boolean; errors: string[]; compilation?: string[]; gpuMs?: number[]; wallMs?: number[] }

async function compile(device: GPUDevice, code: string, run: ShaderRun): Promise<GPUComputePipeline | undefined> {
  device.pushErrorScope('validation');
  device.pushErrorScope('internal');
  let pipeline: GPUComputePipeline | undefined;
  const module = device.createShaderModule({ code });
  try {
    const info = await withTimeout(module.getCompilationInfo(), 'getCompilationInfo');
    const messages = info.messages.map(m => `${m.type} ${m.lineNum}:${m.linePos} ${m.message}`);
    if (messages.length > 0) run.compilation = messages;
    pipeline = await withTimeout(device.createComputePipelineAsync(
        { layout: 'auto', compute: { module, entryPoint: 'main' } }), 'createComputePipelineAsync');
  } catch (err) {
    run.errors.push(`pipeline: ${errorText(err)}`);
  }
  for (const scope of ['internal', 'validation']) {
    const err = await withTimeout(device.popErrorScope(), 'popErrorScope').catch(e => e as Error);
    if (err != null) run.errors.push(`${scope} scope: ${errorText(err)}`);
  }
  return run.errors.length === 0 ? pipeline : undefined;
}

function storageBuffer(device: GPUDevice, bytes: ArrayBufferView | number): GPUBuffer {
  const size = Math.ceil((typeof bytes === 'number' ? bytes : bytes.byteLength) / 4) * 4;
  const buffer = device.createBuffer({
    size, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST, mappedAtCreation: true,
  });
  if (typeof bytes !== 'number') {
    new Uint8Array(buffer.getMappedRange()).set(new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength));
  }
  buffer.unmap();
  return buffer;
}

async function readBuffer(device: GPUDevice, source: GPUBuffer): Promise<ArrayBuffer> {
  const staging = device.createBuffer({ size: source.size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const encoder = device.createCommandEncoder();
  encoder.copyBufferToBuffer(source, 0, staging, 0, source.size);
  device.queue.submit([encoder.finish()]);
  await withTimeout(staging.mapAsync(GPUMapMode.READ), 'mapAsync');
  const copy = staging.getMappedRange().slice(0);
  staging.unmap();
  staging.destroy();
  return copy;
}

/**
 * Dispatches `pipeline` `reps` times, each in its own pass; with a query set, each pass's GPU
 * time from timestamps, and always the wall time from submit to onSubmittedWorkDone.
 */
async function dispatch(device: GPUDevice, pipeline: GPUComputePipeline, buffers: GPUBuffer[],
    workgroups: [number, number, number], run: ShaderRun, reps = 1): Promise<void> {
  const bindGroup = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: buffers.map((buffer, binding) => ({ binding, resource: { buffer } })),
  });
  const timestamps = device.features.has('timestamp-query');
  const querySet = timestamps ? device.createQuerySet({ type: 'timestamp', count: 2 }) : undefined;
  const resolved = timestamps ? device.createBuffer(
      { size: 16, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC }) : undefined;
  device.pushErrorScope('validation');
  device.pushErrorScope('internal');
  device.pushErrorScope('out-of-memory');
  for (let rep = 0; rep < reps; rep++) {
    const encoder = device.createCommandEncoder();
    const pass = encoder.beginComputePass(querySet ? {
      timestampWrites: { querySet, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 } } : {});
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroup);
    pass.dispatchWorkgroups(...workgroups);
    pass.end();
    if (querySet) encoder.resolveQuerySet(querySet, 0, 2, resolved!, 0);
    const t0 = performance.now();
    device.queue.submit([encoder.finish()]);
    await withTimeout(device.queue.onSubmittedWorkDone(), 'onSubmittedWorkDone');
    (run.wallMs ??= []).push(performance.now() - t0);
    if (resolved) {
      const ticks = new BigUint64Array(await readBuffer(device, resolved));
      (run.gpuMs ??= []).push(Number(ticks[1] - ticks[0]) / 1e6);
    }
  }
  for (const scope of ['out-of-memory', 'internal', 'validation']) {
    const err = await withTimeout(device.popErrorScope(), 'popErrorScope').catch(e => e as Error);
    if (err != null) run.errors.push(`${scope} scope (dispatch): ${errorText(err)}`);
  }
  querySet?.destroy();
  resolved?.destroy();
}

// ---------------------------------------------------------------------------------------------
// f16 in JS (Node 20 has no Float16Array): round-to-nearest-even float -> half bits, and back.

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

function toHalfBits(value: number): number {
  f32Scratch[0] = value;
  const x = u32Scratch[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    const midpoint = 1 << (shift - 1);
    if (rest > midpoint || (rest === midpoint && (half & 1) !== 0)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (half & 1) !== 0)) half++; // a carry into the exponent is right
  return sign | half;
}

function fromHalfBits(h: number): number {
  const sign = (h & 0x8000) !== 0 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant !== 0 ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

// ---------------------------------------------------------------------------------------------
// Typed storage per WGSL component type; u8/i8 matrices are backed by array<u32>/array<i32>,
// four components per word (little endian), as in Dawn's own tests.

function scalarType(component: string): string {
  return component === 'u8' ? 'u32' : component === 'i8' ? 'i32' : component;
}

function encode(component: string, values: number[]): ArrayBufferView {
  switch (component) {
    case 'f16': return Uint16Array.from(values, toHalfBits);
    case 'f32': return Float32Array.from(values);
    case 'u32': return Uint32Array.from(values);
    case 'i32': return Int32Array.from(values);
    case 'u8': return Uint8Array.from(values);
    case 'i8': return Int8Array.from(values);
    default: throw new Error(`unknown component type ${component}`);
  }
}

function decode(component: string, bytes: ArrayBuffer, count: number): number[] {
  switch (component) {
    case 'f16': return Array.from(new Uint16Array(bytes, 0, count), fromHalfBits);
    case 'f32': return Array.from(new Float32Array(bytes, 0, count));
    case 'u32': return Array.from(new Uint32Array(bytes, 0, count));
    case 'i32': return Array.from(new Int32Array(bytes, 0, count));
    case 'u8': return Array.from(new Uint8Array(bytes, 0, count));
    case 'i8': return Array.from(new Int8Array(bytes, 0, count));
    default: throw new Error(`unknown component type ${component}`);
  }
}

function enables(config: MatrixConfig): string {
  const f16 = config.componentType === 'f16' || config.resultComponentType === 'f16';
  return `${f16 ? 'enable f16;\n' : ''}enable chromium_experimental_subgroup_matrix;\n`;
}

/** Small pseudo-random integers (a fixed LCG, so runs compare), within [lo, hi]. */
function smallInts(count: number, lo: number, hi: number, seed: number): number[] {
  let s = seed >>> 0;
  return Array.from({ length: count }, () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return lo + (s >>> 8) % (hi - lo + 1);
  });
}

// ---------------------------------------------------------------------------------------------
// Step 2a: f16 elementwise a*b+c (and the same in f32 as a baseline).

/**
 * a*b+c elementwise in `type` (f16, or f32 as the baseline that shows the compile, dispatch and
 * read-back path itself works on this device).
 */
async function testElementwise(device: GPUDevice, type: 'f16' | 'f32'): Promise<ShaderRun & { maxAbsError?: number }> {
  const run: ShaderRun & { maxAbsError?: number } = { ok: false, errors: [] };
  const n = 1024;
  // halves and small integers: every a*b+c below is exact in f16, fused or not
  const a = Array.from({ length: n }, (_, i) => ((i % 17) - 8) / 2);
  const b = Array.from({ length: n }, (_, i) => (i % 13) - 6);
  const c = Array.from({ length: n }, (_, i) => (i % 31) - 15);
  const code = `${type === 'f16' ? 'enable f16;' : ''}
@group(0) @binding(0) var<storage, read> a : array<${type}>;
@group(0) @binding(1) var<storage, read> b : array<${type}>;
@group(0) @binding(2) var<storage, read> c : array<${type}>;
@group(0) @binding(3) var<storage, read_write> out : array<${type}>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id : vec3u) {
  let i = id.x;
  if (i < arrayLength(&out)) { out[i] = a[i] * b[i] + c[i]; }
}`;
  const pipeline = await compile(device, code, run);
  if (pipeline == null) return run;
  const buffers = [a, b, c].map(v => storageBuffer(device, encode(type, v)));
  const out = storageBuffer(device, n * (type === 'f16' ? 2 : 4));
  await dispatch(device, pipeline, [...buffers, out], [n / 64, 1, 1], run);
  const got = decode(type, await readBuffer(device, out), n);
  run.maxAbsError = Math.max(...got.map((g, i) => Math.abs(g - (a[i] * b[i] + c[i]))));
  run.ok = run.errors.length === 0 && run.maxAbsError === 0;
  for (const buffer of [...buffers, out]) buffer.destroy();
  return run;
}

// ---------------------------------------------------------------------------------------------
// Step 2b: one subgroup, one tile: C = A×B + C0 for each listed config.
//
// Per Dawn's docs/dawn/features/subgroup_matrix.md the types are subgroup_matrix_left<T, K, M>
// (M rows × K columns), subgroup_matrix_right<T, N, K>, subgroup_matrix_result<T, N, M>: columns
// first. 'documented' uses that order; 'swapped' the other (rows first), so that a doc that is
// wrong shows up as a pipeline error for one of them (when M, N, K differ) or a wrong product.
// Each is run with col_major false and true; the result is compared with the JS product of A, B,
// C0 read row-major and read column-major.

interface TileResult extends ShaderRun { order: string; colMajor: boolean; matches?: string[]; sample?: number[] }

function tileShader(config: MatrixConfig, order: 'documented' | 'swapped', colMajor: boolean, subgroupSize: number) {
  const { M, N, K } = config;
  const T = config.componentType;
  const R = config.resultComponentType;
  const dims = order === 'documented' ? { left: `${K}, ${M}`, right: `${N}, ${K}`, result: `${N}, ${M}` }
    : { left: `${M}, ${K}`, right: `${K}, ${N}`, result: `${M}, ${N}` };
  // stride: elements between rows (row-major) or columns (column-major) of each matrix
  const strides = colMajor ? { a: M, b: K, c: M } : { a: K, b: N, c: N };
  return `${enables(config)}
@group(0) @binding(0) var<storage, read> A : array<${scalarType(T)}>;
@group(0) @binding(1) var<storage, read> B : array<${scalarType(T)}>;
@group(0) @binding(2) var<storage, read_write> C : array<${scalarType(R)}>;
@compute @workgroup_size(${subgroupSize})
fn main() {
  let a = subgroupMatrixLoad<subgroup_matrix_left<${T}, ${dims.left}>>(&A, 0u, ${colMajor}, ${strides.a}u);
  let b = subgroupMatrixLoad<subgroup_matrix_right<${T}, ${dims.right}>>(&B, 0u, ${colMajor}, ${strides.b}u);
  let c0 = subgroupMatrixLoad<subgroup_matrix_result<${R}, ${dims.result}>>(&C, 0u, ${colMajor}, ${strides.c}u);
  let c = subgroupMatrixMultiplyAccumulate(a, b, c0);
  subgroupMatrixStore(&C, 0u, c, ${colMajor}, ${strides.c}u);
}`;
}

/** C0 + A×B with A (M×K), B (K×N), C (M×N) read from flat arrays row-major or column-major. */
function tileProduct(config: MatrixConfig, a: number[], b: number[], c0: number[], colMajor: boolean): number[] {
  const { M, N, K } = config;
  const at = (arr: number[], r: number, c: number, rows: number, cols: number) =>
    colMajor ? arr[c * rows + r] : arr[r * cols + c];
  const out = new Array<number>(M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let sum = at(c0, m, n, M, N);
      for (let k = 0; k < K; k++) sum += at(a, m, k, M, K) * at(b, k, n, K, N);
      out[colMajor ? n * M + m : m * N + n] = sum;
    }
  }
  return out;
}

async function testTile(device: GPUDevice, config: MatrixConfig, subgroupSize: number): Promise<TileResult[]> {
  const { M, N, K } = config;
  // Exact in every config: an f16 result holds integers to 2048, a u8/i8 input fits its range.
  const small = config.resultComponentType === 'f16' || config.componentType.endsWith('8');
  const [lo, hi] = config.componentType === 'u8' ? [0, small ? 7 : 15] : small ? [-3, 3] : [-12, 12];
  const a = smallInts(M * K, lo, hi, 1);
  const b = smallInts(K * N, lo, hi, 2);
  const c0 = smallInts(M * N, config.resultComponentType.startsWith('u') ? 0 : -8, 8, 3);
  const results: TileResult[] = [];
  for (const order of ['documented', 'swapped'] as const) {
    if (order === 'swapped' && M === N && N === K) continue; // identical shader
    for (const colMajor of [false, true]) {
      const run: TileResult = { ok: false, errors: [], order, colMajor };
      results.push(run);
      try {
        const code = tileShader(config, order, colMajor, subgroupSize);
        const pipeline = await compile(device, code, run);
        if (pipeline == null) continue;
        const buffers = [storageBuffer(device, encode(config.componentType, a)),
          storageBuffer(device, encode(config.componentType, b)),
          storageBuffer(device, encode(config.resultComponentType, c0))];
        await dispatch(device, pipeline, buffers, [1, 1, 1], run);
        const got = decode(config.resultComponentType, await readBuffer(device, buffers[2]), M * N);
        for (const buffer of buffers) buffer.destroy();
        run.sample = got.slice(0, 8);
        const same = (want: number[]) => want.every((w, i) => w === got[i]);
        // The inputs and C0 are the same flat arrays in both interpretations; what differs is
        // whether the hardware read them row-major or column-major.
        run.matches = [];
        if (same(tileProduct(config, a, b, c0, false))) run.matches.push('row-major');
        if (same(tileProduct(config, a, b, c0, true))) run.matches.push('col-major');
        run.ok = run.errors.length === 0 && run.matches.includes(colMajor ? 'col-major' : 'row-major');
      } catch (err) {
        run.errors.push(errorText(err));
      }
    }
  }
  return results;
}

// ---------------------------------------------------------------------------------------------
// Step 2c: crude GEMM throughput, Msize = Nsize = Ksize = 4096, A and B row-major, f32 result.
// One subgroup per workgroup computes a block of (64/M)·M × (64/N)·N of C with that many
// accumulators (unrolled in the generated WGSL: no dynamic indexing of matrix arrays), loading
// A and B tiles straight from storage each K step.

const GEMM = 4096;

function gemmShader(config: MatrixConfig, order: 'documented' | 'swapped', subgroupSize: number) {
  const { M, N, K } = config;
  const T = config.componentType;
  const R = config.resultComponentType;
  const dims = order === 'documented' ? { left: `${K}, ${M}`, right: `${N}, ${K}`, result: `${N}, ${M}` }
    : { left: `${M}, ${K}`, right: `${K}, ${N}`, result: `${M}, ${N}` };
  const tilesM = Math.max(1, Math.floor(64 / M));
  const tilesN = Math.max(1, Math.floor(64 / N));
  const lines: string[] = [];
  for (let i = 0; i < tilesM; i++) {
    for (let j = 0; j < tilesN; j++) lines.push(`  var c${i}_${j} = subgroup_matrix_result<${R}, ${dims.result}>();`);
  }
  lines.push(`  for (var k = 0u; k < ${GEMM}u; k += ${K}u) {`);
  for (let i = 0; i < tilesM; i++) {
    lines.push(`    let a${i} = subgroupMatrixLoad<subgroup_matrix_left<${T}, ${dims.left}>>(&A, (row0 + ${i * M}u) * ${GEMM}u + k, false, ${GEMM}u);`);
  }
  for (let j = 0; j < tilesN; j++) {
    lines.push(`    let b${j} = subgroupMatrixLoad<subgroup_matrix_right<${T}, ${dims.right}>>(&B, k * ${GEMM}u + col0 + ${j * N}u, false, ${GEMM}u);`);
  }
  for (let i = 0; i < tilesM; i++) {
    for (let j = 0; j < tilesN; j++) lines.push(`    c${i}_${j} = subgroupMatrixMultiplyAccumulate(a${i}, b${j}, c${i}_${j});`);
  }
  lines.push('  }');
  for (let i = 0; i < tilesM; i++) {
    for (let j = 0; j < tilesN; j++) {
      lines.push(`  subgroupMatrixStore(&C, (row0 + ${i * M}u) * ${GEMM}u + col0 + ${j * N}u, c${i}_${j}, false, ${GEMM}u);`);
    }
  }
  const code = `${enables(config)}
@group(0) @binding(0) var<storage, read> A : array<${scalarType(T)}>;
@group(0) @binding(1) var<storage, read> B : array<${scalarType(T)}>;
@group(0) @binding(2) var<storage, read_write> C : array<${scalarType(R)}>;
@compute @workgroup_size(${subgroupSize})
fn main(@builtin(workgroup_id) wg : vec3u) {
  let row0 = wg.y * ${tilesM * M}u;
  let col0 = wg.x * ${tilesN * N}u;
${lines.join('\n')}
}`;
  return { code, blockM: tilesM * M, blockN: tilesN * N };
}

let gemmInputsMade: { a: Int16Array; b: Int16Array } | undefined;

/**
 * A and B for the GEMM as integers k in [-1024, 1024], made once; the values are k/1024, exact in
 * f16, so the GPU and the CPU check see the same numbers.
 */
function gemmInputs(): { a: Int16Array; b: Int16Array } {
  const values = (seed: number) => {
    let s = seed;
    const out = new Int16Array(GEMM * GEMM);
    for (let i = 0; i < out.length; i++) {
      s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
      out[i] = (s >>> 11) % 2049 - 1024;
    }
    return out;
  };
  return gemmInputsMade ??= { a: values(11), b: values(12) };
}

/** k/1024 as f16 bits or f32, through a table (a per-element conversion of 16M values takes seconds). */
function packGemmInput(k: Int16Array, component: string): ArrayBufferView {
  if (component === 'f32') {
    const out = new Float32Array(k.length);
    for (let i = 0; i < k.length; i++) out[i] = k[i] / 1024;
    return out;
  }
  const table = Uint16Array.from({ length: 2049 }, (_, i) => toHalfBits((i - 1024) / 1024));
  const out = new Uint16Array(k.length);
  for (let i = 0; i < k.length; i++) out[i] = table[k[i] + 1024];
  return out;
}

async function testGemm(device: GPUDevice, config: MatrixConfig, order: 'documented' | 'swapped',
    subgroupSize: number) {
  const run: ShaderRun & { order: string; block?: string; tflops?: number[]; sampled?: number; maxAbsError?: number;
    maxRelError?: number } = { ok: false, errors: [], order };
  const { code, blockM, blockN } = gemmShader(config, order, subgroupSize);
  run.block = `${blockM}x${blockN}`;
  if (GEMM % blockM !== 0 || GEMM % blockN !== 0) {
    run.errors.push(`block ${run.block} does not divide ${GEMM}`);
    return run;
  }
  const pipeline = await compile(device, code, run);
  if (pipeline == null) return run;
  const count = GEMM * GEMM;
  const { a, b } = gemmInputs();
  const buffers = [storageBuffer(device, packGemmInput(a, config.componentType)),
    storageBuffer(device, packGemmInput(b, config.componentType)),
    storageBuffer(device, count * 4)];
  try {
    const workgroups: [number, number, number] = [GEMM / blockN, GEMM / blockM, 1];
    await dispatch(device, pipeline, buffers, workgroups, { ok: false, errors: [] }); // warm-up
    await dispatch(device, pipeline, buffers, workgroups, run, 3);
    const times = run.gpuMs ?? run.wallMs ?? [];
    run.tflops = times.map(ms => 2 * GEMM ** 3 / (ms * 1e-3) / 1e12);
    const got = new Float32Array(await readBuffer(device, buffers[2])); // f32 results only (see deviceTests)
    let maxAbs = 0;
    let maxRel = 0;
    const samples = smallInts(2 * 300, 0, GEMM - 1, 99);
    for (let s = 0; s < 300; s++) {
      const [row, col] = [samples[2 * s], samples[2 * s + 1]];
      let want = 0;
      let scale = 0;
      for (let k = 0; k < GEMM; k++) {
        const p = (a[row * GEMM + k] / 1024) * (b[k * GEMM + col] / 1024);
        want += p;
        scale += Math.abs(p);
      }
      const err = Math.abs(got[row * GEMM + col] - want);
      maxAbs = Math.max(maxAbs, err);
      maxRel = Math.max(maxRel, err / Math.max(scale, 1e-30));
    }
    run.sampled = 300;
    run.maxAbsError = maxAbs;
    run.maxRelError = maxRel; // relative to sum |a·b|, the scale of rounding in the accumulation
    // f32 accumulation of 4096 terms of size ≤ 1: errors far above 1e-2 mean a wrong product
    run.ok = run.errors.length === 0 && Number.isFinite(maxAbs) && maxRel < 1e-2;
  } catch (err) {
    run.errors.push(errorText(err));
  } finally {
    for (const buffer of buffers) buffer.destroy();
  }
  return run;
}

// ---------------------------------------------------------------------------------------------
// Step 2: device tests on the richest adapter.

async function deviceTests(richest: AdapterFound): Promise<void> {
  const tests: Record<string, unknown> = {};
  report.deviceTests = tests;
  // A fresh instance with full-resolution timestamps; the richest flags alone when that fails.
  let found: { flags: string[]; adapter: GPUAdapter | null } = { flags: richest.flags, adapter: richest.adapter };
  try {
    const flags = [...richest.flags.filter(f => !f.startsWith('backend=')), TIMING_FLAG,
      ...richest.flags.filter(f => f.startsWith('backend='))];
    const { adapter } = await requestAdapter(flags, richest.featureLevel);
    if (adapter != null) found = { flags, adapter };
    else tests.timingFlagNote = `[${flags.join(' ')}] gave no adapter; timings quantized`;
  } catch (err) {
    tests.timingFlagNote = `[${TIMING_FLAG}] failed: ${errorText(err).split('\n')[0]}`;
  }
  const adapter = found.adapter!;
  tests.flags = found.flags;
  tests.featureLevel = richest.featureLevel;
  const wanted = ['shader-f16', 'chromium-experimental-subgroup-matrix', 'subgroups', 'timestamp-query'];
  const requiredFeatures = wanted.filter(f => adapter.features.has(f)) as GPUFeatureName[];
  tests.requestedFeatures = requiredFeatures;
  tests.notOffered = wanted.filter(f => !adapter.features.has(f));
  const limits = allLimits(adapter.limits);
  let device: GPUDevice;
  try {
    device = await withTimeout(adapter.requestDevice({ requiredFeatures, requiredLimits: limits }), 'requestDevice');
    keepAlive.push(device);
  } catch (err) {
    tests.deviceError = errorText(err);
    return;
  }
  const uncaptured: string[] = [];
  tests.uncapturedErrors = uncaptured;
  device.addEventListener('uncapturederror', event => uncaptured.push(errorText((event as GPUUncapturedErrorEvent).error)));
  void device.lost.then(info => { tests.deviceLost = `${info.reason}: ${info.message}`; });
  tests.deviceFeatures = [...device.features].map(String).sort();
  const info = adapter.info as unknown as { subgroupMaxSize?: number };
  const subgroupSize = info.subgroupMaxSize ?? limits.maxSubgroupSize ?? 32;
  tests.subgroupSizeUsed = subgroupSize;

  log('f32 elementwise (baseline)');
  tests.f32 = await testElementwise(device, 'f32').catch(err => ({ ok: false, errors: [errorText(err)] }));
  if (device.features.has('shader-f16')) {
    log('f16 elementwise');
    tests.f16 = await testElementwise(device, 'f16').catch(err => ({ ok: false, errors: [errorText(err)] }));
  } else {
    tests.f16 = { skipped: 'shader-f16 not offered' };
  }

  const configs = matrixConfigs(adapter.info);
  tests.subgroupMatrixConfigs = configs;
  if (!device.features.has('chromium-experimental-subgroup-matrix') || configs.length === 0) {
    tests.subgroupMatrix = { skipped: 'chromium-experimental-subgroup-matrix not offered or no configs listed' };
    return;
  }
  const tiles: unknown[] = [];
  tests.subgroupMatrix = tiles;
  for (const config of configs) {
    const label = `${config.componentType}->${config.resultComponentType} M${config.M} N${config.N} K${config.K}`;
    if ((config.componentType === 'f16' || config.resultComponentType === 'f16') && !device.features.has('shader-f16')) {
      tiles.push({ config, skipped: 'needs shader-f16' });
      continue;
    }
    log(`tile ${label}`);
    const runs = await testTile(device, config, subgroupSize).catch(err => [{ ok: false, errors: [errorText(err)] }]);
    tiles.push({ config, runs });
  }

  const gemms: unknown[] = [];
  tests.gemm = gemms;
  const tileEntries = tiles as Array<{ config: MatrixConfig; runs?: TileResult[] }>;
  for (const { config, runs } of tileEntries) {
    const f16In = config.componentType === 'f16' && config.resultComponentType === 'f32';
    const f32In = config.componentType === 'f32' && config.resultComponentType === 'f32';
    if (!f16In && !f32In) continue;
    // the type order that computed the right tile (the documented one when neither did)
    const order = runs?.find(r => r.ok)?.order === 'swapped' ? 'swapped' : 'documented';
    if (TOTAL_BUDGET_MS - (Date.now() - started) < 8000) {
      gemms.push({ config, skipped: 'out of time budget' });
      continue;
    }
    log(`gemm ${GEMM}^3 ${config.componentType}->${config.resultComponentType} M${config.M} N${config.N} K${config.K}`);
    const run = await testGemm(device, config, order as 'documented' | 'swapped', subgroupSize)
        .catch(err => ({ ok: false, errors: [errorText(err)] }));
    gemms.push({ config, ...run });
  }
  device.destroy();
}

async function main(): Promise<void> {
  setTimeout(() => {
    report.watchdog = `stopped at the ${TOTAL_BUDGET_MS + 3000} ms bound; the report holds what finished`;
    finish(report.anyAdapter ? 0 : 1);
  }, TOTAL_BUDGET_MS + 3000);
  const found = await surveyAdapters();
  report.anyAdapter = found.length > 0;
  if (found.length === 0) {
    report.error = 'no WebGPU adapter for any flag set (on Mesa set EGL_PLATFORM=surfaceless)';
    finish(1);
  }
  // richest: most features, then most matrix configs; a later (more toggles) set wins ties
  const score = (f: AdapterFound) => f.adapter.features.size * 100 + matrixConfigs(f.adapter.info).length;
  const richest = found.reduce((best, f) => (score(f) >= score(best) ? f : best));
  log(`device tests on [${richest.flags.join(' ')}] ${richest.featureLevel}`);
  try {
    await deviceTests(richest);
  } catch (err) {
    report.deviceTestsError = errorText(err);
  }
  finish(0);
}

main().catch(err => {
  report.fatal = errorText(err);
  finish(report.anyAdapter ? 0 : 1);
});
