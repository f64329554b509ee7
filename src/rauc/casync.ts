import { UserError } from '../errors.js';

/**
 * casync index files as `rauc convert` puts them into a casync bundle instead of the images: a
 * `.caibx` (blob index, block images) or `.caidx` (directory archive index, tar images) lists the
 * chunks of the image by id and end offset; the chunks themselves live in a separate chunk store.
 * The manifest keeps the original image's sha256 and size, so without the chunk store a verifier
 * can check the index's structure and (for a blob) the image size it describes, not the image.
 */

const INDEX = 0x96824d9c7b129ff9n;
const TABLE = 0xe75b9e112f17417dn;
const TAIL_MARKER = 0x4b4f050e5549ecd1n;
/** Feature flag: chunk ids are SHA-512/256 instead of SHA-256. */
const SHA512_256 = 0x2000000000000000n;
const INDEX_HEADER = 48;
const TABLE_HEADER = 16;
const ITEM = 40;
const TAIL = 40;

/** What a casync index says about the image it stands for. */
export interface CasyncIndex {
  kind: 'caibx' | 'caidx';
  chunks: number;
  /** Bytes the chunks add up to: the image size for a blob index, the catar stream for an archive. */
  size: number;
  chunkDigest: 'sha256' | 'sha512-256';
}

/** The casync index kind RAUC infers from an image file name, or undefined for an ordinary image. */
export function casyncKind(filename: string): 'caibx' | 'caidx' | undefined {
  if (filename.endsWith('.caibx')) return 'caibx';
  if (filename.endsWith('.caidx')) return 'caidx';
  return undefined;
}

/** Parse and check a casync index (header, chunk table with increasing offsets, tail); `where` locates errors. */
export function parseCasyncIndex(buf: Buffer, kind: 'caibx' | 'caidx', where: string): CasyncIndex {
  const bad = (what: string, at: number): never => {
    throw new UserError('LAMA_E_BUNDLE_CASYNC_INDEX', `casync index: ${what}`, { where: `${where}@${at}` });
  };
  if (buf.length < INDEX_HEADER + TABLE_HEADER + TAIL) bad(`only ${buf.length} bytes`, 0);
  if (buf.readBigUInt64LE(0) !== BigInt(INDEX_HEADER) || buf.readBigUInt64LE(8) !== INDEX) bad('no index header', 0);
  const flags = buf.readBigUInt64LE(16);
  if (buf.readBigUInt64LE(INDEX_HEADER) !== 0xffffffffffffffffn || buf.readBigUInt64LE(INDEX_HEADER + 8) !== TABLE) bad('no chunk table header', INDEX_HEADER);
  const itemsBytes = buf.length - INDEX_HEADER - TABLE_HEADER - TAIL;
  if (itemsBytes % ITEM !== 0) bad(`chunk table of ${itemsBytes} bytes is not a whole number of ${ITEM}-byte entries`, INDEX_HEADER + TABLE_HEADER);
  const tail = buf.length - TAIL;
  if (buf.readBigUInt64LE(tail + 32) !== TAIL_MARKER) bad('no table tail marker', tail + 32);
  if (buf.readBigUInt64LE(tail + 16) !== BigInt(INDEX_HEADER)) bad('table tail does not point at the table', tail + 16);
  if (buf.readBigUInt64LE(tail + 24) !== BigInt(TABLE_HEADER + itemsBytes + TAIL)) bad('table tail gives the wrong table size', tail + 24);
  let end = 0n;
  const chunks = itemsBytes / ITEM;
  for (let i = 0; i < chunks; i++) {
    const at = INDEX_HEADER + TABLE_HEADER + i * ITEM;
    const offset = buf.readBigUInt64LE(at);
    if (offset <= end) bad(`chunk ${i} ends at ${offset}, not after the previous chunk (${end})`, at);
    end = offset;
  }
  if (end > BigInt(Number.MAX_SAFE_INTEGER)) bad(`described size ${end} is too large`, tail - ITEM);
  return { kind, chunks, size: Number(end), chunkDigest: (flags & SHA512_256) !== 0n ? 'sha512-256' : 'sha256' };
}
