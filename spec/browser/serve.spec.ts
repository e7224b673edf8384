/** The example's static server: what it serves, with which types, and what it refuses. */
import { expect } from 'chai';
import { request } from 'node:http';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { serveStatic, type StaticServer } from '../../examples/browser/serve.js';

/** A raw GET/HEAD (fetch would normalize the dot segments this test sends on purpose). */
function get(server: StaticServer, path: string, method = 'GET') {
  return new Promise<{ status: number; type: string | undefined; location: string | undefined; body: string }>((ok, fail) => {
    const req = request({ host: '127.0.0.1', port: server.port, path, method }, res => {
      let body = '';
      res.setEncoding('utf8').on('data', (chunk: string) => { body += chunk; }).on('end', () => ok({
        status: res.statusCode!, type: res.headers['content-type'], location: res.headers.location, body,
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

  it('closes, and the port refuses connections afterwards', async () => {
    const other = await serveStatic({ '/': join(root, 'site') });
    await other.close();
    const error = await get(other, '/').then(() => null, (e: NodeJS.ErrnoException) => e);
    expect(error?.code).to.equal('ECONNREFUSED');
  });
});
