import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { getBsp, type Bsp } from '../bsp/index.js';
import { UserError, isErrno } from '../errors.js';
import { writeGpt } from '../disk/index.js';
import { createRandom, randomUuid, type RandomSource } from '../disk/random.js';
import { checkFileContexts, prepareRootfs, type RootfsInput } from '../erofs/index.js';
import { buildEsp } from '../fat/index.js';
import { loadImaSigner } from '../ima/index.js';
import { keyPath } from '../keys/index.js';
import { LUKS2_DATA_OFFSET, encryptPayload, planLuks2 } from '../luks/index.js';
import { signPe } from '../secureboot/index.js';
import { EFI_STUBS, buildUki, inspectUki } from '../uki/index.js';
import { AtomicFile, makeTempDir, readUserFile } from '../util/fsx.js';
import { formatVerity, productSalt, readVeritySuperblock, verifyVerity } from '../verity/index.js';
import { buildVarExt4 } from './ext4.js';
import { loadLayout, withSizes } from './layout.js';
import { buildRootErofs } from './root.js';
import {
  PROVISION_KEY_PATH,
  RAUC_DIR,
  planImage,
  slotCmdline,
  ukiPath,
  type ImagePlan,
  type SlotContent,
} from './plan.js';

export interface BuildImageOptions {
  out: string;
  bsp: string;
  /** Directory, tarball or EROFS image. */
  rootfs: string;
  kernel?: string;
  initrd?: string[];
  /**
   * The root image's dm-verity tree (with superblock) and root hash, as a release ships them: used
   * after checking the image against them, instead of a tree made here.
   */
  verity?: { file: string; rootHash: string };
  /** Prebuilt (signed) UKI for slot A; its command line must carry slot A's root hash. */
  uki?: string;
  /** Prebuilt UKI for slot B (with --uki, slot B stays empty without it). */
  ukiB?: string;
  /** systemd EFI stub for building UKIs. */
  stub?: string;
  /** Extra kernel command line arguments. */
  cmdline?: string;
  /** Layout name or file replacing the BSP's. */
  layout?: string;
  /** Partition size overrides in MiB by label. */
  sizes?: Record<string, number>;
  diskSize?: number;
  /** LUKS2 for the slots and var (default true). */
  encrypt?: boolean;
  /** Leave slot B empty (RAUC fills it with the first update). */
  emptyB?: boolean;
  /** Derive every random value from this seed: same inputs and seed, same bytes. */
  seed?: string;
  /** A recovery passphrase file the user chose to share between images. */
  recoveryKey?: string;
  /** Where to write the generated recovery key (default `<out>.recovery-key`). */
  recoveryKeyOut?: string;
  /** Secure Boot db signing key for UKIs built here. */
  dbCert?: string;
  dbKey?: string;
  /** Key directory from `lamadist keys init` (its db key signs the UKIs). */
  keys?: string;
  /**
   * SELinux file_contexts labelling every inode of the root image (default: the one the tree's
   * /etc/selinux/config selects, if the tree has a policy).
   */
  fileContexts?: string;
  /**
   * Fleet IMA key (key directory, or key file with `imaCert`): executables, ELF objects and kernel
   * modules of the root image get `security.ima` signatures. The given tree is never modified.
   */
  imaKey?: string;
  imaCert?: string;
  /** Raw boot loader regions by name (Rockchip idbloader, u-boot). */
  raw?: Record<string, string>;
  /**
   * Per-host files for the ESP by absolute path (provisioning under `/lamadist/var/`, which the
   * initramfs moves into /var at first boot and wipes from the ESP).
   */
  espFiles?: Record<string, Buffer>;
  /** Time stamped on every file (SOURCE_DATE_EPOCH). */
  timestamp?: number;
  force?: boolean;
  /** Plan only: prepare the root image and print the plan, write nothing. */
  dryRun?: boolean;
  onPlan?: (plan: ImagePlan) => void;
  onStep?: (step: string) => void;
}

const MODHEX = 'cbdefghijklnrtuv';

/** A typeable recovery key in systemd's style: 32 random bytes as 8 dash-separated groups of modhex. */
export function recoveryKeyText(random: RandomSource): string {
  const b = random('key:recovery', 32);
  let s = '';
  for (const byte of b) s += (MODHEX[byte >> 4] as string) + (MODHEX[byte & 15] as string);
  return (s.match(/.{8}/g) as string[]).join('-');
}

const CHUNK = 8 * 1024 * 1024;

/** Copy `length` bytes of `src` to `dst` at `dstOffset`, skipping all-zero chunks (the image is sparse). */
/** Copy `length` bytes of `src` to `dst` at `dstOffset`, leaving all-zero chunks as holes. */
export async function copyInto(src: string, dst: FileHandle, dstOffset: number, length: number): Promise<void> {
  const h = await fs.open(src, 'r');
  try {
    const buf = Buffer.alloc(CHUNK);
    for (let done = 0; done < length;) {
      const want = Math.min(CHUNK, length - done);
      const { bytesRead } = await h.read(buf, 0, want, done);
      if (bytesRead === 0) throw new Error(`${src} ended after ${done} of ${length} bytes`);
      const piece = buf.subarray(0, bytesRead);
      if (piece.some((x) => x !== 0)) await dst.write(piece, 0, bytesRead, dstOffset + done);
      done += bytesRead;
    }
  } finally {
    await h.close();
  }
}

async function osRelease(dir: string | undefined): Promise<Buffer | undefined> {
  if (!dir) return undefined;
  for (const p of ['etc/os-release', 'usr/lib/os-release']) {
    try {
      return await fs.readFile(path.join(dir, p));
    } catch (err) {
      if (!isErrno(err, 'ENOENT') && !isErrno(err, 'ENOTDIR')) throw err;
    }
  }
  return undefined;
}

async function signer(o: BuildImageOptions): Promise<{ certPem: Buffer; keyPem: Buffer } | undefined> {
  if (o.dbCert || o.dbKey) {
    if (!o.dbCert || !o.dbKey) throw new UserError('LAMA_E_USAGE', '--db-cert and --db-key go together');
    return {
      certPem: await readUserFile(o.dbCert, 'db certificate'),
      keyPem: await readUserFile(o.dbKey, 'db key'),
    };
  }
  if (o.keys) {
    return {
      certPem: await fs.readFile(await keyPath(o.keys, 'secureboot-db-cert')),
      keyPem: await fs.readFile(await keyPath(o.keys, 'secureboot-db-key')),
    };
  }
  return undefined;
}

/** Check a prebuilt UKI's command line against the slot it will boot. */
function checkPrebuiltUki(pe: Buffer, file: string, slot: 'a' | 'b', rootHash: string): string {
  const cmdline = inspectUki(pe, file).cmdline ?? '';
  const hash = /(?:^|\s)roothash=([0-9a-f]+)/.exec(cmdline)?.[1];
  const s = /(?:^|\s)lamadist\.slot=([ab])/.exec(cmdline)?.[1];
  if (hash !== rootHash) {
    throw new UserError(
      'LAMA_E_UKI_ROOTHASH',
      `UKI command line has roothash=${hash ?? '(none)'} but slot ${slot}'s root image hashes to ${rootHash}`,
      { where: file },
    );
  }
  if (s !== slot)
    throw new UserError(
      'LAMA_E_UKI_ROOTHASH',
      `UKI command line has lamadist.slot=${s ?? '(none)'}, expected ${slot}`,
      { where: file },
    );
  return cmdline;
}

/**
 * Build the split A/B disk image: EROFS root (built reproducibly unless given), its dm-verity tree,
 * the slots' UKIs, then plan, then write GPT, ESP, LUKS2 slots, verity partitions and /var into a
 * temporary file renamed into place only when complete. Returns the plan.
 */
export async function buildImage(o: BuildImageOptions): Promise<ImagePlan> {
  const bsp: Bsp = getBsp(o.bsp);
  const layout = withSizes(await loadLayout(o.layout ?? bsp.layout), o.sizes ?? {});
  const encrypt = o.encrypt ?? true;
  const timestamp = o.timestamp ?? 0;
  const random = createRandom(o.seed);
  const step = o.onStep ?? (() => undefined);
  if (!o.uki && !o.kernel)
    throw new UserError(
      'LAMA_E_USAGE',
      'give --kernel (and --initrd) to build the UKIs, or a prebuilt --uki',
    );
  if (o.uki && o.kernel) throw new UserError('LAMA_E_USAGE', '--uki and --kernel exclude each other');
  const keyOut = o.recoveryKeyOut ?? `${o.out}.recovery-key`;
  if (!o.dryRun && !o.force) {
    for (const f of [o.out, ...(encrypt && !o.recoveryKey ? [keyOut] : [])]) {
      if (
        await fs.stat(f).then(
          () => true,
          () => false,
        )
      )
        throw new UserError('LAMA_E_EXISTS', `${f} already exists (use --force to replace it)`);
    }
  }
  const sign = await signer(o);
  if (o.fileContexts) await checkFileContexts(o.fileContexts);
  if (o.imaCert && !o.imaKey) throw new UserError('LAMA_E_USAGE', '--ima-cert goes with --ima-key');
  const ima = o.imaKey ? await loadImaSigner(o.imaKey, o.imaCert) : undefined;
  const tmp = await makeTempDir('lamadist-image-');
  let rootfs: RootfsInput | undefined;
  try {
    rootfs = await prepareRootfs(o.rootfs);
    step('root image');
    let erofsFile: string;
    let erofs: SlotContent['erofs'];
    const erofsUuid = randomUuid(random, 'erofs:uuid');
    if (rootfs.kind === 'erofs') {
      if (o.fileContexts || ima)
        throw new UserError('LAMA_E_USAGE', '--file-contexts and --ima-key need a root tree or tarball, not a built EROFS image', { where: o.rootfs });
      erofsFile = rootfs.file;
      erofs = { uuid: rootfs.superblock.uuid, bytes: rootfs.superblock.bytes };
    } else {
      erofsFile = path.join(tmp.dir, 'root.erofs');
      const sb = await buildRootErofs({
        tree: rootfs.dir,
        out: erofsFile,
        uuid: erofsUuid,
        timestamp,
        fileContexts: o.fileContexts,
        ima,
        work: tmp.dir,
        onStep: step,
      });
      erofs = { uuid: sb.uuid, bytes: sb.bytes };
    }
    if (erofs.bytes % 4096 !== 0 || erofs.bytes === 0)
      throw new UserError(
        'LAMA_E_ROOTFS',
        `EROFS image size ${erofs.bytes} is not a whole number of 4096-byte blocks`,
      );
    const actual = (await fs.stat(erofsFile)).size;
    if (actual < erofs.bytes)
      throw new UserError(
        'LAMA_E_ROOTFS',
        `EROFS image is truncated: superblock says ${erofs.bytes} bytes, file has ${actual}`,
        { where: erofsFile },
      );

    step('dm-verity hash tree');
    let verityFile = path.join(tmp.dir, 'root.verity');
    let v: Awaited<ReturnType<typeof formatVerity>> & { uuid?: string };
    if (o.verity) {
      // A release's own tree: the disk must carry the root hash its UKIs name, so it is checked, not remade.
      const sb = await readVeritySuperblock(o.verity.file);
      if (!sb) throw new UserError('LAMA_E_VERITY_NO_SUPERBLOCK', 'the given dm-verity tree has no superblock', { where: o.verity.file });
      verityFile = o.verity.file;
      v = { ...(await verifyVerity({ dataPath: erofsFile, dataBlocks: erofs.bytes / 4096, hashPath: verityFile, rootHash: Buffer.from(o.verity.rootHash, 'hex') })), uuid: sb.uuid };
    } else {
      v = await formatVerity({
        dataPath: erofsFile,
        dataBlocks: erofs.bytes / 4096,
        hashPath: verityFile,
        salt: productSalt(bsp.compatible),
        uuid: randomUuid(random, 'verity:uuid'),
      });
    }
    const rootHash = v.rootHash.toString('hex');
    const verity = {
      rootHash,
      salt: v.salt.toString('hex'),
      uuid: v.uuid as string,
      hashTreeBytes: v.hashTreeBytes,
      dataBlocks: v.dataBlocks,
    };

    step('unified kernel images');
    const osrel = await osRelease(rootfs.kind === 'dir' ? rootfs.dir : undefined);
    const ukis: Partial<Record<'a' | 'b', { pe: Buffer; cmdline: string; signed: boolean }>> = {};
    const slotsWanted: ('a' | 'b')[] = o.emptyB ? ['a'] : ['a', 'b'];
    for (const slot of slotsWanted) {
      const given = slot === 'a' ? o.uki : o.ukiB;
      if (given) {
        const pe = await readUserFile(given, 'UKI');
        ukis[slot] = { pe, cmdline: checkPrebuiltUki(pe, given, slot, rootHash), signed: false };
      } else if (o.kernel) {
        const cmdline = slotCmdline(rootHash, slot, bsp, o.cmdline);
        const stub = o.stub ?? EFI_STUBS[bsp.arch];
        if (!stub)
          throw new UserError('LAMA_E_NO_STUB', `no systemd EFI stub known for ${bsp.arch}; pass --stub`);
        const pe = await buildUki({ stub, kernel: o.kernel, initrd: o.initrd, cmdline, osrel });
        ukis[slot] = { pe: sign ? signPe(pe, sign) : pe, cmdline, signed: Boolean(sign) };
      }
    }
    const content = (slot: 'a' | 'b'): SlotContent | undefined => {
      const u = ukis[slot];
      return u
        ? { erofs, verity, uki: { cmdline: u.cmdline, bytes: u.pe.length, signed: u.signed } }
        : undefined;
    };
    const raws = await Promise.all(
      Object.entries(o.raw ?? {}).map(async ([name, file]) => ({
        name,
        file,
        data: await readUserFile(file, `raw region ${name}`),
      })),
    );
    const { plan, gpt } = planImage({
      bsp,
      layout,
      encrypt,
      timestamp,
      random,
      slots: { a: content('a') as SlotContent, b: content('b') },
      raw: raws.map((r) => ({ name: r.name, bytes: r.data.length })),
      recoveryKeyFile: o.recoveryKey ?? keyOut,
      diskSize: o.diskSize,
      espExtra: Object.entries(o.espFiles ?? {}).map(([p, d]) => ({ path: p, bytes: d.length })),
    });
    o.onPlan?.(plan);
    if (o.dryRun) return plan;

    const recovery = encrypt
      ? o.recoveryKey
        ? await readUserFile(o.recoveryKey, 'recovery key')
        : Buffer.from(recoveryKeyText(random))
      : undefined;
    const provision = encrypt ? random('key:provision', 64) : undefined;
    const varPart = plan.partitions.find((p) => p.content === 'ext4');
    const varFile = path.join(tmp.dir, 'var.ext4');
    if (varPart) {
      step('/var file system');
      await buildVarExt4({ file: varFile, bytes: plan.var.bytes, uuid: plan.var.uuid, timestamp });
    }

    const image = await AtomicFile.open(o.out, { force: o.force });
    const keyFile =
      recovery && !o.recoveryKey ? await AtomicFile.open(keyOut, { force: o.force, mode: 0o600 }) : undefined;
    let keyCommitted = false;
    try {
      step('partition table');
      await image.fd.truncate(plan.disk.size);
      await writeGpt(image.fd, gpt);
      for (const r of raws) {
        const at = plan.raw.find((x) => x.name === r.name);
        if (at) await image.fd.write(r.data, 0, r.data.length, at.offset);
      }
      for (const p of plan.partitions) {
        const luks = p.luksUuid && recovery && provision;
        const payloadAt = p.offset + (luks ? LUKS2_DATA_OFFSET : 0);
        if (luks) {
          step(`LUKS2 ${p.label}`);
          const volumeKey = random(`luks:${p.label}:volume-key`, 64);
          const meta = planLuks2({
            volumeKey,
            keys: [recovery, provision],
            uuid: p.luksUuid,
            label: p.label,
            random,
          });
          await image.fd.write(meta.metadata, 0, meta.metadata.length, p.offset);
          const src = p.content === 'erofs' ? erofsFile : p.content === 'ext4' ? varFile : undefined;
          if (src) {
            const h = await fs.open(src, 'r');
            try {
              await encryptPayload({
                source: h,
                length: p.payloadBytes,
                out: image.fd,
                outOffset: payloadAt,
                volumeKey,
              });
            } finally {
              await h.close();
            }
          }
        } else if (p.content === 'erofs') {
          step(`EROFS ${p.label}`);
          await copyInto(erofsFile, image.fd, p.offset, p.payloadBytes);
        } else if (p.content === 'ext4') {
          await copyInto(varFile, image.fd, p.offset, p.payloadBytes);
        }
        if (p.content === 'verity') await copyInto(verityFile, image.fd, p.offset, p.payloadBytes);
      }
      await image.fd.sync();

      step('EFI system partition');
      const esp = plan.partitions.find((p) => p.content === 'esp');
      if (esp) {
        const files: Record<string, string | Buffer> = {};
        for (const [slot, u] of Object.entries(ukis)) files[ukiPath(slot as 'a' | 'b')] = u.pe;
        if (bsp.efiBootName && ukis.a) files[`/EFI/BOOT/${bsp.efiBootName}`] = ukis.a.pe;
        if (provision) files[PROVISION_KEY_PATH] = provision;
        Object.assign(files, o.espFiles ?? {});
        await buildEsp({
          image: image.temp,
          offset: esp.offset,
          size: esp.size,
          volumeId: plan.esp.volumeId,
          files,
          dirs: [RAUC_DIR],
          timestamp,
        });
      }
      if (keyFile && recovery) {
        await keyFile.fd.writeFile(recovery);
        await keyFile.commit();
        keyCommitted = true;
      }
      await image.commit();
    } catch (err) {
      await image.abort();
      await keyFile?.abort();
      // A key without its image would only confuse; the image never appeared, so neither does its key.
      if (keyCommitted) await fs.rm(keyOut, { force: true });
      throw err;
    }
    return plan;
  } finally {
    if (rootfs?.kind === 'dir') await rootfs.cleanup();
    await tmp.remove();
  }
}
