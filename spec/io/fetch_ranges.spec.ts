/**
 * fetchHFCheckpoint over real HTTP (a local node:http server, spec-only): range requests where the
 * server honours them, whole files where it does not, and a clear error from a server that sends
 * other bytes than it was asked for.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fetchHFCheckpoint, type FetchFunction } from '../../src/io/fetch_checkpoint.js';
import { CheckpointError, loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import type { MoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { cleanup, fixtureConfig, fixtureDir, readAll, tempDir, writeCheckpoint } from './checkpoint_helpers.js';
import { rejection } from '../helpers/rejection.js';

/**
 * How the server answers a Range header: 'ranges' as RFC 9110 says (206 + Content-Range), 'none'
 * ignores it (200, whole file), 'hiddenRange' sends a 206 without Content-Range (as a cross-origin
 * page sees one that is not exposed), 'shortBody' sends one byte less than Content-Range says
 * (with a Content-Length that matches the body), 'fromZero' serves its bytes from offset 0 whatever
 * was asked (with a truthful Content-Range).
 */
type Mode = 'ranges' | 'none' | 'hiddenRange' | 'shortBody' | 'fromZero';

interface FolderServer {
  base: string;
  /** per request: the path, the Range header, the status and the body bytes sent */
  log: Array<{ path: string; range: string | null; status: number; bytes: number }>;
  close(): Promise<void>;
}

async function serveFolder(dir: string, mode: Mode): Promise<FolderServer> {
  const log: FolderServer['log'] = [];
  const send = (res: ServerResponse, path: string, range: string | null, status: number, body: Uint8Array, headers: Record<string, string> = {}) => {
    log.push({ path, range, status, bytes: body.byteLength });
    res.writeHead(status, { 'Content-Length': String(body.byteLength), ...headers });
    res.end(body);
  };
  const server: Server = createServer((req: IncomingMessage, res: ServerResponse) => {
    void (async () => {
      const path = decodeURIComponent(new URL(req.url!, 'http://x').pathname).slice(1);
      const range = req.headers.range ?? null;
      const bytes = await readFile(join(dir, path)).catch(() => null);
      if (bytes === null) return send(res, path, range, 404, new TextEncoder().encode('not found'));
      const m = range === null ? null : /^bytes=(\d+)-(\d+)$/.exec(range);
      if (m === null || mode === 'none') return send(res, path, range, 200, bytes, mode === 'none' ? {} : { 'Accept-Ranges': 'bytes' });
      const first = Number(m[1]);
      const last = Math.min(Number(m[2]), bytes.byteLength - 1);
      if (first >= bytes.byteLength) return send(res, path, range, 416, new Uint8Array(0), { 'Content-Range': `bytes */${bytes.byteLength}` });
      const contentRange = `bytes ${first}-${last}/${bytes.byteLength}`;
      if (mode === 'hiddenRange') return send(res, path, range, 206, bytes.subarray(first, last + 1));
      if (mode === 'shortBody') return send(res, path, range, 206, bytes.subarray(first, last), { 'Content-Range': contentRange });
      if (mode === 'fromZero') {
        return send(res, path, range, 206, bytes.subarray(0, last - first + 1), { 'Content-Range': `bytes 0-${last - first}/${bytes.byteLength}` });
      }
      return send(res, path, range, 206, bytes.subarray(first, last + 1), { 'Content-Range': contentRange, 'Accept-Ranges': 'bytes' });
    })();
  });
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    base: `http://127.0.0.1:${port}/`, log,
    close: () => new Promise<void>(resolve => { server.closeAllConnections(); server.close(() => resolve()); }),
  };
}

function weightsOf(model: MoECausalLM): Map<string, number[]> {
  return new Map(model.weights.map(w => [w.originalName, Array.from(w.read().dataSync())]));
}

describe('io/fetch_checkpoint fetchHFCheckpoint over HTTP', () => {
  after(cleanup);

  it('reads the header and then each tensor with range requests, and the whole file from a server without ranges: the same weights', async () => {
    const dir = fixtureDir('qwen3_moe');
    const file = join(dir, 'model.safetensors');
    const size = (await stat(file)).size;
    const headerLength = Number((await readFile(file)).readBigUInt64LE(0));
    const nonEmpty = (await readSafetensorsFile(file)).names().length;  // no empty tensors in the fixture
    const fromDisk = await loadHFCheckpoint(dir);
    const expected = weightsOf(fromDisk);
    fromDisk.dispose();
    const before = tf.memory().numTensors;

    const ranged = await serveFolder(dir, 'ranges');
    const files: Array<[string, number]> = [];
    try {
      const model = await fetchHFCheckpoint(ranged.base, { onFile: (url, bytes) => files.push([url, bytes]) });
      expect(weightsOf(model)).to.deep.equal(expected);
      model.dispose();
    } finally {
      await ranged.close();
    }
    const weights = ranged.log.filter(r => r.path === 'model.safetensors');
    // the length, the header, then one request per tensor: every byte of the file exactly once
    expect(weights.slice(0, 2).map(r => [r.range, r.status])).to.deep.equal([['bytes=0-7', 206], [`bytes=8-${8 + headerLength - 1}`, 206]]);
    expect(weights.length).to.equal(2 + nonEmpty);
    expect(weights.every(r => r.status === 206)).to.equal(true);
    expect(weights.reduce((n, r) => n + r.bytes, 0)).to.equal(size);
    expect(files).to.deep.equal([[`${ranged.base}config.json`, (await stat(join(dir, 'config.json'))).size], [`${ranged.base}model.safetensors`, size]]);

    for (const mode of ['none', 'hiddenRange'] as const) {
      const whole = await serveFolder(dir, mode);
      try {
        const model = await fetchHFCheckpoint(whole.base);
        expect(weightsOf(model), mode).to.deep.equal(expected);
        model.dispose();
      } finally {
        await whole.close();
      }
      const got = whole.log.filter(r => r.path === 'model.safetensors');
      // 'none': the first (ranged) request already brought the whole file; 'hiddenRange': 8 unusable bytes, then the file
      expect(got.map(r => [r.status, r.bytes]), mode).to.deep.equal(mode === 'none' ? [[200, size]] : [[206, 8], [200, size]]);
    }
    const never = await serveFolder(dir, 'ranges');
    try {
      const model = await fetchHFCheckpoint(never.base, { rangeRequests: 'never' });
      expect(weightsOf(model)).to.deep.equal(expected);
      model.dispose();
    } finally {
      await never.close();
    }
    expect(never.log.map(r => [r.path, r.range, r.status])).to.deep.equal([['config.json', null, 200], ['model.safetensors', null, 200]]);
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('reads shards with ranges, and a file shorter than the length field through the whole file', async () => {
    const dir = await tempDir();
    const tensors = await readAll(join(fixtureDir('mixtral'), 'model.safetensors'));
    await writeCheckpoint(dir, await fixtureConfig('mixtral'), tensors, 2);
    tf.dispose(Object.values(tensors));
    const fromDisk = await loadHFCheckpoint(fixtureDir('mixtral'));
    const expected = weightsOf(fromDisk);
    fromDisk.dispose();
    const server = await serveFolder(dir, 'ranges');
    try {
      const model = await fetchHFCheckpoint(server.base);
      expect(weightsOf(model)).to.deep.equal(expected);
      model.dispose();
      for (const shard of ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']) {
        const sent = server.log.filter(r => r.path === shard);
        expect(sent.every(r => r.status === 206), shard).to.equal(true);
        expect(sent.reduce((n, r) => n + r.bytes, 0), shard).to.equal((await stat(join(dir, shard))).size);
      }

      const short = await tempDir();
      await writeCheckpoint(short, await fixtureConfig('mixtral'), {});
      const shortServer = await serveFolder(short, 'ranges');
      try {
        // 5 bytes: the server ends the range at the end of the file; 0 bytes: 416, then the whole (empty) file
        for (const [length, statuses] of [[5, [206]], [0, [416, 200]]] as const) {
          await writeFile(join(short, 'model.safetensors'), new Uint8Array(length));
          shortServer.log.length = 0;
          const e = await rejection(fetchHFCheckpoint(shortServer.base));
          expect(e.message).to.equal(`safetensors file '${shortServer.base}model.safetensors': is ${length} bytes long, shorter than ` +
            'the 8-byte header length that starts the format');
          expect(shortServer.log.filter(r => r.path === 'model.safetensors').map(r => r.status)).to.deep.equal(statuses);
        }
      } finally {
        await shortServer.close();
      }
    } finally {
      await server.close();
    }
  });

  it('refuses a server that sends other bytes than it was asked for, naming the range and what came', async () => {
    const dir = fixtureDir('qwen3_moe');
    const before = tf.memory().numTensors;
    for (const [mode, message] of [
      ['shortBody', "the range request 'bytes=0-7' with Content-Length 7 for the 8 bytes of Content-Range 'bytes 0-7/"],
      ['fromZero', "the range request 'bytes=8-"],
    ] as const) {
      const server = await serveFolder(dir, mode);
      try {
        const e = await rejection(fetchHFCheckpoint(server.base));
        expect(e, mode).to.be.instanceOf(CheckpointError);
        expect(e.message, mode).to.contain(`\`fetchHFCheckpoint()\`: weights '${server.base}model.safetensors': the server answered ${message}`);
        expect(e.message, mode).to.match(/; it does not serve the file's bytes correctly$/);
        if (mode === 'fromZero') expect(e.message).to.match(/with Content-Range 'bytes 0-\d+\/\d+' \(bytes 0-\d+\) instead of bytes 8-\d+;/);
      } finally {
        await server.close();
      }
    }

    // each other way a 206 can be wrong, through a fetch that answers ranges from the file and then spoils the answer
    const file = new Uint8Array(await readFile(join(dir, 'model.safetensors')));
    const url = `${dir}/model.safetensors`;
    type Spoil = (asked: [number, number], n: number) => Response | null;
    const spoiled = (spoil: Spoil): FetchFunction => {
      let n = 0;
      return async (where, init) => {
        if (where.endsWith('config.json')) return new Response(await readFile(where));
        const m = /^bytes=(\d+)-(\d+)$/.exec(init?.headers?.Range ?? '');
        if (m === null) return new Response(file);
        const [first, last] = [Number(m[1]), Math.min(Number(m[2]), file.byteLength - 1)];
        return spoil([first, last], n++) ?? new Response(file.subarray(first, last + 1),
            { status: 206, headers: { 'Content-Range': `bytes ${first}-${last}/${file.byteLength}` } });
      };
    };
    const cases: Array<[string, Spoil, string]> = [
      ['not a Content-Range', ([f, l]) => new Response(file.subarray(f, l + 1), { status: 206, headers: { 'Content-Range': 'bytes=0-7' } }),
        "the server answered the range request 'bytes=0-7' with Content-Range \"bytes=0-7\", which is not 'bytes FIRST-LAST/TOTAL'"],
      ['another total', ([f, l], n) => n !== 1 ? null : new Response(file.subarray(f, l + 1), { status: 206, headers: { 'Content-Range': `bytes ${f}-${l}/${file.byteLength + 1}` } }),
        `the server answered the range request 'bytes=8-${8 + Number(Buffer.from(file.subarray(0, 8)).readBigUInt64LE(0)) - 1}' with a total size of ` +
        `${file.byteLength + 1} bytes in Content-Range 'bytes 8-`],
      ['a short body without Content-Length', ([f, l]) => new Response(file.subarray(f, l), { status: 206, headers: { 'Content-Range': `bytes ${f}-${l}/${file.byteLength}` } }),
        `the server answered the range request 'bytes=0-7' with 7 bytes for the 8 bytes of Content-Range 'bytes 0-7/${file.byteLength}'`],
      ['the whole file for the header', (_, n) => n !== 1 ? null : new Response(file),
        'the server stopped honouring range requests (the whole file for the header after a 206 for its length)'],
      ['a 404 for the header', (_, n) => n !== 1 ? null : new Response('gone', { status: 404 }),
        'the server stopped honouring range requests (HTTP 404 for the header after a 206 for its length)'],
      ['a 404 for a tensor', (_, n) => n !== 2 ? null : new Response('gone', { status: 404 }),
        'the server stopped honouring range requests (HTTP 404 for the bytes of a tensor after a 206 for the header)'],
      ['a part of the file for a tensor', (_, n) => n !== 2 ? null : new Response(file.subarray(0, 100)),
        `the server stopped honouring range requests (100 bytes, not the file's ${file.byteLength} for the bytes of a tensor after a 206 for the header)`],
    ];
    for (const [what, spoil, message] of cases) {
      const e = await rejection(fetchHFCheckpoint(dir, { fetch: spoiled(spoil) }));
      expect(e, what).to.be.instanceOf(CheckpointError);
      expect(e.message, what).to.contain(`\`fetchHFCheckpoint()\`: weights '${url}': ${message}`);
    }
    // a server that changes its mind and sends the whole file for a tensor: its slice is used
    const changed = await fetchHFCheckpoint(dir, { fetch: spoiled((_, n) => n === 2 ? new Response(file) : null) });
    const fromDisk = await loadHFCheckpoint(dir);
    expect(weightsOf(changed)).to.deep.equal(weightsOf(fromDisk));
    changed.dispose();
    fromDisk.dispose();
    // a 416 for the length (a file shorter than 8 bytes) is followed by a plain GET; its failure is named
    const e416 = await rejection(fetchHFCheckpoint(dir, { fetch: async (where, init) => where.endsWith('config.json') ? new Response(await readFile(where)) :
      init?.headers !== undefined ? new Response('', { status: 416 }) : new Response('busy', { status: 503, statusText: 'Service Unavailable' }) }));
    expect(e416.message).to.equal(`\`fetchHFCheckpoint()\`: cannot fetch weights '${url}': HTTP 503 Service Unavailable`);
    expect(tf.memory().numTensors).to.equal(before);
    const bad = await rejection(fetchHFCheckpoint('http://127.0.0.1:1/', { rangeRequests: 'sometimes' as never }));
    expect(bad.message).to.equal("`fetchHFCheckpoint()`: 'options.rangeRequests' must be 'auto' or 'never' but got \"sometimes\"");
  });
});
