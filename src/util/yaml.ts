import {
  LineCounter,
  parseDocument,
  visit,
  isMap,
  isSeq,
  isScalar,
  isPair,
  type Alias,
  type Node,
  type Document,
} from 'yaml';
import { UserError } from '../errors.js';

/** A parsed YAML document that can map any path inside it back to file:line:col. */
export interface LocatedYaml<T = unknown> {
  file: string;
  value: T;
  doc: Document.Parsed;
  /** `file:line:col` of the node at `path` (keys and indexes), or of the nearest existing parent. */
  where(path: readonly (string | number)[], part?: 'key' | 'value'): string;
}

/**
 * Parse YAML, turning syntax errors into a UserError located at file:line:col. Duplicate keys are
 * errors (YAML 1.2 says so, and silently taking the last one hides mistakes in kas files).
 */
export function parseYamlLocated<T = unknown>(text: string, file: string): LocatedYaml<T> {
  const lineCounter = new LineCounter();
  // logLevel 'error': the library's warnings (a collection used as a key) go to process.emitWarning,
  // a second stderr line; such keys are stringified and then refused by the caller's own checks.
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true, logLevel: 'error' });
  const first = doc.errors[0];
  if (first) {
    const pos = lineCounter.linePos(first.pos[0]);
    const message = first.message.split('\n')[0] ?? first.message;
    throw new UserError('LAMA_E_YAML', message, { where: `${file}:${pos.line}:${pos.col}` });
  }
  const at = (offset: number): string => {
    const p = lineCounter.linePos(offset);
    return `${file}:${p.line}:${p.col}`;
  };
  // The parser accepts an alias to an anchor that does not exist (yet); only toJS() notices, with a
  // ReferenceError that carries no position.
  const aliases: Alias[] = [];
  visit(doc, { Alias: (_, node) => void aliases.push(node) });
  for (const a of aliases) {
    if (!a.resolve(doc))
      throw new UserError('LAMA_E_YAML', `alias *${a.source} names no anchor defined before it`, {
        where: at(a.range?.[0] ?? 0),
      });
  }
  const where = (p: readonly (string | number)[], part: 'key' | 'value' = 'key'): string => {
    let node: Node | null | undefined = doc.contents as Node | null;
    let keyNode: Node | undefined;
    let last: Node | undefined = node ?? undefined;
    for (const seg of p) {
      if (isMap(node)) {
        const pair = node.items.find((it) => isPair(it) && isScalar(it.key) && String(it.key.value) === String(seg));
        if (!pair) break;
        keyNode = pair.key as Node;
        node = pair.value as Node | null;
        last = part === 'key' ? keyNode : (node ?? keyNode);
      } else if (isSeq(node) && typeof seg === 'number') {
        const item = node.items[seg] as Node | undefined;
        if (!item) break;
        node = item;
        keyNode = undefined;
        last = item;
      } else {
        break;
      }
    }
    const range = last?.range;
    return range ? at(range[0]) : `${file}:1:1`;
  };
  let value: T;
  try {
    value = doc.toJS({ maxAliasCount: 100 }) as T;
  } catch (e) {
    // Alias expansion beyond the limit (a "billion laughs" document) is the remaining way to fail.
    if (!(e instanceof ReferenceError)) throw e;
    throw new UserError('LAMA_E_YAML', `${e.message} (aliases expand too much)`, {
      where: at(aliases[0]?.range?.[0] ?? 0),
    });
  }
  return { file, value, doc, where };
}
