import { mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadKasFile, loadKasSchema, validateKasFile, type KasSchema } from '../../src/kas/index.js';
import { run } from '../../src/util/proc.js';
import { REPO_ROOT } from '../helpers/cli.js';

/**
 * Differential test of kas schema validation: kas validates its files with Python's jsonschema
 * (Draft 7); the toolkit uses ajv. Both must reach the same verdict on the repository's kas files,
 * the fixtures and a set of mutations of them.
 */

const SCHEMA = path.resolve(REPO_ROOT, '../shared/reference/kas/schema-kas-5.4.json');
const PEER = `
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
v = jsonschema.Draft7Validator(schema)
out = {}
for f in json.load(sys.stdin):
    doc = yaml.safe_load(open(f))
    out[f] = sorted('/'.join(str(p) for p in e.absolute_path) for e in v.iter_errors(doc))
print(json.dumps(out))
`;

let tmp: string;
let schema: KasSchema;

function kasFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir)) {
    const p = path.join(dir, e);
    if (statSync(p).isDirectory()) out.push(...kasFiles(p));
    else if (/\.ya?ml$/.test(e) && p.includes(`${path.sep}kas${path.sep}`)) out.push(p);
  }
  return out;
}

/** A valid kas file the mutations start from (each mutation adds keys it does not have). */
const BASE = 'header:\n  version: 14\nmachine: lamadist-x86-64\ndistro: lamadist\ntarget: lama-image-base\n';

/** Mutations of a valid kas file, each either valid or invalid under the schema. */
const MUTATIONS: Record<string, (text: string) => string> = {
  unknownTopKey: (t) => `${t}\nmachnie: x\n`,
  machineList: (t) => `${t.replace(/^machine:.*$/m, '')}\nmachine: [a, b]\n`,
  versionString: (t) => t.replace(/version: \d+/, 'version: "14"'),
  versionOld: (t) => t.replace(/version: \d+/, 'version: "0.10"'),
  versionNew: (t) => t.replace(/version: \d+/, 'version: 24'),
  includeDict: (t) => t.replace(/^header:\n/m, 'header:\n  includes:\n    - repo: lamadist\n      file: kas/x.yml\n'),
  includeBadDict: (t) => t.replace(/^header:\n/m, 'header:\n  includes:\n    - repo: lamadist\n'),
  headerExtra: (t) => t.replace(/^header:\n/m, 'header:\n  flavour: x\n'),
  localConfInt: (t) => `${t}\nlocal_conf_header:\n  x: 5\n`,
  repoLayersList: (t) => `${t}\nrepos:\n  foo:\n    url: https://example.org/foo\n    layers: [a, b]\n`,
  repoUnknownKey: (t) => `${t}\nrepos:\n  foo:\n    url: https://example.org/foo\n    brnach: main\n`,
  targetList: (t) => `${t.replace(/^target:.*$/m, '')}\ntarget: [a, b]\n`,
  envNull: (t) => `${t}\nenv:\n  FOO: null\n`,
};

beforeAll(async () => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'lamadist-kas-peer-'));
  schema = await loadKasSchema(SCHEMA);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

async function peer(files: string[]): Promise<Record<string, string[]>> {
  const r = await run('/usr/bin/python3', ['-c', PEER, SCHEMA], { input: JSON.stringify(files) });
  return JSON.parse(r.stdout) as Record<string, string[]>;
}

async function ours(file: string): Promise<number | 'unparsable'> {
  try {
    return validateKasFile(await loadKasFile(file, path.dirname(file)), schema).length;
  } catch {
    return 'unparsable';
  }
}

describe('kas schema validation agrees with Python jsonschema (what kas uses)', () => {
  it('on the repository, the fixtures and mutations of them', async () => {
    const originals = [...kasFiles(path.join(REPO_ROOT, 'kas')), ...kasFiles(path.join(REPO_ROOT, 'test/fixtures/check'))];
    const files: string[] = [];
    for (const f of originals) {
      if ((await ours(f)) === 'unparsable') continue;
      files.push(f);
    }
    for (const [name, mutate] of Object.entries(MUTATIONS)) {
      const f = path.join(tmp, `${name}.yml`);
      writeFileSync(f, mutate(BASE));
      files.push(f);
    }
    const verdicts = await peer(files);
    let invalid = 0;
    for (const f of files) {
      const n = await ours(f);
      const peerErrors = verdicts[f] ?? [];
      expect({ file: path.relative(REPO_ROOT, f), valid: n === 0 }).toEqual({ file: path.relative(REPO_ROOT, f), valid: peerErrors.length === 0 });
      if (peerErrors.length > 0) invalid++;
    }
    // the comparison covers both verdicts
    expect(invalid).toBeGreaterThanOrEqual(10);
    expect(files.length - invalid).toBeGreaterThanOrEqual(10);
  });
});
