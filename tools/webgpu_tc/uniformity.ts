/**
 * A static audit of the control flow around the subgroup-matrix builtins and barriers of a WGSL
 * shader (issue 13). subgroupMatrixLoad / Store / MultiplyAccumulate act for the whole subgroup and
 * must be reached by all its invocations together; workgroupBarrier and workgroupUniformLoad by
 * the whole workgroup. Tint's own check of that is off in the package's programs
 * (`diagnostic(off, chromium.subgroup_matrix_uniformity)`, see subgroup_matrix_program.ts), so
 * nothing else looks at it. In every function that calls one of them, the audit reports:
 *
 * - `'enclosed'`: the call sits inside an `if`, `else`, `switch`, or loop whose header depends on the
 *   invocation (its index, lane or subgroup, or a value computed from them);
 * - `'loop'`: a loop whose trip count depends on the invocation (`for (var i = localIndex; i < n;
 *   i += threads)`), even one that holds no such call: the calls after it need the invocations of a
 *   subgroup back in step, which a loop that ends at different times for different invocations
 *   leaves to the compiler's reconvergence;
 * - `'exit'`: a `return`, `break` or `continue` under such a branch.
 *
 * Per-invocation `if`s that hold no such call (a guarded store, the prologue of `lid == 0`) are
 * fine. A value is per-invocation when it is one of INVOCATION_NAMES or computed from one, or
 * assigned under a per-invocation branch; `workgroupUniformLoad(&x)` is uniform by definition.
 * A textual analysis of the WGSL this package generates (one statement per `;`, braces around
 * every body), not a WGSL parser.
 *
 * ```ts
 * auditSubgroupControlFlow(program.getUserCode());   // [] for the package's programs
 * ```
 */

/** Names whose value differs between the invocations of a workgroup (or of its subgroups). */
export const INVOCATION_NAMES = ['localIndex', 'localId', 'globalId', 'lid', 'lane', 'subgroup', 'partRow', 'partCol', 'tx', 'ty'];

const COLLECTIVE = /\b(subgroupMatrixLoad|subgroupMatrixStore|subgroupMatrixMultiplyAccumulate|workgroupBarrier|workgroupUniformLoad)\b/;

export interface ControlFlowFinding {
  kind: 'enclosed' | 'loop' | 'exit';
  /** the function that holds it */
  fn: string;
  /** the statement or construct header, whitespace squeezed */
  at: string;
}

interface Construct { header: string; perInvocation: boolean }

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
  /** per block, the names declared there and whether each is per-invocation (WGSL's scoping) */
  const scopes: Array<Map<string, boolean>> = [new Map(INVOCATION_NAMES.map(n => [n, true]))];
  const owner = (n: string) => [...scopes].reverse().find(scope => scope.has(n));
  const varies = (n: string) => owner(n)?.get(n) ?? false;
  const dependsOnInvocation = (expr: string, except?: string) => [...namesIn(expr)].some(n => n !== except && varies(n));
  const underBranch = () => stack.some(c => c.perInvocation);

  const statement = (text: string) => {
    const s = squeeze(text);
    if (s === '') return;
    if (COLLECTIVE.test(s) && underBranch()) findings.push({ kind: 'enclosed', fn: name, at: s });
    if (/^(return|break|continue)\b/.test(s) && underBranch()) findings.push({ kind: 'exit', fn: name, at: s });
    const uniformLoad = (value: string) => /^workgroupUniformLoad\(\s*&\s*\w+\s*\)$/.test(value);
    const decl = /^(?:let|var|const)\s+(\w+)(?:\s*:[^=]+)?\s*=\s*([\s\S]*)$/.exec(s);
    if (decl) {
      scopes.at(-1)!.set(decl[1], !uniformLoad(decl[2]) && dependsOnInvocation(decl[2]));
      return;
    }
    const assign = /^(\w+)(?:\[[^\]]*\])?\s*(?:[-+*/%&|^]|<<|>>)?=\s*([\s\S]*)$/.exec(s);
    // an assignment under a per-invocation branch leaves a per-invocation value
    if (assign && !uniformLoad(assign[2]) && (dependsOnInvocation(assign[2]) || underBranch())) owner(assign[1])?.set(assign[1], true);
  };

  let text = '';
  let parens = 0;
  /** the construct that closed last: an `else` is as per-invocation as its `if` */
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
      // a for loop's own counter: per-invocation when its start is (checked with the rest of the header)
      const counter = /^for\s*\(\s*(?:var|let)\s+(\w+)/.exec(header)?.[1];
      const varying = (isLoop || isBranch) &&
          (dependsOnInvocation(header, counter) || (header.startsWith('else') && (closed?.perInvocation ?? false)));
      if (isLoop && varying) findings.push({ kind: 'loop', fn: name, at: header });
      stack.push({ header, perInvocation: varying });
      scopes.push(new Map(counter ? [[counter, varying]] : []));
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
