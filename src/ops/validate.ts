/**
 * Argument checks at the op boundary. Every message names the op and the argument and gives the
 * expected and the actual value, so bad input never fails deep inside tfjs.
 */
import * as tf from '@tensorflow/tfjs-core';
import { MoELoraError } from '../errors.js';

/** Thrown by an op for a bad argument; nothing has been computed or mutated when it is thrown. */
export class OpArgumentError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'OpArgumentError';
    Object.setPrototypeOf(this, OpArgumentError.prototype);
  }
}

export function fail(op: string, message: string): never {
  throw new OpArgumentError(`\`${op}()\`: ${message}`);
}

function describe(value: unknown): string {
  if (value instanceof tf.Tensor) return `a ${value.dtype} tensor of shape [${value.shape}]`;
  if (value === null) return 'null';
  if (Array.isArray(value)) return `an array of length ${value.length}`;
  if (typeof value === 'string') return `'${value}'`;
  return typeof value === 'object' ? 'an object' : `${String(value)} (${typeof value})`;
}

/** A tensor of the given rank; float32 unless `dtype` says otherwise. */
export function assertTensor(
    op: string, arg: string, value: unknown, rank: number,
    dtype: tf.DataType = 'float32'): asserts value is tf.Tensor {
  if (!(value instanceof tf.Tensor)) {
    fail(op, `'${arg}' must be a ${rank}-D ${dtype} tensor but got ${describe(value)}`);
  }
  if (value.isDisposed) fail(op, `'${arg}' was already disposed`);
  if (value.rank !== rank) {
    fail(op, `'${arg}' must be ${rank}-D but got shape [${value.shape}]`);
  }
  if (value.dtype !== dtype) {
    fail(op, `'${arg}' must be ${dtype} but got ${value.dtype} (shape [${value.shape}])`);
  }
}

/** `shape` with null for "any size". `context` lists the other shapes involved, for the message. */
export function assertShape(
    op: string, arg: string, value: tf.Tensor, shape: Array<number|null>, context = ''): void {
  const ok = value.rank === shape.length &&
      shape.every((d, i) => d === null || d === value.shape[i]);
  if (!ok) {
    const want = `[${shape.map(d => (d === null ? '*' : d)).join(',')}]`;
    fail(op, `'${arg}' must have shape ${want} but got [${value.shape}]${context ? ` (${context})` : ''}`);
  }
}

export function assertInteger(
    op: string, arg: string, value: unknown, min: number, max = Infinity): asserts value is number {
  if (typeof value !== 'number' || !Number.isInteger(value)) {
    fail(op, `'${arg}' must be an integer but got ${describe(value)}`);
  }
  if (value < min) fail(op, `'${arg}' must be >= ${min} but got ${value}`);
  if (value > max) fail(op, `'${arg}' must be <= ${max} but got ${value}`);
}

export function assertFiniteNumber(op: string, arg: string, value: unknown): asserts value is number {
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    fail(op, `'${arg}' must be a finite number but got ${describe(value)}`);
  }
}

export function assertOneOf<T extends string>(
    op: string, arg: string, value: unknown, allowed: readonly T[]): asserts value is T {
  if (typeof value !== 'string' || !(allowed as readonly string[]).includes(value)) {
    fail(op, `'${arg}' must be one of ${allowed.map(a => `'${a}'`).join(', ')} but got ${describe(value)}`);
  }
}
