/**
 * A tiny static file server for the browser example (and its spec): GET/HEAD of files under a
 * few mounted folders, on 127.0.0.1, nothing else. Any static server works for the page; this
 * one needs no install, knows the content type browsers want for .wasm, and answers single byte
 * ranges (`Range: bytes=a-b`), so fetchHFCheckpoint reads a multi-GB safetensors file one tensor at
 * a time instead of holding the whole file in the page.
 *
 *   npx tsx examples/browser/serve.ts [--port 8080] [--dir examples/browser/dist] [--model <checkpoint dir>]
 */
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { dirname, extname, join, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const CONTENT_TYPES: Readonly<Record<string, string>> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.map': 'application/json; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.txt': 'text/plain; charset=utf-8',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.wasm': 'application/wasm',
};

export interface StaticServer {
  /** 'http://127.0.0.1:<port>' */
  url: string;
  port: number;
  /** stops listening and drops open connections */
  close(): Promise<void>;
}

/**
 * The byte range [first, last] of a file of `size` bytes asked by a Range header (RFC 9110 14.1.2:
 * `bytes=a-b`, `bytes=a-`, `bytes=-n`), 'unsatisfiable' when it starts past the end, or null for no
 * header or one this server does not take (several ranges, other units, malformed): the whole file
 * is sent then, which the RFC allows.
 */
export function parseRangeHeader(header: string | undefined, size: number):
    { first: number; last: number } | 'unsatisfiable' | null {
  if (header === undefined) return null;
  const m = /^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$/i.exec(header);
  if (m === null || (m[1] === '' && m[2] === '')) return null;
  if (m[1] === '') {
    // a suffix: the last n bytes
    const n = Number(m[2]);
    if (n === 0) return 'unsatisfiable';
    return size === 0 ? 'unsatisfiable' : { first: Math.max(0, size - n), last: size - 1 };
  }
  const first = Number(m[1]);
  const last = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1);
  if (m[2] !== '' && Number(m[2]) < first) return null;
  return first >= size ? 'unsatisfiable' : { first, last };
}

/**
 * Serves `mounts` (URL prefix ending in '/' → folder; the longest matching prefix wins) on
 * 127.0.0.1:`port` (0: a free port). A path that leaves its folder, or any other method than
 * GET/HEAD, is refused. A single byte range is answered with 206 and Content-Range.
 */
export async function serveStatic(mounts: Record<string, string>, port = 0): Promise<StaticServer> {
  const table = Object.entries(mounts)
      .map(([prefix, dir]) => [prefix.endsWith('/') ? prefix : `${prefix}/`, resolve(dir)] as const)
      .sort((a, b) => b[0].length - a[0].length);

  const server: Server = createServer(async (req, res) => {
    const reply = (status: number, text: string) => {
      res.writeHead(status, { 'content-type': 'text/plain; charset=utf-8' });
      res.end(req.method === 'HEAD' ? undefined : `${text}\n`);
    };
    if (req.method !== 'GET' && req.method !== 'HEAD') return reply(405, 'method not allowed');
    let path: string;
    try {
      path = decodeURIComponent(new URL(req.url ?? '/', 'http://localhost').pathname);
    } catch {
      return reply(400, 'bad path');
    }
    const mount = table.find(([prefix]) => path.startsWith(prefix) || `${path}/` === prefix);
    if (mount === undefined) return reply(404, 'not found');
    const [prefix, dir] = mount;
    let file = resolve(dir, `.${sep}${path.slice(prefix.length)}`);
    const inside = relative(dir, file);
    if (inside === '..' || inside.startsWith(`..${sep}`) || resolve(dir, inside) !== file) return reply(403, 'outside the served folder');
    let info = await stat(file).catch(() => null);
    if (info?.isDirectory()) {
      if (!path.endsWith('/')) {
        res.writeHead(301, { location: `${path}/` });
        return res.end();
      }
      file = join(file, 'index.html');
      info = await stat(file).catch(() => null);
    }
    if (info === null || !info.isFile()) return reply(404, 'not found');
    const type = CONTENT_TYPES[extname(file)] ?? 'application/octet-stream';
    const range = parseRangeHeader(req.headers.range, info.size);
    if (range === 'unsatisfiable') {
      res.writeHead(416, { 'content-range': `bytes */${info.size}`, 'cache-control': 'no-store' });
      return res.end();
    }
    const { first, last } = range ?? { first: 0, last: info.size - 1 };
    res.writeHead(range === null ? 200 : 206, {
      'content-type': type,
      'content-length': last - first + 1,
      'accept-ranges': 'bytes',
      'cache-control': 'no-store',
      ...(range === null ? {} : { 'content-range': `bytes ${first}-${last}/${info.size}` }),
    });
    if (req.method === 'HEAD' || last < first) return res.end();
    createReadStream(file, { start: first, end: last }).on('error', () => res.destroy()).pipe(res);
  });

  await new Promise<void>((ok, fail) => {
    server.once('error', fail);
    server.listen(port, '127.0.0.1', () => ok());
  });
  const actual = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${actual}`,
    port: actual,
    close: () => new Promise<void>(ok => {
      server.close(() => ok());
      server.closeAllConnections();
    }),
  };
}

function flag(argv: string[], name: string): string | undefined {
  const at = argv.indexOf(`--${name}`);
  return at === -1 ? undefined : argv[at + 1];
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const argv = process.argv.slice(2);
  const here = dirname(fileURLToPath(import.meta.url));
  const dir = flag(argv, 'dir') ?? join(here, 'dist');
  const model = flag(argv, 'model');
  const port = Number(flag(argv, 'port') ?? 8080);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`serve: --port must be an integer in [0, 65535] but is '${flag(argv, 'port')}'`);
    process.exit(2);
  }
  if (!(await stat(join(dir, 'index.html')).catch(() => null))) {
    console.error(`serve: '${dir}' has no index.html; build the page first: npm run build:browser`);
    process.exit(1);
  }
  const server = await serveStatic(model === undefined ? { '/': dir } : { '/': dir, '/model/': model }, port);
  console.log(`serving ${relative(process.cwd(), dir) || '.'}${model ? ` (model/ = ${model})` : ''} at ${server.url}/ (Ctrl-C stops)`);
  process.once('SIGINT', () => { void server.close().then(() => process.exit(0)); });
}
