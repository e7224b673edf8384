/**
 * V8's old-generation growth for `tfjs-moe-lora train` on webgpu (issue 15). Every step promotes the
 * tfjs bookkeeping that lives from the forward pass to the backward one (tensors, tape entries,
 * Dawn's command encoders and buffers' wrappers): at OLMoE-1B-7B's shape about 10 MB a step on
 * an H100. V8 lets the old generation grow to about four times what a mark-compact left
 * (~100 MB live there) before the next one, so after ~35 steps one mark-compact took 100–123 ms and
 * the step around it waited 280–370 ms for its loss where the others waited ~50 (runs Z16, Z19, Z21,
 * docs/webgpu.md "Garbage collection in a long run"): 4–5 % of the tokens/s of a 40-step run. With
 * the growth at 25 % of what is live, a mark-compact of 9–13 ms comes every 3–7 steps, inside the
 * wait for the GPU (run Z24); end to end, 40 steps without a step over 0.18 s, 3.1 % more tokens/s
 * than V8's own growth in the same call (run Z25). A user's own --heap-growing-percent (node's flags
 * or NODE_OPTIONS) is left as it is.
 */
import { setFlagsFromString } from 'node:v8';

/** The old generation's growth after a mark-compact, as a percent of what it left (V8's --heap-growing-percent). */
export const TRAINING_HEAP_GROWING_PERCENT = 25;

/** The node flag; V8 reads it when it sets the next limit, so it applies from the next mark-compact on. */
const FLAG = '--heap-growing-percent';

/**
 * Sets V8's heap growth for a training run, unless node's own flags or NODE_OPTIONS give one;
 * returns whether it did. `set` (tests) stands for v8.setFlagsFromString.
 *
 * ```js
 * limitHeapGrowthForTraining();   // true: from the next mark-compact on, the old generation grows by 25 %
 * ```
 */
export function limitHeapGrowthForTraining(
    env: { execArgv: readonly string[]; nodeOptions: string | undefined } = { execArgv: process.execArgv, nodeOptions: process.env.NODE_OPTIONS },
    set: (flags: string) => void = setFlagsFromString): boolean {
  // node takes V8's flags with '_' or '-' between the words
  const given = (arg: string) => arg.split('=')[0].replace(/_/g, '-') === FLAG;
  if (env.execArgv.some(given) || (env.nodeOptions ?? '').split(/\s+/).some(given)) return false;
  set(`${FLAG}=${TRAINING_HEAP_GROWING_PERCENT}`);
  return true;
}
