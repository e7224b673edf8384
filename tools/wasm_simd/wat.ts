/**
 * A WebAssembly text assembler for the subset that tools/wasm_simd/moe_simd.wat uses, so that the
 * module's bytes are built from checked-in text without wabt (not installed here, and the build has
 * no network). Standard WAT, linear (unfolded) instructions only:
 *
 *   (module
 *     (import "env" "memory" (memory 0))              or (memory 0 65536 shared)
 *     (func $name (export "name") (param $p i32) … (result f32)? (local $l v128) …
 *       local.get $p  i32.const 4  i32.add  …  block $b  loop $l  br_if $b  …  end  end))
 *
 * Instructions: control (block, loop, if/else, br, br_if, return, end, with no block results; call),
 * locals, i32 / f32 / f64 scalars, SIMD (v128) loads, stores, lane ops, shuffles and arithmetic,
 * memory.copy, memory.fill. Memory arguments take `offset=` and `align=` (bytes); a name not in the tables
 * below is an error naming it. The output is checked by WebAssembly.validate in the spec.
 */

type Sexp = string | Sexp[];

const VALUE_TYPES: Record<string, number> = { i32: 0x7f, i64: 0x7e, f32: 0x7d, f64: 0x7c, v128: 0x7b };

/** Plain opcodes with no immediates. */
const PLAIN: Record<string, number> = {
  'return': 0x0f, 'drop': 0x1a, 'select': 0x1b,
  'i32.eqz': 0x45, 'i32.eq': 0x46, 'i32.ne': 0x47, 'i32.lt_s': 0x48, 'i32.lt_u': 0x49, 'i32.gt_s': 0x4a,
  'i32.gt_u': 0x4b, 'i32.le_s': 0x4c, 'i32.le_u': 0x4d, 'i32.ge_s': 0x4e, 'i32.ge_u': 0x4f,
  'i32.add': 0x6a, 'i32.sub': 0x6b, 'i32.mul': 0x6c, 'i32.and': 0x71, 'i32.or': 0x72, 'i32.shl': 0x74,
  'i32.shr_s': 0x75, 'i32.shr_u': 0x76,
  'f32.add': 0x92, 'f32.sub': 0x93, 'f32.mul': 0x94, 'f32.div': 0x95,
  'f64.add': 0xa0, 'f64.sub': 0xa1, 'f64.mul': 0xa2, 'f64.div': 0xa3,
  'f32.demote_f64': 0xb6, 'f64.promote_f32': 0xbb,
};

/** SIMD opcodes (after the 0xfd prefix) with no immediates. */
const SIMD_PLAIN: Record<string, number> = {
  'f32x4.splat': 0x13, 'f64x2.splat': 0x14,
  'f32x4.eq': 0x41, 'f32x4.ne': 0x42, 'f32x4.lt': 0x43, 'f32x4.gt': 0x44, 'f32x4.le': 0x45, 'f32x4.ge': 0x46,
  'v128.not': 0x4d, 'v128.and': 0x4e, 'v128.andnot': 0x4f, 'v128.or': 0x50, 'v128.xor': 0x51, 'v128.bitselect': 0x52,
  'f32x4.demote_f64x2_zero': 0x5e, 'f64x2.promote_low_f32x4': 0x5f,
  'f32x4.ceil': 0x67, 'f32x4.floor': 0x68, 'f32x4.trunc': 0x69, 'f32x4.nearest': 0x6a,
  'i32x4.shl': 0xab, 'i32x4.shr_s': 0xac, 'i32x4.shr_u': 0xad, 'i32x4.add': 0xae, 'i32x4.sub': 0xb1, 'i32x4.mul': 0xb5,
  'f32x4.abs': 0xe0, 'f32x4.neg': 0xe1, 'f32x4.sqrt': 0xe3, 'f32x4.add': 0xe4, 'f32x4.sub': 0xe5, 'f32x4.mul': 0xe6,
  'f32x4.div': 0xe7, 'f32x4.min': 0xe8, 'f32x4.max': 0xe9, 'f32x4.pmin': 0xea, 'f32x4.pmax': 0xeb,
  'f64x2.abs': 0xec, 'f64x2.neg': 0xed, 'f64x2.add': 0xf0, 'f64x2.sub': 0xf1, 'f64x2.mul': 0xf2, 'f64x2.div': 0xf3,
  'i32x4.trunc_sat_f32x4_s': 0xf8, 'f32x4.convert_i32x4_s': 0xfa,
};

/** Memory instructions: opcode (SIMD ones prefixed), natural alignment as log2 bytes, and whether a lane index follows. */
const MEMORY: Record<string, { op: number[]; align: number; lane?: boolean }> = {
  'i32.load': { op: [0x28], align: 2 }, 'f32.load': { op: [0x2a], align: 2 }, 'f64.load': { op: [0x2b], align: 3 },
  'i32.store': { op: [0x36], align: 2 }, 'f32.store': { op: [0x38], align: 2 }, 'f64.store': { op: [0x39], align: 3 },
  'v128.load': { op: [0xfd, 0x00], align: 4 }, 'v128.load32_splat': { op: [0xfd, 0x09], align: 2 },
  'v128.store': { op: [0xfd, 0x0b], align: 4 },
  'v128.load32_lane': { op: [0xfd, 0x56], align: 2, lane: true }, 'v128.load64_lane': { op: [0xfd, 0x57], align: 3, lane: true },
  'v128.store32_lane': { op: [0xfd, 0x5a], align: 2, lane: true }, 'v128.store64_lane': { op: [0xfd, 0x5b], align: 3, lane: true },
  'v128.load32_zero': { op: [0xfd, 0x5c], align: 2 }, 'v128.load64_zero': { op: [0xfd, 0x5d], align: 3 },
};

/** Lane instructions with a lane index immediate. */
const LANE: Record<string, number> = {
  'f32x4.extract_lane': 0x1f, 'f32x4.replace_lane': 0x20, 'f64x2.extract_lane': 0x21, 'f64x2.replace_lane': 0x22,
};

function fail(message: string): never {
  throw new Error(`wat: ${message}`);
}

function tokenize(text: string): string[] {
  const tokens: string[] = [];
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (/\s/.test(c)) {
      i++;
    } else if (text.startsWith(';;', i)) {
      while (i < text.length && text[i] !== '\n') i++;
    } else if (text.startsWith('(;', i)) {
      const end = text.indexOf(';)', i);
      if (end < 0) fail('unclosed block comment');
      i = end + 2;
    } else if (c === '(' || c === ')') {
      tokens.push(c);
      i++;
    } else if (c === '"') {
      const end = text.indexOf('"', i + 1);
      if (end < 0) fail('unclosed string');
      tokens.push(text.slice(i, end + 1));
      i = end + 1;
    } else {
      let j = i;
      while (j < text.length && !/[\s()]/.test(text[j]) && !text.startsWith(';;', j)) j++;
      tokens.push(text.slice(i, j));
      i = j;
    }
  }
  return tokens;
}

function parse(tokens: string[]): Sexp {
  let i = 0;
  const read = (): Sexp => {
    const t = tokens[i++];
    if (t === undefined) fail('unexpected end of text');
    if (t === ')') fail('unexpected )');
    if (t !== '(') return t;
    const list: Sexp[] = [];
    while (tokens[i] !== ')') {
      if (i >= tokens.length) fail('missing )');
      list.push(read());
    }
    i++;
    return list;
  };
  const tree = read();
  if (i !== tokens.length) fail('text after the module');
  return tree;
}

function uleb(n: number): number[] {
  const out: number[] = [];
  do {
    let byte = n & 0x7f;
    n = Math.floor(n / 128);
    if (n !== 0) byte |= 0x80;
    out.push(byte);
  } while (n !== 0);
  return out;
}

function sleb(n: number): number[] {
  const out: number[] = [];
  for (;;) {
    const byte = n & 0x7f;
    n >>= 7;
    if ((n === 0 && (byte & 0x40) === 0) || (n === -1 && (byte & 0x40) !== 0)) {
      out.push(byte);
      return out;
    }
    out.push(byte | 0x80);
  }
}

const utf8 = (s: string) => [...uleb(Buffer.byteLength(s)), ...Buffer.from(s, 'utf8')];
const section = (id: number, body: number[]) => [id, ...uleb(body.length), ...body];
const vec = (items: number[][]) => [...uleb(items.length), ...items.flat()];

function f32Bytes(v: number): number[] {
  return [...new Uint8Array(new Float32Array([v]).buffer)];
}

function f64Bytes(v: number): number[] {
  return [...new Uint8Array(new Float64Array([v]).buffer)];
}

function integer(token: string, what: string): number {
  const v = Number(token.replace(/_/g, ''));
  if (!Number.isInteger(v)) fail(`${what}: expected an integer, got '${token}'`);
  return v;
}

function number(token: string, what: string): number {
  const v = Number(token.replace(/_/g, ''));
  if (Number.isNaN(v)) fail(`${what}: expected a number, got '${token}'`);
  return v;
}

interface Func {
  name: string;
  exportName: string | null;
  params: Array<[string | null, number]>;
  results: number[];
  locals: Array<[string | null, number]>;
  body: string[];
}

function readFunc(list: Sexp[]): Func {
  const f: Func = { name: '', exportName: null, params: [], results: [], locals: [], body: [] };
  let i = 1;
  if (typeof list[i] === 'string' && (list[i] as string).startsWith('$')) f.name = list[i++] as string;
  for (; i < list.length; i++) {
    const item = list[i];
    if (typeof item === 'string') {
      f.body.push(item);
      continue;
    }
    const [head, ...rest] = item as string[];
    if (f.body.length > 0) fail(`${f.name}: folded instruction '(${head} …)' (only linear instructions are supported)`);
    const typeOf = (t: string) => VALUE_TYPES[t] ?? fail(`${f.name}: unknown value type '${t}'`);
    if (head === 'export') {
      f.exportName = JSON.parse(rest[0]) as string;
    } else if (head === 'param' || head === 'local') {
      const into = head === 'param' ? f.params : f.locals;
      if (rest[0]?.startsWith('$')) into.push([rest[0], typeOf(rest[1])]);
      else rest.forEach(t => into.push([null, typeOf(t)]));
    } else if (head === 'result') {
      rest.forEach(t => f.results.push(typeOf(t)));
    } else {
      fail(`${f.name}: unsupported field '(${head} …)'`);
    }
  }
  return f;
}

function encodeBody(f: Func, funcIndex: (name: string) => number): number[] {
  const names = [...f.params, ...f.locals].map(([n]) => n);
  const localIndex = (t: string): number => {
    if (!t.startsWith('$')) return integer(t, `${f.name} local`);
    const i = names.indexOf(t);
    if (i < 0) fail(`${f.name}: unknown local ${t}`);
    return i;
  };
  const labels: Array<string | null> = [];   // innermost last
  const depth = (t: string): number => {
    if (!t.startsWith('$')) return integer(t, `${f.name} label`);
    const i = labels.lastIndexOf(t);
    if (i < 0) fail(`${f.name}: unknown label ${t}`);
    return labels.length - 1 - i;
  };
  const code: number[] = [];
  // locals: runs of one type
  const runs: number[][] = [];
  for (const [, type] of f.locals) {
    const last = runs[runs.length - 1];
    if (last && last[1] === type) last[0]++;
    else runs.push([1, type]);
  }
  code.push(...vec(runs.map(([count, type]) => [...uleb(count), type])));
  const words = f.body;
  let i = 0;
  const next = (what: string) => words[i++] ?? fail(`${f.name}: ${what} expected at the end`);
  while (i < words.length) {
    const op = words[i++];
    if (op === 'block' || op === 'loop' || op === 'if') {
      const label = words[i]?.startsWith('$') ? words[i++] : null;
      labels.push(label);
      code.push(op === 'block' ? 0x02 : op === 'loop' ? 0x03 : 0x04, 0x40);
    } else if (op === 'else') {
      code.push(0x05);
    } else if (op === 'end') {
      if (labels.length === 0) fail(`${f.name}: 'end' with no open block`);
      labels.pop();
      code.push(0x0b);
    } else if (op === 'br' || op === 'br_if') {
      code.push(op === 'br' ? 0x0c : 0x0d, ...uleb(depth(next('label'))));
    } else if (op === 'call') {
      code.push(0x10, ...uleb(funcIndex(next('function'))));
    } else if (op === 'local.get' || op === 'local.set' || op === 'local.tee') {
      code.push({ 'local.get': 0x20, 'local.set': 0x21, 'local.tee': 0x22 }[op], ...uleb(localIndex(next('local'))));
    } else if (op === 'i32.const') {
      code.push(0x41, ...sleb(integer(next('i32'), op) | 0));
    } else if (op === 'f32.const') {
      code.push(0x43, ...f32Bytes(number(next('f32'), op)));
    } else if (op === 'f64.const') {
      code.push(0x44, ...f64Bytes(number(next('f64'), op)));
    } else if (op === 'v128.const') {
      const shape = next('shape');
      if (shape === 'f32x4') code.push(0xfd, 0x0c, ...[0, 1, 2, 3].flatMap(() => f32Bytes(number(next('lane'), op))));
      else if (shape === 'i32x4') code.push(0xfd, 0x0c, ...[0, 1, 2, 3].flatMap(() => [...new Uint8Array(new Int32Array([integer(next('lane'), op)]).buffer)]));
      else if (shape === 'f64x2') code.push(0xfd, 0x0c, ...[0, 1].flatMap(() => f64Bytes(number(next('lane'), op))));
      else fail(`${f.name}: v128.const shape '${shape}' not supported`);
    } else if (op === 'i8x16.shuffle') {
      const lanes = Array.from({ length: 16 }, () => integer(next('lane'), op));
      if (lanes.some(l => l < 0 || l > 31)) fail(`${f.name}: i8x16.shuffle lanes must be 0..31`);
      code.push(0xfd, 0x0d, ...lanes);
    } else if (op in LANE) {
      code.push(0xfd, ...uleb(LANE[op]), integer(next('lane'), op));
    } else if (op in MEMORY) {
      const m = MEMORY[op];
      let offset = 0;
      let align = m.align;
      while (words[i]?.startsWith('offset=') || words[i]?.startsWith('align=')) {
        const [key, value] = words[i++].split('=');
        if (key === 'offset') offset = integer(value, op);
        else align = Math.log2(integer(value, op));
      }
      if (!Number.isInteger(align) || align > m.align) fail(`${f.name}: ${op}: bad align`);
      code.push(m.op[0], ...(m.op.length > 1 ? uleb(m.op[1]) : []), ...uleb(align), ...uleb(offset));
      if (m.lane) code.push(integer(next('lane'), op));
    } else if (op === 'memory.copy') {
      code.push(0xfc, ...uleb(10), 0x00, 0x00);
    } else if (op === 'memory.fill') {
      code.push(0xfc, ...uleb(11), 0x00);
    } else if (op in PLAIN) {
      code.push(PLAIN[op]);
    } else if (op in SIMD_PLAIN) {
      code.push(0xfd, ...uleb(SIMD_PLAIN[op]));
    } else {
      fail(`${f.name}: unknown instruction '${op}'`);
    }
  }
  if (labels.length !== 0) fail(`${f.name}: ${labels.length} block(s) not closed`);
  code.push(0x0b);
  return [...uleb(code.length), ...code];
}

/** The binary module of WAT text in the subset above. */
export function assemble(text: string): Uint8Array {
  const tree = parse(tokenize(text));
  if (!Array.isArray(tree) || tree[0] !== 'module') fail('the text must be one (module …)');
  const imports: number[][] = [];
  const funcs: Func[] = [];
  for (const item of tree.slice(1)) {
    if (!Array.isArray(item)) fail(`unexpected '${item}' in the module`);
    if (item[0] === 'import') {
      const [, mod, field, desc] = item as [string, string, string, Sexp[]];
      if (!Array.isArray(desc) || desc[0] !== 'memory') fail('only a memory can be imported');
      const min = integer(desc[1] as string, 'memory minimum');
      // (memory MIN) or (memory MIN MAX shared): a shared memory needs its maximum (limits flag 3)
      const limits = desc.length === 2 ? [0x00, ...uleb(min)]
        : desc.length === 4 && desc[3] === 'shared' ? [0x03, ...uleb(min), ...uleb(integer(desc[2] as string, 'memory maximum'))]
        : fail(`an imported memory must be (memory MIN) or (memory MIN MAX shared) but got (${desc.join(' ')})`);
      imports.push([...utf8(JSON.parse(mod) as string), ...utf8(JSON.parse(field) as string), 0x02, ...limits]);
    } else if (item[0] === 'func') {
      funcs.push(readFunc(item));
    } else {
      fail(`unsupported module field '${String(item[0])}'`);
    }
  }
  const funcIndex = (name: string): number => {
    const i = funcs.findIndex(f => f.name === name);
    return i >= 0 ? i : fail(`unknown function ${name}`);
  };
  const types = funcs.map(f => [0x60, ...vec(f.params.map(([, t]) => [t])), ...vec(f.results.map(t => [t]))]);
  const exports = funcs.flatMap((f, i) => f.exportName === null ? [] : [[...utf8(f.exportName), 0x00, ...uleb(i)]]);
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, vec(types)),
    ...section(2, vec(imports)),
    ...section(3, vec(funcs.map((_, i) => uleb(i)))),
    ...section(7, vec(exports)),
    ...section(10, vec(funcs.map(f => encodeBody(f, funcIndex)))),
  ]);
}
