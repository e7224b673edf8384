/**
 * Ctrl-C during training: the first SIGINT asks the loop to stop after the current step (so the
 * caller can save what it has); a second one exits at once with code 130.
 */
export interface InterruptFlag {
  /** true once SIGINT arrived */
  readonly requested: boolean;
  /** removes the handler */
  dispose(): void;
}

/**
 * ```js
 * const interrupt = onInterrupt(() => console.error('stopping after this step...'));
 * await trainLoop(model, tokens, {..., shouldStop: () => interrupt.requested});
 * interrupt.dispose();
 * ```
 */
export function onInterrupt(notice?: () => void): InterruptFlag {
  let requested = false;
  const handler = () => {
    if (requested) process.exit(130);
    requested = true;
    notice?.();
  };
  process.on('SIGINT', handler);
  return {
    get requested() { return requested; },
    dispose() { process.off('SIGINT', handler); },
  };
}
