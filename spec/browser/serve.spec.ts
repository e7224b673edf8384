/** The example's static server: what it serves, with which types, and what it refuses. */
import { expect } from 'chai';
import { request } from 'node:http';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseRangeHeader, serveStatic, type StaticServer } from '../../examples/browser/serve.js';

/** A raw GET/HEAD (fetch would normalize the dot segments this test sends on purpose). */
function get(server: StaticServer, path: string, method = 'GET', headers: Record<string, string> = {}) {
  return new Promise<{
    status: number; type: string | undefined; location: string | undefined; range: string | undefined; length: string | undefined; body: string;
  }>((ok, fail) => {
    const req = request({ host: '127.0.0.1', port: server.port, path, method, headers }, res => {
      let body = '';
      res.setEncoding('utf8').on('data', (chunk: string) => { body += chunk; }).on('end', () => ok({
        status: res.statusCode!, type: res.headers['content-type'], location: res.headers.location,
        range: res.headers['content-range'], length: res.headers['content-length'], body,
      }));
    });
    req.on('error', fail).end();
  });
}

describe('examples/browser/serve.ts', () => {
  let root: string;
  let server: StaticServer;

  before(async () => {
    root = await mkdtemp(join(tmpdir(), 'moe-lora-serve-'));
    await mkdir(join(root, 'site/sub'), { recursive: true });
    await mkdir(join(root, 'weights'));
    await writeFile(join(root, 'site/index.html'), '<p>home</p>');
    await writeFile(join(root, 'site/sub/index.html'), '<p>sub</p>');
    await writeFile(join(root, 'site/a.wasm'), 'wasm');
    await writeFile(join(root, 'weights/config.json'), '{"a": 1}');
    await writeFile(join(root, 'weights/digits.bin'), '0123456789');
    await writeFile(join(root, 'secret.txt'), 'secret');
    server = await serveStatic({ '/': join(root, 'site'), '/model/': join(root, 'weights') });
  });

  after(async () => {
    await server.close();
    await rm(root, { recursive: true, force: true });
  });

  it('serves files of the mounts with their content types, index.html for folders', async () => {
    expect(server.url).to.equal(`http://127.0.0.1:${server.port}`);
    expect(await get(server, '/')).to.include({ status: 200, type: 'text/html; charset=utf-8', body: '<p>home</p>' });
    expect(await get(server, '/a.wasm')).to.include({ status: 200, type: 'application/wasm', body: 'wasm' });
    expect(await get(server, '/model/config.json')).to.include({ status: 200, type: 'application/json; charset=utf-8', body: '{"a": 1}' });
    expect(await get(server, '/sub')).to.include({ status: 301, location: '/sub/' });
    expect(await get(server, '/sub/')).to.include({ status: 200, body: '<p>sub</p>' });
    expect(await get(server, '/a.wasm', 'HEAD')).to.include({ status: 200, type: 'application/wasm', body: '' });
  });

  it('refuses paths outside the folders, missing files and other methods', async () => {
    expect(await get(server, '/..%2fsecret.txt')).to.include({ status: 403 });
    expect(await get(server, '/model/..%2f..%2fsecret.txt')).to.include({ status: 403 });
    expect(await get(server, '/nothing.js')).to.include({ status: 404 });
    expect(await get(server, '/model/tokenizer.json')).to.include({ status: 404 });
    expect(await get(server, '/%E0%A4%A')).to.include({ status: 400 });
    expect(await get(server, '/', 'POST')).to.include({ status: 405 });
  });

  it('answers a single byte range with 206 and Content-Range (fetchHFCheckpoint reads tensors so), else the whole file', async () => {
    const range = (r: string) => get(server, '/model/digits.bin', 'GET', { Range: r });
    expect(await range('bytes=2-5')).to.include({ status: 206, range: 'bytes 2-5/10', length: '4', body: '2345' });
    expect(await range('bytes=7-')).to.include({ status: 206, range: 'bytes 7-9/10', body: '789' });
    expect(await range('bytes=8-100')).to.include({ status: 206, range: 'bytes 8-9/10', body: '89' });
    expect(await range('bytes=-3')).to.include({ status: 206, range: 'bytes 7-9/10', body: '789' });
    expect(await range('bytes=10-12')).to.include({ status: 416, range: 'bytes */10', body: '' });
    // several ranges, other units, a reversed range: the whole file (RFC 9110 lets a server ignore Range)
    for (const r of ['bytes=0-1,4-5', 'items=0-1', 'bytes=5-2', 'bytes=x']) {
      expect(await range(r), r).to.include({ status: 200, range: undefined, body: '0123456789' });
    }
    expect(await get(server, '/model/digits.bin', 'HEAD', { Range: 'bytes=0-3' })).to.include({ status: 206, length: '4', body: '' });
    expect(parseRangeHeader(undefined, 10)).to.equal(null);
    expect(parseRangeHeader('bytes=0-0', 0)).to.equal('unsatisfiable');
    expect(parseRangeHeader('bytes=-0', 10)).to.equal('unsatisfiable');
  });

  it('closes, and the port refuses connections afterwards', async () => {
    const other = await serveStatic({ '/': join(root, 'site') });
    await other.close();
    const error = await get(other, '/').then(() => null, (e: NodeJS.ErrnoException) => e);
    expect(error?.code).to.equal('ECONNREFUSED');
  });
});
