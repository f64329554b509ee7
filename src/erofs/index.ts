import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { UserError, isErrno } from '../errors.js';
import { makeTempDir } from '../util/fsx.js';
import { run } from '../util/proc.js';

/**
 * EROFS root images: built with mkfs.erofs so that the same tree always gives the same bytes (fixed
 * UUID, every inode's time set to one timestamp, lz4hc), and read back in TypeScript (superblock
 * fields and its crc32c checksum) to report and to size the verity data area.
 *
 * Public API:
 * - `erofsArgs(options)` → mkfs.erofs argv (pure); `buildErofs(options)` runs it.
 * - `treeFileContexts(dir)` → the SELinux file_contexts the tree's own policy names, if any;
 *   `checkFileContexts(file)` → refuses a missing one; `stageTree(src, dst)` → a private copy.
 * - `prepareRootfs(input)` → a directory or an existing EROFS image from DIR | TAR | EROFS input.
 * - `readErofsSuperblock(file, offset?)` / `decodeErofsSuperblock(buf)` → `ErofsSuperblock`.
 */

export const EROFS_MAGIC = 0xe0f5e1e2;
export const EROFS_SUPER_OFFSET = 1024;
const FEATURE_COMPAT_SB_CHKSUM = 0x1;

export interface ErofsSuperblock {
  blockSize: number;
  /** Filesystem size in blocks: the image is `blocks * blockSize` bytes. */
  blocks: number;
  bytes: number;
  inodes: number;
  rootNid: number;
  uuid: string;
  volumeName: string;
  buildTime: number;
  featureCompat: number;
  featureIncompat: number;
  /** Whether the superblock carries a checksum, and whether it matches. */
  checksum: 'ok' | 'absent';
}

const CRC32C_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0x82f63b78 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32C (Castagnoli) without the final inversion, as the EROFS superblock checksum uses it. */
export function crc32cRaw(buf: Buffer, seed = 0xffffffff): number {
  let c = seed >>> 0;
  for (const b of buf) c = (CRC32C_TABLE[(c ^ b) & 0xff] as number) ^ (c >>> 8);
  return c >>> 0;
}

function uuidText(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/**
 * Decode the superblock from the first block of an EROFS image (at least 4096 bytes). Returns
 * undefined when there is no EROFS magic; throws LAMA_E_EROFS_CORRUPT when the checksum fails.
 */
export function decodeErofsSuperblock(block: Buffer, where = 'erofs image'): ErofsSuperblock | undefined {
  if (block.length < EROFS_SUPER_OFFSET + 128 || block.readUInt32LE(EROFS_SUPER_OFFSET) !== EROFS_MAGIC)
    return undefined;
  const sb = block.subarray(EROFS_SUPER_OFFSET);
  const blkszbits = sb.readUInt8(12);
  if (blkszbits < 9 || blkszbits > 16)
    throw new UserError('LAMA_E_EROFS_CORRUPT', `invalid block size 2^${blkszbits}`, { where });
  const blockSize = 2 ** blkszbits;
  const featureCompat = sb.readUInt32LE(8);
  let checksum: ErofsSuperblock['checksum'] = 'absent';
  if (featureCompat & FEATURE_COMPAT_SB_CHKSUM) {
    const area = Buffer.from(block.subarray(EROFS_SUPER_OFFSET, Math.max(blockSize, 4096)));
    const stored = area.readUInt32LE(4);
    area.writeUInt32LE(0, 4);
    const actual = crc32cRaw(area);
    if (stored !== actual) {
      throw new UserError(
        'LAMA_E_EROFS_CORRUPT',
        `superblock checksum is 0x${stored.toString(16)} but the superblock hashes to 0x${actual.toString(16)}`,
        { where },
      );
    }
    checksum = 'ok';
  }
  const blocks = sb.readUInt32LE(36);
  const name = sb.subarray(64, 80);
  const nul = name.indexOf(0);
  return {
    blockSize,
    blocks,
    bytes: blocks * blockSize,
    inodes: Number(sb.readBigUInt64LE(16)),
    rootNid: sb.readUInt16LE(14),
    uuid: uuidText(sb.subarray(48, 64)),
    volumeName: name.toString('latin1', 0, nul >= 0 ? nul : 16),
    buildTime: Number(sb.readBigUInt64LE(24)),
    featureCompat,
    featureIncompat: sb.readUInt32LE(80),
    checksum,
  };
}

/** Read the superblock of an EROFS image at `offset` of an open file (e.g. a partition). */
export async function readErofsSuperblockFrom(
  h: FileHandle,
  offset = 0,
  where = 'erofs image',
): Promise<ErofsSuperblock | undefined> {
  const buf = Buffer.alloc(4096);
  const { bytesRead } = await h.read(buf, 0, buf.length, offset);
  return decodeErofsSuperblock(buf.subarray(0, bytesRead), where);
}

/** Read the superblock of an EROFS image file. */
export async function readErofsSuperblock(file: string, offset = 0): Promise<ErofsSuperblock | undefined> {
  const h = await fs.open(file, 'r');
  try {
    return await readErofsSuperblockFrom(h, offset, file);
  } finally {
    await h.close();
  }
}

export interface ErofsOptions {
  /** Directory holding the root tree. */
  source: string;
  out: string;
  uuid: string;
  /** UNIX time given to every inode (SOURCE_DATE_EPOCH of the build). */
  timestamp: number;
  compression?: 'lz4hc' | 'lz4' | 'none';
  /**
   * SELinux file_contexts: every inode gets the `security.selinux` label it names. Other xattrs of
   * the tree (`security.ima`) are kept either way: mkfs.erofs keeps xattrs unless `-x` is negative.
   */
  fileContexts?: string;
}

/** The mkfs.erofs command line for a reproducible image. Pure. */
export function erofsArgs(o: ErofsOptions): string[] {
  const args = ['--quiet', `-T${o.timestamp}`, `-U${o.uuid}`];
  if ((o.compression ?? 'lz4hc') !== 'none') args.push(`-z${o.compression ?? 'lz4hc'}`);
  if (o.fileContexts) args.push(`--file-contexts=${o.fileContexts}`);
  args.push(o.out, o.source);
  return args;
}

/** Run mkfs.erofs and return the new image's superblock. */
export async function buildErofs(o: ErofsOptions): Promise<ErofsSuperblock> {
  await run('mkfs.erofs', erofsArgs(o), { userErrorCode: 'LAMA_E_EROFS_BUILD' });
  const sb = await readErofsSuperblock(o.out);
  if (!sb) throw new Error(`mkfs.erofs wrote no EROFS superblock to ${o.out}`);
  return sb;
}

/**
 * The file_contexts of the policy the tree itself selects: SELINUXTYPE in its /etc/selinux/config,
 * when /etc/selinux/<type>/contexts/files/file_contexts exists. Undefined otherwise.
 */
export async function treeFileContexts(dir: string): Promise<string | undefined> {
  let config: string;
  try {
    config = await fs.readFile(path.join(dir, 'etc/selinux/config'), 'utf8');
  } catch (err) {
    if (isErrno(err, 'ENOENT') || isErrno(err, 'ENOTDIR')) return undefined;
    throw err;
  }
  const type = /^\s*SELINUXTYPE\s*=\s*"?([A-Za-z0-9_.-]+)"?\s*$/m.exec(config)?.[1];
  if (!type) return undefined;
  const file = path.join(dir, 'etc/selinux', type, 'contexts/files/file_contexts');
  const st = await fs.stat(file).catch(() => undefined);
  return st?.isFile() ? file : undefined;
}

/** Refuse a file_contexts that does not exist or is not a file, before anything is built. */
export async function checkFileContexts(file: string): Promise<void> {
  const st = await fs.stat(file).catch((err: unknown) => {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `file_contexts ${file} does not exist`);
    throw err;
  });
  if (!st.isFile()) throw new UserError('LAMA_E_USAGE', `file_contexts ${file} is not a file`);
}

/**
 * Copy a tree into `dst` (which must not exist) keeping owners, modes, times, xattrs and hard
 * links within the tree. A copy, not hard links: xattrs set on the copy must not reach the source.
 */
export async function stageTree(src: string, dst: string): Promise<void> {
  await run('cp', ['-a', '--reflink=auto', '--no-target-directory', src, dst], { userErrorCode: 'LAMA_E_ROOTFS' });
}

const TAR_RE = /\.(tar|tar\.gz|tgz|tar\.xz|txz|tar\.zst|tar\.bz2)$/;

/** What `--rootfs` named: a tree to pack, or an EROFS image to take as it is. */
export type RootfsInput =
  | { kind: 'dir'; dir: string; cleanup: () => Promise<void> }
  | { kind: 'erofs'; file: string; superblock: ErofsSuperblock };

/**
 * Resolve a rootfs argument: a directory is used in place, a tarball is unpacked into a temporary
 * directory (owners and modes kept), an EROFS image is used as it is.
 */
export async function prepareRootfs(input: string): Promise<RootfsInput> {
  let st;
  try {
    st = await fs.stat(input);
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `rootfs ${input} does not exist`);
    throw err;
  }
  if (st.isDirectory()) return { kind: 'dir', dir: input, cleanup: async () => undefined };
  const sb = await readErofsSuperblock(input);
  if (sb) return { kind: 'erofs', file: input, superblock: sb };
  if (!TAR_RE.test(input)) {
    throw new UserError(
      'LAMA_E_ROOTFS',
      `rootfs ${input} is neither a directory, a tarball (.tar, .tar.gz, .tar.xz, .tar.zst) nor an EROFS image`,
    );
  }
  const tmp = await makeTempDir('lamadist-rootfs-');
  const dir = path.join(tmp.dir, 'root');
  await fs.mkdir(dir);
  await run('tar', ['--numeric-owner', '--xattrs', '--xattrs-include=*', '-xpf', input, '-C', dir], {
    userErrorCode: 'LAMA_E_ROOTFS',
  });
  return { kind: 'dir', dir, cleanup: tmp.remove };
}
