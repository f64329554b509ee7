/**
 * The fleet installer stick: one bootable image that installs any of the hosts it was made for.
 *
 * The stick carries no installer OS of its own. It boots the release's own kernel and initramfs
 * (the release's slot-A template UKI with the command line `roothash=<release> lamadist.installer`,
 * signed with the fleet's db key, so it boots in setup mode and under the fleet's Secure Boot
 * alike); lamadist-init then opens the stick's copy of the release's root with dm-verity and runs
 * that root's `lamadist-install` on the stick's data partition. What gets installed is therefore
 * exactly what the installer itself was verified to be.
 *
 * Stick layout (GPT): `esp` (the installer UKI as the removable-media boot path), `installer_root`
 * (the release's EROFS image), `installer_verity` (its hash tree), `installer_data` (ext4):
 *
 *     installer.conf            lamadist-installer 1 / root-hash / rootfs-bytes / verity-bytes / …
 *     recovery.cert.pem         the fleet's recovery certificate (escrow recipient)
 *     secureboot/{PK,KEK,db}.auth   signed enrollment updates for firmware in setup mode
 *     hosts/<name>/host.conf    name, machine-id, smbios-uuid, mac…, min-bytes, luks <label> <uuid>…
 *     hosts/<name>/disk.sfdisk  the host's partition table (the last partition takes the drive's rest)
 *     hosts/<name>/esp.img      the host's ESP: signed UKIs of both slots, provisioning files
 *     escrow/                   where each installed host leaves its recovery key, encrypted
 *
 * No disk key is made here: the device creates them (lamadist-install), so they never exist
 * anywhere but on it and, encrypted to the fleet's recovery key, in the escrow.
 *
 * Public API:
 * - `installerCmdline(rootHash, bsp)`, `sfdiskScript(plan)`, `hostConf(…)`, `checkInstallable(bsp, hosts)` (pure)
 * - `buildInstaller(opts)` → what was written (plan, then one atomic write)
 * - `readStickFile(image, rel)`: a file of a stick's data partition (the escrow), read without mounting
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Bsp } from '../bsp/index.js';
import { planGpt, readGpt, writeGpt } from '../disk/index.js';
import { createRandom, randomUuid } from '../disk/random.js';
import { UserError } from '../errors.js';
import { readErofsSuperblock } from '../erofs/index.js';
import { buildEsp } from '../fat/index.js';
import type { Host } from '../host/index.js';
import { buildImage, copyInto, mkfsExt4Args, RAUC_DIR, ukiPath, type ImagePlan } from '../image/index.js';
import { keyPath, signingPair } from '../keys/index.js';
import type { OpenRelease } from '../release/index.js';
import { signPe } from '../secureboot/index.js';
import { setUkiCmdline } from '../uki/index.js';
import { AtomicFile, makeTempDir } from '../util/fsx.js';
import { run } from '../util/proc.js';

const MiB = 1024 * 1024;
/** GPT type of the stick's own partitions other than the ESP: plain Linux data, so no auto-mounter claims them. */
const LINUX_DATA = '0fc63daf-8483-4772-8e79-3d69d8477de4';
const ESP_TYPE = 'c12a7328-f81f-11d2-ba4b-00a0c93ec93b';
/** Room left on the data partition for the escrow and ext4's own metadata. */
const DATA_SLACK = 32 * MiB;

/** The installer UKI's command line: the release's root, installer mode, the BSP's console. Pure. */
export function installerCmdline(rootHash: string, bsp: Bsp): string {
  return [`roothash=${rootHash}`, 'lamadist.installer', bsp.console].join(' ');
}

/**
 * The host's partition table as an sfdisk script: the planned offsets, types, UUIDs and names;
 * the last partition (var) has no size, so it takes the rest of whatever drive it lands on. Pure.
 */
export function sfdiskScript(plan: ImagePlan): string {
  const ss = plan.disk.sectorSize;
  const lines = ['label: gpt', `label-id: ${plan.disk.guid.toUpperCase()}`, 'unit: sectors', `sector-size: ${ss}`, ''];
  plan.partitions.forEach((p, i) => {
    const last = i === plan.partitions.length - 1;
    const size = last ? '' : ` size=${p.size / ss},`;
    lines.push(`start=${p.offset / ss},${size} type=${p.typeGuid.toUpperCase()}, uuid=${p.uuid.toUpperCase()}, name="${p.label}"`);
  });
  return `${lines.join('\n')}\n`;
}

/** One host's record on the stick, read by lamadist-install's `conf` (key, space, value). Pure. */
export function hostConf(host: Host, plan: ImagePlan): string {
  const lines = ['lamadist-install-host 1', `name ${host.name}`, `machine-id ${host.machineId}`];
  if (host.smbiosUuid) lines.push(`smbios-uuid ${host.smbiosUuid}`);
  for (const m of host.macs) lines.push(`mac ${m}`);
  lines.push(`min-bytes ${plan.disk.size}`);
  for (const p of plan.partitions) if (p.luksUuid) lines.push(`luks ${p.label} ${p.luksUuid}`);
  return `${lines.join('\n')}\n`;
}

/**
 * Whether a stick can install these hosts from a release for `bsp`: UEFI boards only, and every
 * host recognisable by SMBIOS UUID or MAC. Throws the one-line reason; checked before anything is
 * issued or registered.
 */
export function checkInstallable(bsp: Bsp, hosts: Host[]): void {
  if (!bsp.efiBootName)
    throw new UserError('LAMA_E_INSTALLER', `the installer stick boots through UEFI; ${bsp.name} boots through U-Boot (use --disk)`);
  const missing = hosts.filter((h) => !h.smbiosUuid && h.macs.length === 0).map((h) => h.name);
  if (missing.length > 0)
    throw new UserError(
      'LAMA_E_INSTALLER',
      `the installer recognises a machine by SMBIOS UUID or MAC; ${missing.join(', ')} has neither (lamadist host add --smbios-uuid/--mac)`,
    );
}

/** One host the stick installs: its inventory entry, signed UKIs and ESP provisioning files. */
export interface InstallerHost {
  host: Host;
  ukis: Record<'a' | 'b', string>;
  espFiles: Record<string, Buffer>;
}

export interface InstallerResult {
  out: string;
  bytes: number;
  hosts: { host: string; machineId: string; minBytes: number; luks: { label: string; uuid: string }[] }[];
  /** Where each host's recovery key escrow appears on the stick's data partition. */
  escrowDir: string;
  partitions: { label: string; offset: number; size: number }[];
}

async function stageHost(dir: string, release: OpenRelease, h: InstallerHost, sizes: Record<string, number> | undefined): Promise<ImagePlan> {
  // The host's disk, planned as `provision --disk` would build it, but never written here: the
  // device fills its LUKS2 containers with keys of its own.
  const plan = await buildImage({
    out: path.join(dir, 'never-written.img'),
    bsp: release.bsp.name,
    rootfs: release.rootfs,
    verity: { file: release.verity, rootHash: release.rootHash },
    uki: h.ukis.a,
    ukiB: h.ukis.b,
    encrypt: true,
    espFiles: h.espFiles,
    ...(sizes && { sizes }),
    dryRun: true,
  });
  const esp = plan.partitions.find((p) => p.content === 'esp');
  if (!esp) throw new UserError('LAMA_E_INSTALLER', `the ${release.bsp.name} layout has no ESP`);
  const espImage = path.join(dir, 'esp.img');
  await fs.writeFile(espImage, '');
  await fs.truncate(espImage, esp.size);
  const files: Record<string, string | Buffer> = { [ukiPath('a')]: h.ukis.a, [ukiPath('b')]: h.ukis.b, ...h.espFiles };
  if (release.bsp.efiBootName) files[`/EFI/BOOT/${release.bsp.efiBootName}`] = h.ukis.a;
  await buildEsp({ image: espImage, offset: 0, size: esp.size, volumeId: plan.esp.volumeId, files, dirs: [RAUC_DIR], timestamp: 0 });
  await fs.writeFile(path.join(dir, 'disk.sfdisk'), sfdiskScript(plan));
  await fs.writeFile(path.join(dir, 'host.conf'), hostConf(h.host, plan));
  return plan;
}

/** Build the installer stick for `hosts` from an opened release. */
export async function buildInstaller(o: {
  out: string;
  release: OpenRelease;
  keys: string;
  hosts: InstallerHost[];
  sizes?: Record<string, number>;
  force?: boolean;
  log?: (m: string) => void;
}): Promise<InstallerResult> {
  const log = o.log ?? ((): void => undefined);
  const { release } = o;
  checkInstallable(release.bsp, o.hosts.map((h) => h.host));
  const recoveryCert = await keyPath(o.keys, 'recovery-cert');
  const db = await signingPair(o.keys, 'secureboot-db');
  const tmp = await makeTempDir('lamadist-installer-');
  try {
    const data = path.join(tmp.dir, 'data');
    await fs.mkdir(path.join(data, 'escrow'), { recursive: true });
    await fs.mkdir(path.join(data, 'secureboot'));
    for (const v of ['pk', 'kek', 'db'] as const) {
      await fs.copyFile(await keyPath(o.keys, `secureboot-${v}-auth`), path.join(data, 'secureboot', `${v === 'db' ? 'db' : v.toUpperCase()}.auth`));
    }
    await fs.copyFile(recoveryCert, path.join(data, 'recovery.cert.pem'));
    const sb = await readErofsSuperblock(release.rootfs);
    if (!sb) throw new UserError('LAMA_E_INSTALLER', 'the release root image has no EROFS superblock', { where: release.rootfs });
    const verityBytes = (await fs.stat(release.verity)).size;
    await fs.writeFile(
      path.join(data, 'installer.conf'),
      ['lamadist-installer 1', `release ${release.version}`, `bsp ${release.bsp.name}`, `root-hash ${release.rootHash}`, `rootfs-bytes ${sb.bytes}`, `verity-bytes ${verityBytes}`, ''].join('\n'),
    );
    const hosts: InstallerResult['hosts'] = [];
    for (const h of o.hosts) {
      log(`${h.host.name}: partition plan and ESP`);
      const dir = path.join(data, 'hosts', h.host.name);
      await fs.mkdir(dir, { recursive: true });
      const plan = await stageHost(dir, release, h, o.sizes);
      hosts.push({
        host: h.host.name,
        machineId: h.host.machineId,
        minBytes: plan.disk.size,
        luks: plan.partitions.filter((p) => p.luksUuid).map((p) => ({ label: p.label, uuid: p.luksUuid as string })),
      });
    }

    log('installer UKI');
    const uki = signPe(setUkiCmdline(release.templates.a, installerCmdline(release.rootHash, release.bsp), 'lamadist-installer.efi'), db);
    const dataBytes = (await duBytes(data)) + DATA_SLACK;
    const random = createRandom();
    const gpt = planGpt({
      diskGuid: randomUuid(random, 'gpt:disk'),
      partitions: [
        { name: 'esp', typeGuid: ESP_TYPE, size: Math.max(64 * MiB, Math.ceil((uki.length * 1.1) / MiB) * MiB + 8 * MiB) },
        { name: 'installer_root', typeGuid: LINUX_DATA, size: sb.bytes },
        { name: 'installer_verity', typeGuid: LINUX_DATA, size: verityBytes },
        { name: 'installer_data', typeGuid: LINUX_DATA, size: dataBytes },
      ],
    });
    const at = (i: number): { offset: number; size: number } => {
      const p = gpt.partitions[i];
      if (!p) throw new Error('installer GPT lost a partition');
      return { offset: Number(p.firstLba) * gpt.sectorSize, size: Number(p.lastLba - p.firstLba + 1n) * gpt.sectorSize };
    };
    const dataFile = path.join(tmp.dir, 'data.ext4');
    await run(
      'mkfs.ext4',
      mkfsExt4Args({ file: dataFile, bytes: at(3).size, uuid: randomUuid(random, 'data:uuid'), label: 'lamadist-inst', source: data }),
      { userErrorCode: 'LAMA_E_EXT4' },
    );

    log(`writing ${o.out}`);
    // The stick carries each host's update-client token and bundle key: it is a secret.
    const image = await AtomicFile.open(o.out, { force: o.force ?? false, mode: 0o600 });
    try {
      const size = Number(gpt.diskSectors) * gpt.sectorSize;
      await image.fd.truncate(size);
      await writeGpt(image.fd, gpt);
      await copyInto(release.rootfs, image.fd, at(1).offset, sb.bytes);
      await copyInto(release.verity, image.fd, at(2).offset, verityBytes);
      await copyInto(dataFile, image.fd, at(3).offset, at(3).size);
      await image.fd.sync();
      const files = { [`/EFI/BOOT/${release.bsp.efiBootName}`]: uki };
      await buildEsp({ image: image.temp, offset: at(0).offset, size: at(0).size, volumeId: randomUuid(random, 'esp').slice(0, 8), files, timestamp: 0 });
      await image.commit();
      return {
        out: path.resolve(o.out),
        bytes: size,
        hosts,
        escrowDir: 'installer_data:/escrow',
        partitions: ['esp', 'installer_root', 'installer_verity', 'installer_data'].map((label, i) => ({ label, ...at(i) })),
      };
    } catch (err) {
      await image.abort();
      throw err;
    }
  } finally {
    await tmp.remove();
  }
}

/** Bytes the files under `dir` occupy (a sparse ESP image counts only its written blocks, as mke2fs -d copies it). */
async function duBytes(dir: string): Promise<number> {
  let total = 0;
  for (const e of await fs.readdir(dir, { withFileTypes: true, recursive: true })) {
    const st = await fs.stat(path.join(e.parentPath, e.name));
    total += st.blocks * 512 + 4096;
  }
  return total;
}

/**
 * A file of an installer stick's data partition (`escrow/<host>.cms`), read from the stick's image
 * or block device without mounting it (debugfs at the partition's offset); undefined when `image`
 * is not an installer stick or the file is not on it.
 */
export async function readStickFile(image: string, rel: string): Promise<Buffer | undefined> {
  const gpt = await readGpt(image).catch(() => undefined);
  const data = gpt?.table.partitions.find((p) => p.name === 'installer_data');
  if (!gpt || !data) return undefined;
  const offset = Number(data.firstLba) * gpt.table.sectorSize;
  if (!/^[A-Za-z0-9._/-]+$/.test(rel) || rel.includes('..')) throw new UserError('LAMA_E_USAGE', `'${rel}' is not a path on the stick`);
  const r = await run('debugfs', ['-R', `cat /${rel}`, `${image}?offset=${offset}`], { allowFailure: true });
  // debugfs exits 0 for a missing file and says so on stderr.
  if (r.code !== 0 || /File not found|Bad magic|Couldn't find valid/.test(r.stderr)) return undefined;
  return r.stdoutBuffer;
}
