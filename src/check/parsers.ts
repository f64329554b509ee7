/**
 * Small located parsers for the non-YAML formats `lamadist check` reads: wic kickstart (.wks/.wks.in),
 * RAUC system.conf (INI) and BitBake configuration (layer.conf, machine configs). They keep the
 * line and column of every token so each problem can be reported as file:line:col.
 */

/** A position in a file, 1-based like compilers print it. */
export interface Pos {
  line: number;
  col: number;
}

/** `file:line:col` for a position. */
export function at(file: string, pos: Pos): string {
  return `${file}:${pos.line}:${pos.col}`;
}

interface Token {
  text: string;
  col: number;
}

/** Split a line into shell-like words, honouring single and double quotes, keeping columns. */
function words(line: string): Token[] {
  const out: Token[] = [];
  let i = 0;
  while (i < line.length) {
    while (i < line.length && /\s/.test(line[i] ?? '')) i++;
    if (i >= line.length) break;
    const start = i;
    let text = '';
    while (i < line.length && !/\s/.test(line[i] ?? '')) {
      const ch = line[i] ?? '';
      if (ch === '"' || ch === "'") {
        const end = line.indexOf(ch, i + 1);
        const stop = end < 0 ? line.length : end;
        text += line.slice(i + 1, stop);
        i = stop + 1;
      } else {
        text += ch;
        i++;
      }
    }
    out.push({ text, col: start + 1 });
  }
  return out;
}

/** One `part` or `bootloader` directive of a wks file. */
export interface WksDirective {
  kind: string;
  pos: Pos;
  /** Mount point or partition name given right after `part` (may be absent). */
  target?: { text: string; pos: Pos };
  /** Options by name without the dashes; value '' for flags. */
  options: Map<string, { value: string; pos: Pos }>;
}

/** wic options that take no value; every other `--option` consumes the next word. */
const WKS_FLAGS = new Set(['active', 'no-table', 'use-uuid', 'use-label', 'no-fstab-update', 'hidden', 'mbr']);

/** Parse a wic kickstart file into its directives; comments and blank lines are skipped. */
export function parseWks(text: string): WksDirective[] {
  const out: WksDirective[] = [];
  const lines = text.split('\n');
  for (const [n, raw] of lines.entries()) {
    const line = raw.replace(/\r$/, '');
    if (/^\s*(#|$)/.test(line)) continue;
    const toks = words(line);
    const first = toks[0];
    if (!first) continue;
    const d: WksDirective = { kind: first.text, pos: { line: n + 1, col: first.col }, options: new Map() };
    for (let i = 1; i < toks.length; i++) {
      const t = toks[i];
      if (!t) continue;
      if (!t.text.startsWith('--')) {
        if (i === 1) d.target = { text: t.text, pos: { line: n + 1, col: t.col } };
        continue;
      }
      const eq = t.text.indexOf('=');
      if (eq > 0) {
        d.options.set(t.text.slice(2, eq), { value: t.text.slice(eq + 1), pos: { line: n + 1, col: t.col + eq + 1 } });
        continue;
      }
      const name = t.text.slice(2);
      const next = toks[i + 1];
      if (!WKS_FLAGS.has(name) && next && !next.text.startsWith('--')) {
        d.options.set(name, { value: next.text, pos: { line: n + 1, col: next.col } });
        i++;
      } else {
        d.options.set(name, { value: '', pos: { line: n + 1, col: t.col } });
      }
    }
    out.push(d);
  }
  return out;
}

/**
 * A wic size ("512M", "2G", "1024K", or a bare number of MiB, as wic reads it) in MiB, or undefined
 * when it is not a literal (a `${VAR}` expanded by BitBake).
 */
export function wksSizeMiB(value: string): number | undefined {
  const m = /^(\d+)([KMG]?)$/i.exec(value.trim());
  if (!m) return undefined;
  const n = Number(m[1]);
  switch ((m[2] ?? '').toUpperCase()) {
    case 'K':
      return n / 1024;
    case 'G':
      return n * 1024;
    default:
      return n;
  }
}

/** One INI section with its keys, as RAUC's system.conf uses them. */
export interface IniSection {
  name: string;
  pos: Pos;
  keys: Map<string, { value: string; pos: Pos; keyPos: Pos }>;
}

/** A syntax problem in a line-based file. */
export interface ParseIssue {
  pos: Pos;
  message: string;
}

/** Parse an INI file (GLib key-file syntax, which RAUC uses). */
export function parseIni(text: string): { sections: IniSection[]; issues: ParseIssue[] } {
  const sections: IniSection[] = [];
  const issues: ParseIssue[] = [];
  let cur: IniSection | undefined;
  for (const [n, raw] of text.split('\n').entries()) {
    const line = raw.replace(/\r$/, '');
    const lead = line.length - line.trimStart().length;
    const body = line.trim();
    if (body === '' || body.startsWith('#') || body.startsWith(';')) continue;
    const pos = { line: n + 1, col: lead + 1 };
    const sec = /^\[([^\]]+)\]$/.exec(body);
    if (sec) {
      const name = (sec[1] ?? '').trim();
      if (sections.some((s) => s.name === name)) issues.push({ pos, message: `section [${name}] appears twice` });
      cur = { name, pos, keys: new Map() };
      sections.push(cur);
      continue;
    }
    const eq = line.indexOf('=');
    if (eq < 0) {
      issues.push({ pos, message: `expected 'key=value' or '[section]', got '${body}'` });
      continue;
    }
    if (!cur) {
      issues.push({ pos, message: 'key outside of any [section]' });
      continue;
    }
    const key = line.slice(0, eq).trim();
    const after = line.slice(eq + 1);
    const valueCol = eq + 2 + (after.length - after.trimStart().length);
    if (cur.keys.has(key)) issues.push({ pos, message: `key '${key}' appears twice in [${cur.name}]` });
    cur.keys.set(key, { value: after.trim(), pos: { line: n + 1, col: valueCol }, keyPos: pos });
  }
  return { sections, issues };
}

/** One BitBake variable assignment. */
export interface BbAssignment {
  name: string;
  op: string;
  value: string;
  pos: Pos;
  valuePos: Pos;
}

/**
 * Parse the assignments of a BitBake configuration file (`VAR = "x"`, `+=`, `?=`, `:append`, line
 * continuations). Anything else (include, require, inherit, python functions) is skipped: only the
 * assignments matter for the sanity checks.
 */
export function parseBbConf(text: string): BbAssignment[] {
  const out: BbAssignment[] = [];
  const lines = text.split('\n');
  for (let n = 0; n < lines.length; n++) {
    let line = (lines[n] ?? '').replace(/\r$/, '');
    const startLine = n + 1;
    while (line.endsWith('\\') && n + 1 < lines.length) {
      n++;
      line = line.slice(0, -1) + ' ' + (lines[n] ?? '').trim();
    }
    const m = /^(\s*)(?:export\s+)?([A-Za-z0-9_${}:.\-/+~@]+?)\s*(\?\?=|\?=|:=|\+=|=\+|\.=|=\.|=)\s*(.*)$/.exec(line);
    if (!m || line.trimStart().startsWith('#')) continue;
    const [, lead = '', name = '', op = '', rest = ''] = m;
    const valueStart = line.length - rest.length;
    const value = rest.replace(/^"(.*)"\s*$/, '$1').replace(/^'(.*)'\s*$/, '$1');
    out.push({
      name,
      op,
      value,
      pos: { line: startLine, col: lead.length + 1 },
      valuePos: { line: startLine, col: valueStart + 1 + (rest.startsWith('"') || rest.startsWith("'") ? 1 : 0) },
    });
  }
  return out;
}
