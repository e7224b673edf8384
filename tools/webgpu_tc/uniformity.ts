/**
 * A static audit of the control flow around the subgroup-matrix builtins and barriers of a WGSL
 * shader (issue 13). subgroupMatrixLoad / Store / MultiplyAccumulate act for the whole subgroup and
 * must be reached by all its invocations together; workgroupBarrier and workgroupUniformLoad by
 * the whole workgroup. Tint's own check of that is off in the package's programs
 * (`diagnostic(off, chromium.subgroup_matrix_uniformity)`, see subgroup_matrix_program.ts), so
 * nothing else looks at it. In every function that calls one of them, the audit reports:
 *
 * - `'enclosed'`: the call sits inside an `if`, `else`, `switch`, or loop whose header depends on the
 *   invocation (its index or lane, or a value computed from them), or, for a barrier, on the
 *   subgroup (a subgroup-matrix call may sit under a branch that each subgroup takes as a whole);
 * - `'loop'`: a loop whose trip count depends on the invocation (`for (var i = localIndex; i < n;
 *   i += threads)`), even one that holds no such call: the calls after it need the invocations of a
 *   subgroup back in step, which a loop that ends at different times for different invocations
 *   leaves to the compiler's reconvergence;
 * - `'exit'`: a `return`, `break` or `continue` under a branch that is not the workgroup's.
 *
 * Per-invocation `if`s that hold no such call (a guarded store, the prologue of `lid == 0`) are
 * fine. A value is per-invocation when it is one of INVOCATION_NAMES or computed from one, or
 * assigned under a per-invocation branch; per-subgroup likewise from SUBGROUP_NAMES;
 * `workgroupUniformLoad(&x)` is uniform by definition.
 * A textual analysis of the WGSL this package generates (one statement per `;`, braces around
 * every body), not a WGSL parser.
 *
 * ```ts
 * auditSubgroupControlFlow(program.getUserCode());   // [] for the package's programs
 * ```
 */

/** Names whose value differs between the invocations of a subgroup. */
export const INVOCATION_NAMES = ['localIndex', 'localId', 'globalId', 'lid', 'lane', 'tx', 'ty'];
/**
 * Names whose value is the same across each subgroup but differs between them: the programs' subgroup
 * is localIndex / subgroupSize (consecutive invocations of a one-dimensional workgroup, what the
 * matrices' offsets from partRow and partCol already rely on), so their declarations from localIndex
 * are taken as per-subgroup.
 */
export const SUBGROUP_NAMES = ['subgroup', 'partRow', 'partCol'];

/** How far a value is shared: by the whole workgroup, by each subgroup, or by no two invocations for sure. */
const WORKGROUP = 0;
const SUBGROUP = 1;
const INVOCATION = 2;
type Sharing = typeof WORKGROUP | typeof SUBGROUP | typeof INVOCATION;

const COLLECTIVE = /\b(subgroupMatrixLoad|subgroupMatrixStore|subgroupMatrixMultiplyAccumulate|subgroupMatrixScalarMultiply|workgroupBarrier|workgroupUniformLoad)\b/;
const WORKGROUP_COLLECTIVE = /\b(workgroupBarrier|workgroupUniformLoad)\b/;

export interface ControlFlowFinding {
  kind: 'enclosed' | 'loop' | 'exit';
  /** the function that holds it */
  fn: string;
  /** the statement or construct header, whitespace squeezed */
  at: string;
}

interface Construct { header: string; sharing: Sharing }

const squeeze = (s: string) => s.replace(/\s+/g, ' ').trim();
/** the names an expression mentions, member accesses (`.x`, `uniforms.inner`'s `inner`) left out */
const namesIn = (expr: string) => new Set(expr.replace(/\.\s*\w+/g, '').match(/\b[A-Za-z_]\w*\b/g) ?? []);

/** The body (between its braces) of every function that calls a subgroup-wide builtin or a barrier. */
function collectiveFunctions(code: string): Array<{ name: string; body: string }> {
  const out: Array<{ name: string; body: string }> = [];
  for (const m of code.matchAll(/\bfn\s+(\w+)\s*\([^)]*\)[^{]*\{/g)) {
    let depth = 1;
    let i = m.index! + m[0].length;
    const start = i;
    for (; i < code.length && depth > 0; i++) {
      if (code[i] === '{') depth++;
      else if (code[i] === '}') depth--;
    }
    const body = code.slice(start, i - 1);
    if (COLLECTIVE.test(body)) out.push({ name: m[1], body });
  }
  return out;
}

function auditFunction(name: string, body: string): ControlFlowFinding[] {
  const findings: ControlFlowFinding[] = [];
  const stack: Construct[] = [];
  /** per block, the names declared there and how far each is shared (WGSL's scoping) */
  const scopes: Array<Map<string, Sharing>> = [new Map([
    ...INVOCATION_NAMES.map((n): [string, Sharing] => [n, INVOCATION]), ...SUBGROUP_NAMES.map((n): [string, Sharing] => [n, SUBGROUP])])];
  const owner = (n: string) => [...scopes].reverse().find(scope => scope.has(n));
  const sharingOf = (n: string): Sharing => owner(n)?.get(n) ?? WORKGROUP;
  const sharingOfExpr = (expr: string, except?: string): Sharing =>
    Math.max(WORKGROUP, ...[...namesIn(expr)].filter(n => n !== except).map(sharingOf)) as Sharing;
  /** the least shared branch or loop around the current statement */
  const branchSharing = (): Sharing => Math.max(WORKGROUP, ...stack.map(c => c.sharing)) as Sharing;

  const statement = (text: string) => {
    const s = squeeze(text);
    if (s === '') return;
    // a barrier needs the whole workgroup, a matrix operation its whole subgroup
    const needs = WORKGROUP_COLLECTIVE.test(s) ? WORKGROUP : SUBGROUP;
    if (COLLECTIVE.test(s) && branchSharing() > needs) findings.push({ kind: 'enclosed', fn: name, at: s });
    if (/^(return|break|continue)\b/.test(s) && branchSharing() > WORKGROUP) findings.push({ kind: 'exit', fn: name, at: s });
    const uniformLoad = (value: string) => /^workgroupUniformLoad\(\s*&\s*\w+\s*\)$/.test(value);
    const decl = /^(?:let|var|const)\s+(\w+)(?:\s*:[^=]+)?\s*=\s*([\s\S]*)$/.exec(s);
    if (decl) {
      const sharing = uniformLoad(decl[2]) ? WORKGROUP : sharingOfExpr(decl[2]);
      scopes.at(-1)!.set(decl[1], SUBGROUP_NAMES.includes(decl[1]) ? Math.min(sharing, SUBGROUP) as Sharing : sharing);
      return;
    }
    const assign = /^(\w+)(?:\[[^\]]*\])?\s*(?:[-+*/%&|^]|<<|>>)?=\s*([\s\S]*)$/.exec(s);
    // an assignment under a branch is at most as shared as the branch
    if (assign && !uniformLoad(assign[2])) {
      const scope = owner(assign[1]);
      scope?.set(assign[1], Math.max(scope.get(assign[1])!, sharingOfExpr(assign[2]), branchSharing()) as Sharing);
    }
  };

  let text = '';
  let parens = 0;
  /** the construct that closed last: an `else` is as shared as its `if` */
  let closed: Construct | undefined;
  for (const ch of body) {
    if (ch === '(') parens++;
    if (ch === ')') parens--;
    if (ch === ';' && parens === 0) {
      statement(text);
      text = '';
    } else if (ch === '{') {
      const header = squeeze(text);
      text = '';
      const isLoop = /^(for|while|loop)\b/.test(header);
      const isBranch = /^(if|else|switch|case|default)\b/.test(header);
      // a for loop's own counter: as shared as its start (checked with the rest of the header)
      const counter = /^for\s*\(\s*(?:var|let)\s+(\w+)/.exec(header)?.[1];
      const sharing: Sharing = !(isLoop || isBranch) ? WORKGROUP
        : Math.max(sharingOfExpr(header, counter), header.startsWith('else') ? closed?.sharing ?? WORKGROUP : WORKGROUP) as Sharing;
      if (isLoop && sharing === INVOCATION) findings.push({ kind: 'loop', fn: name, at: header });
      stack.push({ header, sharing });
      scopes.push(new Map(counter ? [[counter, sharing]] : []));
    } else if (ch === '}') {
      statement(text);
      text = '';
      closed = stack.pop();
      scopes.pop();
    } else {
      text += ch;
    }
  }
  statement(text);
  return findings;
}

/** Every finding (see the file comment) of every function of `code` that reaches a subgroup-wide builtin or a barrier. */
export function auditSubgroupControlFlow(code: string): ControlFlowFinding[] {
  return collectiveFunctions(code).flatMap(f => auditFunction(f.name, f.body));
}
