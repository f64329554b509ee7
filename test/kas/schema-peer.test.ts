import { mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { findInstalledKasSchema } from '../../src/check/index.js';
import { KAS_PROJECT_SCHEMA, loadKasFile, loadKasSchema, validateKasFile, type KasSchema } from '../../src/kas/index.js';
import { run } from '../../src/util/proc.js';
import { REPO_ROOT } from '../helpers/cli.js';
import { skipBecause } from '../helpers/skip.js';

/**
 * Differential tests of the project's own kas schema (schema/kas-project.schema.json), on the
 * repository's kas files, the fixtures and mutations of them:
 * - the toolkit validates with ajv, kas with Python's jsonschema (Draft 7): both reach the same
 *   verdict with the project's schema;
 * - the project's schema reaches the verdict of the schema kas itself publishes (schema-kas.json of
 *   the pinned release), validated as kas does, where such a schema is present: $LAMADIST_PEER_KAS_SCHEMA,
 *   the kas inside the local build container image, or a host installation of the pinned release.
 *   Debian 12's kas (3.1) is no peer: it knows format versions up to 12 only.
 */

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

const PEER_SCHEMA = process.env.LAMADIST_PEER_KAS_SCHEMA || (await findInstalledKasSchema(REPO_ROOT));

let tmp: string;
let schema: KasSchema;
let files: string[];

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

/** A repo entry `foo` with the given extra lines (indented under it). */
const repo = (...lines: string[]): ((t: string) => string) => (t) => `${t}\nrepos:\n  foo:\n    url: https://example.org/foo\n${lines.map((l) => `    ${l}\n`).join('')}`;
/** Appends top-level YAML. */
const add = (yaml: string): ((t: string) => string) => (t) => `${t}\n${yaml}\n`;
/** Replaces a top-level key's line. */
const set = (key: string, line: string): ((t: string) => string) => (t) => `${t.replace(new RegExp(`^${key}:.*$`, 'm'), '')}\n${line}\n`;
const header = (lines: string): ((t: string) => string) => (t) => t.replace(/^header:\n/m, `header:\n${lines}`);

/** Mutations of a valid kas file, each either valid or invalid under the format, covering every key. */
const MUTATIONS: Record<string, (text: string) => string> = {
  unknownTopKey: add('machnie: x'),
  noHeader: (t) => t.replace(/^header:\n {2}version: \d+\n/m, ''),
  noVersion: (t) => t.replace(/^ {2}version: \d+\n/m, '  includes: []\n'),
  machineList: set('machine', 'machine: [a, b]'),
  distroNull: set('distro', 'distro: null'),
  versionString: (t) => t.replace(/version: \d+/, 'version: "14"'),
  versionOld: (t) => t.replace(/version: \d+/, 'version: "0.10"'),
  versionOne: (t) => t.replace(/version: \d+/, 'version: 1'),
  versionZero: (t) => t.replace(/version: \d+/, 'version: 0'),
  versionFloat: (t) => t.replace(/version: \d+/, 'version: 14.5'),
  versionNewest: (t) => t.replace(/version: \d+/, 'version: 23'),
  versionNew: (t) => t.replace(/version: \d+/, 'version: 24'),
  includeString: header('  includes:\n    - kas/x.yml\n'),
  includeDict: header('  includes:\n    - repo: lamadist\n      file: kas/x.yml\n'),
  includeBadDict: header('  includes:\n    - repo: lamadist\n'),
  includeDictExtra: header('  includes:\n    - repo: lamadist\n      file: kas/x.yml\n      prio: 1\n'),
  includeNotList: header('  includes: kas/x.yml\n'),
  headerExtra: header('  flavour: x\n'),
  localConfInt: add('local_conf_header:\n  x: 5'),
  localConfText: add('local_conf_header:\n  x: |\n    FOO = "1"'),
  bblayersList: add('bblayers_conf_header: [a]'),
  bblayersText: add('bblayers_conf_header:\n  x: y'),
  targetList: set('target', 'target: [a, b]'),
  targetListInt: set('target', 'target: [a, 1]'),
  taskString: add('task: populate_sdk'),
  taskList: add('task: [a]'),
  envNull: add('env:\n  FOO: null'),
  envInt: add('env:\n  FOO: 1'),
  envList: add('env: [FOO]'),
  buildSystemOe: add('build_system: oe'),
  buildSystemRootless: add('build_system: isar-rootless'),
  buildSystemYocto: add('build_system: yocto'),
  reposNull: add('repos:\n  here: null'),
  reposEmpty: add('repos:\n  here:'),
  repoLayersList: repo('layers: [a, b]'),
  repoUnknownKey: repo('brnach: main'),
  repoFull: repo('name: bar', 'type: git', 'commit: 0123456789abcdef0123456789abcdef01234567', 'branch: scarthgap', 'path: layers/foo', 'signed: true', 'allowed_signers: [me]'),
  repoTypeSvn: repo('type: svn'),
  repoNameInt: repo('name: 5'),
  repoCommitInt: repo('commit: 1234'),
  repoBranchNull: repo('branch: null'),
  repoTagNull: repo('tag: null'),
  repoTagList: repo('tag: [a]'),
  repoRefspec: repo('refspec: main'),
  repoSignedString: repo('signed: "yes"'),
  repoSignersString: repo('allowed_signers: me'),
  repoPathNull: repo('path: null'),
  repoUrlNull: repo('url2: x'),
  layerNull: repo('layers:', '  meta-foo:'),
  layerDisabled: repo('layers:', '  meta-foo: disabled'),
  layerExcluded: repo('layers:', '  meta-foo: excluded'),
  layerZero: repo('layers:', '  meta-foo: 0'),
  layerFalse: repo('layers:', '  meta-foo: false'),
  layerTrue: repo('layers:', '  meta-foo: true'),
  layerMaybe: repo('layers:', '  meta-foo: maybe'),
  layerPrio: repo('layers:', '  meta-foo:', '    prio: 10'),
  layerPrioHigh: repo('layers:', '  meta-foo:', '    prio: 100'),
  layerPrioLow: repo('layers:', '  meta-foo:', '    prio: -99'),
  layerPrioFloat: repo('layers:', '  meta-foo:', '    prio: 1.5'),
  layerPrioExtra: repo('layers:', '  meta-foo:', '    prio: 1', '    x: 2'),
  patch: repo('patches:', '  p1:', '    repo: foo', '    path: a.patch'),
  patchNull: repo('patches:', '  p1: null'),
  patchNoPath: repo('patches:', '  p1:', '    repo: foo'),
  patchExtra: repo('patches:', '  p1:', '    path: a.patch', '    strip: 1'),
  patchString: repo('patches:', '  p1: a.patch'),
  defaults: add('defaults:\n  repos:\n    branch: scarthgap\n    tag: v1\n    refspec: x\n    patches:\n      repo: foo'),
  defaultsUnknown: add('defaults:\n  repos:\n    commit: abc'),
  defaultsPatchesUnknown: add('defaults:\n  repos:\n    patches:\n      path: x'),
  defaultsTop: add('defaults:\n  machine: x'),
  overrides: add('overrides:\n  repos:\n    foo:\n      commit: null\n      branch: main\n      url: https://example.org/x'),
  overridesUnknown: add('overrides:\n  repos:\n    foo:\n      tag: v1'),
  overridesUrlNull: add('overrides:\n  repos:\n    foo:\n      url: null'),
  overridesTop: add('overrides:\n  machine: x'),
  proxy: add('proxy_config:\n  http_proxy: http://p:3128\n  no_proxy: localhost'),
  proxyUnknown: add('proxy_config:\n  socks_proxy: x'),
  menu: add('menu_configuration:\n  A: true\n  B: text\n  C: 3'),
  menuFloat: add('menu_configuration:\n  A: 1.5'),
  menuList: add('menu_configuration:\n  A: [1]'),
  artifacts: add('artifacts:\n  image: tmp/deploy/images/x.wic'),
  artifactsInt: add('artifacts:\n  image: 1'),
  signerPath: add('signers:\n  me:\n    repo: foo\n    path: keys/me.asc'),
  signerPathNoRepo: add('signers:\n  me:\n    path: keys/me.asc'),
  signerKeyserver: add(`signers:\n  me:\n    gpg_keyserver: keys.example.org\n    fingerprint: ${'A'.repeat(40)}`),
  signerKeyserverNoFp: add('signers:\n  me:\n    gpg_keyserver: keys.example.org'),
  signerBoth: add(`signers:\n  me:\n    repo: foo\n    path: k\n    gpg_keyserver: keys.example.org\n    fingerprint: ${'A'.repeat(40)}`),
  signerNeither: add('signers:\n  me:\n    type: gpg'),
  signerSsh: add(`signers:\n  me:\n    type: ssh\n    repo: foo\n    path: k.pub\n    fingerprint: SHA256:${'x'.repeat(43)}`),
  signerSshKeyserver: add(`signers:\n  me:\n    type: ssh\n    gpg_keyserver: keys.example.org\n    fingerprint: ${'A'.repeat(40)}`),
  signerX509: add('signers:\n  me:\n    type: x509\n    repo: foo\n    path: k'),
  signerShortFp: add('signers:\n  me:\n    repo: foo\n    path: k\n    fingerprint: ABCD'),
  signerExtra: add('signers:\n  me:\n    repo: foo\n    path: k\n    trust: full'),
  buildtools: add('buildtools:\n  version: "5.0"\n  sha256sum: abc\n  base_url: https://example.org\n  filename: x.sh\n  extra: ok'),
  buildtoolsNoSum: add('buildtools:\n  version: "5.0"'),
  buildtoolsVersionNum: add('buildtools:\n  version: 5.0\n  sha256sum: abc'),
  sourceDir: add('_source_dir: /work\n_source_dir_host: /home/me/work'),
  sourceDirInt: add('_source_dir: 1'),
};

/** Verdicts of Python jsonschema with `schemaFile`: file -> error paths (empty when valid). */
async function python(schemaFile: string): Promise<Record<string, string[]>> {
  const r = await run('/usr/bin/python3', ['-c', PEER, schemaFile], { input: JSON.stringify(files) });
  return JSON.parse(r.stdout) as Record<string, string[]>;
}

/** The number of problems `lamadist check` reports for one file with the project's schema. */
async function ours(file: string): Promise<number | 'unparsable'> {
  try {
    return validateKasFile(await loadKasFile(file, path.dirname(file)), schema).length;
  } catch {
    return 'unparsable';
  }
}

/** Both verdicts agree on every file, and the corpus holds enough of either verdict. */
async function expectSameVerdicts(peer: Record<string, string[]>): Promise<void> {
  let invalid = 0;
  const disagreements: string[] = [];
  for (const f of files) {
    const n = await ours(f);
    const peerErrors = peer[f] ?? [];
    if ((n === 0) !== (peerErrors.length === 0)) {
      disagreements.push(`${path.relative(REPO_ROOT, f)}: ours ${n === 0 ? 'valid' : 'invalid'}, peer ${peerErrors.length === 0 ? 'valid' : `invalid at ${peerErrors.join(', ')}`}`);
    }
    if (peerErrors.length > 0) invalid++;
  }
  expect(disagreements).toEqual([]);
  expect(invalid).toBeGreaterThanOrEqual(40);
  expect(files.length - invalid).toBeGreaterThanOrEqual(40);
}

beforeAll(async () => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'lamadist-kas-peer-'));
  schema = await loadKasSchema(KAS_PROJECT_SCHEMA);
  files = [];
  for (const f of [...kasFiles(path.join(REPO_ROOT, 'kas')), ...kasFiles(path.join(REPO_ROOT, 'test/fixtures/check'))]) {
    if ((await ours(f)) !== 'unparsable') files.push(f);
  }
  for (const [name, mutate] of Object.entries(MUTATIONS)) {
    const f = path.join(tmp, `${name}.yml`);
    writeFileSync(f, mutate(BASE));
    files.push(f);
  }
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe("the project's kas schema", () => {
  it('gives the same verdicts under ajv (lamadist) and Python jsonschema (as kas validates)', async () => {
    await expectSameVerdicts(await python(KAS_PROJECT_SCHEMA));
  });

  it.skipIf(
    skipBecause(
      !PEER_SCHEMA,
      "comparison with kas's published schema",
      'no kas schema-kas.json: set LAMADIST_PEER_KAS_SCHEMA, build the container image (lamadist container) or install kas 5.4',
    ),
  )("gives the same verdicts as kas's published schema-kas.json", async () => {
    await expectSameVerdicts(await python(PEER_SCHEMA as string));
  });
});
