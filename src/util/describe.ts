/**
 * How error messages show a value the caller gave: short, typed and never huge, so that
 * "expected X but got Y" reads the same across the package.
 */

const MAX_CHARS = 80;

/**
 * A short description of any value for an error message: `"abc" (string)`, `1e+9 (number)`,
 * `null`, `an array of length 3`, `a float32 tensor of shape [2, 3]`, `an object {a, b}`.
 *
 * ```js
 * describeValue('x');           // '"x" (string)'
 * describeValue([1, 2]);        // 'an array of length 2'
 * ```
 */
export function describeValue(value: unknown): string {
  if (value === null) return 'null';
  if (value === undefined) return 'undefined';
  if (Array.isArray(value)) return `an array of length ${value.length}`;
  if (ArrayBuffer.isView(value)) return `a ${value.constructor.name} of ${value.byteLength} bytes`;
  if (value instanceof ArrayBuffer) return `an ArrayBuffer of ${value.byteLength} bytes`;
  const tensor = value as { dtype?: unknown; shape?: unknown; dataId?: unknown };
  if (typeof value === 'object' && tensor.dataId !== undefined && Array.isArray(tensor.shape)) {
    return `a ${String(tensor.dtype)} tensor of shape [${tensor.shape.join(', ')}]`;
  }
  switch (typeof value) {
    case 'string': return `${truncate(JSON.stringify(value))} (string)`;
    case 'number': case 'bigint': case 'boolean': return `${String(value)} (${typeof value})`;
    case 'function': return 'a function';
    case 'symbol': return String(value);
    default: {
      const keys = Object.keys(value as object);
      return `an object {${truncate(keys.join(', '))}}`;
    }
  }
}

function truncate(text: string): string {
  return text.length <= MAX_CHARS ? text : `${text.slice(0, MAX_CHARS - 1)}…`;
}
