import { promises as fs } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { UserError, isErrno } from '../errors.js';
import { isDpsRole } from '../disk/index.js';
import { parseYamlLocated, type LocatedYaml } from '../util/yaml.js';

/**
 * Disk layout definitions (meta-lamadist/wic/layouts/<name>.yaml): the single source of partition
 * sizes for `lamadist image build`, the wks templates and `lamadist check`. Parsed with locations so
 * every mistake is reported as file:line:col.
 */

export interface LayoutPartition {
  label: string;
  role: string;
  slot?: 'a' | 'b';
  sizeMiB: number;
  fs?: 'vfat' | 'ext4';
  encrypt?: 'luks2';
  mapper?: string;
  grow?: boolean;
}

export interface LayoutRaw {
  name: string;
  offsetSectors: number;
  maxKiB: number;
  source: string;
}

export interface Layout {
  name: string;
  file: string;
  arch: string;
  alignmentMiB: number;
  firstPartitionMiB: number;
  raw: LayoutRaw[];
  partitions: LayoutPartition[];
}

/** Directory of the layouts shipped with the toolkit (works from src/ and dist/). */
export function layoutsDir(): string {
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../meta-lamadist/wic/layouts');
}

type Raw = Record<string, unknown>;

function fail(y: LocatedYaml, at: (string | number)[], message: string): never {
  throw new UserError('LAMA_E_LAYOUT', message, { where: y.where(at, 'value') });
}

function int(y: LocatedYaml, at: (string | number)[], v: unknown, min: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min)
    fail(y, at, `${at.join('.')} must be a whole number ≥ ${min}, got ${JSON.stringify(v)}`);
  return v;
}

const PARTITION_KEYS = new Set(['label', 'role', 'slot', 'size-mib', 'fs', 'encrypt', 'mapper', 'grow']);

/** Validate a parsed layout document. */
export function parseLayout(text: string, file: string, name = path.basename(file, '.yaml')): Layout {
  const y = parseYamlLocated<Raw>(text, file);
  const v = y.value;
  if (!v || typeof v !== 'object' || Array.isArray(v)) fail(y, [], 'a layout must be a mapping');
  if (v.arch !== 'x86-64' && v.arch !== 'arm64')
    fail(y, ['arch'], `arch must be x86-64 or arm64, got ${JSON.stringify(v.arch)}`);
  const alignmentMiB = int(y, ['alignment-mib'], v['alignment-mib'] ?? 1, 1);
  const firstPartitionMiB = int(y, ['first-partition-mib'], v['first-partition-mib'] ?? alignmentMiB, 1);
  if (!Array.isArray(v.partitions) || v.partitions.length === 0)
    fail(y, ['partitions'], 'partitions must be a non-empty list');
  const labels = new Set<string>();
  const partitions = (v.partitions as unknown[]).map((p, i): LayoutPartition => {
    const at = ['partitions', i];
    if (!p || typeof p !== 'object') fail(y, at, 'each partition must be a mapping');
    const r = p as Raw;
    for (const k of Object.keys(r))
      if (!PARTITION_KEYS.has(k))
        fail(y, [...at, k], `unknown partition key '${k}' (known: ${[...PARTITION_KEYS].join(', ')})`);
    if (typeof r.label !== 'string' || !/^[A-Za-z0-9_.-]{1,36}$/.test(r.label))
      fail(y, [...at, 'label'], 'label must be 1-36 characters of A-Z a-z 0-9 _ . -');
    if (labels.has(r.label)) fail(y, [...at, 'label'], `duplicate label '${r.label}'`);
    labels.add(r.label);
    if (typeof r.role !== 'string' || !isDpsRole(r.role))
      fail(y, [...at, 'role'], `role ${JSON.stringify(r.role)} is not a Discoverable Partitions role`);
    if (r.slot !== undefined && r.slot !== 'a' && r.slot !== 'b')
      fail(y, [...at, 'slot'], 'slot must be a or b');
    if (r.fs !== undefined && r.fs !== 'vfat' && r.fs !== 'ext4')
      fail(y, [...at, 'fs'], 'fs must be vfat or ext4');
    if (r.encrypt !== undefined && r.encrypt !== 'luks2')
      fail(y, [...at, 'encrypt'], 'encrypt must be luks2');
    if (r.grow !== undefined && typeof r.grow !== 'boolean')
      fail(y, [...at, 'grow'], 'grow must be true or false');
    return {
      label: r.label,
      role: r.role,
      slot: r.slot as 'a' | 'b' | undefined,
      sizeMiB: int(y, [...at, 'size-mib'], r['size-mib'], 1),
      fs: r.fs as 'vfat' | 'ext4' | undefined,
      encrypt: r.encrypt as 'luks2' | undefined,
      mapper: typeof r.mapper === 'string' ? r.mapper : undefined,
      grow: r.grow === true,
    };
  });
  const raw = ((v.raw as unknown[] | undefined) ?? []).map((r, i): LayoutRaw => {
    const x = r as Raw;
    const at = ['raw', i];
    if (typeof x.name !== 'string') fail(y, [...at, 'name'], 'raw region needs a name');
    if (typeof x.source !== 'string') fail(y, [...at, 'source'], 'raw region needs a source file name');
    return {
      name: x.name,
      offsetSectors: int(y, [...at, 'offset-sectors'], x['offset-sectors'], 1),
      maxKiB: int(y, [...at, 'max-kib'], x['max-kib'], 1),
      source: x.source,
    };
  });
  for (const r of raw) {
    if (r.offsetSectors * 512 + r.maxKiB * 1024 > firstPartitionMiB * 1024 * 1024) {
      fail(y, ['raw'], `raw region ${r.name} reaches past first-partition-mib ${firstPartitionMiB}`);
    }
  }
  return { name, file, arch: v.arch as string, alignmentMiB, firstPartitionMiB, raw, partitions };
}

/** Load a layout by name (shipped) or by path (a user's override file). */
export async function loadLayout(nameOrFile: string): Promise<Layout> {
  const isFile = nameOrFile.includes('/') || nameOrFile.endsWith('.yaml');
  const file = isFile ? nameOrFile : path.join(layoutsDir(), `${nameOrFile}.yaml`);
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if (isErrno(err, 'ENOENT'))
      throw new UserError('LAMA_E_LAYOUT', `layout ${isFile ? file : `'${nameOrFile}'`} does not exist`);
    throw err;
  }
  return parseLayout(text, file, isFile ? path.basename(file, '.yaml') : nameOrFile);
}

/** Apply `label=MiB` size overrides (tests and small boards shrink slots this way). */
export function withSizes(layout: Layout, sizes: Record<string, number>): Layout {
  for (const label of Object.keys(sizes)) {
    if (!layout.partitions.some((p) => p.label === label)) {
      throw new UserError(
        'LAMA_E_LAYOUT',
        `--size names partition '${label}', which layout ${layout.name} does not have (${layout.partitions.map((p) => p.label).join(', ')})`,
      );
    }
  }
  return {
    ...layout,
    partitions: layout.partitions.map((p) => ({ ...p, sizeMiB: sizes[p.label] ?? p.sizeMiB })),
  };
}
