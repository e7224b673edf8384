/**
 * The benches' `--tf-flags 'NAME=VALUE,...'`: tf.env() flags for one run (bench/e2e/ours.ts,
 * bench/webgpu_moe.ts), so that a backend's knobs are tried on the GPU machine without a new bundle.
 */
import * as tf from '@tensorflow/tfjs-core';
import { fail } from '../src/ops/validate.js';

/**
 * `--tf-flags 'NAME=VALUE,...'`: tf.env() flags to set once the backend is up (numbers, or true /
 * false), for trying a backend's knobs on the GPU machine without a new bundle, e.g.
 * `WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE=60`.
 */
export function parseTfFlags(text: string): Record<string, number | boolean | string> {
  const flags: Record<string, number | boolean | string> = {};
  for (const pair of text.split(',')) {
    // a string value is one lowercase word: the choice flags (WEBGPU_MOE_DENSE_PROGRAM=grouped, MOE_ATTENTION_PROGRAM=rows)
    const match = /^([A-Z][A-Z0-9_]*)=(true|false|[a-z][a-z0-9_]*|-?[0-9.e+-]+)$/.exec(pair.trim());
    if (match === null || (/^[-0-9.]/.test(match[2]) && !Number.isFinite(Number(match[2])))) {
      fail('parseTfFlags', `'--tf-flags' must be NAME=VALUE pairs (a number, true, false or a lowercase word) joined by commas but got ${JSON.stringify(pair)}`);
    }
    const value = match[2];
    flags[match[1]] = value === 'true' ? true : value === 'false' ? false : /^[a-z]/.test(value) ? value : Number(value);
  }
  return flags;
}

/** Sets `flags` (parseTfFlags's) once the backend is up; a name tf.env() does not know is one clear error. */
export function setTfFlags(flags: Record<string, number | boolean | string>): void {
  for (const [name, value] of Object.entries(flags)) {
    try {
      tf.env().set(name, value);
    } catch (err) {
      fail('setTfFlags', `'--tf-flags' names ${name}, which tf.env() cannot set on ${tf.getBackend()}: ${(err as Error)?.message ?? err}`);
    }
  }
}
