/**
 * JSON Lines read line by line (Node): the file is read in chunks and each line decoded and parsed
 * on its own, so memory holds one chunk and one line, never the whole file as one string.
 */
import { openRegularFile } from '../util/files.js';
import { DatasetError } from './datasets_error.js';

/** The longest line accepted (a dataset line is one sample; a longer one is a broken file, not data). */
export const MAX_JSONL_LINE_BYTES = 16 << 20;
const CHUNK_BYTES = 1 << 20;

/** One parsed line: the object and where it came from ('data.jsonl:12'). */
export interface JsonlRecord {
  record: Record<string, unknown>;
  /** 1-based line number */
  line: number;
  /** 'path:line', for messages */
  where: string;
}

/**
 * The objects of a JSON Lines file, one per non-blank line, in order. Blank (whitespace-only)
 * lines are skipped, as pyarrow's JSON reader (Hugging Face `datasets`) skips them; a line that is
 * not a JSON object, not UTF-8 or longer than MAX_JSONL_LINE_BYTES is a DatasetError naming
 * file and line.
 *
 * ```js
 * for await (const {record, where} of readJsonl('train.jsonl')) console.log(where, record.text);
 * ```
 */
export async function* readJsonl(path: string): AsyncGenerator<JsonlRecord> {
  const { handle } = await openRegularFile(path, 'dataset');
  const decoder = new TextDecoder('utf-8', { fatal: true });
  const chunk = new Uint8Array(CHUNK_BYTES);
  // the start of the current line, as the chunk pieces read so far
  let pending: Uint8Array[] = [];
  let pendingBytes = 0;
  let line = 0;
  const parse = (bytes: Uint8Array): JsonlRecord | null => {
    line++;
    const where = `${path}:${line}`;
    let text: string;
    try {
      text = decoder.decode(bytes);
    } catch {
      throw new DatasetError(`${where}: the line is not valid UTF-8`);
    }
    if (text.trim().length === 0) return null;
    let record: unknown;
    try {
      record = JSON.parse(text);
    } catch (e) {
      throw new DatasetError(`${where}: expected a JSON object but the line is not JSON (${(e as Error).message})`);
    }
    if (record === null || typeof record !== 'object' || Array.isArray(record)) {
      throw new DatasetError(`${where}: expected a JSON object but the line holds ${Array.isArray(record) ? 'an array' : JSON.stringify(record)}`);
    }
    return { record: record as Record<string, unknown>, line, where };
  };
  const tooLong = () => new DatasetError(`${path}:${line + 1}: the line is longer than ${MAX_JSONL_LINE_BYTES} bytes ` +
      '(MAX_JSONL_LINE_BYTES); is this a JSON Lines file?');
  try {
    for (;;) {
      const { bytesRead } = await handle.read(chunk, 0, CHUNK_BYTES, null);
      if (bytesRead === 0) break;
      let start = 0;
      for (let i = 0; i < bytesRead; i++) {
        if (chunk[i] !== 0x0a) continue;
        const piece = chunk.subarray(start, i);
        if (pendingBytes + piece.length > MAX_JSONL_LINE_BYTES) throw tooLong();
        const bytes = pendingBytes === 0 ? piece : concat([...pending, piece], pendingBytes + piece.length);
        pending = [];
        pendingBytes = 0;
        const parsed = parse(bytes);
        if (parsed !== null) yield parsed;
        start = i + 1;
      }
      if (start < bytesRead) {
        pendingBytes += bytesRead - start;
        if (pendingBytes > MAX_JSONL_LINE_BYTES) throw tooLong();
        pending.push(chunk.slice(start, bytesRead));  // a copy: the chunk is read into again
      }
    }
    if (pendingBytes > 0) {
      const parsed = parse(concat(pending, pendingBytes));
      if (parsed !== null) yield parsed;
    }
  } finally {
    await handle.close();
  }
}

function concat(pieces: Uint8Array[], total: number): Uint8Array {
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of pieces) { out.set(p, at); at += p.length; }
  return out;
}
