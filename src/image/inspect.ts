import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { UserError, isErrno } from '../errors.js';
import { dpsRoleOf, partitionExtent, readAt, readGptFrom, type GptReadResult } from '../disk/index.js';
import { decodeErofsSuperblock, readErofsSuperblockFrom, type ErofsSuperblock } from '../erofs/index.js';
import { listEsp, readEspFile } from '../fat/index.js';
import {
  dataSegment,
  decryptSectors,
  luksSummary,
  readLuks2From,
  unlockLuks2From,
  type Luks2Header,
} from '../luks/index.js';
import { listSignatures } from '../secureboot/index.js';
import { inspectUki } from '../uki/index.js';
import { makeTempDir } from '../util/fsx.js';
import { decodeVeritySuperblock, verifyVerity, type VeritySuperblock } from '../verity/index.js';

/**
 * `image inspect`: read a LamaDist disk back the way the device will — partition table with DPS
 * roles, LUKS2 headers (decrypted with a key when given), EROFS and verity superblocks, the UKIs on
 * the ESP with their command lines — and check every populated slot's data against the root hash its
 * UKI boots with.
 */

export interface PartitionReport {
  number: number;
  label: string;
  role: string | null;
  arch: string | null;
  offset: number;
  size: number;
  uuid: string;
  luks?: Record<string, unknown>;
  /** Which keyslot the given key opened. */
  unlockedKeyslot?: string;
  erofs?: ErofsSuperblock;
  verity?: Omit<VeritySuperblock, 'salt'> & { salt: string };
  ext4?: { label: string; uuid: string };
  fat?: boolean;
}

export interface UkiReport {
  path: string;
  bytes: number;
  cmdline?: string;
  uname?: string;
  signatures: string[];
}

export interface SlotReport {
  slot: 'a' | 'b';
  rootHash?: string;
  uki?: string;
  /** true: every block verifies; false: see `problem`; null: not checked (empty or still encrypted). */
  verified: boolean | null;
  problem?: string;
}

export interface ImageReport {
  image: string;
  gpt: GptReadResult;
  partitions: PartitionReport[];
  esp: { files: string[]; ukis: UkiReport[] };
  slots: SlotReport[];
}

function ext4Info(b: Buffer): { label: string; uuid: string } | undefined {
  if (b.length < 2048 || b.readUInt16LE(1024 + 56) !== 0xef53) return undefined;
  const h = b.subarray(1024 + 104, 1024 + 120).toString('hex');
  const label = b.subarray(1024 + 120, 1024 + 136);
  const nul = label.indexOf(0);
  return {
    label: label.toString('latin1', 0, nul >= 0 ? nul : 16),
    uuid: `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`,
  };
}

/** Decrypt the first `bytes` of a LUKS2 payload into a plain file (for verification). */
async function decryptTo(
  h: FileHandle,
  containerOffset: number,
  header: Luks2Header,
  volumeKey: Buffer,
  bytes: number,
  out: string,
): Promise<void> {
  const seg = dataSegment(header);
  const o = await fs.open(out, 'w');
  try {
    const per = Math.max(1, Math.floor((8 * 1024 * 1024) / seg.sectorSize));
    const sectors = Math.ceil(bytes / seg.sectorSize);
    for (let s = 0; s < sectors; s += per) {
      const n = Math.min(per, sectors - s);
      const plain = await decryptSectors(
        h,
        containerOffset + seg.offset,
        volumeKey,
        s,
        n,
        seg.sectorSize,
        seg.ivTweak,
      );
      await o.write(plain, 0, plain.length, s * seg.sectorSize);
    }
  } finally {
    await o.close();
  }
}

function param(cmdline: string | undefined, name: string): string | undefined {
  if (!cmdline) return undefined;
  return new RegExp(`(?:^|\\s)${name.replace('.', '\\.')}=(\\S+)`).exec(cmdline)?.[1];
}

/**
 * Inspect `file`. With `key`, LUKS2 slots are unlocked (a key that opens none is an error) and their
 * data verified; without it only unencrypted slots are verified.
 */
export async function inspectImage(
  file: string,
  options: { key?: Buffer; verify?: boolean } = {},
): Promise<ImageReport> {
  let h: FileHandle;
  try {
    h = await fs.open(file, 'r');
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `image ${file} does not exist`);
    throw err;
  }
  const tmp = await makeTempDir('lamadist-inspect-');
  try {
    const gpt = await readGptFrom(h, { strict: true, where: file });
    const volumeKeys = new Map<string, { header: Luks2Header; key: Buffer }>();
    const partitions: PartitionReport[] = [];
    for (const p of gpt.table.partitions) {
      const { offset, size } = partitionExtent(gpt.table, p);
      const dps = dpsRoleOf(p.typeGuid);
      const r: PartitionReport = {
        number: p.number,
        label: p.name,
        role: dps?.role ?? null,
        arch: dps?.arch ?? null,
        offset,
        size,
        uuid: p.uuid,
      };
      const head = await readAt(h, 4096, offset);
      if (head.subarray(0, 6).equals(Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]))) {
        const { header } = await readLuks2From(h, offset, `${file}: partition ${p.name}`);
        r.luks = luksSummary(header);
        if (options.key) {
          const u = await unlockLuks2From(h, offset, header, options.key, `${file}: partition ${p.name}`);
          r.unlockedKeyslot = u.keyslot;
          volumeKeys.set(p.name, { header, key: u.volumeKey });
          const seg = dataSegment(header);
          const plain = await decryptSectors(
            h,
            offset + seg.offset,
            u.volumeKey,
            0,
            4096 / seg.sectorSize || 1,
            seg.sectorSize,
            seg.ivTweak,
          );
          r.erofs = decodeErofsSuperblock(plain, `${file}: partition ${p.name}`);
          r.ext4 = ext4Info(plain);
        }
      } else {
        r.erofs = await readErofsSuperblockFrom(h, offset, `${file}: partition ${p.name}`);
        const vsb = decodeVeritySuperblock(head);
        if (vsb) r.verity = { ...vsb, salt: vsb.salt.toString('hex') };
        r.ext4 = ext4Info(head);
        r.fat = dps?.role === 'esp' && head.readUInt16LE(510) === 0xaa55;
      }
      partitions.push(r);
    }

    const espPart = partitions.find((x) => x.role === 'esp');
    const files = espPart ? await listEsp(file, espPart.offset) : [];
    const ukis: UkiReport[] = [];
    for (const f of files.filter((x) => /\.efi$/i.test(x))) {
      const pe = await readEspFile(file, (espPart as PartitionReport).offset, f);
      try {
        const info = inspectUki(pe, f);
        ukis.push({
          path: f,
          bytes: pe.length,
          cmdline: info.cmdline,
          uname: info.uname,
          signatures: listSignatures(pe, f).map((s) => s.subject),
        });
      } catch (err) {
        if (!(err instanceof UserError)) throw err;
        ukis.push({ path: f, bytes: pe.length, signatures: [] });
      }
    }

    const slots: SlotReport[] = [];
    for (const slot of ['a', 'b'] as const) {
      const uki = ukis.find((u) => path.basename(u.path).toLowerCase() === `lamadist-${slot}.efi`);
      const rootHash = param(uki?.cmdline, 'roothash');
      const report: SlotReport = { slot, rootHash, uki: uki?.path, verified: null };
      slots.push(report);
      const rootPart = partitions.find((x) => x.label === `rootfs_${slot}`);
      const verityPart = partitions.find((x) => x.label === `verity_${slot}`);
      if (!rootHash || !rootPart || !verityPart || options.verify === false) continue;
      if (!verityPart.verity) {
        report.verified = false;
        report.problem = `partition verity_${slot} holds no verity superblock`;
        continue;
      }
      let dataPath = file;
      let dataOffset = rootPart.offset;
      if (rootPart.luks) {
        const unlocked = volumeKeys.get(rootPart.label);
        if (!unlocked) continue;
        dataPath = path.join(tmp.dir, `rootfs_${slot}.plain`);
        dataOffset = 0;
        await decryptTo(
          h,
          rootPart.offset,
          unlocked.header,
          unlocked.key,
          verityPart.verity.dataBlocks * verityPart.verity.dataBlockSize,
          dataPath,
        );
      }
      try {
        await verifyVerity({
          dataPath,
          dataOffset,
          hashPath: file,
          hashOffset: verityPart.offset,
          rootHash: Buffer.from(rootHash, 'hex'),
        });
        report.verified = true;
      } catch (err) {
        if (!(err instanceof UserError)) throw err;
        report.verified = false;
        report.problem = `slot ${slot}: ${err.message}`;
      }
      if (dataPath !== file) await fs.rm(dataPath, { force: true });
    }
    return { image: file, gpt, partitions, esp: { files, ukis }, slots };
  } finally {
    await h.close();
    await tmp.remove();
  }
}
