/** "Did you mean" suggestions for unknown argument names. */

/**
 * Edit distance with adjacent transpositions (optimal string alignment): insertions, deletions,
 * substitutions and swaps of two neighbours ('alhpa' → 'alpha') cost 1 each.
 */
export function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) =>
    Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.length][b.length];
}

/** Case, '-' and '_' do not matter: 'expert_kernel', 'expert-kernel' and 'ExpertKernel' are one name. */
function normalize(name: string): string {
  return name.toLowerCase().replace(/[-_]/g, '');
}

/**
 * The known name closest to `name`, or undefined when none is close: a name that differs only in
 * case or separators, an alias (e.g. PEFT's 'lora_alpha' for 'alpha'), or one within an edit
 * distance of a third of its length (at least 1, at most 3).
 */
export function suggestName(
    name: string, known: readonly string[], aliases: Readonly<Record<string, string>> = {}): string | undefined {
  const n = normalize(name);
  const exact = known.find(k => normalize(k) === n);
  if (exact !== undefined) return exact;
  for (const [alias, target] of Object.entries(aliases)) {
    if (normalize(alias) === n && known.includes(target)) return target;
  }
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const k of known) {
    const d = editDistance(n, normalize(k));
    const limit = Math.min(3, Math.max(1, Math.floor(k.length / 3)));
    if (d <= limit && d < bestDistance) {
      best = k;
      bestDistance = d;
    }
  }
  return best;
}
