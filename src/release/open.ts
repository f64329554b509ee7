/**
 * A release bundle opened for use off the device: verified against the fleet's RAUC keyring,
 * unpacked, its templates, root hash and hosts read. Provisioning and `release show` start here.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { BSPS, type Bsp } from '../bsp/index.js';
import { UserError } from '../errors.js';
import { keyPath, readManifest } from '../keys/index.js';
import { extractBundle, type BundleInfo } from '../rauc/index.js';
import { inspectUki } from '../uki/index.js';
import { makeTempDir, readUserFile } from '../util/fsx.js';
import { run } from '../util/proc.js';
import { HOSTS_DIR } from './layout.js';
import { applyUkiPatch, parsePatch } from './patch.js';

/** A release bundle verified against the fleet's RAUC keyring and unpacked into a temporary directory. */
export interface OpenRelease {
  bundle: string;
  info: BundleInfo;
  bsp: Bsp;
  version: string;
  rootHash: string;
  templates: Record<'a' | 'b', Buffer>;
  rootfs: string;
  verity: string;
  /** Machine-ids the release carries boot files for. */
  hosts: Set<string>;
  /** The unpacked bundle. */
  dir: string;
  close: () => Promise<void>;
}

/** Device key files of the key directory, the update server's first: candidates to open a crypt bundle. */
async function deviceKeys(keys: string): Promise<string[]> {
  const names = (await readManifest(keys)).files.filter((f) => f.purpose === 'device-key' && f.device).map((f) => f.device as string);
  names.sort((a, b) => Number(b === 'update-server') - Number(a === 'update-server'));
  return Promise.all(names.map((n) => keyPath(keys, 'device-key', n)));
}

/**
 * Verify and unpack a release bundle. A crypt bundle is opened with `bundleKey`, or with the first
 * device key of the key directory that is one of its recipients.
 */
export async function openRelease(bundle: string, o: { keys: string; bundleKey?: string }): Promise<OpenRelease> {
  return unpackRelease(bundle, {
    keyring: await keyPath(o.keys, 'rauc-ca-cert'),
    candidates: o.bundleKey ? [o.bundleKey] : [undefined, ...(await deviceKeys(o.keys))],
  });
}

/**
 * `openRelease` with the keyring and the keys to try on a crypt bundle given directly (`undefined`
 * tries without one): what the update server has instead of a key directory.
 */
export async function unpackRelease(bundle: string, o: { keyring: string; candidates: readonly (string | undefined)[] }): Promise<OpenRelease> {
  const { keyring, candidates } = o;
  const tmp = await makeTempDir('lamadist-release-open-');
  try {
    const dir = path.join(tmp.dir, 'bundle');
    let info: BundleInfo | undefined;
    for (const key of candidates) {
      try {
        info = await extractBundle(bundle, dir, { keyring, ...(key && { deviceKey: key }) });
        break;
      } catch (err) {
        const next = err instanceof UserError && (err.code === 'LAMA_E_BUNDLE_NEEDS_KEY' || err.code === 'LAMA_E_BUNDLE_WRONG_DEVICE_KEY');
        if (!next || key === candidates.at(-1)) {
          if (next) throw new UserError('LAMA_E_PROVISION_RELEASE', 'no key of the key directory opens this crypt bundle; pass --bundle-key', { where: bundle });
          throw err;
        }
        await fs.rm(dir, { recursive: true, force: true });
      }
    }
    if (!info) throw new Error('unreachable: no bundle opened');
    const bsp = BSPS.find((b) => b.compatible === info.manifest.compatible);
    if (!bsp) throw new UserError('LAMA_E_PROVISION_RELEASE', `release is for '${info.manifest.compatible}', which no BSP of this toolkit is`, { where: bundle });
    const image = (cls: string): string => {
      const i = info.manifest.images.find((x) => x.slotClass === cls);
      if (!i) throw new UserError('LAMA_E_PROVISION_RELEASE', `release has no ${cls} image; it is not a LamaDist release bundle`, { where: bundle });
      return path.join(dir, i.filename);
    };
    const efiDir = path.join(tmp.dir, 'efi');
    await fs.mkdir(efiDir);
    if ((await run('tar', ['-xf', image('efi'), '-C', efiDir, 'lamadist-a.efi', 'lamadist-b.efi'], { allowFailure: true })).code !== 0) {
      throw new UserError('LAMA_E_PROVISION_RELEASE', 'release efi image holds no lamadist-a.efi and lamadist-b.efi templates', { where: bundle });
    }
    const templates = { a: await fs.readFile(path.join(efiDir, 'lamadist-a.efi')), b: await fs.readFile(path.join(efiDir, 'lamadist-b.efi')) };
    const rootHash = /(?:^|\s)roothash=([0-9a-f]{64})(?:\s|$)/.exec(inspectUki(templates.a, 'lamadist-a.efi').cmdline ?? '')?.[1];
    if (!rootHash) throw new UserError('LAMA_E_PROVISION_RELEASE', "release's slot A template UKI names no root hash", { where: bundle });
    const hostsDir = path.join(dir, HOSTS_DIR);
    const hosts = new Set(await fs.readdir(hostsDir).catch(() => []));
    return { bundle, info, bsp, version: info.manifest.version ?? '', rootHash, templates, rootfs: image('rootfs'), verity: image('verity'), hosts, dir, close: tmp.remove };
  } catch (err) {
    await tmp.remove();
    throw err;
  }
}

/** A host's signed UKI as the release ships it: its patch applied to the slot's template (hashes checked). */
export async function releaseUki(release: OpenRelease, machineId: string, slot: 'a' | 'b'): Promise<Buffer> {
  const base = path.join(release.dir, HOSTS_DIR, machineId, `uki-${slot}`);
  const map = await readUserFile(`${base}.map`, 'UKI patch map');
  return applyUkiPatch(release.templates[slot], parsePatch(map.toString('utf8'), await readUserFile(`${base}.bin`, 'UKI patch data'), `${base}.map`), `${base}.map`);
}


/** What `release show` prints: the release and, per host, its name, machine-id and patch size. Reads only the opened release. */
export async function describeRelease(r: OpenRelease): Promise<{
  bundle: string;
  bsp: string;
  compatible: string;
  version: string;
  rootHash: string;
  hosts: { name: string; machineId: string; cmdline: Record<'a' | 'b', string>; patchBytes: number }[];
}> {
  const hosts = [];
  for (const machineId of [...r.hosts].sort()) {
    const dir = path.join(r.dir, HOSTS_DIR, machineId);
    const cmdline = {} as Record<'a' | 'b', string>;
    let patchBytes = 0;
    for (const slot of ['a', 'b'] as const) {
      cmdline[slot] = (await readUserFile(path.join(dir, `cmdline-${slot}`), 'host command line')).toString('utf8').trim();
      patchBytes += (await fs.stat(path.join(dir, `uki-${slot}.bin`))).size;
    }
    const name = /(?:^|\s)systemd\.hostname=(\S+)/.exec(cmdline.a)?.[1] ?? '';
    hosts.push({ name, machineId, cmdline, patchBytes });
  }
  return { bundle: r.bundle, bsp: r.bsp.name, compatible: r.info.manifest.compatible, version: r.version, rootHash: r.rootHash, hosts };
}
