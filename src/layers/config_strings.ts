/**
 * tfjs-layers rewrites every string value in a layer config when a model is saved (toSnakeCase)
 * and again when it is loaded (toCamelCase), keys included, except values under a 'name' key. So
 * 'experts.gate_up' comes back as 'experts.gateUp', an adapter called 'my_adapter' as 'myAdapter'
 * and a key 'rsLoRA' as 'rsLoRa'. Layers protect such strings in getConfig() and restore them in
 * the constructor; a protected string is made only of characters both rewrites leave alone.
 */

const MARK = '~';

/**
 * A form of `s` that survives save and load unchanged (lowercase, digits, '-', '.', '~' only for
 * the letters and underscores of `s`).
 *
 * ```js
 * protectString('experts.gate_up');  // '~experts.gate-1up'
 * restoreString(protectString('My_Adapter'));  // 'My_Adapter'
 * ```
 */
export function protectString(s: string): string {
  let out = MARK;
  for (const ch of s) {
    if (ch === '-') out += '-0';
    else if (ch === '_') out += '-1';
    else if (ch !== ch.toLowerCase()) out += `-2${ch.toLowerCase()}`;
    else out += ch;
  }
  return out;
}

/** The original of a `protectString` result; any other string is returned as it is. */
export function restoreString(s: string): string {
  if (typeof s !== 'string' || !s.startsWith(MARK)) return s;
  let out = '';
  for (let i = MARK.length; i < s.length; i++) {
    if (s[i] !== '-') {
      out += s[i];
      continue;
    }
    const code = s[++i];
    if (code === '0') out += '-';
    else if (code === '1') out += '_';
    else out += s[++i].toUpperCase();
  }
  return out;
}
