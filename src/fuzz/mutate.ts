import { parseDocument, stringify } from 'yaml';

/**
 * Deterministic mutations. Every case gets its own generator seeded from (run seed, target, case
 * number), so one failing case is reproduced from three numbers without replaying the run.
 */
export class Rng {
  private s: number;

  constructor(seed: number) {
    this.s = seed >>> 0 || 0x9e3779b9;
  }

  /** Seed of case `n` of `target` in a run seeded with `seed` (FNV-1a over the three). */
  static forCase(seed: number, target: string, n: number): Rng {
    let h = 0x811c9dc5;
    for (const ch of `${seed}/${target}/${n}`) h = Math.imul(h ^ ch.charCodeAt(0), 0x01000193);
    return new Rng(h);
  }

  /** xorshift32: fast, and the same sequence on every platform. */
  u32(): number {
    let x = this.s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.s = x >>> 0;
    return this.s;
  }

  /** Integer in [0, n). */
  int(n: number): number {
    return n <= 0 ? 0 : Math.floor((this.u32() / 0x100000000) * n);
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)] as T;
  }

  chance(p: number): boolean {
    return this.u32() / 0x100000000 < p;
  }

  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff;
    return b;
  }
}

/** Byte ranges `[start, end)` where the parser's structures live; mutations land there mostly. */
export type Regions = readonly (readonly [number, number])[];

const INTERESTING8 = [0x00, 0xff, 0x7f, 0x80, 0x01, 0x10, 0x20, 0x40];

function interestingWord(rng: Rng, length: number): bigint {
  return rng.pick([
    0n,
    1n,
    0x7fn,
    0x80n,
    0xffn,
    0x7fffn,
    0x8000n,
    0xffffn,
    0x7fffffffn,
    0x80000000n,
    0xffffffffn,
    0xffffffffffffffffn,
    0x7fffffffffffffffn,
    512n,
    4096n,
    65536n,
    BigInt(length),
    BigInt(length + 1),
    BigInt(Math.max(0, length - 1)),
    BigInt(length * 2),
  ]);
}

function position(rng: Rng, length: number, regions: Regions): number {
  const inside = regions.filter(([a, b]) => a < length && b > a);
  if (inside.length > 0 && rng.chance(0.9)) {
    const [a, b] = rng.pick(inside);
    return a + rng.int(Math.min(b, length) - a);
  }
  return rng.int(length);
}

/** The names of the binary mutations, for the report of a failing case. */
export type BinaryMutation = 'bitflip' | 'byte' | 'word' | 'truncate' | 'extend' | 'duplicate' | 'remove';

/**
 * One to four stacked binary mutations of `input`: bit flips, bytes and 16/32/64-bit words (either
 * byte order) set to boundary values and lengths, truncation, extension, chunk duplication and
 * removal. Returns the mutated copy and what was done.
 */
export function mutateBytes(
  rng: Rng,
  input: Buffer,
  regions: Regions = [],
): { data: Buffer; steps: string[] } {
  let b: Buffer = Buffer.from(input);
  const steps: string[] = [];
  const count = 1 + rng.int(4);
  for (let i = 0; i < count; i++) {
    if (b.length === 0) {
      b = rng.bytes(1 + rng.int(64));
      steps.push(`fill ${b.length}`);
      continue;
    }
    const kind: BinaryMutation = rng.pick([
      'bitflip',
      'bitflip',
      'byte',
      'byte',
      'word',
      'word',
      'truncate',
      'extend',
      'duplicate',
      'remove',
    ]);
    const at = position(rng, b.length, regions);
    switch (kind) {
      case 'bitflip': {
        const bit = rng.int(8);
        b[at] = (b[at] as number) ^ (1 << bit);
        steps.push(`bitflip @${at}.${bit}`);
        break;
      }
      case 'byte': {
        const v = rng.chance(0.8) ? rng.pick(INTERESTING8) : rng.int(256);
        b[at] = v;
        steps.push(`byte @${at}=0x${v.toString(16)}`);
        break;
      }
      case 'word': {
        const width = rng.pick([2, 4, 8]);
        const w = interestingWord(rng, b.length) & ((1n << BigInt(width * 8)) - 1n);
        const le = rng.chance(0.6);
        for (let k = 0; k < width && at + k < b.length; k++) {
          const shift = BigInt(8 * (le ? k : width - 1 - k));
          b[at + k] = Number((w >> shift) & 0xffn);
        }
        steps.push(`u${width * 8}${le ? 'le' : 'be'} @${at}=0x${w.toString(16)}`);
        break;
      }
      case 'truncate':
        b = b.subarray(0, at);
        steps.push(`truncate ${at}`);
        break;
      case 'extend': {
        const n = rng.pick([1, 7, 512, 4096, 1 + rng.int(8192)]);
        b = Buffer.concat([b, rng.chance(0.5) ? Buffer.alloc(n) : rng.bytes(n)]);
        steps.push(`extend ${n}`);
        break;
      }
      case 'duplicate': {
        const len = 1 + rng.int(Math.min(512, b.length - at));
        const to = position(rng, b.length, regions);
        b = Buffer.concat([b.subarray(0, to), b.subarray(at, at + len), b.subarray(to)]);
        steps.push(`duplicate ${at}+${len} @${to}`);
        break;
      }
      case 'remove': {
        const len = 1 + rng.int(Math.min(512, b.length - at));
        b = Buffer.concat([b.subarray(0, at), b.subarray(at + len)]);
        steps.push(`remove ${at}+${len}`);
        break;
      }
    }
  }
  return { data: b, steps };
}

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

const HOSTILE_KEYS = ['__proto__', 'toString', 'constructor', 'valueOf', 'hasOwnProperty', ''];

/** A plain object with `key` as an own enumerable property, even for `__proto__`. */
function setOwn(o: Record<string, Json>, key: string, value: Json): void {
  Object.defineProperty(o, key, { value, enumerable: true, writable: true, configurable: true });
}

/** Mutated documents larger than this are replaced by text damage: size is not what is being tested. */
export const MAX_MUTANT_TEXT = 1024 * 1024;

function replacementValue(rng: Rng, old: Json, state: { deep: boolean }): Json {
  const deep = (): Json => {
    // One deep value per case: two nested into each other overflow JSON.stringify itself.
    if (state.deep) return old;
    state.deep = true;
    let v: Json = rng.chance(0.5) ? 1 : 'x';
    const depth = rng.pick([64, 1000, 5000]);
    for (let i = 0; i < depth; i++) v = rng.chance(0.5) ? [v] : { a: v };
    return v;
  };
  const hostile = (): Json => {
    const o: Record<string, Json> = {};
    setOwn(o, rng.pick(HOSTILE_KEYS), rng.pick<Json>([1, 'x', null, {}, []]));
    return o;
  };
  const choices: (() => Json)[] = [
    () => null,
    () => true,
    () => 0,
    () => -1,
    () => 1e308,
    () => -1e308,
    () => 2 ** 53 + 1,
    () => 2 ** 64,
    () => 0.5,
    () => '',
    () => 'x'.repeat(rng.pick([256, 65536])),
    () => '\u0000\n\t"\\',
    () => '../../etc/passwd',
    () => [],
    () => ({}),
    () =>
      typeof old === 'number'
        ? String(old)
        : typeof old === 'string' && /^-?\d+$/.test(old)
          ? Number(old)
          : [old],
    () => [old, old],
    () => ({ value: old }),
    deep,
    hostile,
  ];
  return rng.pick(choices)();
}

/** Paths to every node of `v` (objects and arrays included), root first. */
function nodes(
  v: Json,
  at: (string | number)[] = [],
  out: (string | number)[][] = [],
): (string | number)[][] {
  out.push(at);
  // A value nested thousands deep by an earlier step stays a leaf: walking it would blow the stack.
  if (out.length > 2000 || at.length > 100) return out;
  if (Array.isArray(v)) v.forEach((x, i) => nodes(x, [...at, i], out));
  else if (v !== null && typeof v === 'object')
    for (const k of Object.keys(v)) nodes(v[k] as Json, [...at, k], out);
  return out;
}

function getAt(v: Json, p: readonly (string | number)[]): Json {
  let cur = v;
  for (const k of p) cur = (cur as Record<string | number, Json>)[k] as Json;
  return cur;
}

/**
 * One to three structural mutations of a JSON value: type swaps, huge and boundary numbers, long and
 * hostile strings, deep nesting, `__proto__`/`toString`/`constructor` keys, key deletion and
 * duplication. The input is not modified.
 */
export function mutateJson(rng: Rng, input: unknown): { value: unknown; steps: string[] } {
  let root = structuredClone(input) as Json;
  const steps: string[] = [];
  const state = { deep: false };
  const count = 1 + rng.int(3);
  for (let i = 0; i < count; i++) {
    const all = nodes(root);
    const p = rng.pick(all);
    const parentPath = p.slice(0, -1);
    const key = p[p.length - 1];
    const node = getAt(root, p);
    const op = rng.int(10);
    if (op < 5 || key === undefined) {
      const v = replacementValue(rng, node, state);
      if (key === undefined) root = v;
      else (getAt(root, parentPath) as Record<string | number, Json>)[key] = v;
      steps.push(`replace /${p.join('/')}`);
    } else if (op < 7) {
      const parent = getAt(root, parentPath);
      if (Array.isArray(parent)) parent.splice(key as number, 1);
      else delete (parent as Record<string, Json>)[key as string];
      steps.push(`delete /${p.join('/')}`);
    } else if (node !== null && typeof node === 'object' && !Array.isArray(node)) {
      const k = rng.pick(HOSTILE_KEYS);
      setOwn(node, k, rng.chance(0.5) ? { ...node } : replacementValue(rng, null, state));
      steps.push(`key ${JSON.stringify(k)} in /${p.join('/')}`);
    } else if (Array.isArray(node)) {
      const n = rng.pick([0, 300, 10000]);
      (getAt(root, parentPath) as Record<string | number, Json>)[key] =
        n === 0 ? [] : Array.from({ length: n }, () => node[0] ?? null);
      steps.push(`array of ${n} at /${p.join('/')}`);
    } else {
      (getAt(root, parentPath) as Record<string | number, Json>)[key] = replacementValue(rng, node, state);
      steps.push(`replace /${p.join('/')}`);
    }
  }
  return { value: root, steps };
}

/**
 * JSON text of a mutated value, or undefined when it is too large to be worth sending or too deep
 * for JSON.stringify itself (the deep values are built as values; the parser under test gets them
 * whenever the printer copes).
 */
export function jsonText(value: unknown): string | undefined {
  try {
    const text = JSON.stringify(value);
    return text.length <= MAX_MUTANT_TEXT ? text : undefined;
  } catch (err) {
    if (err instanceof RangeError) return undefined;
    throw err;
  }
}

/** Text-level damage shared by JSON and YAML: cut, duplicated or deleted lines, stray bytes. */
export function mutateText(rng: Rng, text: string): { text: string; steps: string[] } {
  const lines = text.split('\n');
  const op = rng.int(6);
  const i = rng.int(lines.length);
  switch (op) {
    case 0:
      return { text: text.slice(0, rng.int(text.length + 1)), steps: ['truncate'] };
    case 1:
      lines.splice(i, 0, lines[i] ?? '');
      return { text: lines.join('\n'), steps: [`duplicate line ${i + 1}`] };
    case 2:
      lines.splice(i, 1);
      return { text: lines.join('\n'), steps: [`delete line ${i + 1}`] };
    case 3: {
      const at = rng.int(text.length + 1);
      const junk = rng.pick([
        '\t',
        '\u0000',
        '\uFEFF',
        '"',
        "'",
        '{',
        '[',
        ':',
        '- ',
        '#',
        '\r',
        '\\',
        '%',
        '&',
        '*',
        '!',
        '|',
        '>',
        '\ud800',
      ]);
      return {
        text: text.slice(0, at) + junk + text.slice(at),
        steps: [`insert ${JSON.stringify(junk)} @${at}`],
      };
    }
    case 4: {
      const { data, steps } = mutateBytes(rng, Buffer.from(text));
      return { text: data.toString('latin1'), steps };
    }
    default:
      return { text: text + '\n' + 'x'.repeat(rng.pick([1, 100000])), steps: ['long tail'] };
  }
}

/** YAML-only constructs: undefined and recursive aliases, alias bombs, merge keys, tags, multi-doc. */
function yamlSpecial(rng: Rng, text: string): { text: string; steps: string[] } {
  const lines = text.split('\n');
  const keyLines = lines.map((l, i) => [l, i] as const).filter(([l]) => /^\s*[\w.-]+:\s*\S/.test(l));
  const [line, i] = keyLines.length > 0 ? rng.pick(keyLines) : (['x: 1', 0] as const);
  const key = line.slice(0, line.indexOf(':') + 1);
  const bomb = [
    'a: &a ["x","x","x","x","x","x","x","x","x"]',
    ...'bcdefghi'.split('').map((c, k) => `${c}: &${c} [${Array(9).fill(`*${'abcdefghi'[k]}`).join(',')}]`),
  ].join('\n');
  const variants: [string, () => string][] = [
    ['undefined alias', () => `${key} *nosuch`],
    ['anchor + alias', () => `${key} &anc ${line.slice(key.length).trim()}\nalias_again: *anc`],
    ['merge key', () => `${key}\n  <<: *nosuch`],
    ['custom tag', () => `${key} !nosuchtag ${line.slice(key.length).trim()}`],
    ['binary tag', () => `${key} !!binary AAAA`],
    ['explicit key', () => `? [a, b]\n: 1\n${line}`],
    ['second document', () => `${line}\n---\nfoo: bar`],
    ['alias bomb', () => `${bomb}\n${line}`],
    ['flow nesting', () => `${key} ${'['.repeat(rng.pick([100, 5000]))}`],
    ['proto key', () => `${line}\n__proto__: {polluted: 1}\ntoString: 1`],
  ];
  const [name, make] = rng.pick(variants);
  lines[i] = make();
  return { text: lines.join('\n'), steps: [name] };
}

/**
 * Mutate a YAML document three ways: structurally (parse, mutate the value as JSON, print it
 * again), at the text level, or with YAML-only constructs (aliases, anchors, tags, merge keys).
 */
export function mutateYaml(rng: Rng, text: string): { text: string; steps: string[] } {
  const op = rng.int(3);
  if (op === 0) {
    const doc = parseDocument(text, { logLevel: 'error' });
    if (doc.errors.length === 0) {
      const m = mutateJson(rng, doc.toJS({ maxAliasCount: -1 }) as unknown);
      try {
        const out = stringify(m.value, { aliasDuplicateObjects: false });
        if (out.length <= MAX_MUTANT_TEXT) return { text: out, steps: m.steps };
      } catch {
        // Values the YAML printer cannot emit (very deep nesting) fall through to text damage.
      }
    }
  }
  return op === 2 ? yamlSpecial(rng, text) : mutateText(rng, text);
}
