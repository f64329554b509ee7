import { UserError } from '../errors.js';
import { decodeList, decodeString, encodeList, escapeValue, parseKeyFile, serializeKeyFile, type KeyFile } from './keyfile.js';

/** RAUC bundle formats. `plain` bundles are read (for `rauc bundle` peers) but never written. */
export type BundleFormat = 'plain' | 'verity' | 'crypt';

/** Per-image hooks RAUC knows. */
export type ImageHook = 'pre-install' | 'install' | 'post-install';

/** One `[image.<slot-class>]` section. */
export interface ManifestImage {
  slotClass: string;
  filename: string;
  /** Lower-case hex SHA-256 of the image file. */
  sha256?: string;
  size?: number;
  /** RAUC adaptive methods, e.g. ['block-hash-index']. */
  adaptive?: string[];
  hooks?: ImageHook[];
}

/** A RAUC manifest (manifest.raucm / the signed content of a verity or crypt bundle). */
export interface Manifest {
  compatible: string;
  version?: string;
  description?: string;
  build?: string;
  format: BundleFormat;
  /** Set only when the manifest said `format=` explicitly (RAUC writes `format=plain` only then). */
  formatExplicit?: boolean;
  verityHash?: string;
  veritySalt?: string;
  veritySize?: number;
  /** Hex AES-256 key of a crypt bundle's payload (only in the signed manifest, never in the payload). */
  cryptKey?: string;
  handler?: { filename?: string; args?: string };
  /** Bundle hook script and its `install-check` hook. */
  hookScript?: string;
  installCheck?: boolean;
  images: ManifestImage[];
  meta?: Record<string, Record<string, string>>;
}

const IMAGE_HOOKS: readonly ImageHook[] = ['pre-install', 'install', 'post-install'];

/**
 * Render a manifest exactly as RAUC's save_manifest_mem does: the same groups and keys in the same
 * order, so the manifest we sign is the one `rauc bundle` would have signed.
 */
export function renderManifest(m: Manifest): string {
  const kf: KeyFile = new Map();
  const set = (group: string, key: string, raw: string): void => {
    let g = kf.get(group);
    if (!g) kf.set(group, (g = new Map()));
    g.set(key, raw);
  };
  set('update', 'compatible', escapeValue(m.compatible));
  if (m.version !== undefined) set('update', 'version', escapeValue(m.version));
  if (m.description !== undefined) set('update', 'description', escapeValue(m.description));
  if (m.build !== undefined) set('update', 'build', escapeValue(m.build));
  if (m.format === 'plain') {
    if (m.formatExplicit) set('bundle', 'format', 'plain');
  } else {
    if (m.format === 'crypt' && m.cryptKey) set('bundle', 'crypt-key', m.cryptKey);
    set('bundle', 'format', m.format);
    if (m.verityHash) set('bundle', 'verity-hash', m.verityHash);
    if (m.veritySalt) set('bundle', 'verity-salt', m.veritySalt);
    if (m.veritySize) set('bundle', 'verity-size', String(m.veritySize));
  }
  if (m.handler?.filename !== undefined) set('handler', 'filename', escapeValue(m.handler.filename));
  if (m.handler?.args !== undefined) set('handler', 'args', escapeValue(m.handler.args));
  if (m.hookScript !== undefined) set('hooks', 'filename', escapeValue(m.hookScript));
  if (m.installCheck) set('hooks', 'hooks', encodeList(['install-check']));
  for (const img of m.images) {
    const g = `image.${img.slotClass}`;
    if (img.sha256 !== undefined) set(g, 'sha256', img.sha256);
    if (img.size !== undefined) set(g, 'size', String(img.size));
    set(g, 'filename', escapeValue(img.filename));
    const hooks = IMAGE_HOOKS.filter((h) => img.hooks?.includes(h));
    if (hooks.length > 0) set(g, 'hooks', encodeList(hooks));
    if (img.adaptive && img.adaptive.length > 0) set(g, 'adaptive', encodeList(img.adaptive));
  }
  for (const [group, kvs] of Object.entries(m.meta ?? {})) {
    for (const [k, v] of Object.entries(kvs)) set(`meta.${group}`, k, escapeValue(v));
  }
  return serializeKeyFile(kf);
}

function hex(value: string, bytes: number, what: string, where: string): string {
  if (!new RegExp(`^[0-9a-f]{${bytes * 2}}$`).test(value)) {
    throw new UserError('LAMA_E_MANIFEST', `${what} must be ${bytes * 2} lower-case hex digits`, { where });
  }
  return value;
}

function uint(value: string, what: string, where: string): number {
  if (!/^\d+$/.test(value)) throw new UserError('LAMA_E_MANIFEST', `${what} must be a whole number, got '${value}'`, { where });
  const n = Number(value);
  if (!Number.isSafeInteger(n)) throw new UserError('LAMA_E_MANIFEST', `${what} is too large`, { where });
  return n;
}

/**
 * Parse and validate a manifest (hand-written, from a bundle's payload, or the signed one). `file`
 * names the source in errors (a path, or e.g. "bundle.raucb:signed manifest").
 */
export function parseManifest(text: string, file: string): Manifest {
  const kf = parseKeyFile(text, file);
  const str = (group: string, key: string): string | undefined => {
    const raw = kf.get(group)?.get(key);
    return raw === undefined ? undefined : decodeString(raw, `${file}: [${group}] ${key}`);
  };
  const list = (group: string, key: string): string[] | undefined => {
    const raw = kf.get(group)?.get(key);
    return raw === undefined ? undefined : decodeList(raw, `${file}: [${group}] ${key}`);
  };
  const compatible = str('update', 'compatible');
  if (!compatible) throw new UserError('LAMA_E_MANIFEST', 'missing [update] compatible', { where: file });
  const formatRaw = str('bundle', 'format');
  const format = (formatRaw ?? 'plain') as BundleFormat;
  if (!['plain', 'verity', 'crypt'].includes(format)) {
    throw new UserError('LAMA_E_MANIFEST', `unknown bundle format '${formatRaw}' (plain, verity or crypt)`, { where: file });
  }
  const m: Manifest = { compatible, format, images: [] };
  if (formatRaw !== undefined) m.formatExplicit = true;
  const version = str('update', 'version');
  if (version !== undefined) m.version = version;
  const description = str('update', 'description');
  if (description !== undefined) m.description = description;
  const build = str('update', 'build');
  if (build !== undefined) m.build = build;
  const vh = str('bundle', 'verity-hash');
  if (vh !== undefined) m.verityHash = hex(vh, 32, 'verity-hash', file);
  const vs = str('bundle', 'verity-salt');
  if (vs !== undefined) m.veritySalt = hex(vs, 32, 'verity-salt', file);
  const vz = str('bundle', 'verity-size');
  if (vz !== undefined) m.veritySize = uint(vz, 'verity-size', file);
  const ck = str('bundle', 'crypt-key');
  if (ck !== undefined) m.cryptKey = hex(ck, 32, 'crypt-key', file);
  const hf = str('handler', 'filename');
  const ha = str('handler', 'args');
  if (hf !== undefined || ha !== undefined) m.handler = { ...(hf !== undefined && { filename: hf }), ...(ha !== undefined && { args: ha }) };
  const hs = str('hooks', 'filename');
  if (hs !== undefined) m.hookScript = hs;
  if (list('hooks', 'hooks')?.includes('install-check')) m.installCheck = true;
  for (const [group] of kf) {
    if (group.startsWith('meta.')) {
      const kvs: Record<string, string> = {};
      for (const [k] of kf.get(group) ?? []) kvs[k] = str(group, k) ?? '';
      (m.meta ??= {})[group.slice(5)] = kvs;
      continue;
    }
    if (!group.startsWith('image.')) continue;
    const slotClass = group.slice(6);
    const filename = str(group, 'filename');
    if (!filename) throw new UserError('LAMA_E_MANIFEST', `[${group}] has no filename`, { where: file });
    if (filename.includes('/') || filename.startsWith('.')) {
      throw new UserError('LAMA_E_MANIFEST', `[${group}] filename '${filename}' must be a plain file name`, { where: file });
    }
    const img: ManifestImage = { slotClass, filename };
    const sha = str(group, 'sha256');
    if (sha !== undefined) img.sha256 = hex(sha, 32, `[${group}] sha256`, file);
    const size = str(group, 'size');
    if (size !== undefined) img.size = uint(size, `[${group}] size`, file);
    const adaptive = list(group, 'adaptive');
    if (adaptive) img.adaptive = adaptive;
    const hooks = list(group, 'hooks');
    if (hooks) {
      for (const h of hooks) {
        if (!IMAGE_HOOKS.includes(h as ImageHook)) {
          throw new UserError('LAMA_E_MANIFEST', `[${group}] unknown hook '${h}' (${IMAGE_HOOKS.join(', ')})`, { where: file });
        }
      }
      img.hooks = hooks as ImageHook[];
    }
    m.images.push(img);
  }
  return m;
}

/**
 * The slot classes a RAUC system.conf defines (`[slot.<class>.<index>] ... class` is implied by the
 * group name). Bundles may only carry images for these classes.
 */
export function slotClassesOf(systemConf: string, file: string): string[] {
  const kf = parseKeyFile(systemConf, file);
  const classes: string[] = [];
  for (const group of kf.keys()) {
    const m = /^slot\.([^.]+)\.\d+$/.exec(group);
    if (m?.[1] && !classes.includes(m[1])) classes.push(m[1]);
  }
  return classes;
}
