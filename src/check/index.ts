import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { resolveSettings } from '../build/index.js';
import { BSPS, type Bsp, type DpsArch } from '../bsp/index.js';
import { dpsRoleOf, dpsTypeFor } from '../disk/index.js';
import { UserError, type ErrorCode } from '../errors.js';
import {
  composeKas,
  getPath,
  KAS_PROJECT_SCHEMA,
  kasFilesFor,
  loadKasFile,
  loadKasSchema,
  validateKasFile,
  type KasComposition,
  type KasSchema,
} from '../kas/index.js';
import { writeFileAtomic } from '../util/fsx.js';
import { hasTool, run } from '../util/proc.js';
import { parseYamlLocated, type LocatedYaml } from '../util/yaml.js';
import { at, parseBbConf, parseIni, parseWks, wksSizeMiB, type BbAssignment, type IniSection, type WksDirective } from './parsers.js';

/**
 * `lamadist check`: verifies the distribution definition in the repository (kas files, layers,
 * machine configs, wks templates, RAUC system.conf) against each other, against the kas schema of
 * the pinned kas release and against the Discoverable Partitions Specification. Every problem is
 * located at file:line:col.
 */

/** The groups of checks, reported with each problem. */
export type CheckName = 'kas-schema' | 'kas-compose' | 'layers' | 'machines' | 'wks' | 'rauc';

/** One defect in the distribution definition. */
export interface Problem {
  check: CheckName;
  where: string;
  code: ErrorCode;
  message: string;
}

/** Partition roles as the layout files name them. */
export type PartitionRole = 'esp' | 'root' | 'root-verity' | 'var';

/** Where the DPS partition type UUIDs come from (the table lives with the disk engine). */
export interface DpsLookup {
  /** The DPS type UUID for a role on an architecture (upper or lower case), if the spec defines one. */
  typeFor(role: PartitionRole, arch: DpsArch): string | undefined;
  /** A readable name for a type UUID ("root-verity on arm64"), if it is in the table. */
  describe(uuid: string): string | undefined;
}

export interface CheckOptions {
  /** Repository root (the directory holding kas/, meta-lamadist/, ...). */
  root: string;
  /** kas JSON schema; default from `findKasSchema`. */
  kasSchema?: string;
  /** DPS table; the disk engine's by default. */
  dps?: DpsLookup;
  /** BSP table; the toolkit's own by default (tests pass smaller ones). */
  bsps?: readonly Bsp[];
}

export interface CheckReport {
  ok: boolean;
  schema: string;
  problems: Problem[];
  checked: { kasFiles: number; compositions: number; layers: number; machines: number; wks: number; systemConfs: number };
  /** Real tools that also read the files (rauc loads each system.conf when installed). */
  peers: string[];
}

interface LayoutPartition {
  label: string;
  role: PartitionRole;
  slot?: 'a' | 'b';
  sizeMiB?: number;
  mapper?: string;
  encrypt?: string;
  fs?: string;
}

interface Layout {
  file: string;
  arch: DpsArch;
  alignmentMiB?: number;
  partitions: LayoutPartition[];
  raw: { name: string; offsetSectors: number; maxKiB?: number; source?: string }[];
}

const SLOT_CLASSES = new Set(['rootfs', 'verity', 'efi']);
/** Slot types RAUC 1.8 accepts in system.conf. */
const RAUC_SLOT_TYPES = new Set(['raw', 'ext4', 'vfat', 'nand', 'nor', 'ubifs', 'ubivol', 'jffs2', 'boot-emmc', 'boot-mbr-switch', 'boot-gpt-switch', 'boot-raw-fallback']);
const RAUC_BOOTLOADERS: Record<Bsp['raucFamily'], string[]> = { efi: ['efi', 'custom'], uboot: ['uboot', 'custom'] };

/**
 * The kas schema `check` validates with: $LAMADIST_KAS_SCHEMA, then the schema of the pinned kas
 * release where one is installed (`findInstalledKasSchema`), else the project's own schema of the
 * format, shipped with the package, so a fresh clone without kas still checks its files.
 */
export async function findKasSchema(root: string): Promise<string> {
  return process.env.LAMADIST_KAS_SCHEMA || ((await findInstalledKasSchema(root)) ?? KAS_PROJECT_SCHEMA);
}

/**
 * The schema-kas.json of the kas release the build container pins: from the kas inside the local
 * build container image, else from a host installation of that release. Undefined when neither
 * exists.
 */
export async function findInstalledKasSchema(root: string): Promise<string | undefined> {
  const fromImage = await schemaFromContainer(root);
  if (fromImage) return fromImage;
  const pinned = await pinnedKasVersion(root);
  for (const dir of await pythonPackageDirs()) {
    const schema = path.join(dir, 'kas', 'schema-kas.json');
    if (!existsSync(schema)) continue;
    const version = await fs.readFile(path.join(dir, 'kas', '__version__.py'), 'utf8').catch(() => '');
    const v = /__version__\s*=\s*['"]([^'"]+)['"]/.exec(version)?.[1];
    // Only the pinned release's schema says what the container's kas accepts (Debian's kas 3.1 does not).
    if (pinned !== undefined && v !== undefined && (v === pinned || v.startsWith(`${pinned}.`))) return schema;
  }
  return undefined;
}

/** Prints the schema file of the kas package the interpreter imports. */
const PRINT_SCHEMA = "import kas, pathlib, sys; sys.stdout.write((pathlib.Path(kas.__file__).parent / 'schema-kas.json').read_text())";

/**
 * The schema of the kas inside the local build container image, cached per image ID under
 * ~/.cache/lamadist/kas-schema/. Undefined when there is no engine or no image.
 */
export async function schemaFromContainer(root: string): Promise<string | undefined> {
  const settings = await resolveSettings(root).catch(() => undefined);
  if (!settings) return undefined;
  const inspect = await run(settings.engine, [...settings.engineArgs, 'image', 'inspect', '--format', '{{.Id}}', settings.image], { allowFailure: true });
  const id = inspect.stdout.trim().replace(/^sha256:/, '');
  if (inspect.code !== 0 || !/^[0-9a-f]{12,}$/.test(id)) return undefined;
  const cached = path.join(os.homedir(), '.cache', 'lamadist', 'kas-schema', `${id}.json`);
  if (existsSync(cached)) return cached;
  const args = [...settings.engineArgs, 'run', '--rm', ...(settings.runtime ? ['--runtime', settings.runtime] : [])];
  for (const u of settings.ulimits) args.push('--ulimit', u);
  const r = await run(settings.engine, [...args, settings.image, 'python3', '-c', PRINT_SCHEMA], { allowFailure: true, timeoutMs: 120_000 });
  try {
    JSON.parse(r.stdout);
  } catch {
    return undefined;
  }
  if (r.code !== 0) return undefined;
  await fs.mkdir(path.dirname(cached), { recursive: true });
  await writeFileAtomic(cached, r.stdout, { force: true });
  return cached;
}

/** The kas version container/ pins (`kas[extras] == X.Y` in requirements.in or requirements.txt). */
async function pinnedKasVersion(root: string): Promise<string | undefined> {
  for (const f of ['container/requirements.in', 'container/requirements.txt']) {
    const text = await fs.readFile(path.join(root, f), 'utf8').catch(() => '');
    const m = /^\s*kas(?:\[[^\]]*\])?\s*==\s*(\d+(?:\.\d+)*)\s*$/m.exec(text);
    if (m) return m[1];
  }
  return undefined;
}

async function pythonPackageDirs(): Promise<string[]> {
  const bases = ['/usr/lib', '/usr/local/lib', path.join(os.homedir(), '.local', 'lib')];
  const out: string[] = [];
  for (const base of bases) {
    const entries = await fs.readdir(base).catch(() => [] as string[]);
    for (const e of entries.filter((n) => /^python3/.test(n))) {
      for (const sub of ['site-packages', 'dist-packages']) out.push(path.join(base, e, sub));
    }
  }
  return out;
}

async function listFiles(dir: string, pattern: RegExp): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string): Promise<void> => {
    const entries = await fs.readdir(d, { withFileTypes: true }).catch(() => []);
    for (const e of entries.sort((a, b) => a.name.localeCompare(b.name))) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else if (pattern.test(e.name)) out.push(p);
    }
  };
  await walk(dir);
  return out;
}

/** Run every check on the repository at `options.root`. Never throws for defects in the repository. */
export async function runChecks(options: CheckOptions): Promise<CheckReport> {
  const root = path.resolve(options.root);
  const bsps = options.bsps ?? BSPS;
  const schemaFile = options.kasSchema ?? (await findKasSchema(root));
  const schema = await loadKasSchema(schemaFile);
  const problems: Problem[] = [];
  const add = (check: CheckName, where: string, code: ErrorCode, message: string): void => {
    if (!problems.some((p) => p.where === where && p.message === message)) problems.push({ check, where, code, message });
  };
  const relp = (f: string): string => path.relative(root, f);

  const kasFiles = await checkKasFiles(root, schema, add);
  const compositions = await checkCompositions(root, bsps, add);
  const series = new Set<string>();
  for (const c of compositions) for (const s of seriesOf(c.config)) series.add(s);
  const layers = await checkLayers(root, compositions, series, add);
  const machines = await checkMachines(root, bsps, layers, add);

  let wks = 0;
  const layouts = new Map<string, Layout>();
  for (const layoutName of [...new Set(bsps.map((b) => b.layout))]) {
    const arch = bsps.find((b) => b.layout === layoutName)?.arch ?? 'x86-64';
    const layoutFile = path.join(root, 'meta-lamadist', 'wic', 'layouts', `${layoutName}.yaml`);
    const layout = await loadLayout(layoutFile, relp(layoutFile), arch, add);
    if (!layout) continue;
    layouts.set(layoutName, layout);
    const wksFile = path.join(root, 'meta-lamadist', 'wic', `lamadist-ab-${layoutName}.wks.in`);
    if (!existsSync(wksFile)) {
      add('wks', `${relp(layoutFile)}:1:1`, 'LAMA_E_WKS_MISSING', `layout ${layoutName} has no wks template ${relp(wksFile)}`);
      continue;
    }
    wks++;
    checkWks(relp(wksFile), await fs.readFile(wksFile, 'utf8'), layout, options.dps ?? DISK_DPS, add);
  }

  let systemConfs = 0;
  const withRauc = await hasTool('rauc');
  for (const family of [...new Set(bsps.map((b) => b.raucFamily))]) {
    const file = path.join(root, 'meta-lamadist', 'recipes-core', 'rauc', 'files', family, 'system.conf');
    if (!existsSync(file)) {
      add('rauc', `${relp(path.dirname(file))}:1:1`, 'LAMA_E_RAUC_CONF_MISSING', `RAUC family ${family} has no system.conf`);
      continue;
    }
    systemConfs++;
    const familyBsps = bsps.filter((b) => b.raucFamily === family);
    const famLayouts = familyBsps.map((b) => layouts.get(b.layout)).filter((l): l is Layout => l !== undefined);
    const text = await fs.readFile(file, 'utf8');
    checkSystemConf(relp(file), text, family, familyBsps, famLayouts, add);
    if (withRauc) {
      const p = await raucLoadProblem(file, relp(file), text);
      if (p && !problems.some((q) => q.where === p.where)) add('rauc', p.where, 'LAMA_E_RAUC_CONFIG', p.message);
    }
  }

  return {
    ok: problems.length === 0,
    schema: schemaFile,
    problems,
    checked: { kasFiles, compositions: compositions.length, layers: layers.length, machines, wks, systemConfs },
    peers: withRauc ? ['rauc'] : [],
  };
}

/** The DPS lookup backed by the disk engine's table. */
export const DISK_DPS: DpsLookup = {
  typeFor: (role, arch) => dpsTypeFor(role, arch),
  describe: (uuid) => {
    const t = dpsRoleOf(uuid);
    return t ? `${t.role}${t.arch ? ` on ${t.arch}` : ''}` : undefined;
  },
};

type Add = (check: CheckName, where: string, code: ErrorCode, message: string) => void;

function asProblem(err: unknown, fallback: string): { where: string; code: ErrorCode; message: string } {
  if (err instanceof UserError) return { where: err.where ?? fallback, code: err.code, message: err.message };
  throw err;
}

async function checkKasFiles(root: string, schema: KasSchema, add: Add): Promise<number> {
  const files = await listFiles(path.join(root, 'kas'), /\.ya?ml$/);
  for (const f of files) {
    try {
      const kf = await loadKasFile(f, root);
      for (const p of validateKasFile(kf, schema)) add('kas-schema', p.where, p.code, p.message);
    } catch (err) {
      const p = asProblem(err, `${path.relative(root, f)}:1:1`);
      add('kas-schema', p.where, p.code, p.message);
    }
  }
  return files.length;
}

/** Every subset of the extras when there are few; singles plus "all" when there are many. */
function extraCombos(extras: string[]): string[][] {
  if (extras.length > 5) return [[], ...extras.map((x) => [x]), extras];
  const out: string[][] = [];
  for (let mask = 0; mask < 1 << extras.length; mask++) out.push(extras.filter((_, i) => mask & (1 << i)));
  return out;
}

async function checkCompositions(root: string, bsps: readonly Bsp[], add: Add): Promise<KasComposition[]> {
  const overlays = async (dir: string): Promise<string[]> =>
    (await listFiles(path.join(root, 'kas', dir), /\.kas\.ya?ml$/)).map((f) => path.basename(f).replace(/\.kas\.ya?ml$/, ''));
  const extras = await overlays('extras');
  const scanners = await overlays('scanners');
  const installer = existsSync(path.join(root, 'kas', 'installer.kas.yml'));
  const recipes = await localRecipes(root);
  const out: KasComposition[] = [];
  for (const name of await overlays('bsp')) {
    if (!bsps.some((b) => b.name === name)) {
      add('machines', `kas/bsp/${name}.kas.yml:1:1`, 'LAMA_E_BSP_UNKNOWN', `kas BSP file for '${name}' has no row in the BSP table (src/bsp/index.ts)`);
    }
  }
  for (const bsp of bsps) {
    const bspFile = path.join(root, kasFilesFor({ bsp: bsp.name })[1] ?? '');
    if (!existsSync(bspFile)) {
      add('machines', `${path.relative(root, path.dirname(bspFile))}:1:1`, 'LAMA_E_BSP_KAS_MISSING', `BSP ${bsp.name} has no kas file kas/bsp/${bsp.name}.kas.yml`);
      continue;
    }
    for (const combo of extraCombos(extras)) {
      for (const [inst, scanner] of (installer ? [false, true] : [false]).flatMap((i) => [undefined, ...scanners].map((sc) => [i, sc] as const))) {
        const files = kasFilesFor({ bsp: bsp.name, extras: combo, installer: inst, scanners: scanner ? [scanner] : [] });
        try {
          const comp = await composeKas(files, { repoRoot: root });
          out.push(comp);
          checkComposed(root, bsp, files, comp, recipes, add);
        } catch (err) {
          const p = asProblem(err, `${files.at(-1) ?? ''}:1:1`);
          add('kas-compose', p.where, p.code, p.message);
        }
      }
    }
  }
  return out;
}

/** Names of the project's own namespace, which must resolve inside the repository's layers. */
const OWN_NAME = /^(lama|lamadist)[-_]|^packagegroup-lamadist/;

/** Recipe names (file name up to the first `_` or `.bb`) in the repository's layers. */
async function localRecipes(root: string): Promise<Set<string>> {
  const out = new Set<string>();
  for (const e of await fs.readdir(root, { withFileTypes: true })) {
    if (!e.isDirectory() || !e.name.startsWith('meta-')) continue;
    for (const f of await listFiles(path.join(root, e.name), /\.bb$/)) out.add(path.basename(f, '.bb').split('_')[0] ?? '');
  }
  return out;
}

function checkComposed(root: string, bsp: Bsp, files: string[], comp: KasComposition, recipes: Set<string>, add: Add): void {
  const cfg = comp.config;
  const combo = files.join(':');
  if (cfg.machine !== bsp.machine) {
    add('kas-compose', comp.origin(['machine']), 'LAMA_E_KAS_MACHINE', `BSP ${bsp.name} must build MACHINE '${bsp.machine}', but its kas files compose to '${String(cfg.machine)}'`);
  }
  const overlayDistro = checkPolicy(comp, add);
  if (overlayDistro) {
    // already reported at the overlay; the composed distro is that overlay's choice
  } else if (typeof cfg.distro !== 'string') add('kas-compose', comp.origin(['distro']), 'LAMA_E_KAS_DISTRO', `${combo} sets no distro`);
  else if (!OWN_DISTRO.test(cfg.distro)) {
    add('kas-compose', comp.origin(['distro']), 'LAMA_E_KAS_POLICY', `distro '${cfg.distro}' is not LamaDist's: every build uses a distro of this repository's layers (lamadist or a lamadist-* variant)`);
  } else if (!localLayerEntries(cfg).some((e) => existsSync(path.join(root, e.layer, 'conf', 'distro', `${cfg.distro as string}.conf`)))) {
    add('kas-compose', comp.origin(['distro']), 'LAMA_E_KAS_DISTRO', `distro '${cfg.distro}' has no conf/distro/${cfg.distro}.conf in the layers this build uses`);
  }
  const targets = Array.isArray(cfg.target) ? cfg.target : cfg.target === undefined ? [] : [cfg.target];
  for (const t of targets) {
    if (typeof t === 'string' && OWN_NAME.test(t) && !recipes.has(t)) {
      add('kas-compose', comp.origin(['target']), 'LAMA_E_KAS_TARGET', `target '${t}' is no recipe in this repository's layers`);
    }
  }
  const repos = cfg.repos;
  if (typeof repos !== 'object' || repos === null) {
    add('kas-compose', comp.origin(['repos']), 'LAMA_E_KAS_REPOS', `${combo} declares no repos`);
    return;
  }
  for (const { key, layer } of localLayerEntries(cfg)) {
    if (!existsSync(path.join(root, layer, 'conf', 'layer.conf'))) {
      add('kas-compose', comp.origin(['repos', key, 'layers', layer]), 'LAMA_E_KAS_LAYER_MISSING', `layer '${layer}' of repo '${key}' has no conf/layer.conf`);
    }
  }
}

/** LamaDist's distro and its variants (lamadist-debug). */
const OWN_DISTRO = /^lamadist([-_]|$)/;
/** Files that may choose the distro: the base, and extras selecting one of its variants (debug). */
const DISTRO_SETTERS = /^kas\/(main\.kas\.ya?ml$|extras\/)/;
/** What kas accepts as a pinned commit: a full object id (SHA-1, or SHA-256 for git's sha256 repositories). */
const COMMIT_ID = /^([0-9a-f]{40}|[0-9a-f]{64})$/;

/**
 * The distribution policy an overlay must not replace: BSP files, scanners and their includes may not
 * choose the distro, every fetched repository pins a commit and every commit is an object id (a
 * path or ref there would let an overlay build unreviewed sources), and kas builds with OpenEmbedded (isar builds Debian, not LamaDist).
 * Returns whether an overlay chose the distro, so the composed value is not reported twice.
 */
function checkPolicy(comp: KasComposition, add: Add): boolean {
  let overlayDistro = false;
  for (const kf of comp.files) {
    const value = kf.yaml.value;
    if (getPath(value, ['distro']) !== undefined && !DISTRO_SETTERS.test(kf.rel)) {
      overlayDistro = true;
      add('kas-compose', kf.yaml.where(['distro']), 'LAMA_E_KAS_POLICY', `${kf.rel} must not set the distro (only kas/main.kas.yml and kas/extras/ choose it)`);
    }
    const bs = getPath(value, ['build_system']);
    if (bs !== undefined && bs !== 'openembedded') {
      add('kas-compose', kf.yaml.where(['build_system'], 'value'), 'LAMA_E_KAS_POLICY', `build_system must be 'openembedded', not '${String(bs)}'`);
    }
    const repos = getPath(value, ['repos']);
    if (typeof repos !== 'object' || repos === null) continue;
    for (const key of Object.keys(repos)) {
      const commit = getPath(repos, [key, 'commit']);
      if (commit === undefined || (typeof commit === 'string' && COMMIT_ID.test(commit))) continue;
      add('kas-compose', kf.yaml.where(['repos', key, 'commit'], 'value'), 'LAMA_E_KAS_POLICY', `repo '${key}' commit '${String(commit)}' is not a full lower-case commit id (40 or 64 hex digits)`);
    }
  }
  const composed = getPath(comp.config, ['repos']);
  for (const key of typeof composed === 'object' && composed !== null ? Object.keys(composed) : []) {
    // a fetched repository without a pinned commit builds whatever its branch holds today
    if (getPath(composed, [key, 'url']) !== undefined && getPath(composed, [key, 'commit']) === undefined) {
      add('kas-compose', comp.origin(['repos', key, 'url']), 'LAMA_E_KAS_POLICY', `repo '${key}' is fetched from a url but pins no commit`);
    }
  }
  return overlayDistro;
}

/** The enabled layers of the project's own repository (repos without url or path) in a composed configuration. */
function localLayerEntries(config: Record<string, unknown>): { key: string; layer: string }[] {
  const out: { key: string; layer: string }[] = [];
  for (const [key, spec] of Object.entries((config.repos ?? {}) as Record<string, unknown>)) {
    if (spec !== null && (typeof spec !== 'object' || getPath(spec, ['url']) !== undefined || getPath(spec, ['path']) !== undefined)) continue;
    const layers = getPath(spec, ['layers']);
    const names = typeof layers === 'object' && layers !== null ? Object.keys(layers) : ['.'];
    for (const layer of names) if (!['disabled', 'excluded'].includes(String(getPath(layers, [layer])))) out.push({ key, layer });
  }
  return out;
}

/** Release series names (scarthgap, ...) from the branch of the OE-Core/poky repository. */
function seriesOf(config: Record<string, unknown>): string[] {
  const out: string[] = [];
  for (const key of ['poky', 'openembedded-core', 'oe-core']) {
    const branch = getPath(config, ['repos', key, 'branch']) ?? getPath(config, ['defaults', 'repos', 'branch']);
    if (typeof branch === 'string' && /^[a-z]+$/.test(branch)) out.push(branch);
  }
  return out;
}

interface LayerInfo {
  dir: string;
  collection: string;
  confFile: string;
}

async function checkLayers(root: string, comps: KasComposition[], series: Set<string>, add: Add): Promise<LayerInfo[]> {
  const dirs = new Set<string>();
  for (const e of await fs.readdir(root, { withFileTypes: true })) {
    if (e.isDirectory() && e.name.startsWith('meta-') && existsSync(path.join(root, e.name, 'conf', 'layer.conf'))) dirs.add(e.name);
  }
  for (const c of comps) {
    for (const { layer } of localLayerEntries(c.config)) if (existsSync(path.join(root, layer, 'conf', 'layer.conf'))) dirs.add(layer);
  }
  const infos: LayerInfo[] = [];
  const seen = new Map<string, string>();
  for (const dir of [...dirs].sort()) {
    const confRel = path.join(dir, 'conf', 'layer.conf');
    const vars = parseBbConf(await fs.readFile(path.join(root, confRel), 'utf8'));
    const get = (name: string): BbAssignment | undefined => vars.filter((v) => v.name === name).at(-1);
    const colls = get('BBFILE_COLLECTIONS');
    if (!colls || colls.value.trim().split(/\s+/).length !== 1) {
      add('layers', colls ? at(confRel, colls.valuePos) : `${confRel}:1:1`, 'LAMA_E_LAYER_COLLECTION', 'layer.conf must add exactly one name to BBFILE_COLLECTIONS');
      continue;
    }
    const c = colls.value.trim();
    const firstAt = seen.get(c);
    if (firstAt) add('layers', at(confRel, colls.valuePos), 'LAMA_E_LAYER_COLLECTION', `collection '${c}' is also declared by ${firstAt}`);
    seen.set(c, confRel);
    infos.push({ dir, collection: c, confFile: confRel });
    if (!vars.some((v) => v.name === 'BBPATH' && v.value.includes('${LAYERDIR}'))) {
      add('layers', `${confRel}:1:1`, 'LAMA_E_LAYER_BBPATH', 'layer.conf does not add ${LAYERDIR} to BBPATH');
    }
    if (!get(`BBFILE_PATTERN_${c}`)) add('layers', at(confRel, colls.pos), 'LAMA_E_LAYER_PATTERN', `BBFILE_PATTERN_${c} is not set`);
    const prio = get(`BBFILE_PRIORITY_${c}`);
    if (!prio) add('layers', at(confRel, colls.pos), 'LAMA_E_LAYER_PRIORITY', `BBFILE_PRIORITY_${c} is not set`);
    else if (!/^\d+$/.test(prio.value.trim()) || Number(prio.value) < 1 || Number(prio.value) > 99) {
      add('layers', at(confRel, prio.valuePos), 'LAMA_E_LAYER_PRIORITY', `BBFILE_PRIORITY_${c} must be a whole number from 1 to 99, got '${prio.value}'`);
    }
    const compat = get(`LAYERSERIES_COMPAT_${c}`);
    if (!compat) {
      add('layers', at(confRel, colls.pos), 'LAMA_E_LAYER_SERIES', `LAYERSERIES_COMPAT_${c} is not set`);
    } else {
      const declared = compat.value.trim().split(/\s+/);
      for (const s of series) {
        if (!declared.includes(s)) {
          add('layers', at(confRel, compat.valuePos), 'LAMA_E_LAYER_SERIES', `LAYERSERIES_COMPAT_${c} ('${compat.value.trim()}') does not include '${s}', the series the kas files build`);
        }
      }
    }
    const hasDistro = existsSync(path.join(root, dir, 'conf', 'distro'));
    const hasMachine = existsSync(path.join(root, dir, 'conf', 'machine'));
    if (hasDistro && hasMachine) {
      add('layers', `${confRel}:1:1`, 'LAMA_E_LAYER_TYPE', `layer ${dir} has both conf/distro and conf/machine; yocto-check-layer refuses a layer that is DISTRO and BSP at once`);
    }
  }
  const known = new Set(infos.map((i) => i.collection));
  for (const info of infos) {
    const vars = parseBbConf(await fs.readFile(path.join(root, info.confFile), 'utf8'));
    for (const dep of vars.filter((v) => v.name === `LAYERDEPENDS_${info.collection}`)) {
      for (const d of dep.value.trim().split(/\s+/).filter((x) => x && !x.startsWith('('))) {
        if (d === info.collection) add('layers', at(info.confFile, dep.valuePos), 'LAMA_E_LAYER_DEPENDS', `layer '${d}' depends on itself`);
        else if (d.startsWith('lamadist') && !known.has(d)) {
          add('layers', at(info.confFile, dep.valuePos), 'LAMA_E_LAYER_DEPENDS', `LAYERDEPENDS names '${d}', which no layer in this repository declares`);
        }
      }
    }
  }
  return infos;
}

async function checkMachines(root: string, bsps: readonly Bsp[], layers: LayerInfo[], add: Add): Promise<number> {
  const confs = new Map<string, string>();
  for (const l of layers) {
    for (const f of await listFiles(path.join(root, l.dir, 'conf', 'machine'), /\.conf$/)) {
      if (path.dirname(f) === path.join(root, l.dir, 'conf', 'machine')) confs.set(path.basename(f, '.conf'), path.relative(root, f));
    }
  }
  for (const bsp of bsps) {
    const conf = confs.get(bsp.machine);
    const kasRel = `kas/bsp/${bsp.name}.kas.yml`;
    if (!conf) {
      let where = `${kasRel}:1:1`;
      if (existsSync(path.join(root, kasRel))) {
        const kf = await loadKasFile(path.join(root, kasRel), root).catch(() => undefined);
        if (kf) where = kf.yaml.where(['machine'], 'value');
      }
      add('machines', where, 'LAMA_E_MACHINE_MISSING', `BSP ${bsp.name} needs machine config conf/machine/${bsp.machine}.conf in a layer of this repository`);
      continue;
    }
    const vars = parseBbConf(await fs.readFile(path.join(root, conf), 'utf8'));
    const wks = vars.filter((v) => v.name === 'WKS_FILE').at(-1);
    const expected = `lamadist-ab-${bsp.layout}.wks.in`;
    if (wks && !wks.value.includes('$') && wks.value.trim() !== expected) {
      add('machines', at(conf, wks.valuePos), 'LAMA_E_MACHINE_WKS', `WKS_FILE is '${wks.value.trim()}', but BSP ${bsp.name} uses layout ${bsp.layout} (${expected})`);
    }
  }
  for (const [machine, conf] of confs) {
    if (!bsps.some((b) => b.machine === machine)) {
      add('machines', `${conf}:1:1`, 'LAMA_E_MACHINE_UNKNOWN', `machine '${machine}' has no BSP in the BSP table (src/bsp/index.ts)`);
    }
  }
  return confs.size;
}

async function loadLayout(file: string, shown: string, arch: DpsArch, add: Add): Promise<Layout | undefined> {
  if (!existsSync(file)) {
    add('wks', `${path.dirname(shown)}:1:1`, 'LAMA_E_LAYOUT_MISSING', `layout ${path.basename(shown)} does not exist`);
    return undefined;
  }
  let y: LocatedYaml<Record<string, unknown>>;
  try {
    y = parseYamlLocated<Record<string, unknown>>(await fs.readFile(file, 'utf8'), shown);
  } catch (err) {
    const p = asProblem(err, `${shown}:1:1`);
    add('wks', p.where, p.code, p.message);
    return undefined;
  }
  const v = y.value;
  if (v.arch !== arch) {
    add('wks', y.where(['arch'], 'value'), 'LAMA_E_LAYOUT_ARCH', `layout is for '${String(v.arch)}', but its BSPs are ${arch}`);
  }
  const parts = Array.isArray(v.partitions) ? (v.partitions as Record<string, unknown>[]) : [];
  const raw = Array.isArray(v.raw) ? (v.raw as Record<string, unknown>[]) : [];
  return {
    file: shown,
    arch,
    alignmentMiB: typeof v['alignment-mib'] === 'number' ? v['alignment-mib'] : undefined,
    partitions: parts.map((p) => ({
      label: String(p.label),
      role: p.role as PartitionRole,
      slot: p.slot as 'a' | 'b' | undefined,
      sizeMiB: typeof p['size-mib'] === 'number' ? p['size-mib'] : undefined,
      mapper: typeof p.mapper === 'string' ? p.mapper : undefined,
      encrypt: typeof p.encrypt === 'string' ? p.encrypt : undefined,
      fs: typeof p.fs === 'string' ? p.fs : undefined,
    })),
    raw: raw.map((r) => ({
      name: String(r.name),
      offsetSectors: Number(r['offset-sectors']),
      maxKiB: typeof r['max-kib'] === 'number' ? r['max-kib'] : undefined,
      source: typeof r.source === 'string' ? r.source : undefined,
    })),
  };
}

function checkWks(file: string, text: string, layout: Layout, dps: DpsLookup, add: Add): void {
  const directives = parseWks(text);
  const bootloader = directives.find((d) => d.kind === 'bootloader');
  const ptable = bootloader?.options.get('ptable');
  if (!bootloader || ptable?.value !== 'gpt') {
    add('wks', ptable ? at(file, ptable.pos) : bootloader ? at(file, bootloader.pos) : `${file}:1:1`, 'LAMA_E_WKS_PTABLE', 'the disk must use a GPT (bootloader --ptable gpt): DPS type UUIDs exist only in GPT');
  }
  const parts = directives.filter((d) => d.kind === 'part');
  for (const [i, d] of parts.filter((p) => p.options.has('no-table')).entries()) checkRawPart(file, d, i, layout, add);
  const table = parts.filter((p) => !p.options.has('no-table'));
  for (const [i, d] of table.entries()) {
    const want = layout.partitions[i];
    if (!want) {
      add('wks', at(file, d.pos), 'LAMA_E_WKS_EXTRA_PART', `partition ${i + 1} is not in ${layout.file} (which has ${layout.partitions.length})`);
      continue;
    }
    checkPart(file, d, i, want, layout, dps, add);
  }
  for (const missing of layout.partitions.slice(table.length)) {
    const last = table.at(-1);
    add('wks', last ? at(file, last.pos) : `${file}:1:1`, 'LAMA_E_WKS_MISSING_PART', `partition '${missing.label}' of ${layout.file} is missing from the wks file`);
  }
}

function checkPart(file: string, d: WksDirective, i: number, want: LayoutPartition, layout: Layout, dps: DpsLookup, add: Add): void {
  const name = d.options.get('part-name');
  if (!name) {
    add('wks', at(file, d.pos), 'LAMA_E_WKS_PARTNAME', `partition ${i + 1} has no --part-name; the GPT name must be '${want.label}' for /dev/disk/by-partlabel and RAUC`);
  } else if (name.value !== want.label) {
    add('wks', at(file, name.pos), 'LAMA_E_WKS_PARTNAME', `partition ${i + 1} is named '${name.value}', but ${layout.file} has '${want.label}' there`);
  }
  const expected = dps.typeFor(want.role, layout.arch);
  const type = d.options.get('part-type');
  if (!type) {
    add('wks', at(file, d.pos), 'LAMA_E_WKS_DPS', `partition '${want.label}' has no --part-type; DPS wants ${expected ?? `a ${want.role} type`}`);
  } else if (expected && type.value.toLowerCase() !== expected.toLowerCase()) {
    const actual = dps.describe(type.value);
    add(
      'wks',
      at(file, type.pos),
      'LAMA_E_WKS_DPS',
      `partition '${want.label}' has type ${type.value}${actual ? ` (DPS ${actual})` : ''}, but DPS ${want.role} on ${layout.arch} is ${expected}`,
    );
  }
  const size = d.options.get('fixed-size') ?? d.options.get('size');
  const mib = size ? wksSizeMiB(size.value) : undefined;
  if (want.sizeMiB !== undefined && size && mib !== undefined && mib !== want.sizeMiB) {
    add('wks', at(file, size.pos), 'LAMA_E_WKS_SIZE', `partition '${want.label}' is ${size.value}, but ${layout.file} says ${want.sizeMiB} MiB`);
  }
  const align = d.options.get('align');
  if (align && layout.alignmentMiB !== undefined && Number(align.value) % (layout.alignmentMiB * 1024) !== 0) {
    add('wks', at(file, align.pos), 'LAMA_E_WKS_ALIGN', `--align ${align.value} KiB is not a multiple of the layout's ${layout.alignmentMiB} MiB alignment`);
  }
}

/**
 * Raw regions (boot loaders outside the partition table) are matched in order: the file names are
 * usually BitBake variables, but offsets and maximum sizes are fixed by the SoC's boot ROM.
 */
function checkRawPart(file: string, d: WksDirective, index: number, layout: Layout, add: Add): void {
  const region = layout.raw[index];
  const src = /(?:^|,)file=([^,]+)/.exec(d.options.get('sourceparams')?.value ?? '')?.[1];
  if (!region) {
    add('wks', at(file, d.pos), 'LAMA_E_WKS_RAW', `raw region ${src ?? '(no file=)'} is not in ${layout.file} (which has ${layout.raw.length})`);
    return;
  }
  if (src && !src.includes('$') && region.source && path.basename(src) !== region.source) {
    add('wks', at(file, d.pos), 'LAMA_E_WKS_RAW', `raw region ${index + 1} writes ${src}, but ${layout.file} expects ${region.source} there`);
  }
  const off = d.options.get('offset') ?? d.options.get('align');
  const wantKiB = (region.offsetSectors * 512) / 1024;
  const gotKiB = off ? wksOffsetKiB(off.value) : undefined;
  if (!off || gotKiB !== wantKiB) {
    add('wks', off ? at(file, off.pos) : at(file, d.pos), 'LAMA_E_WKS_RAW', `raw region ${region.name} must start at sector ${region.offsetSectors} (${wantKiB}K), as ${layout.file} says${off ? `; the wks has ${off.value}` : ''}`);
  }
  const size = d.options.get('fixed-size') ?? d.options.get('size');
  const sizeKiB = size ? wksOffsetKiB(size.value) : undefined;
  if (size && sizeKiB !== undefined && region.maxKiB !== undefined && sizeKiB > region.maxKiB) {
    add('wks', at(file, size.pos), 'LAMA_E_WKS_RAW', `raw region ${region.name} is ${size.value}, more than the ${region.maxKiB}K ${layout.file} leaves for it`);
  }
}

/** A wic --offset/--align value in KiB (bare numbers are KiB for both options), or a sector count ending in "s". */
function wksOffsetKiB(value: string): number | undefined {
  const m = /^(\d+)([sKMG]?)$/.exec(value.trim());
  if (!m) return undefined;
  const n = Number(m[1]);
  return { s: n / 2, K: n, '': n, M: n * 1024, G: n * 1024 * 1024 }[m[2] ?? ''];
}

/**
 * Let rauc itself load a system.conf (`rauc --conf FILE info` loads the configuration before it
 * looks at the bundle) and locate its complaint, if any, in the file.
 */
async function raucLoadProblem(abs: string, file: string, text: string): Promise<{ where: string; message: string } | undefined> {
  const r = await run('rauc', [`--conf=${abs}`, 'info', '/nonexistent/lamadist-check.raucb'], { allowFailure: true, timeoutMs: 30_000 });
  const msg = /Failed to load system config \([^)]*\): (.*)$/m.exec(r.stderr)?.[1]?.trim();
  if (!msg) return undefined;
  const { sections } = parseIni(text);
  const section = (name: string): IniSection | undefined => sections.find((s) => s.name === name);
  let pos: { line: number; col: number } | undefined;
  const badKey = /Invalid key '([^']+)' in group '\[([^\]]+)\]'/.exec(msg);
  const slotType = /slot type '[^']*' for slot ([\w.-]+)/.exec(msg);
  const parent = /Parent slot '([^']+)' not found/.exec(msg);
  const line = /contains line “([^”]*)”/.exec(msg);
  const missing = /does not have key “[^”]+” in group “([^”]+)”/.exec(msg);
  const badValue = /contains key “([^”]+)”/.exec(msg);
  if (badKey) pos = section(badKey[2] ?? '')?.keys.get(badKey[1] ?? '')?.keyPos;
  else if (missing) pos = section(missing[1] ?? '')?.pos;
  else if (badValue) pos = sections.map((s) => s.keys.get(badValue[1] ?? '')?.pos).find((p) => p !== undefined);
  else if (slotType) pos = section(`slot.${slotType[1] ?? ''}`)?.keys.get('type')?.pos;
  else if (parent) pos = sections.flatMap((s) => [...s.keys.entries()]).find(([k, v]) => k === 'parent' && v.value === parent[1])?.[1].pos;
  else if (/bootloader/.test(msg)) pos = section('system')?.keys.get('bootloader')?.pos;
  else if (line) {
    const n = text.split('\n').findIndex((l) => l.trim() === line[1]);
    if (n >= 0) pos = { line: n + 1, col: 1 };
  }
  return { where: pos ? at(file, pos) : `${file}:1:1`, message: `rauc refuses this system.conf: ${msg}` };
}

function checkSystemConf(file: string, text: string, family: Bsp['raucFamily'], bsps: Bsp[], layouts: Layout[], add: Add): void {
  const { sections, issues } = parseIni(text);
  for (const i of issues) add('rauc', at(file, i.pos), 'LAMA_E_RAUC_SYNTAX', i.message);
  const system = sections.find((s) => s.name === 'system');
  if (!system) {
    add('rauc', `${file}:1:1`, 'LAMA_E_RAUC_SYSTEM', 'system.conf has no [system] section');
  } else {
    const compatible = system.keys.get('compatible');
    if (!compatible) add('rauc', at(file, system.pos), 'LAMA_E_RAUC_SYSTEM', '[system] has no compatible=');
    else if (!/[@$]/.test(compatible.value) && !bsps.some((b) => b.compatible === compatible.value)) {
      add('rauc', at(file, compatible.pos), 'LAMA_E_RAUC_COMPATIBLE', `compatible '${compatible.value}' is none of ${bsps.map((b) => b.compatible).join(', ')}`);
    }
    const bl = system.keys.get('bootloader');
    if (!bl) add('rauc', at(file, system.pos), 'LAMA_E_RAUC_SYSTEM', '[system] has no bootloader=');
    else if (!RAUC_BOOTLOADERS[family].includes(bl.value)) {
      add('rauc', at(file, bl.pos), 'LAMA_E_RAUC_BOOTLOADER', `bootloader '${bl.value}' does not fit the ${family} family (expected ${RAUC_BOOTLOADERS[family].join(' or ')})`);
    }
  }
  if (!sections.some((s) => s.name === 'keyring')) add('rauc', `${file}:1:1`, 'LAMA_E_RAUC_KEYRING', 'system.conf has no [keyring]: bundles could not be verified');

  const slots = sections.filter((s) => s.name.startsWith('slot.'));
  const covered = new Set<string>();
  for (const s of slots) {
    const [, cls = '', idx = ''] = s.name.split('.');
    if (!SLOT_CLASSES.has(cls) || !/^\d+$/.test(idx)) {
      add('rauc', at(file, s.pos), 'LAMA_E_RAUC_SLOT', `slot [${s.name}] is not slot.<rootfs|verity|efi>.<index>`);
      continue;
    }
    const device = s.keys.get('device');
    if (!device) {
      add('rauc', at(file, s.pos), 'LAMA_E_RAUC_SLOT', `slot [${s.name}] has no device=`);
      continue;
    }
    const type = s.keys.get('type');
    if (type && !RAUC_SLOT_TYPES.has(type.value)) {
      add('rauc', at(file, type.pos), 'LAMA_E_RAUC_SLOT_TYPE', `slot type '${type.value}' is not one RAUC knows (${[...RAUC_SLOT_TYPES].join(', ')})`);
    } else if (type && (cls === 'rootfs' || cls === 'verity') && type.value !== 'raw') {
      add('rauc', at(file, type.pos), 'LAMA_E_RAUC_SLOT_TYPE', `${cls} slot [${s.name}] must be type=raw: EROFS images and hash trees are written block for block`);
    }
    for (const layout of layouts) checkSlotDevice(file, s, cls, device, layout, slots, covered, add);
    if (cls === 'rootfs' && !s.keys.has('bootname')) add('rauc', at(file, s.pos), 'LAMA_E_RAUC_SLOT', `rootfs slot [${s.name}] has no bootname= (A/B switching needs it)`);
  }
  for (const layout of layouts) {
    for (const p of layout.partitions.filter((x) => x.role === 'root' || x.role === 'root-verity')) {
      if (!covered.has(p.label)) add('rauc', system ? at(file, system.pos) : `${file}:1:1`, 'LAMA_E_RAUC_UNCOVERED', `partition '${p.label}' of ${layout.file} is not an update slot`);
    }
  }
}

function checkSlotDevice(
  file: string,
  s: IniSection,
  cls: string,
  device: { value: string; pos: { line: number; col: number } },
  layout: Layout,
  slots: IniSection[],
  covered: Set<string>,
  add: Add,
): void {
  const where = at(file, device.pos);
  const mapper = /^\/dev\/mapper\/(.+)$/.exec(device.value)?.[1];
  const partlabel = /^\/dev\/disk\/by-partlabel\/(.+)$/.exec(device.value)?.[1];
  let part: LayoutPartition | undefined;
  if (mapper !== undefined) {
    part = layout.partitions.find((p) => p.mapper === mapper);
    if (!part) {
      add('rauc', where, 'LAMA_E_RAUC_DEVICE', `slot [${s.name}] writes ${device.value}, which is no LUKS mapper of ${layout.file}${mapper === 'root' ? ' (it is the read-only verity device)' : ''}`);
      return;
    }
  } else if (partlabel !== undefined) {
    part = layout.partitions.find((p) => p.label === partlabel);
    if (!part) {
      add('rauc', where, 'LAMA_E_RAUC_DEVICE', `slot [${s.name}] writes ${device.value}, but ${layout.file} has no partition '${partlabel}'`);
      return;
    }
    if (part.encrypt) {
      add('rauc', where, 'LAMA_E_RAUC_DEVICE', `slot [${s.name}] writes the raw LUKS partition '${partlabel}' and would destroy its header; target /dev/mapper/${part.mapper ?? partlabel}`);
      return;
    }
  } else {
    add('rauc', where, 'LAMA_E_RAUC_DEVICE', `slot [${s.name}] device ${device.value} is neither /dev/mapper/<name> nor /dev/disk/by-partlabel/<label>`);
    return;
  }
  covered.add(part.label);
  const roleFor: Record<string, PartitionRole> = { rootfs: 'root', verity: 'root-verity', efi: 'esp' };
  if (roleFor[cls] !== part.role) {
    add('rauc', where, 'LAMA_E_RAUC_DEVICE', `slot class '${cls}' targets '${part.label}', which is a ${part.role} partition`);
  }
  if (cls === 'verity') {
    const parent = s.keys.get('parent');
    const parentSlot = parent ? slots.find((x) => x.name === `slot.${parent.value}`) : undefined;
    if (!parent || !parentSlot) {
      add('rauc', parent ? at(file, parent.pos) : at(file, s.pos), 'LAMA_E_RAUC_PARENT', `verity slot [${s.name}] needs parent= naming its rootfs slot`);
      return;
    }
    const parentDev = parentSlot.keys.get('device')?.value ?? '';
    const parentPart = layout.partitions.find((p) => parentDev === `/dev/mapper/${p.mapper ?? ''}` || parentDev === `/dev/disk/by-partlabel/${p.label}`);
    if (parentPart && parentPart.slot !== part.slot) {
      add('rauc', at(file, parent.pos), 'LAMA_E_RAUC_PARENT', `verity slot [${s.name}] (slot ${part.slot ?? '?'}) has parent ${parent.value} in slot ${parentPart.slot ?? '?'}`);
    }
  }
}
