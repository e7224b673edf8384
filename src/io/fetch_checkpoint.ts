/**
 * Hugging Face checkpoint import over HTTP (browsers, or Node's fetch): the same folder layout as
 * `loadHFCheckpoint` reads from disk (config.json + model.safetensors, or shards with
 * model.safetensors.index.json), fetched relative to a base URL.
 *
 * Safetensors files are read with HTTP range requests where the server honours them: the 8-byte
 * length, then the header, then each tensor's bytes when the model reads it, so memory is the
 * header plus the tensor being read, whatever the file's size. A server that answers a range
 * request with 200 (the whole file), or with 206 but no Content-Range, is read whole instead. Every
 * 206 answer is checked against what was asked (Content-Range, Content-Length, the body's length,
 * the file's total size), so a server that sends other bytes is a clear error, not garbage weights.
 * A cross-origin server must list Content-Range in Access-Control-Expose-Headers for ranges to be
 * used from a page; otherwise its files are read whole.
 */
import type { MoECausalLM } from '../layers/moe_causal_lm.js';
import { familyOf, type HFConfig } from '../models/families.js';
import {
  CheckpointError, CheckpointSource, indexedCheckpointSource, modelFromCheckpoint, type LoadHFCheckpointOptions,
} from './hf_checkpoint_core.js';
import {
  checkHeaderLength, describeSource, parseHeader, parseSafetensors, SafetensorsFile,
} from './safetensors_bytes.js';

const OP = 'fetchHFCheckpoint';

/** The part of a fetch Response the loader uses; `headers` is optional (without it, no range requests). */
export interface FetchResponse extends Pick<Response, 'ok' | 'status' | 'statusText' | 'arrayBuffer' | 'text'> {
  headers?: Pick<Headers, 'get'>;
}

/** The part of the Fetch API the loader uses (the global `fetch` is one). */
export type FetchFunction = (url: string, init?: { headers?: Record<string, string> }) => Promise<FetchResponse>;

export interface FetchHFCheckpointOptions extends LoadHFCheckpointOptions {
  /** the fetch to use; default the global `fetch` */
  fetch?: FetchFunction;
  /**
   * called once per file with its URL and size: after it arrived (JSON files, and safetensors
   * files the server sends whole) or after its header was read (safetensors over range requests,
   * whose tensors then arrive one by one as the model is filled); for a progress display
   */
  onFile?: (url: string, bytes: number) => void;
  /**
   * 'auto' (default): range requests for safetensors files where the server honours them, whole
   * files otherwise; 'never': always whole files (one request per file)
   */
  rangeRequests?: 'auto' | 'never';
}

type Fetched = { status: 'ok'; bytes: Uint8Array } | { status: 'missing' };

/** The folder URL `base` joined with a file name; `base` may be relative ('model/') or absolute. */
function fileURL(base: string, name: string): string {
  return base.endsWith('/') ? base + name : `${base}/${name}`;
}

/** `bytes B-E/TOTAL` of a Content-Range header, or null when it is not one ('*' totals included). */
function parseContentRange(value: string): { first: number; last: number; total: number } | null {
  const m = /^\s*bytes\s+(\d+)-(\d+)\/(\d+)\s*$/i.exec(value);
  if (m === null) return null;
  const [first, last, total] = [Number(m[1]), Number(m[2]), Number(m[3])];
  return Number.isSafeInteger(total) && first <= last && last < total ? { first, last, total } : null;
}

/**
 * Fetches an HF checkpoint folder into a MoECausalLM, checking every tensor against config.json
 * before any is read (one CheckpointError lists all problems, as `loadHFCheckpoint` does).
 *
 * ```js
 * const model = await fetchHFCheckpoint('models/tiny-moe/', {expertKernel: 'fused'});
 * const logits = model.predict(tf.tensor2d([[1, 2, 3]], [1, 3], 'int32'));
 * ```
 */
export async function fetchHFCheckpoint(url: string, options: FetchHFCheckpointOptions = {}): Promise<MoECausalLM> {
  if (typeof url !== 'string' || url.length === 0) {
    throw new CheckpointError(`\`${OP}()\`: 'url' must be the checkpoint folder's URL but got ${JSON.stringify(url)}`);
  }
  const { fetch: fetchFn = globalThis.fetch as FetchFunction | undefined, onFile, rangeRequests = 'auto', ...modelOptions } = options;
  if (typeof fetchFn !== 'function') {
    throw new CheckpointError(`\`${OP}()\`: 'options.fetch' must be a function (default: the global fetch, ` +
        `which this runtime lacks) but got ${fetchFn === undefined ? 'undefined' : typeof fetchFn}`);
  }
  if (rangeRequests !== 'auto' && rangeRequests !== 'never') {
    throw new CheckpointError(`\`${OP}()\`: 'options.rangeRequests' must be 'auto' or 'never' but got ${JSON.stringify(rangeRequests)}`);
  }

  /** The response to a GET of `where` (with `headers`); a failed fetch is an error naming the file. */
  const request = async (where: string, what: string, headers?: Record<string, string>): Promise<FetchResponse> => {
    try {
      return headers === undefined ? await fetchFn(where) : await fetchFn(where, { headers });
    } catch (e) {
      throw new CheckpointError(`\`${OP}()\`: cannot fetch ${what} '${where}': ${(e as Error).message}`);
    }
  };
  const httpError = (where: string, what: string, response: FetchResponse) =>
    new CheckpointError(`\`${OP}()\`: cannot fetch ${what} '${where}': HTTP ${response.status} ${response.statusText}`.trimEnd());

  /** A file's bytes, or 'missing' for a 404; other failures are errors naming the file. */
  const get = async (name: string, what: string): Promise<Fetched> => {
    const where = fileURL(url, name);
    const response = await request(where, what);
    if (response.status === 404) return { status: 'missing' };
    if (!response.ok) throw httpError(where, what, response);
    const bytes = new Uint8Array(await response.arrayBuffer());
    onFile?.(where, bytes.byteLength);
    return { status: 'ok', bytes };
  };

  /**
   * The bytes [first, last] of `where`, asked with a Range header, and the file's total size from
   * Content-Range; 'whole' when the server sent the whole file (200) or a 206 without a usable
   * Content-Range (then `bytes` is the whole body); 'missing' for a 404. `total`, once known, is
   * checked too (a file that changed size between requests).
   */
  const getRange = async (where: string, what: string, first: number, last: number, total?: number):
      Promise<{ status: 'range' | 'whole'; bytes: Uint8Array; total: number } | { status: 'missing' }> => {
    const asked = `bytes=${first}-${last}`;
    const response = await request(where, what, { Range: asked });
    if (response.status === 404) return { status: 'missing' };
    // 416: the range starts past the end (a file shorter than 8 bytes); the whole file says why
    const wholeFile = async () => {
      const whole = await request(where, what);
      if (!whole.ok) throw httpError(where, what, whole);
      const bytes = new Uint8Array(await whole.arrayBuffer());
      return { status: 'whole' as const, bytes, total: bytes.byteLength };
    };
    if (response.status === 416 && total === undefined) return wholeFile();
    if (!response.ok) throw httpError(where, what, response);
    const bytes = new Uint8Array(await response.arrayBuffer());
    if (response.status !== 206) return { status: 'whole', bytes, total: bytes.byteLength };
    const contentRange = response.headers?.get('content-range') ?? null;
    // a 206 whose Content-Range cannot be read (e.g. not exposed to a cross-origin page): its bytes
    // cannot be checked, so the whole file is asked for without a range
    if (contentRange === null) return wholeFile();
    const wrong = (why: string) => new CheckpointError(`\`${OP}()\`: ${what} '${where}': the server answered the ` +
        `range request '${asked}' with ${why}; it does not serve the file's bytes correctly`);
    const range = parseContentRange(contentRange);
    if (range === null) throw wrong(`Content-Range ${JSON.stringify(contentRange)}, which is not 'bytes FIRST-LAST/TOTAL'`);
    // a server may end the range early at the end of the file (RFC 9110 14.1.2), never elsewhere
    const expectedLast = Math.min(last, range.total - 1);
    if (range.first !== first || range.last !== expectedLast) {
      throw wrong(`Content-Range '${contentRange}' (bytes ${range.first}-${range.last}) instead of bytes ${first}-${expectedLast}`);
    }
    if (total !== undefined && range.total !== total) {
      throw wrong(`a total size of ${range.total} bytes in Content-Range '${contentRange}' where it was ${total} ` +
          'bytes before (the file changed while it was read?)');
    }
    const length = range.last - range.first + 1;
    const contentLength = response.headers?.get('content-length') ?? null;
    if (contentLength !== null && Number(contentLength) !== length) {
      throw wrong(`Content-Length ${contentLength} for the ${length} bytes of Content-Range '${contentRange}'`);
    }
    if (bytes.byteLength !== length) {
      throw wrong(`${bytes.byteLength} bytes for the ${length} bytes of Content-Range '${contentRange}'`);
    }
    return { status: 'range', bytes, total: range.total };
  };

  /**
   * A safetensors file, or null for a 404: header first over range requests and each tensor when
   * it is read, or (rangeRequests 'never', or a server without ranges) the whole file at once.
   */
  const openSafetensors = async (name: string, what: string): Promise<SafetensorsFile | null> => {
    const where = fileURL(url, name);
    if (rangeRequests === 'never') {
      const file = await get(name, what);
      return file.status === 'ok' ? parseSafetensors(file.bytes, where) : null;
    }
    const first = await getRange(where, what, 0, 7);
    if (first.status === 'missing') return null;
    if (first.status === 'whole') {
      onFile?.(where, first.bytes.byteLength);
      return parseSafetensors(first.bytes, where);
    }
    const size = first.total;
    const source = describeSource(where);
    const n = checkHeaderLength(first.bytes, size, source);
    const header = await getRange(where, what, 8, 8 + n - 1, size);
    if (header.status !== 'range') {
      throw new CheckpointError(`\`${OP}()\`: ${what} '${where}': the server stopped honouring range requests ` +
          `(${header.status === 'missing' ? 'HTTP 404' : 'the whole file'} for the header after a 206 for its length)`);
    }
    const dataStart = 8 + n;
    const parsed = parseHeader(header.bytes, size - dataStart, source);
    onFile?.(where, size);
    return new SafetensorsFile(parsed, async (begin, end) => {
      if (end === begin) return new Uint8Array(0);
      const part = await getRange(where, what, dataStart + begin, dataStart + end - 1, size);
      if (part.status === 'range') return part.bytes;
      // the whole file after all (a server that changed its mind): its slice is right if its size is
      if (part.status === 'whole' && part.bytes.byteLength === size) return part.bytes.subarray(dataStart + begin, dataStart + end);
      throw new CheckpointError(`\`${OP}()\`: ${what} '${where}': the server stopped honouring range requests ` +
          `(${part.status === 'missing' ? 'HTTP 404' : `${part.bytes.byteLength} bytes, not the file's ${size}`} ` +
          `for the bytes of a tensor after a 206 for the header)`);
    }, source);
  };
  const getJSON = async (name: string, what: string): Promise<unknown> => {
    const file = await get(name, what);
    if (file.status === 'missing') {
      throw new CheckpointError(`\`${OP}()\`: cannot fetch ${what} '${fileURL(url, name)}': HTTP 404 (not found)`);
    }
    try {
      return JSON.parse(new TextDecoder().decode(file.bytes));
    } catch (e) {
      throw new CheckpointError(`\`${OP}()\`: ${what} '${fileURL(url, name)}' is not valid JSON: ${(e as Error).message}`);
    }
  };

  const config = await getJSON('config.json', 'config') as HFConfig;
  familyOf(config);  // unknown model types fail here, before any weights are fetched
  let source: CheckpointSource;
  const single = await openSafetensors('model.safetensors', 'weights');
  if (single !== null) {
    source = CheckpointSource.single(single);
  } else {
    const indexFile = await get('model.safetensors.index.json', 'index');
    if (indexFile.status === 'missing') {
      throw new CheckpointError(`\`${OP}()\`: '${url}' has neither model.safetensors nor model.safetensors.index.json`);
    }
    const indexURL = fileURL(url, 'model.safetensors.index.json');
    let index: unknown;
    try {
      index = JSON.parse(new TextDecoder().decode(indexFile.bytes));
    } catch (e) {
      throw new CheckpointError(`\`${OP}()\`: index '${indexURL}' is not valid JSON: ${(e as Error).message}`);
    }
    source = await indexedCheckpointSource(OP, `'${url}'`, indexURL, index, shard => openSafetensors(shard, 'shard'));
  }
  return modelFromCheckpoint(OP, `'${url}'`, config, source, modelOptions);
}
