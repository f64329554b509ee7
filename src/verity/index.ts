import { createHash, randomUUID } from 'node:crypto';
import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { readAt } from '../disk/index.js';
import { UserError, isErrno } from '../errors.js';
import {
  VERITY_SUPERBLOCK_SIZE,
  decodeVeritySuperblock,
  encodeVeritySuperblock,
  planVerity,
  type VerityGeometry,
  type VerityLevel,
  type VerityParams,
  type VeritySuperblock,
} from './geometry.js';
import { hashBlocks, openReadWrite, type HashJob } from './hasher.js';

/**
 * dm-verity hash trees in the exact on-disk format of veritysetup (format 1): optional 512-byte
 * superblock, the tree's top level first, each hash `H(salt || block)` in a power-of-two slot, every
 * hash block zero-padded. The hash area may live on its own file or inside another one (RAUC appends
 * the tree to the image without a superblock; a disk image keeps it in the verity partition).
 *
 * Public API:
 * - `formatVerity(options)` → `VerityResult` (root hash and geometry), streaming, bounded memory.
 * - `verifyVerity(options & { rootHash })` → `VerityResult`, or UserError LAMA_E_VERITY_MISMATCH naming
 *   the first bad block and its byte offset (LAMA_E_VERITY_TRUNCATED when a device is too short).
 * - `readVeritySuperblock(file, offset)` → the superblock, or undefined.
 * - `planVerity(params)` (pure geometry), `encodeVeritySuperblock`, `decodeVeritySuperblock`.
 * - `productSalt(product)` → the salt every release of one product shares.
 */

export {
  VERITY_ALGORITHMS,
  VERITY_SUPERBLOCK_SIZE,
  planVerity,
  encodeVeritySuperblock,
  decodeVeritySuperblock,
  formatUuid,
  parseUuidBytes,
} from './geometry.js';
export type { VerityGeometry, VerityLevel, VerityParams, VeritySuperblock } from './geometry.js';

export interface VerityOptions {
  /** File holding the data blocks. */
  dataPath: string;
  /** Byte offset of the first data block in `dataPath` (a partition inside a disk image). */
  dataOffset?: number;
  /** Number of data blocks; default: every whole block from `dataOffset` to the end of the file. */
  dataBlocks?: number;
  /** File receiving the hash area; may be `dataPath` itself with `hashOffset` past the data. */
  hashPath: string;
  /** Byte offset of the hash area (superblock first when `superblock`). */
  hashOffset?: number;
  dataBlockSize?: number;
  hashBlockSize?: number;
  algorithm?: string;
  salt: Buffer;
  /** Superblock UUID; random when omitted. */
  uuid?: string;
  /** Write a veritysetup superblock in front of the tree (default true). */
  superblock?: boolean;
  /** Called with data bytes hashed so far and the total. */
  onProgress?: (done: number, total: number) => void;
}

export interface VerityVerifyOptions extends Omit<VerityOptions, 'salt' | 'uuid'> {
  rootHash: Buffer;
  /** Required without a superblock; with one, the superblock's salt is used. */
  salt?: Buffer;
}

export interface VerityResult {
  rootHash: Buffer;
  /** Bytes of the hash area from `hashOffset`, superblock block included. */
  hashTreeBytes: number;
  dataBlocks: number;
  dataBlockSize: number;
  hashBlockSize: number;
  algorithm: string;
  salt: Buffer;
  /** Superblock UUID (undefined without a superblock). */
  uuid: string | undefined;
  hashOffset: number;
  superblock: boolean;
  geometry: VerityGeometry;
}

/** Data bytes per hashing chunk: large sequential reads, a whole number of hash blocks of digests. */
const CHUNK_BYTES = 8 * 1024 * 1024;

function chunkBlocksFor(blockSize: number, hashesPerBlock: number): number {
  return Math.max(hashesPerBlock, Math.floor(CHUNK_BYTES / blockSize / hashesPerBlock) * hashesPerBlock);
}

async function openRead(file: string, what: string): Promise<FileHandle> {
  try {
    return await fs.open(file, 'r');
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw new UserError('LAMA_E_NOT_FOUND', `${what} ${file} does not exist`);
    throw err;
  }
}

function sameFile(a: string, b: string): boolean {
  return path.resolve(a) === path.resolve(b);
}

/** Spread packed digests into hash blocks: each digest in its slot, the rest of each block zero. */
function packHashBlocks(digests: Buffer, count: number, g: VerityGeometry, hashBlockSize: number): Buffer {
  const blocks = Math.ceil(count / g.hashesPerBlock);
  const out = Buffer.alloc(blocks * hashBlockSize);
  for (let i = 0; i < count; i++) {
    const block = Math.floor(i / g.hashesPerBlock);
    const slot = i % g.hashesPerBlock;
    digests.copy(out, block * hashBlockSize + slot * g.digestSlot, i * g.digestSize, (i + 1) * g.digestSize);
  }
  return out;
}

/**
 * The salt of a product's hash trees: fixed per product (its RAUC compatible), never per build, so
 * successive releases share every hash block whose data blocks did not change and an update moves
 * only the tree blocks on the paths of changed data. Products stay apart.
 */
export function productSalt(product: string): Buffer {
  return createHash('sha256').update(`lamadist:verity:${product}`).digest();
}

function hashOne(algorithm: string, salt: Buffer, block: Buffer): Buffer {
  return createHash(algorithm).update(salt).update(block).digest();
}

interface Resolved {
  params: VerityParams;
  geometry: VerityGeometry;
  dataOffset: number;
}

function dataBlocksOf(
  size: number,
  dataOffset: number,
  blockSize: number,
  requested: number | undefined,
  where: string,
): number {
  const available = Math.floor(Math.max(0, size - dataOffset) / blockSize);
  if (requested === undefined) return available;
  if (requested > available) {
    throw new UserError(
      'LAMA_E_VERITY_TRUNCATED',
      `data area holds ${available} blocks of ${blockSize} bytes but ${requested} are needed (${size} bytes from offset ${dataOffset})`,
      { where },
    );
  }
  return requested;
}

/**
 * Write the hash tree (and superblock) for `dataPath` and return the root hash. Output is identical
 * to `veritysetup format` given the same salt, UUID, block sizes and offsets.
 */
export async function formatVerity(options: VerityOptions): Promise<VerityResult> {
  const dataOffset = options.dataOffset ?? 0;
  const dataBlockSize = options.dataBlockSize ?? 4096;
  const data = await openRead(options.dataPath, 'data file');
  const shared = sameFile(options.dataPath, options.hashPath);
  let hash: FileHandle | undefined;
  try {
    const size = (await data.stat()).size;
    const params: VerityParams = {
      dataBlocks: dataBlocksOf(size, dataOffset, dataBlockSize, options.dataBlocks, options.dataPath),
      dataBlockSize,
      hashBlockSize: options.hashBlockSize ?? 4096,
      algorithm: options.algorithm ?? 'sha256',
      salt: options.salt,
      hashOffset: options.hashOffset ?? (shared ? size : 0),
      superblock: options.superblock ?? true,
    };
    const geometry = planVerity(params);
    if (
      shared &&
      params.hashOffset < dataOffset + params.dataBlocks * dataBlockSize &&
      params.hashOffset + geometry.hashTreeBytes > dataOffset
    ) {
      throw new UserError(
        'LAMA_E_VERITY_PARAMS',
        `hash area at offset ${params.hashOffset} overlaps the data area`,
        { where: options.hashPath },
      );
    }
    hash = await openReadWrite(options.hashPath);
    const uuid = params.superblock ? (options.uuid ?? randomUUID()) : undefined;
    if (params.superblock) {
      // Only the 512 superblock bytes, like veritysetup: the rest of its block is left as it was.
      const sb = encodeVeritySuperblock({
        uuid: uuid as string,
        algorithm: params.algorithm,
        dataBlockSize,
        hashBlockSize: params.hashBlockSize,
        dataBlocks: params.dataBlocks,
        salt: params.salt,
      });
      await hash.write(sb, 0, sb.length, params.hashOffset);
    }
    const r: Resolved = { params, geometry, dataOffset };
    const rootHash = await buildTree(r, data, hash, options.onProgress);
    // A tree-less single block still owns its superblock's whole hash block, as with veritysetup.
    const end = params.hashOffset + geometry.hashTreeBytes;
    if ((await hash.stat()).size < end) await hash.truncate(end);
    // No fsync here (veritysetup does none either): callers writing final outputs commit them through
    // AtomicFile, which syncs, and a disk image being assembled is synced once when complete.
    return result(r, rootHash, uuid);
  } finally {
    await hash?.close();
    await data.close();
  }
}

function result(r: Resolved, rootHash: Buffer, uuid: string | undefined): VerityResult {
  const p = r.params;
  return {
    rootHash,
    hashTreeBytes: r.geometry.hashTreeBytes,
    dataBlocks: p.dataBlocks,
    dataBlockSize: p.dataBlockSize,
    hashBlockSize: p.hashBlockSize,
    algorithm: p.algorithm,
    salt: p.salt,
    uuid,
    hashOffset: p.hashOffset,
    superblock: p.superblock,
    geometry: r.geometry,
  };
}

function jobFor(r: Resolved, fd: number, offset: number, blocks: number, blockSize: number): HashJob {
  const { params: p, geometry: g } = r;
  return {
    fd,
    offset,
    blocks,
    blockSize,
    algorithm: p.algorithm,
    salt: p.salt,
    digestSize: g.digestSize,
    chunkBlocks: chunkBlocksFor(blockSize, g.hashesPerBlock),
  };
}

/** Level 0 from the data, each higher level from the level below as written, then the root. */
async function buildTree(
  r: Resolved,
  data: FileHandle,
  hash: FileHandle,
  onProgress?: (done: number, total: number) => void,
): Promise<Buffer> {
  const { params: p, geometry: g } = r;
  const hbs = p.hashBlockSize;
  const dataBytes = p.dataBlocks * p.dataBlockSize;
  if (g.levels.length === 0) {
    return hashOne(p.algorithm, p.salt, await readAt(data, p.dataBlockSize, r.dataOffset));
  }
  for (const level of g.levels) {
    const source =
      level.level === 0
        ? jobFor(r, data.fd, r.dataOffset, p.dataBlocks, p.dataBlockSize)
        : jobFor(r, hash.fd, (g.levels[level.level - 1] as VerityLevel).offset, level.covers, hbs);
    for await (const chunk of hashBlocks(source)) {
      const packed = packHashBlocks(chunk.digests, chunk.blocks, g, hbs);
      await hash.write(packed, 0, packed.length, level.offset + (chunk.firstBlock / g.hashesPerBlock) * hbs);
      if (level.level === 0) onProgress?.((chunk.firstBlock + chunk.blocks) * p.dataBlockSize, dataBytes);
    }
  }
  const top = g.levels[g.levels.length - 1] as VerityLevel;
  return hashOne(p.algorithm, p.salt, await readAt(hash, hbs, top.offset));
}

/** Read the veritysetup superblock at `offset` of `file`, or undefined when there is none. */
export async function readVeritySuperblock(file: string, offset = 0): Promise<VeritySuperblock | undefined> {
  const h = await openRead(file, 'hash file');
  try {
    return decodeVeritySuperblock(await readAt(h, VERITY_SUPERBLOCK_SIZE, offset));
  } finally {
    await h.close();
  }
}

function mismatch(message: string, where: string): UserError {
  return new UserError('LAMA_E_VERITY_MISMATCH', message, { where });
}

/**
 * Check the data and the whole hash tree against `rootHash`, top-down so that the first bad block
 * reported is the one actually changed: a damaged hash block is blamed on the tree, a damaged data
 * block on the data, a wrong root hash on the root.
 */
export async function verifyVerity(options: VerityVerifyOptions): Promise<VerityResult> {
  const dataOffset = options.dataOffset ?? 0;
  const data = await openRead(options.dataPath, 'data file');
  const hash = sameFile(options.dataPath, options.hashPath)
    ? data
    : await openRead(options.hashPath, 'hash file');
  try {
    const dataSize = (await data.stat()).size;
    const hashSize = (await hash.stat()).size;
    const superblock = options.superblock ?? true;
    const hashOffset = options.hashOffset ?? (hash === data ? dataSize : 0);
    let sb: VeritySuperblock | undefined;
    if (superblock) {
      sb = decodeVeritySuperblock(await readAt(hash, VERITY_SUPERBLOCK_SIZE, hashOffset));
      if (!sb)
        throw new UserError(
          'LAMA_E_VERITY_NO_SUPERBLOCK',
          `no verity superblock at byte offset ${hashOffset}`,
          { where: options.hashPath },
        );
      if (sb.version !== 1 || sb.hashType !== 1) {
        throw new UserError(
          'LAMA_E_VERITY_PARAMS',
          `unsupported verity superblock version ${sb.version}, hash type ${sb.hashType}`,
          { where: options.hashPath },
        );
      }
    } else if (!options.salt) {
      throw new UserError(
        'LAMA_E_VERITY_PARAMS',
        'a salt is required to verify a hash tree without a superblock',
      );
    }
    const dataBlockSize = sb?.dataBlockSize ?? options.dataBlockSize ?? 4096;
    const params: VerityParams = {
      dataBlocks: dataBlocksOf(
        dataSize,
        dataOffset,
        dataBlockSize,
        sb?.dataBlocks ?? options.dataBlocks,
        options.dataPath,
      ),
      dataBlockSize,
      hashBlockSize: sb?.hashBlockSize ?? options.hashBlockSize ?? 4096,
      algorithm: sb?.algorithm ?? options.algorithm ?? 'sha256',
      salt: sb?.salt ?? (options.salt as Buffer),
      hashOffset,
      superblock,
    };
    const geometry = planVerity(params);
    if (hashSize < hashOffset + geometry.hashTreeBytes) {
      throw new UserError(
        'LAMA_E_VERITY_TRUNCATED',
        `hash area needs ${geometry.hashTreeBytes} bytes from offset ${hashOffset} but the file ends at ${hashSize}`,
        { where: options.hashPath },
      );
    }
    if (options.rootHash.length !== geometry.digestSize) {
      throw new UserError(
        'LAMA_E_VERITY_PARAMS',
        `root hash has ${options.rootHash.length} bytes; ${params.algorithm} digests have ${geometry.digestSize}`,
      );
    }
    const r: Resolved = { params, geometry, dataOffset };
    await checkTree(r, data, hash, options);
    return result(r, options.rootHash, sb?.uuid);
  } finally {
    if (hash !== data) await hash.close();
    await data.close();
  }
}

async function checkTree(
  r: Resolved,
  data: FileHandle,
  hash: FileHandle,
  options: VerityVerifyOptions,
): Promise<void> {
  const { params: p, geometry: g } = r;
  const hbs = p.hashBlockSize;
  const hex = (b: Buffer): string => b.toString('hex');
  if (g.levels.length === 0) {
    const got = hashOne(p.algorithm, p.salt, await readAt(data, p.dataBlockSize, r.dataOffset));
    if (!got.equals(options.rootHash)) {
      throw mismatch(
        `root hash mismatch: data block 0 at byte offset ${r.dataOffset} hashes to ${hex(got)}, expected ${hex(options.rootHash)}`,
        options.dataPath,
      );
    }
    return;
  }
  const top = g.levels[g.levels.length - 1] as VerityLevel;
  const topHash = hashOne(p.algorithm, p.salt, await readAt(hash, hbs, top.offset));
  if (!topHash.equals(options.rootHash)) {
    throw mismatch(
      `root hash mismatch: the tree's top block at byte offset ${top.offset} hashes to ${hex(topHash)}, expected ${hex(options.rootHash)}`,
      options.hashPath,
    );
  }
  for (let i = g.levels.length - 1; i >= 0; i--) {
    const parent = g.levels[i] as VerityLevel;
    const child = i === 0 ? undefined : (g.levels[i - 1] as VerityLevel);
    const job = child
      ? jobFor(r, hash.fd, child.offset, child.blocks, hbs)
      : jobFor(r, data.fd, r.dataOffset, p.dataBlocks, p.dataBlockSize);
    const blockSize = child ? hbs : p.dataBlockSize;
    const base = child ? child.offset : r.dataOffset;
    for await (const chunk of hashBlocks(job)) {
      const stored = await readAt(
        hash,
        Math.ceil(chunk.blocks / g.hashesPerBlock) * hbs,
        parent.offset + (chunk.firstBlock / g.hashesPerBlock) * hbs,
      );
      for (let k = 0; k < chunk.blocks; k++) {
        const slot = Math.floor(k / g.hashesPerBlock) * hbs + (k % g.hashesPerBlock) * g.digestSlot;
        const want = stored.subarray(slot, slot + g.digestSize);
        const got = chunk.digests.subarray(k * g.digestSize, (k + 1) * g.digestSize);
        if (!got.equals(want)) {
          const n = chunk.firstBlock + k;
          const offset = base + n * blockSize;
          throw child
            ? mismatch(
                `hash tree level ${child.level} block ${n} at byte offset ${offset} does not match level ${parent.level}`,
                options.hashPath,
              )
            : mismatch(
                `data block ${n} at byte offset ${offset} does not match the hash tree`,
                options.dataPath,
              );
        }
      }
      if (!child)
        options.onProgress?.(
          (chunk.firstBlock + chunk.blocks) * p.dataBlockSize,
          p.dataBlocks * p.dataBlockSize,
        );
    }
  }
}
