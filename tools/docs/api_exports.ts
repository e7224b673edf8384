/**
 * Lists every public export of src/index.ts (the package's entry) with its kind, its source file
 * and, for functions and classes, the signature, so docs/api.md can be checked against it.
 *
 *   npx tsx tools/docs/api_exports.ts            # one line per export: kind name (file): signature
 *   npx tsx tools/docs/api_exports.ts --names    # the names only
 */
import ts from 'typescript';
import { relative } from 'node:path';

export interface ExportInfo {
  name: string;
  kind: 'function' | 'class' | 'const' | 'type' | 'interface' | 'enum' | 'other';
  file: string;
  signature: string;
}

/** The exports of `entry` as the type checker sees them (re-exports followed to their declarations). */
export function listExports(entry = 'src/index.ts'): ExportInfo[] {
  const program = ts.createProgram([entry], {
    target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext,
    strict: true, skipLibCheck: true, noEmit: true,
  });
  const checker = program.getTypeChecker();
  const source = program.getSourceFile(entry);
  if (source === undefined) throw new Error(`cannot read ${entry}`);
  const moduleSymbol = checker.getSymbolAtLocation(source)!;
  return checker.getExportsOfModule(moduleSymbol).map(exported => {
    const symbol = exported.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(exported) : exported;
    const decl = symbol.declarations?.[0];
    const file = decl ? relative(process.cwd(), decl.getSourceFile().fileName) : '?';
    let kind: ExportInfo['kind'] = 'other';
    let signature = '';
    const flags = symbol.flags;
    if (flags & ts.SymbolFlags.Class) kind = 'class';
    else if (flags & ts.SymbolFlags.Function) kind = 'function';
    else if (flags & ts.SymbolFlags.Interface) kind = 'interface';
    else if (flags & ts.SymbolFlags.TypeAlias) kind = 'type';
    else if (flags & ts.SymbolFlags.Enum) kind = 'enum';
    else if (flags & ts.SymbolFlags.Variable) kind = 'const';
    if (decl !== undefined && (kind === 'function' || kind === 'const')) {
      const type = checker.getTypeOfSymbolAtLocation(symbol, decl);
      const sigs = type.getCallSignatures();
      signature = sigs.length > 0 && kind === 'function' ?
        sigs.map(s => checker.signatureToString(s, undefined, ts.TypeFormatFlags.NoTruncation)).join(' | ') :
        checker.typeToString(type, undefined, ts.TypeFormatFlags.NoTruncation);
    } else if (decl !== undefined && kind === 'class') {
      const ctor = checker.getTypeOfSymbolAtLocation(symbol, decl).getConstructSignatures()[0];
      signature = ctor ? `new ${checker.signatureToString(ctor, undefined, ts.TypeFormatFlags.NoTruncation)}` : '';
    }
    return { name: exported.name, kind, file, signature };
  }).sort((a, b) => a.file.localeCompare(b.file) || a.name.localeCompare(b.name));
}

if (process.argv[1]?.endsWith('api_exports.ts')) {
  const list = listExports();
  const namesOnly = process.argv.includes('--names');
  for (const e of list) {
    process.stdout.write(namesOnly ? `${e.name}\n` : `${e.kind} ${e.name} (${e.file})${e.signature ? `: ${e.signature}` : ''}\n`);
  }
}
