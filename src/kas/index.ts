import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { UserError, isErrno, type ErrorCode } from '../errors.js';
import { parseYamlLocated, type LocatedYaml } from '../util/yaml.js';

/**
 * kas configuration handling done by the toolkit itself: loading with file:line:col locations,
 * include resolution and merging with kas's semantics, and validation against the JSON schema that
 * a given kas release ships. This lets `lamadist dump` and `lamadist check` work offline and
 * without kas 4+ on the host.
 */

/** One problem found in a kas file, located at file:line:col. */
export interface KasProblem {
  where: string;
  code: ErrorCode;
  message: string;
}

/** A parsed kas file with its path relative to the repository root. */
export interface KasFile {
  path: string;
  rel: string;
  yaml: LocatedYaml<Record<string, unknown>>;
}

/** The result of composing one or more kas files and their includes. */
export interface KasComposition {
  /** Every file that contributed, in merge order (includes before their includer). */
  files: KasFile[];
  /** The merged configuration as kas would see it, without `header.includes`. */
  config: Record<string, unknown>;
  /** file:line:col of the value that won the merge at `keyPath` (the last file defining it). */
  origin(keyPath: readonly (string | number)[]): string;
}

type Dict = Record<string, unknown>;

function isDict(v: unknown): v is Dict {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Merge `upd` into a copy of `base` the way kas does: mappings merge key by key recursively, any
 * other value (scalars, lists, null) replaces what was there. This covers `repos`, their `layers`,
 * and the named entries of `local_conf_header` / `bblayers_conf_header`, which kas keys by name
 * precisely so that later files can override or extend single entries.
 */
export function mergeKas(base: Dict, upd: Dict): Dict {
  const out: Dict = { ...base };
  for (const [key, value] of Object.entries(upd)) {
    const prev = out[key];
    out[key] = isDict(prev) && isDict(value) ? mergeKas(prev, value) : structuredClone(value);
  }
  return out;
}

/** Load and parse one kas file; YAML errors become LAMA_E_YAML at file:line:col. */
export async function loadKasFile(file: string, repoRoot: string): Promise<KasFile> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `kas file ${rel(repoRoot, file)} does not exist`);
    throw err;
  }
  const shown = rel(repoRoot, file);
  const yaml = parseYamlLocated<Record<string, unknown>>(text, shown);
  if (!isDict(yaml.value)) {
    throw new UserError('LAMA_E_KAS_FORMAT', 'a kas file must be a mapping with a header', { where: `${shown}:1:1` });
  }
  return { path: file, rel: shown, yaml };
}

function rel(root: string, file: string): string {
  const r = path.relative(root, file);
  return r.startsWith('..') ? file : r;
}

/** Repository keys in `repos` that denote the project's own checkout (no url and no path). */
function localRepoKeys(config: Dict): Set<string> {
  const keys = new Set<string>();
  const repos = config.repos;
  if (!isDict(repos)) return keys;
  for (const [k, v] of Object.entries(repos)) {
    if (v === null || (isDict(v) && v.url === undefined && v.path === undefined)) keys.add(k);
  }
  return keys;
}

/**
 * Resolve an include entry. kas resolves string includes relative to the repository root of the
 * including file, and still accepts the older form relative to the including file's directory.
 * Dict includes name a repository; offline only the project's own repository can be read.
 */
function resolveInclude(entry: unknown, from: KasFile, index: number, repoRoot: string, known: Dict): string {
  const where = from.yaml.where(['header', 'includes', index], 'value');
  let target: string;
  if (typeof entry === 'string') {
    target = entry;
  } else if (isDict(entry) && typeof entry.repo === 'string' && typeof entry.file === 'string') {
    if (!localRepoKeys(known).has(entry.repo)) {
      throw new UserError(
        'LAMA_E_KAS_REMOTE_INCLUDE',
        `include from repository '${entry.repo}' needs that repository checked out; only the project's own repository can be composed offline`,
        { where },
      );
    }
    target = entry.file;
  } else {
    throw new UserError('LAMA_E_KAS_INCLUDE', 'an include must be a path or a {repo, file} mapping', { where });
  }
  if (path.isAbsolute(target)) return target;
  const fromRoot = path.join(repoRoot, target);
  if (existsSync(fromRoot)) return fromRoot;
  const fromDir = path.join(path.dirname(from.path), target);
  if (existsSync(fromDir)) return fromDir;
  throw new UserError('LAMA_E_KAS_INCLUDE', `included kas file '${target}' does not exist`, { where });
}

/**
 * Compose kas files exactly as `kas build a.yml:b.yml` would: each file's includes are merged
 * depth-first before the file itself, files given later override earlier ones, and a file included
 * twice is merged only at its first occurrence (kas drops repeats). Include cycles are errors.
 */
export async function composeKas(files: readonly string[], options: { repoRoot: string }): Promise<KasComposition> {
  const repoRoot = path.resolve(options.repoRoot);
  const order: KasFile[] = [];
  const seen = new Set<string>();
  let config: Dict = {};

  const visit = async (file: string, stack: string[], includedAt?: string): Promise<void> => {
    const abs = path.resolve(file);
    if (stack.includes(abs)) {
      throw new UserError('LAMA_E_KAS_INCLUDE_CYCLE', `include cycle: ${[...stack, abs].map((f) => rel(repoRoot, f)).join(' -> ')}`, {
        where: includedAt,
      });
    }
    if (seen.has(abs)) return;
    const kf = await loadKasFile(abs, repoRoot);
    const header = kf.yaml.value.header;
    const includes = isDict(header) && Array.isArray(header.includes) ? header.includes : [];
    for (const [i, entry] of includes.entries()) {
      // Only the repos decide which includes are local; merging the whole file (its includes list
      // too) for each include made a long list quadratic.
      const target = resolveInclude(entry, kf, i, repoRoot, mergeKas({ repos: config.repos ?? {} }, { repos: kf.yaml.value.repos ?? {} }));
      await visit(target, [...stack, abs], kf.yaml.where(['header', 'includes', i], 'value'));
    }
    seen.add(abs);
    order.push(kf);
    config = mergeKas(config, kf.yaml.value);
  };

  for (const f of files) await visit(path.resolve(repoRoot, f), []);
  const header = isDict(config.header) ? { ...config.header } : {};
  delete header.includes;
  config.header = header;

  const origin = (keyPath: readonly (string | number)[]): string => {
    for (let i = order.length - 1; i >= 0; i--) {
      const kf = order[i];
      if (kf && getPath(kf.yaml.value, keyPath) !== undefined) return kf.yaml.where(keyPath);
    }
    const last = order[order.length - 1];
    return last ? `${last.rel}:1:1` : repoRoot;
  };
  return { files: order, config, origin };
}

/** The value at `keyPath` inside nested mappings and lists, or undefined. */
export function getPath(value: unknown, keyPath: readonly (string | number)[]): unknown {
  let cur: unknown = value;
  for (const seg of keyPath) {
    if (Array.isArray(cur) && typeof seg === 'number') cur = cur[seg];
    else if (isDict(cur)) cur = cur[String(seg)];
    else return undefined;
  }
  return cur;
}

/**
 * What to build: the BSP, optional extras (kas/extras/<name>.kas.yml), scanners
 * (kas/scanners/<name>.kas.yml: CVE reports, SBOM settings) and the installer overlay.
 */
export interface KasSelection {
  bsp: string;
  extras?: readonly string[];
  scanners?: readonly string[];
  installer?: boolean;
}

/** The kas files, relative to the repository root, for a selection, in kas's merge order. */
export function kasFilesFor(sel: KasSelection): string[] {
  return [
    'kas/main.kas.yml',
    `kas/bsp/${sel.bsp}.kas.yml`,
    ...(sel.extras ?? []).map((x) => `kas/extras/${x}.kas.yml`),
    ...(sel.scanners ?? []).map((x) => `kas/scanners/${x}.kas.yml`),
    ...(sel.installer ? ['kas/installer.kas.yml'] : []),
  ];
}

/** The single colon-separated argument kas takes for a selection. */
export function kasConfigArg(sel: KasSelection): string {
  return kasFilesFor(sel).join(':');
}

/**
 * The project's own schema of the kas configuration format (the format versions the pinned kas
 * accepts), shipped in the package's schema/ directory; the same relative path holds from src/ and
 * from dist/. `lamadist check` falls back to it when no kas installation supplies its schema.
 */
export const KAS_PROJECT_SCHEMA = fileURLToPath(new URL('../../schema/kas-project.schema.json', import.meta.url));

/** A compiled kas JSON schema and the highest header format version it accepts. */
export interface KasSchema {
  file: string;
  validate: ValidateFunction;
  maxFormatVersion: number | undefined;
}

/** Load a kas JSON schema file (draft-07, as kas ships it) and compile it. */
export async function loadKasSchema(file: string): Promise<KasSchema> {
  let raw: string;
  try {
    raw = await fs.readFile(file, 'utf8');
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `kas schema ${file} does not exist (give one with --kas-schema)`);
    throw err;
  }
  let schema: Dict;
  try {
    schema = JSON.parse(raw) as Dict;
  } catch (err) {
    throw new UserError('LAMA_E_KAS_SCHEMA', `kas schema ${file} is not valid JSON: ${(err as Error).message}`);
  }
  const ajv = new Ajv({ allErrors: true, strict: false });
  const validate = ajv.compile(schema);
  const version = getPath(schema, ['properties', 'header', 'properties', 'version', 'anyOf']);
  const max = Array.isArray(version)
    ? version.map((v) => (isDict(v) && typeof v.maximum === 'number' ? v.maximum : undefined)).find((v) => v !== undefined)
    : undefined;
  return { file, validate, maxFormatVersion: max };
}

function pointerToPath(pointer: string, value: unknown): (string | number)[] {
  const out: (string | number)[] = [];
  if (pointer === '') return out;
  let cur: unknown = value;
  for (const raw of pointer.slice(1).split('/')) {
    const seg = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    if (Array.isArray(cur)) {
      out.push(Number(seg));
      cur = cur[Number(seg)];
    } else {
      out.push(seg);
      cur = isDict(cur) ? cur[seg] : undefined;
    }
  }
  return out;
}

/**
 * Reduce ajv's error list to what a person should fix: one error per location, preferring the
 * precise keyword (an unknown key, a wrong type) over the anyOf/oneOf summaries that wrap it.
 */
function significant(errors: readonly ErrorObject[]): ErrorObject[] {
  const byPath = new Map<string, ErrorObject>();
  for (const e of errors.filter((x) => !otherAlternative(x, errors))) {
    const key = e.keyword === 'additionalProperties' ? `${e.instancePath}/${String(e.params.additionalProperty)}` : e.instancePath;
    const prev = byPath.get(key);
    const vague = (x: ErrorObject): boolean => x.keyword === 'anyOf' || x.keyword === 'oneOf';
    if (!prev || (vague(prev) && !vague(e))) byPath.set(key, e);
  }
  const kept = [...byPath.values()];
  // A wrapper error is redundant when a precise error sits at or below its location.
  return kept.filter(
    (e) =>
      !(e.keyword === 'anyOf' || e.keyword === 'oneOf') ||
      !kept.some((o) => o !== e && o.keyword !== 'anyOf' && o.keyword !== 'oneOf' && o.instancePath.startsWith(e.instancePath)),
  );
}

const SHAPE = new Set(['type', 'enum', 'const']);

/**
 * Whether `e` only says the value does not have the shape of one alternative of an anyOf/oneOf
 * (wrong type, not one of an enum) while it has the shape of another alternative, which failed
 * inside: the author meant that other one, so "repos.x must be null" next to "unknown key" is noise.
 */
function otherAlternative(e: ErrorObject, errors: readonly ErrorObject[]): boolean {
  const m = SHAPE.has(e.keyword) ? /^(.*\/(?:anyOf|oneOf))\/(\d+)\/[^/]+$/.exec(e.schemaPath) : null;
  if (!m) return false;
  const [, choice, branch] = m;
  return errors.some(
    (o) =>
      o.keyword !== 'anyOf' &&
      o.keyword !== 'oneOf' &&
      o.instancePath.startsWith(e.instancePath) &&
      (o.instancePath !== e.instancePath || !SHAPE.has(o.keyword)) &&
      o.schemaPath.startsWith(`${choice}/`) &&
      !o.schemaPath.startsWith(`${choice}/${branch}/`),
  );
}

/** Validate one kas file against a kas schema; every problem is located at file:line:col. */
export function validateKasFile(kf: KasFile, schema: KasSchema): KasProblem[] {
  const value = kf.yaml.value;
  const problems: KasProblem[] = [];
  const header = value.header;
  const version = isDict(header) ? header.version : undefined;
  if (typeof version === 'number' && schema.maxFormatVersion !== undefined && version > schema.maxFormatVersion) {
    problems.push({
      where: kf.yaml.where(['header', 'version'], 'value'),
      code: 'LAMA_E_KAS_VERSION',
      message: `kas format version ${version} is newer than the pinned kas supports (at most ${schema.maxFormatVersion})`,
    });
  }
  if (schema.validate(value)) return problems;
  for (const e of significant(schema.validate.errors ?? [])) {
    const p = pointerToPath(e.instancePath, value);
    if (p.length === 2 && p[0] === 'header' && p[1] === 'version' && problems.length > 0) continue;
    if (e.keyword === 'additionalProperties') {
      const key = String(e.params.additionalProperty);
      problems.push({ where: kf.yaml.where([...p, key], 'key'), code: 'LAMA_E_KAS_UNKNOWN_KEY', message: `unknown kas key '${key}'${p.length ? ` in ${p.join('.')}` : ''}` });
    } else if (e.keyword === 'required') {
      problems.push({
        where: kf.yaml.where(p, 'key'),
        code: 'LAMA_E_KAS_SCHEMA',
        message: `missing required key '${String(e.params.missingProperty)}'${p.length ? ` in ${p.join('.')}` : ''}`,
      });
    } else {
      problems.push({
        where: kf.yaml.where(p, 'value'),
        code: 'LAMA_E_KAS_SCHEMA',
        message: `${p.length ? p.join('.') : 'file'} ${e.message ?? 'is invalid'}`,
      });
    }
  }
  return problems;
}
