import { UserError } from '../errors.js';

/**
 * Pure dm-verity geometry (format version 1, the one veritysetup writes by default): where each
 * level of the hash tree lives on the hash device and how large the whole area is. No I/O here, so
 * the layout can be planned (and unit-tested) before a single byte is hashed.
 */

/** Hash algorithms accepted by the kernel's dm-verity and by node:crypto under the same name. */
export const VERITY_ALGORITHMS: Readonly<Record<string, number>> = { sha1: 20, sha256: 32, sha512: 64 };

/** Size of the on-disk superblock veritysetup writes in front of the tree. */
export const VERITY_SUPERBLOCK_SIZE = 512;

export interface VerityParams {
  dataBlocks: number;
  dataBlockSize: number;
  hashBlockSize: number;
  algorithm: string;
  salt: Buffer;
  /** Byte offset of the hash area (superblock first when `superblock`) on the hash device. */
  hashOffset: number;
  superblock: boolean;
}

export interface VerityLevel {
  /** 0 hashes the data blocks; the highest level is a single block whose hash is the root hash. */
  level: number;
  /** Absolute byte offset of the level on the hash device. */
  offset: number;
  /** Number of hash blocks in this level. */
  blocks: number;
  /** Number of blocks (data blocks for level 0) this level hashes. */
  covers: number;
}

export interface VerityGeometry {
  digestSize: number;
  /** Bytes each digest occupies inside a hash block (the digest size rounded up to a power of two). */
  digestSlot: number;
  hashesPerBlock: number;
  /** Byte offset of the first tree block (after the superblock block, when there is one). */
  treeOffset: number;
  /** Bottom-up: levels[0] hashes data, levels[levels.length-1] is the single top block. */
  levels: VerityLevel[];
  /** Bytes from `hashOffset` to the end of the tree, superblock area included. */
  hashTreeBytes: number;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** Reject parameters the kernel would refuse, with the same limits veritysetup enforces. */
export function checkVerityParams(p: VerityParams): void {
  const bad = (msg: string): never => {
    throw new UserError('LAMA_E_VERITY_PARAMS', msg);
  };
  for (const [name, v] of [
    ['data block size', p.dataBlockSize],
    ['hash block size', p.hashBlockSize],
  ] as const) {
    if (!isPowerOfTwo(v) || v < 512 || v > 512 * 1024)
      bad(`${name} ${v} must be a power of two between 512 and 524288`);
  }
  if (VERITY_ALGORITHMS[p.algorithm] === undefined) {
    bad(
      `unsupported hash algorithm '${p.algorithm}' (supported: ${Object.keys(VERITY_ALGORITHMS).join(', ')})`,
    );
  }
  if (p.salt.length > 256) bad(`salt is ${p.salt.length} bytes; at most 256 are allowed`);
  if (!Number.isSafeInteger(p.dataBlocks) || p.dataBlocks < 1)
    bad(`the data area must hold at least one block (got ${p.dataBlocks})`);
  if (!Number.isSafeInteger(p.hashOffset) || p.hashOffset < 0)
    bad(`hash offset ${p.hashOffset} is not a valid byte offset`);
  const align = p.superblock ? 512 : p.hashBlockSize;
  if (p.hashOffset % align !== 0) bad(`hash offset ${p.hashOffset} must be a multiple of ${align}`);
}

/** Compute where every tree level goes, exactly as veritysetup lays it out (top level first on disk). */
export function planVerity(p: VerityParams): VerityGeometry {
  checkVerityParams(p);
  const digestSize = VERITY_ALGORITHMS[p.algorithm] as number;
  let digestSlot = 1;
  while (digestSlot < digestSize) digestSlot *= 2;
  const hashesPerBlock = 2 ** Math.floor(Math.log2(p.hashBlockSize / digestSlot));
  const hbs = p.hashBlockSize;
  const treeOffset = p.superblock
    ? Math.ceil((p.hashOffset + VERITY_SUPERBLOCK_SIZE) / hbs) * hbs
    : p.hashOffset;

  // Level sizes bottom-up; a single data block has no tree at all (the root hash is its own hash).
  const sizes: number[] = [];
  let covers = p.dataBlocks;
  while (covers > 1) {
    const blocks = Math.ceil(covers / hashesPerBlock);
    sizes.push(blocks);
    covers = blocks;
  }
  // veritysetup stores the top level first, then each lower level after it.
  const levels: VerityLevel[] = [];
  let offset = treeOffset;
  for (let i = sizes.length - 1; i >= 0; i--) {
    const blocks = sizes[i] as number;
    levels[i] = { level: i, offset, blocks, covers: i === 0 ? p.dataBlocks : (sizes[i - 1] as number) };
    offset += blocks * hbs;
  }
  return { digestSize, digestSlot, hashesPerBlock, treeOffset, levels, hashTreeBytes: offset - p.hashOffset };
}

/** The fields of a veritysetup superblock. */
export interface VeritySuperblock {
  version: number;
  hashType: number;
  uuid: string;
  algorithm: string;
  dataBlockSize: number;
  hashBlockSize: number;
  dataBlocks: number;
  salt: Buffer;
}

const SIGNATURE = Buffer.from('verity\0\0', 'latin1');

/** Render a 16-byte UUID as the canonical lower-case 8-4-4-4-12 string. */
export function formatUuid(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Parse a textual UUID into its 16 bytes in written order (the byte order veritysetup stores). */
export function parseUuidBytes(uuid: string): Buffer {
  const hex = uuid.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new UserError('LAMA_E_BAD_UUID', `'${uuid}' is not a UUID`);
  return Buffer.from(hex, 'hex');
}

/** Encode the 512-byte superblock (struct verity_sb in cryptsetup, little-endian). */
export function encodeVeritySuperblock(sb: Omit<VeritySuperblock, 'version' | 'hashType'>): Buffer {
  const b = Buffer.alloc(VERITY_SUPERBLOCK_SIZE);
  SIGNATURE.copy(b, 0);
  b.writeUInt32LE(1, 8);
  b.writeUInt32LE(1, 12);
  parseUuidBytes(sb.uuid).copy(b, 16);
  b.write(sb.algorithm, 32, 32, 'latin1');
  b.writeUInt32LE(sb.dataBlockSize, 64);
  b.writeUInt32LE(sb.hashBlockSize, 68);
  b.writeBigUInt64LE(BigInt(sb.dataBlocks), 72);
  b.writeUInt16LE(sb.salt.length, 80);
  sb.salt.copy(b, 88);
  return b;
}

/** Decode a superblock, or return undefined when the bytes do not start with the verity signature. */
export function decodeVeritySuperblock(b: Buffer): VeritySuperblock | undefined {
  if (b.length < VERITY_SUPERBLOCK_SIZE || !b.subarray(0, 8).equals(SIGNATURE)) return undefined;
  const saltSize = b.readUInt16LE(80);
  const nul = b.indexOf(0, 32);
  return {
    version: b.readUInt32LE(8),
    hashType: b.readUInt32LE(12),
    uuid: formatUuid(b.subarray(16, 32)),
    algorithm: b.toString('latin1', 32, nul >= 32 && nul < 64 ? nul : 64),
    dataBlockSize: b.readUInt32LE(64),
    hashBlockSize: b.readUInt32LE(68),
    dataBlocks: Number(b.readBigUInt64LE(72)),
    salt: Buffer.from(b.subarray(88, 88 + Math.min(saltSize, 256))),
  };
}
