/**
 * Argument checks for LoRA factors, shared by the lora ops. `prefix` is how the caller names
 * the adapter ('' for `A`/`B`/`scaling` arguments, `adapters[1].` or `router.lora[0].` inside a
 * list), so every message names the exact argument.
 */
import type { Tensor2D } from '@tensorflow/tfjs-core';
import type { LoRAFactors } from '../types.js';
import { assertFiniteNumber, assertShape, assertTensor, fail } from '../validate.js';
import { checkLoRADropout } from './dropout.js';

function assertFactorsObject(op: string, prefix: string, f: unknown): asserts f is LoRAFactors {
  if (f == null || typeof f !== 'object' || Array.isArray(f)) {
    const got = f === null ? 'null' : Array.isArray(f) ? 'an array' : `${String(f)} (${typeof f})`;
    fail(op, `'${prefix || 'adapter'}' must be a LoRAFactors object {A, B, scaling} but got ${got}`);
  }
}

/**
 * Checks one expert adapter on a fused weight with E experts: A [r·E, in], B [out, r·E], scaling
 * finite. `outDim`/`inDim` null means "taken from the factors" (no W to compare with).
 * Returns r.
 */
export function checkExpertFactors(
    op: string, prefix: string, f: unknown, numExperts: number,
    outDim: number | null, inDim: number | null, context: string): number {
  assertFactorsObject(op, prefix.replace(/\.$/, ''), f);
  const nameA = `${prefix}A`;
  const nameB = `${prefix}B`;
  assertTensor(op, nameA, f.A, 2);
  const rows = f.A.shape[0];
  if (rows === 0 || rows % numExperts !== 0) {
    fail(op, `'${nameA}' must have r·E rows (expert-major, r >= 1) with E = ${numExperts} experts ` +
        `but got ${rows} rows, shape [${f.A.shape}] (${context})`);
  }
  const r = rows / numExperts;
  assertShape(op, nameA, f.A, [rows, inDim], `[r·E, in] with E = ${numExperts}; ${context}`);
  assertTensor(op, nameB, f.B, 2);
  assertShape(op, nameB, f.B as Tensor2D, [outDim, r * numExperts],
      `[out, r·E] with r = ${r} from '${nameA}' [${f.A.shape}] and E = ${numExperts}; ${context}`);
  assertFiniteNumber(op, `${prefix}scaling`, f.scaling);
  checkLoRADropout(op, prefix, f.dropout);
  return r;
}

/** Checks one router adapter on W_g [E, H]: A [r, H], B [E, r], scaling finite. Returns r. */
export function checkRouterFactors(
    op: string, prefix: string, f: unknown, numExperts: number, hidden: number): number {
  assertFactorsObject(op, prefix.replace(/\.$/, ''), f);
  const nameA = `${prefix}A`;
  const nameB = `${prefix}B`;
  assertTensor(op, nameA, f.A, 2);
  const r = f.A.shape[0];
  if (r === 0) fail(op, `'${nameA}' must have r >= 1 rows but got shape [${f.A.shape}]`);
  assertShape(op, nameA, f.A, [r, hidden], `[r, H] with H = ${hidden} from the router weight`);
  assertTensor(op, nameB, f.B, 2);
  assertShape(op, nameB, f.B as Tensor2D, [numExperts, r],
      `[E, r] with E = ${numExperts} and r = ${r} from '${nameA}' [${f.A.shape}]`);
  assertFiniteNumber(op, `${prefix}scaling`, f.scaling);
  checkLoRADropout(op, prefix, f.dropout);
  return r;
}

/** A list of adapters (possibly empty). */
export function assertAdapterList(op: string, arg: string, value: unknown): asserts value is unknown[] {
  if (!Array.isArray(value)) {
    fail(op, `'${arg}' must be an array of LoRAFactors but got ` +
        `${value === null ? 'null' : typeof value === 'object' ? 'an object' : typeof value}`);
  }
}
