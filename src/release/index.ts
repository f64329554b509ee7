/**
 * A fleet release: one RAUC bundle for every host of a BSP. The root image and its dm-verity tree
 * are the same for all hosts; each host's identity (hostname, machine-id, network, own kernel
 * arguments) lives on its UKI's signed command line. The bundle carries, per slot, one template
 * UKI (the release's command line without identity, unsigned) and, per host, a small patch that
 * rebuilds that host's signed UKI byte for byte (src/release/patch.ts): the command-line area, a
 * few header fields and the Authenticode signature. docs/host-identity.md says why.
 *
 * Payload layout next to the images:
 *   hosts/<machine-id>/cmdline-<slot>    the host's command line for the slot (the install check reads it)
 *   hosts/<machine-id>/uki-<slot>.map    patch map (text)
 *   hosts/<machine-id>/uki-<slot>.bin    patch data
 *   uki-blocks/lamadist-<slot>.blocks    SHA-256 of each 16 KiB block of the slot's template UKI
 *
 * Public API:
 * - `planHostCmdlines(...)` → the template's and every host's command line per slot (pure)
 * - `blockIndex(data)` → SHA-256 of each UKI_BLOCK (16 KiB) block (pure)
 * - `efiTarMembers(sizes)` → the efi image's members, padding that puts each template UKI on a
 *   UKI_BLOCK boundary included (pure)
 * - `releaseBootFiles(...)` → the template UKIs and every host's payload files
 * - `systemConfClasses(family)` → the slot classes of meta-lamadist's system.conf
 * - `createRelease(...)` → the bundle (rootfs, verity, efi templates, host patches, install check)
 * - `diffUki`, `applyUkiPatch`, `renderPatch`, `parsePatch` (patch.ts)
 * - `openRelease(bundle, { keys, bundleKey? })` → the verified, unpacked release; `releaseUki`,
 *   `describeRelease` (open.ts)
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Bsp } from '../bsp/index.js';
import { UserError, isErrno } from '../errors.js';
import { hostArgs, isMachineId, type Host } from '../host/index.js';
import { slotCmdline } from '../image/index.js';
import { ALIGN_PAD_PREFIX, blockHashes, createBundle, slotClassesOf, type CreatedBundle, type SignerMaterial } from '../rauc/index.js';
import { signPe, type SignerKeys } from '../secureboot/index.js';
import { EFI_STUBS, buildUki, setUkiCmdline, type Input } from '../uki/index.js';
import { makeTempDir } from '../util/fsx.js';
import { run } from '../util/proc.js';
import { verifyVerity } from '../verity/index.js';
import { HOSTS_DIR, UKI_BLOCKS_DIR } from './layout.js';
import { diffUki, renderPatch } from './patch.js';

export { applyUkiPatch, diffUki, parsePatch, renderPatch, MAX_PATCH_BYTES, type PatchWrite, type UkiPatch } from './patch.js';
export { HOSTS_DIR, UKI_BLOCKS_DIR } from './layout.js';
export { describeRelease, openRelease, releaseUki, type OpenRelease } from './open.js';

const SLOTS = ['a', 'b'] as const;
export type Slot = (typeof SLOTS)[number];


const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
/** meta-lamadist's bundle hook: install check and the efi slot's install (applies the host's patch). */
export const BUNDLE_HOOK = path.join(REPO_ROOT, 'meta-lamadist/dynamic-layers/rauc/recipes-core/bundles/files/lamadist-bundle-hook');

/** Slot classes meta-lamadist's RAUC system.conf of a family defines (undefined when the layer is not beside the toolkit). */
export async function systemConfClasses(family: string): Promise<string[] | undefined> {
  const file = path.join(REPO_ROOT, 'meta-lamadist/recipes-core/rauc/files', family, 'system.conf');
  try {
    return slotClassesOf(await fs.readFile(file, 'utf8'), file);
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return undefined;
    throw err;
  }
}

/**
 * squashfs block size of release bundles. A device streams the bundle and reads only the blocks it
 * lacks, each costing its whole squashfs block: 16 KiB instead of mksquashfs's 128 KiB keeps a
 * version bump's download near the changed blocks, for a few KiB more metadata. The images are
 * stored verbatim, each on a 4 KiB boundary of the bundle (`alignImages`), so that a squashfs
 * block is exactly the 4 KiB sectors the device reads it in.
 */
export const RELEASE_SQUASHFS_BLOCK = 16384;

/** A host as a release sees it: its machine-id names its files, `args` follow the release's own arguments. */
export interface ReleaseHost {
  name: string;
  machineId: string;
  args: string[];
}

/** The release hosts of inventory entries. */
export function releaseHosts(hosts: readonly Host[]): ReleaseHost[] {
  return hosts.map((h) => ({ name: h.name, machineId: h.machineId, args: hostArgs(h) }));
}

/** Command lines of a release: the template's (no identity) and each host's, per slot. Pure. */
export function planHostCmdlines(bsp: Bsp, rootHash: string, hosts: readonly ReleaseHost[]): { template: Record<Slot, string>; hosts: { host: ReleaseHost; cmdline: Record<Slot, string> }[] } {
  const seen = new Set<string>();
  for (const h of hosts) {
    if (!isMachineId(h.machineId)) throw new UserError('LAMA_E_RELEASE_INPUT', `host ${h.name}: machine-id '${h.machineId}' is not 32 lowercase hex digits`);
    if (seen.has(h.machineId)) throw new UserError('LAMA_E_RELEASE_INPUT', `two hosts share machine-id ${h.machineId}`);
    seen.add(h.machineId);
  }
  const per = (extra?: string): Record<Slot, string> => ({ a: slotCmdline(rootHash, 'a', bsp, extra), b: slotCmdline(rootHash, 'b', bsp, extra) });
  return { template: per(), hosts: hosts.map((host) => ({ host, cmdline: per(host.args.join(' ')) })) };
}

/** Inputs of a release's boot artefacts. */
export interface ReleaseBootInput {
  bsp: Bsp;
  rootHash: string;
  /** systemd EFI stub; default: Debian's for the BSP's architecture. */
  stub?: Input;
  kernel: Input;
  initrd?: Input[];
  osrel?: Input;
  hosts: readonly ReleaseHost[];
  /** Secure Boot db certificate and key: every host's UKI is signed with them. */
  db: SignerKeys;
}

/** The template UKIs and, per host, its files under HOSTS_DIR and its signed UKIs. */
export interface ReleaseBoot {
  templates: Record<Slot, Buffer>;
  hosts: { host: ReleaseHost; files: Record<string, Buffer>; ukis: Record<Slot, Buffer> }[];
}

/**
 * Build the template UKI of each slot once, then each host's signed UKI from it (only the command
 * line changes) and the patch between them. Every patch is applied back before it is kept.
 */
export async function releaseBootFiles(o: ReleaseBootInput): Promise<ReleaseBoot> {
  const plan = planHostCmdlines(o.bsp, o.rootHash, o.hosts);
  const stub = o.stub ?? EFI_STUBS[o.bsp.arch];
  if (!stub) throw new UserError('LAMA_E_NO_STUB', `no systemd EFI stub known for ${o.bsp.arch}; pass one`);
  const kernel = typeof o.kernel === 'string' ? await fs.readFile(o.kernel) : o.kernel;
  const templates = {} as Record<Slot, Buffer>;
  for (const slot of SLOTS) templates[slot] = await buildUki({ stub, kernel, initrd: o.initrd ?? [], cmdline: plan.template[slot], ...(o.osrel !== undefined && { osrel: o.osrel }) });
  const hosts: ReleaseBoot['hosts'] = [];
  for (const { host, cmdline } of plan.hosts) {
    const files: Record<string, Buffer> = {};
    const ukis = {} as Record<Slot, Buffer>;
    for (const slot of SLOTS) {
      const signed = signPe(setUkiCmdline(templates[slot], cmdline[slot]), o.db);
      const { map, data } = renderPatch(diffUki(templates[slot], signed));
      const dir = `${HOSTS_DIR}/${host.machineId}`;
      files[`${dir}/cmdline-${slot}`] = Buffer.from(`${cmdline[slot]}\n`);
      files[`${dir}/uki-${slot}.map`] = Buffer.from(map);
      files[`${dir}/uki-${slot}.bin`] = data;
      ukis[slot] = signed;
    }
    hosts.push({ host, files, ukis });
  }
  return { templates, hosts };
}

/**
 * Block size of a template UKI's block index: the bundle's squashfs block size, so reading a block
 * costs no more than the squashfs block it lies in, and the index is 32 bytes per 16 KiB.
 */
export const UKI_BLOCK = RELEASE_SQUASHFS_BLOCK;

/** SHA-256 of each UKI_BLOCK block of `data`, the last one zero-padded: what the bundle hook seeds a UKI by. Pure. */
export function blockIndex(data: Buffer): Buffer {
  return blockHashes(data, UKI_BLOCK);
}

const TAR_HEADER = 512;

/**
 * The efi image's members in order: before each template UKI a zero-filled padding member that
 * puts the UKI's first byte on a UKI_BLOCK boundary of the tar. The bundle stores the tar on a
 * 4 KiB boundary and verbatim, so a UKI block is then exactly one squashfs block of it, and one a
 * device lacks costs only itself. Plain ustar members (512-byte header, data padded to 512), so any
 * tar reader, the bundle hook's header walk included, skips the padding by name. Pure.
 */
export function efiTarMembers(templateSizes: Readonly<Record<'a' | 'b', number>>): { name: string; size: number }[] {
  const members: { name: string; size: number }[] = [];
  let at = 0;
  for (const slot of SLOTS) {
    // padding header + padding + the UKI's header end on a boundary
    const pad = (UKI_BLOCK - ((at + 2 * TAR_HEADER) % UKI_BLOCK)) % UKI_BLOCK;
    members.push({ name: `${ALIGN_PAD_PREFIX}${slot}`, size: pad }, { name: `lamadist-${slot}.efi`, size: templateSizes[slot] });
    at += 2 * TAR_HEADER + pad + Math.ceil(templateSizes[slot] / TAR_HEADER) * TAR_HEADER;
  }
  return members;
}

/** Everything `createRelease` needs besides the boot inputs. */
export interface CreateReleaseOptions extends ReleaseBootInput {
  out: string;
  version: string;
  build?: string;
  description?: string;
  /** EROFS root image and its dm-verity hash tree (no superblock), whose root hash is `rootHash`. */
  rootfs: string;
  verity: string;
  format?: 'verity' | 'crypt';
  /** RAUC signing certificate and key. */
  signer: SignerMaterial;
  /** Crypt bundles: recipient certificates (PEM texts). */
  recipients?: string[];
  signingTime?: Date;
  force?: boolean;
  onStep?: (step: string) => void;
}

/** What `createRelease` reports. */
export interface CreatedRelease extends CreatedBundle {
  hosts: { name: string; machineId: string; patchBytes: number }[];
}

/**
 * Build the release bundle: the verity image (adaptive), the rootfs and efi images (installed by
 * the bundle hook from the blocks the device already has: the running slot's root image, whose
 * tree tells which blocks changed, and the running UKI, by the templates' block indexes), every
 * host's patch files, and the install check that refuses the bundle on a host it does not carry.
 */
export async function createRelease(o: CreateReleaseOptions): Promise<CreatedRelease> {
  if (o.hosts.length === 0) throw new UserError('LAMA_E_RELEASE_INPUT', 'a release needs at least one host (its inventory is empty)');
  const step = o.onStep ?? ((): void => undefined);
  // Every host's UKI will name this root hash: a wrong one would leave the whole fleet unbootable.
  step('checking the root image against its dm-verity tree and root hash');
  if (!/^[0-9a-f]{64}$/.test(o.rootHash)) throw new UserError('LAMA_E_RELEASE_INPUT', `root hash '${o.rootHash}' must be 64 lowercase hex digits`);
  await verifyVerity({ dataPath: o.rootfs, hashPath: o.verity, rootHash: Buffer.from(o.rootHash, 'hex') });
  step(`boot artefacts for ${o.hosts.length} host(s)`);
  const boot = await releaseBootFiles(o);
  const tmp = await makeTempDir('lamadist-release-');
  try {
    const members = efiTarMembers({ a: boot.templates.a.length, b: boot.templates.b.length });
    for (const m of members) {
      const slot = SLOTS.find((x) => m.name === `lamadist-${x}.efi`);
      await fs.writeFile(path.join(tmp.dir, m.name), slot ? boot.templates[slot] : Buffer.alloc(m.size));
    }
    const efi = path.join(tmp.dir, 'efi.tar');
    // The members in efiTarMembers' order, as plain ustar: the order and the headers place the UKIs.
    await run('tar', ['--format=ustar', '--owner=0', '--group=0', '--numeric-owner', '--mtime=@0', '--mode=0644', '-cf', efi, '-C', tmp.dir, ...members.map((m) => m.name)]);
    const payloadFiles: { name: string; from: string }[] = [];
    const put = async (name: string, data: Buffer): Promise<void> => {
      const from = path.join(tmp.dir, 'payload', name);
      await fs.mkdir(path.dirname(from), { recursive: true });
      await fs.writeFile(from, data);
      payloadFiles.push({ name, from });
    };
    for (const slot of SLOTS) await put(`${UKI_BLOCKS_DIR}/lamadist-${slot}.blocks`, blockIndex(boot.templates[slot]));
    for (const h of boot.hosts) {
      for (const [name, data] of Object.entries(h.files)) await put(name, data);
    }
    const slotClasses = await systemConfClasses(o.bsp.raucFamily);
    const created = await createBundle({
      out: o.out,
      compatible: o.bsp.compatible,
      version: o.version,
      ...(o.build !== undefined && { build: o.build }),
      ...(o.description !== undefined && { description: o.description }),
      // The verity image first: RAUC installs in manifest order, and the rootfs install hook reads
      // the new tree from the target's verity slot to learn which blocks it must fetch.
      images: [
        { slotClass: 'verity', path: o.verity, adaptive: true },
        { slotClass: 'rootfs', path: o.rootfs, hooks: ['install'] },
        { slotClass: 'efi', path: efi, hooks: ['install'] },
      ],
      ...(slotClasses && { slotClasses }),
      hookScript: BUNDLE_HOOK,
      squashfsBlockSize: RELEASE_SQUASHFS_BLOCK,
      alignImages: true,
      installCheck: true,
      payloadFiles,
      format: o.format ?? 'verity',
      signer: o.signer,
      ...(o.signingTime && { signingTime: o.signingTime }),
      ...(o.recipients?.length && { recipients: o.recipients }),
      force: o.force ?? false,
      onStep: step,
    });
    return {
      ...created,
      hosts: boot.hosts.map((h) => ({
        name: h.host.name,
        machineId: h.host.machineId,
        patchBytes: Object.entries(h.files)
          .filter(([n]) => n.endsWith('.bin'))
          .reduce((a, [, d]) => a + d.length, 0),
      })),
    };
  } finally {
    await tmp.remove();
  }
}
