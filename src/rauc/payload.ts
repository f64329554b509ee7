import { createCipheriv, createDecipheriv, createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { UserError, isErrno } from '../errors.js';
import { run } from '../util/proc.js';

/** RAUC's block size for block-hash indexes, dm-verity and crypt sectors. */
export const BLOCK = 4096;

/** Read size for sequential passes: large enough to keep syscalls cheap, small enough to stay bounded. */
const CHUNK = 4 * 1024 * 1024;

/** What one read pass over an image yields. */
export interface ImageDigest {
  size: number;
  /** Lower-case hex SHA-256 of the whole file. */
  sha256: string;
  /** RAUC block-hash-index: SHA-256 of every 4 KiB block, concatenated (only when requested). */
  blockHashIndex?: Buffer;
}

async function openInput(file: string, what: string): Promise<FileHandle> {
  try {
    return await fs.open(file, 'r');
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `${what} ${file} does not exist`);
    if (isErrno(err, 'EISDIR')) throw new UserError('LAMA_E_NOT_FOUND', `${what} ${file} is a directory`);
    throw err;
  }
}

/**
 * SHA-256 and (for adaptive images) the block-hash-index of an image in a single sequential read.
 * The index is what `rauc bundle` stores as `<image>.block-hash-index`; RAUC requires the image
 * size to be a multiple of 4 KiB for it.
 */
export async function digestImage(file: string, options: { blockIndex?: boolean } = {}): Promise<ImageDigest> {
  const h = await openInput(file, 'image');
  try {
    const { size } = await h.stat();
    if (options.blockIndex && size % BLOCK !== 0) {
      throw new UserError('LAMA_E_BUNDLE_IMAGE', `image size ${size} is not a multiple of ${BLOCK} bytes, as a block-hash-index needs`, { where: file });
    }
    const whole = createHash('sha256');
    const index = options.blockIndex ? Buffer.alloc((size / BLOCK) * 32) : undefined;
    const buf = Buffer.allocUnsafe(CHUNK);
    let pos = 0;
    while (pos < size) {
      const { bytesRead } = await h.read(buf, 0, Math.min(CHUNK, size - pos), pos);
      if (bytesRead === 0) throw new UserError('LAMA_E_BUNDLE_IMAGE', `image shrank while being read at byte ${pos}`, { where: file });
      const data = buf.subarray(0, bytesRead);
      whole.update(data);
      if (index) blockHashes(data).copy(index, (pos / BLOCK) * 32);
      pos += bytesRead;
    }
    return { size, sha256: whole.digest('hex'), ...(index && { blockHashIndex: index }) };
  } finally {
    await h.close();
  }
}

/** SHA-256 of each `blockSize` block of `data` (the last one zero-padded), concatenated. Pure. */
export function blockHashes(data: Buffer, blockSize = BLOCK): Buffer {
  const out = Buffer.alloc(Math.ceil(data.length / blockSize) * 32);
  for (let off = 0; off < data.length; off += blockSize) {
    const h = createHash('sha256').update(data.subarray(off, off + blockSize));
    if (data.length - off < blockSize) h.update(Buffer.alloc(blockSize - (data.length - off)));
    h.digest().copy(out, (off / blockSize) * 32);
  }
  return out;
}

/** Digest of the first `length` bytes of a file, streamed (a plain bundle's signed payload). */
export async function digestPrefix(file: string, length: number, algorithm: string): Promise<Buffer> {
  const h = await openInput(file, 'bundle');
  try {
    const hash = createHash(algorithm);
    const buf = Buffer.allocUnsafe(CHUNK);
    for (let pos = 0; pos < length; ) {
      const { bytesRead } = await h.read(buf, 0, Math.min(CHUNK, length - pos), pos);
      if (bytesRead === 0) throw new UserError('LAMA_E_BUNDLE_TRUNCATED', `bundle ends at byte ${pos}, expected ${length}`, { where: file });
      hash.update(buf.subarray(0, bytesRead));
      pos += bytesRead;
    }
    return hash.digest();
  } finally {
    await h.close();
  }
}

/**
 * Bytes an adaptive (block-hash-index) update fetches: every block of the new image whose hash the
 * device cannot find anywhere in its current image. Pure: both indexes in, byte count out.
 */
export function adaptiveFetchBytes(oldIndex: Buffer, newIndex: Buffer): { blocks: number; changed: number; bytes: number } {
  const have = new Set<string>();
  for (let i = 0; i < oldIndex.length; i += 32) have.add(oldIndex.subarray(i, i + 32).toString('hex'));
  let changed = 0;
  for (let i = 0; i < newIndex.length; i += 32) if (!have.has(newIndex.subarray(i, i + 32).toString('hex'))) changed++;
  return { blocks: newIndex.length / 32, changed, bytes: changed * BLOCK };
}

/** dm-crypt's plain64 IV for a 4 KiB sector: the 512-byte sector number, little-endian, zero-padded. */
export function plain64Iv(sector4k: number): Buffer {
  const iv = Buffer.alloc(16);
  iv.writeBigUInt64LE(BigInt(sector4k) * 8n);
  return iv;
}

/**
 * Encrypt or decrypt `length` bytes of an open file in place with RAUC's crypt-bundle scheme:
 * AES-256-CBC restarted for every 4 KiB sector with a plain64 IV (dm-crypt `aes-cbc-plain64`,
 * 4096-byte sectors), so that a device can map the payload with dm-crypt on top of dm-verity.
 */
export async function cryptInPlace(h: FileHandle, length: number, key: Buffer, encrypt: boolean): Promise<void> {
  if (length % BLOCK !== 0) throw new UserError('LAMA_E_BUNDLE_PAYLOAD', `payload size ${length} is not a multiple of ${BLOCK} bytes`);
  const buf = Buffer.allocUnsafe(CHUNK);
  for (let pos = 0; pos < length; ) {
    const n = Math.min(CHUNK, length - pos);
    const { bytesRead } = await h.read(buf, 0, n, pos);
    if (bytesRead !== n) throw new UserError('LAMA_E_BUNDLE_TRUNCATED', `payload ends at byte ${pos + bytesRead}, expected ${length}`);
    for (let off = 0; off < n; off += BLOCK) {
      const iv = plain64Iv((pos + off) / BLOCK);
      const c = encrypt ? createCipheriv('aes-256-cbc', key, iv) : createDecipheriv('aes-256-cbc', key, iv);
      c.setAutoPadding(false);
      c.update(buf.subarray(off, off + BLOCK)).copy(buf, off);
      c.final();
    }
    await h.write(buf, 0, n, pos);
    pos += n;
  }
}

/**
 * The mksquashfs command line RAUC uses for a bundle payload, plus fixed timestamps so that the same
 * content always gives the same bytes (mksquashfs is reproducible by default otherwise).
 */
export function mksquashfsArgs(contentDir: string, out: string, epoch: number, extra: readonly string[] = []): string[] {
  const t = String(Math.max(0, Math.min(0xffffffff, Math.floor(epoch))));
  return [contentDir, out, '-noappend', '-no-progress', '-all-root', '-no-xattrs', '-quiet', '-all-time', t, '-mkfs-time', t, ...extra];
}

/** Where mksquashfs starts file data: right after its 96-byte superblock (no compressor options stored). */
export const SQUASHFS_DATA_START = 96;

/**
 * mksquashfs arguments under which a file's data is its bytes verbatim and contiguous, so that an
 * aligned file stays aligned block after block: no compression, no fragment packing, no
 * deduplication, no skipped zero blocks.
 */
export const ALIGNED_SQUASHFS_ARGS = ['-noD', '-no-fragments', '-no-duplicates', '-no-sparse'] as const;

/** Names of the padding files an aligned payload adds (a leading dot: no bundle file can start so). */
export const ALIGN_PAD_PREFIX = '.lamadist-align-';

/** Where each large file of an aligned payload goes, and what puts it there. */
export interface AlignedPayload {
  /** Padding files to add to the payload directory, each of `size` zero bytes. */
  pads: { name: string; size: number }[];
  /** mksquashfs `-sort` file: pads and images first, in this order (paths relative to the payload directory). */
  sortFile: string;
  /** Offset of each image's first byte in the squashfs image. */
  placed: { name: string; offset: number; size: number }[];
}

/**
 * Plan a squashfs payload in which each of `images` (in order) starts on a `BLOCK` boundary of the
 * bundle. A streaming device reads the bundle through NBD, dm-verity (and dm-crypt) in 4 KiB
 * sectors: an unaligned 16 KiB squashfs block spans five of them, so every read would cost 25 %
 * more than the data it needs. Written first (highest `-sort` priorities), stored verbatim
 * (`ALIGNED_SQUASHFS_ARGS`), each image is preceded by the zero padding that brings it to the next
 * boundary. Pure: the caller writes the pads and the sort file.
 */
export function alignPayload(images: readonly { name: string; size: number }[], start = SQUASHFS_DATA_START): AlignedPayload {
  const pads: AlignedPayload['pads'] = [];
  const placed: AlignedPayload['placed'] = [];
  const order: string[] = [];
  let at = start;
  for (const img of images) {
    const pad = (BLOCK - (at % BLOCK)) % BLOCK;
    if (pad > 0) {
      const name = `${ALIGN_PAD_PREFIX}${pads.length}`;
      pads.push({ name, size: pad });
      order.push(name);
      at += pad;
    }
    placed.push({ name: img.name, offset: at, size: img.size });
    order.push(img.name);
    at += img.size;
  }
  // mksquashfs writes higher priorities first; 32767 is the highest it takes.
  const sortFile = order.map((name, i) => `${name} ${32767 - i}\n`).join('');
  return { pads, sortFile, placed };
}

/** Build the squashfs payload. */
export async function makeSquashfs(contentDir: string, out: string, epoch: number, extra: readonly string[] = []): Promise<void> {
  await run('mksquashfs', mksquashfsArgs(contentDir, out, epoch, extra));
}
