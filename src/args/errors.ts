/** The one error bad plugin args give: every problem found, a line each. */

import { MoELoraError } from '../errors.js';
export interface PluginArgsProblem {
  /** the plugin arg the problem is about, as a dotted path ('lora.r', 'models', 'expertKernel') */
  arg: string;
  /** the whole line: what is wrong, with the expected and the actual value */
  message: string;
}

/**
 * Thrown by `register()` (and the CLI's argv → args) before anything is patched or added.
 * `problems` holds every problem; the message has one line per problem after a header.
 */
export class PluginArgsError extends MoELoraError {
  readonly problems: readonly PluginArgsProblem[];

  constructor(problems: PluginArgsProblem[], source = 'register()', prefix?: (arg: string) => string | undefined) {
    const lines = problems.map(p => {
      const pre = prefix?.(p.arg);
      return pre ? `${pre}: ${p.message}` : p.message;
    });
    const n = problems.length;
    super(`${source}: ${n} problem${n === 1 ? '' : 's'} with the plugin args:\n${lines.map(l => `  - ${l}`).join('\n')}`);
    this.name = 'PluginArgsError';
    this.problems = problems.map(p => ({ ...p }));
    Object.setPrototypeOf(this, PluginArgsError.prototype);
  }
}
