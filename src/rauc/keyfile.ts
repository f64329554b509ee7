import { UserError } from '../errors.js';

/**
 * RAUC manifests and system.conf files are GLib key files. This module reads and writes that format
 * exactly as GLib's GKeyFile does (group order, key order, escapes, list separators, blank line
 * between groups), because the manifest bytes are what the bundle signature covers and a manifest
 * we write must be byte-identical to the one `rauc bundle` writes for the same content.
 */

/** Groups in file order, each with its keys in file order. */
export type KeyFile = Map<string, Map<string, string>>;

/** GKeyFile's escaping for a single string value (g_key_file_set_string). */
export function escapeValue(value: string): string {
  let out = '';
  for (let i = 0; i < value.length; i++) {
    const ch = value[i];
    if (ch === ' ' && i === 0) out += '\\s';
    else if (ch === '\\') out += '\\\\';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\t') out += '\\t';
    else if (ch === '\r') out += '\\r';
    else out += ch;
  }
  return out;
}

/** GKeyFile's encoding of a string list: each item escaped, ';' escaped, every item followed by ';'. */
export function encodeList(items: readonly string[]): string {
  return items.map((i) => escapeValue(i).replaceAll(';', '\\;') + ';').join('');
}

/** Decode a raw string value as g_key_file_get_string does; `where` locates errors. */
export function decodeString(raw: string, where: string): string {
  let out = '';
  for (let i = 0; i < raw.length; i++) {
    const ch = raw[i];
    if (ch !== '\\') {
      out += ch;
      continue;
    }
    const next = raw[++i];
    switch (next) {
      case 's':
        out += ' ';
        break;
      case 'n':
        out += '\n';
        break;
      case 't':
        out += '\t';
        break;
      case 'r':
        out += '\r';
        break;
      case '\\':
        out += '\\';
        break;
      default:
        throw new UserError('LAMA_E_KEYFILE', `invalid escape '\\${next ?? ''}' in value`, { where });
    }
  }
  return out;
}

/** Decode a raw list value as g_key_file_get_string_list does: split at unescaped ';', then unescape. */
export function decodeList(raw: string, where: string): string[] {
  const items: string[] = [];
  let cur = '';
  for (let i = 0; i < raw.length; i++) {
    if (raw[i] === '\\' && raw[i + 1] === ';') {
      cur += ';';
      i++;
    } else if (raw[i] === '\\') {
      cur += raw.slice(i, i + 2);
      i++;
    } else if (raw[i] === ';') {
      items.push(decodeString(cur, where));
      cur = '';
    } else {
      cur += raw[i];
    }
  }
  if (cur.length > 0) items.push(decodeString(cur, where));
  return items;
}

/**
 * Parse a key file into raw (still escaped) values; decode them with `decodeString`/`decodeList`,
 * which know whether the key is a list. Errors name file:line.
 */
export function parseKeyFile(text: string, file: string): KeyFile {
  const groups: KeyFile = new Map();
  let current: Map<string, string> | undefined;
  const lines = text.split('\n');
  for (let n = 0; n < lines.length; n++) {
    const where = `${file}:${n + 1}`;
    const line = (lines[n] ?? '').replace(/\r$/, '').replace(/^[ \t]+/, '');
    if (line === '' || line.startsWith('#')) continue;
    if (line.startsWith('[')) {
      const m = /^\[([^\][]+)\][ \t]*$/.exec(line);
      if (!m?.[1]) throw new UserError('LAMA_E_KEYFILE', `malformed group header '${line}'`, { where });
      if (groups.has(m[1])) throw new UserError('LAMA_E_KEYFILE', `duplicate group [${m[1]}]`, { where });
      current = new Map();
      groups.set(m[1], current);
      continue;
    }
    const eq = line.indexOf('=');
    if (eq <= 0) throw new UserError('LAMA_E_KEYFILE', `expected 'key=value', got '${line}'`, { where });
    if (!current) throw new UserError('LAMA_E_KEYFILE', `key outside of any [group]`, { where });
    const key = line.slice(0, eq).trimEnd();
    // Localised keys (name[de]) are not used by RAUC; GKeyFile keeps them apart from the plain key.
    if (!/^[A-Za-z0-9-_.[\]@]+$/.test(key)) throw new UserError('LAMA_E_KEYFILE', `invalid key name '${key}'`, { where });
    if (current.has(key)) throw new UserError('LAMA_E_KEYFILE', `duplicate key '${key}'`, { where });
    current.set(key, line.slice(eq + 1).replace(/^[ \t]+/, ''));
  }
  return groups;
}

/** Serialise raw values like g_key_file_to_data: "[group]\nkey=value\n" with one empty line between groups. */
export function serializeKeyFile(kf: KeyFile): string {
  const parts: string[] = [];
  for (const [name, keys] of kf) {
    let s = `[${name}]\n`;
    for (const [k, v] of keys) s += `${k}=${v}\n`;
    parts.push(s);
  }
  return parts.join('\n');
}
