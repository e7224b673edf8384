/**
 * Where the host's time goes in a V8 CPU profile (node:inspector's Profiler, the `.cpuprofile`
 * format): per function, the time sampled in it (self) and in it or anything it called
 * (inclusive). ours.ts --cpu-profile on profiles its timed steps with it: on the GPU machine the
 * step is bound by the host (issue 15), and only a profile there shows what NVIDIA's driver and
 * Dawn cost per dispatch, which Mesa's software GPU here does not.
 */
import { Session } from 'node:inspector/promises';

/** The parts of V8's profile this reads. */
export interface CpuProfile {
  nodes: { id: number; callFrame: { functionName: string; url: string; lineNumber: number }; children?: number[] }[];
  samples: number[];
  timeDeltas: number[];
}

export interface CpuProfileSummary {
  /** sampled ms in all */
  totalMs: number;
  /** ms per function, sampled in the function itself, largest first */
  self: { name: string; ms: number }[];
  /** ms per function, sampled in it or below it (a recursive function counted once a sample) */
  inclusive: { name: string; ms: number }[];
}

/** `functionName file:line`, the file without its folder; V8's unnamed frames as (anonymous). */
function frameName(frame: CpuProfile['nodes'][number]['callFrame']): string {
  const file = frame.url.slice(frame.url.lastIndexOf('/') + 1);
  return `${frame.functionName || '(anonymous)'}${file ? ` ${file}:${frame.lineNumber + 1}` : ''}`;
}

/**
 * Self and inclusive ms per function, the `top` largest of each.
 *
 * ```js
 * const { totalMs, self } = summarizeCpuProfile(profile, 20);
 * ```
 */
export function summarizeCpuProfile(profile: CpuProfile, top = 60): CpuProfileSummary {
  const byId = new Map(profile.nodes.map(n => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  // a sample's time is the delta to the next sample (V8 records the delta before each)
  const msOf = new Map<number, number>();
  profile.samples.forEach((id, i) => {
    const next = profile.timeDeltas[i + 1] ?? 0;
    msOf.set(id, (msOf.get(id) ?? 0) + Math.max(next, 0) / 1000);
  });
  const self = new Map<string, number>();
  const inclusive = new Map<string, number>();
  let totalMs = 0;
  for (const [id, ms] of msOf) {
    totalMs += ms;
    const leaf = frameName(byId.get(id)!.callFrame);
    self.set(leaf, (self.get(leaf) ?? 0) + ms);
    const seen = new Set<string>();
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const name = frameName(byId.get(at)!.callFrame);
      if (seen.has(name)) continue;
      seen.add(name);
      inclusive.set(name, (inclusive.get(name) ?? 0) + ms);
    }
  }
  const largest = (m: Map<string, number>) =>
    [...m].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).slice(0, top).map(([name, ms]) => ({ name, ms: Math.round(ms * 10) / 10 }));
  return { totalMs: Math.round(totalMs * 10) / 10, self: largest(self), inclusive: largest(inclusive) };
}

/**
 * Runs `work` under V8's sampling profiler (an interval of `intervalUs` µs) and returns its value
 * with the profile.
 */
export async function withCpuProfile<T>(work: () => Promise<T>, intervalUs = 200): Promise<{ value: T; profile: CpuProfile }> {
  const session = new Session();
  session.connect();
  try {
    await session.post('Profiler.enable');
    await session.post('Profiler.setSamplingInterval', { interval: intervalUs });
    await session.post('Profiler.start');
    const value = await work();
    const { profile } = await session.post('Profiler.stop');
    return { value, profile: profile as unknown as CpuProfile };
  } finally {
    session.disconnect();
  }
}
