import { randomUUID } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import { crc32 } from 'node:zlib';
import { UserError } from '../errors.js';
import { readAt } from './io.js';

/**
 * GUID Partition Table (UEFI spec, chapter 5): protective MBR, primary header and entry array at the
 * start, backup entry array and header at the end, both guarded by CRC32. Encoding is pure (a table
 * in, the bytes of both ends out); reading checks every CRC and falls back to the backup copy.
 */

export const GPT_SIGNATURE = 'EFI PART';
const HEADER_SIZE = 92;
const REVISION = 0x00010000;
export const DEFAULT_ENTRY_COUNT = 128;
export const ENTRY_SIZE = 128;
const MiB = 1024 * 1024;

/** Attribute bits with their names (UEFI bits 0–2, DPS bits 59–63). */
export const GPT_ATTRIBUTES: Readonly<Record<string, number>> = {
  required: 0,
  'no-block-io': 1,
  'legacy-bios-bootable': 2,
  'grow-fs': 59,
  'read-only': 60,
  hidden: 62,
  'no-auto': 63,
};

export interface GptPartition {
  /** 1-based slot in the entry array (what the kernel calls partition N). */
  number: number;
  typeGuid: string;
  uuid: string;
  firstLba: bigint;
  lastLba: bigint;
  attributes: bigint;
  name: string;
}

export interface GptTable {
  sectorSize: number;
  /** Total sectors of the disk; the backup header sits in the last one. */
  diskSectors: bigint;
  diskGuid: string;
  firstUsableLba: bigint;
  lastUsableLba: bigint;
  entryCount: number;
  partitions: GptPartition[];
}

/** A partition to place, in order; `size` in bytes (rounded up to the alignment). */
export interface PartitionRequest {
  name: string;
  typeGuid: string;
  uuid?: string;
  size: number;
  /** Take whatever the disk has left (at most one partition, normally the last). */
  grow?: boolean;
  attributes?: bigint;
}

export interface GptPlanOptions {
  partitions: PartitionRequest[];
  sectorSize?: number;
  /** Partition start and size alignment in bytes (1 MiB). */
  alignment?: number;
  /** Where the first partition starts (defaults to the alignment; Rockchip boards need more). */
  firstOffset?: number;
  /** Total disk size; default: just large enough for the partitions and the backup table. */
  diskSize?: number;
  diskGuid?: string;
  entryCount?: number;
}

/** Byte offset and size of a partition. */
export function partitionExtent(t: GptTable, p: GptPartition): { offset: number; size: number } {
  const ss = BigInt(t.sectorSize);
  return { offset: Number(p.firstLba * ss), size: Number((p.lastLba - p.firstLba + 1n) * ss) };
}

function entrySectors(entryCount: number, sectorSize: number): number {
  return Math.ceil((entryCount * ENTRY_SIZE) / sectorSize);
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/**
 * Place partitions on a disk: each starts on the alignment, sizes round up to it, a `grow`
 * partition takes the rest. Pure; throws a UserError when the requests do not fit `diskSize`.
 */
export function planGpt(o: GptPlanOptions): GptTable {
  const ss = o.sectorSize ?? 512;
  const align = o.alignment ?? MiB;
  const entryCount = o.entryCount ?? DEFAULT_ENTRY_COUNT;
  const es = entrySectors(entryCount, ss);
  const tailBytes = (es + 1) * ss;
  const fixed = o.partitions.reduce((sum, p) => sum + alignUp(p.size, align), 0);
  let offset = alignUp(o.firstOffset ?? align, align);
  if (offset < (2 + es) * ss)
    throw new UserError('LAMA_E_GPT_LAYOUT', `first partition offset ${offset} overlaps the primary GPT`);
  const diskSize = o.diskSize ?? alignUp(offset + fixed + tailBytes, align);
  if (diskSize % ss !== 0)
    throw new UserError(
      'LAMA_E_GPT_LAYOUT',
      `disk size ${diskSize} is not a multiple of the ${ss}-byte sector`,
    );
  const diskSectors = diskSize / ss;
  const lastUsable = diskSectors - es - 2;
  const needed = offset + fixed + tailBytes;
  if (needed > diskSize) {
    throw new UserError('LAMA_E_GPT_LAYOUT', `partitions need ${needed} bytes but the disk has ${diskSize}`);
  }
  const grows = o.partitions.filter((p) => p.grow).length;
  if (grows > 1) throw new UserError('LAMA_E_GPT_LAYOUT', 'at most one partition may grow to fill the disk');
  const spare = Math.floor((diskSize - needed) / align) * align;
  const partitions = o.partitions.map((p, i): GptPartition => {
    const size = alignUp(p.size, align) + (p.grow ? spare : 0);
    const first = offset / ss;
    offset += size;
    const last = offset / ss - 1;
    return {
      number: i + 1,
      typeGuid: p.typeGuid.toLowerCase(),
      uuid: (p.uuid ?? randomUUID()).toLowerCase(),
      firstLba: BigInt(first),
      lastLba: BigInt(last),
      attributes: p.attributes ?? 0n,
      name: p.name,
    };
  });
  return {
    sectorSize: ss,
    diskSectors: BigInt(diskSectors),
    diskGuid: (o.diskGuid ?? randomUUID()).toLowerCase(),
    firstUsableLba: BigInt(2 + es),
    lastUsableLba: BigInt(lastUsable),
    entryCount,
    partitions,
  };
}

/** Write a GUID in the mixed-endian layout GPT uses (first three fields little-endian). */
export function encodeGuid(guid: string, out: Buffer, at: number): void {
  const hex = guid.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new UserError('LAMA_E_BAD_UUID', `'${guid}' is not a UUID`);
  const b = Buffer.from(hex, 'hex');
  out.writeUInt32LE(b.readUInt32BE(0), at);
  out.writeUInt16LE(b.readUInt16BE(4), at + 4);
  out.writeUInt16LE(b.readUInt16BE(6), at + 6);
  b.copy(out, at + 8, 8, 16);
}

/** Read a mixed-endian GUID back into its lower-case text form. */
export function decodeGuid(buf: Buffer, at: number): string {
  const b = Buffer.alloc(16);
  b.writeUInt32BE(buf.readUInt32LE(at), 0);
  b.writeUInt16BE(buf.readUInt16LE(at + 4), 4);
  b.writeUInt16BE(buf.readUInt16LE(at + 6), 6);
  buf.copy(b, 8, at + 8, at + 16);
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function encodeEntries(t: GptTable): Buffer {
  const entries = Buffer.alloc(entrySectors(t.entryCount, t.sectorSize) * t.sectorSize);
  for (const p of t.partitions) {
    if (p.number < 1 || p.number > t.entryCount)
      throw new UserError('LAMA_E_GPT_LAYOUT', `partition number ${p.number} outside 1..${t.entryCount}`);
    if (p.name.length > 36)
      throw new UserError('LAMA_E_GPT_LAYOUT', `partition name '${p.name}' is longer than 36 characters`);
    const at = (p.number - 1) * ENTRY_SIZE;
    encodeGuid(p.typeGuid, entries, at);
    encodeGuid(p.uuid, entries, at + 16);
    entries.writeBigUInt64LE(p.firstLba, at + 32);
    entries.writeBigUInt64LE(p.lastLba, at + 40);
    entries.writeBigUInt64LE(p.attributes, at + 48);
    entries.write(p.name, at + 56, 72, 'utf16le');
  }
  return entries;
}

function encodeHeader(
  t: GptTable,
  current: bigint,
  backup: bigint,
  entriesLba: bigint,
  entriesCrc: number,
): Buffer {
  const h = Buffer.alloc(t.sectorSize);
  h.write(GPT_SIGNATURE, 0, 'latin1');
  h.writeUInt32LE(REVISION, 8);
  h.writeUInt32LE(HEADER_SIZE, 12);
  h.writeBigUInt64LE(current, 24);
  h.writeBigUInt64LE(backup, 32);
  h.writeBigUInt64LE(t.firstUsableLba, 40);
  h.writeBigUInt64LE(t.lastUsableLba, 48);
  encodeGuid(t.diskGuid, h, 56);
  h.writeBigUInt64LE(entriesLba, 72);
  h.writeUInt32LE(t.entryCount, 80);
  h.writeUInt32LE(ENTRY_SIZE, 84);
  h.writeUInt32LE(entriesCrc, 88);
  h.writeUInt32LE(crc32(h.subarray(0, HEADER_SIZE)), 16);
  return h;
}

function protectiveMbr(t: GptTable): Buffer {
  const m = Buffer.alloc(t.sectorSize);
  const e = 446;
  // CHS fields as every partitioning tool writes them: start 0/0/2, end maxed out.
  m.writeUInt8(0x00, e);
  m.writeUInt8(0x00, e + 1);
  m.writeUInt8(0x02, e + 2);
  m.writeUInt8(0x00, e + 3);
  m.writeUInt8(0xee, e + 4);
  m.writeUInt8(0xff, e + 5);
  m.writeUInt8(0xff, e + 6);
  m.writeUInt8(0xff, e + 7);
  m.writeUInt32LE(1, e + 8);
  const sectors = t.diskSectors - 1n;
  m.writeUInt32LE(sectors > 0xffffffffn ? 0xffffffff : Number(sectors), e + 12);
  m.writeUInt16LE(0xaa55, 510);
  return m;
}

/** The bytes of both ends of a GPT disk: `head` at offset 0, `tail` at `tailOffset`. */
export interface EncodedGpt {
  head: Buffer;
  tail: Buffer;
  tailOffset: number;
}

/** Encode protective MBR, primary header + entries, backup entries + header. Pure. */
export function encodeGpt(t: GptTable): EncodedGpt {
  const entries = encodeEntries(t);
  const crc = crc32(entries);
  const es = BigInt(entries.length / t.sectorSize);
  const last = t.diskSectors - 1n;
  const primary = encodeHeader(t, 1n, last, 2n, crc);
  const backup = encodeHeader(t, last, 1n, last - es, crc);
  return {
    head: Buffer.concat([protectiveMbr(t), primary, entries]),
    tail: Buffer.concat([entries, backup]),
    tailOffset: Number((last - es) * BigInt(t.sectorSize)),
  };
}

/** Write both copies of the table into an open disk image (extending it to the disk size). */
export async function writeGpt(h: FileHandle, t: GptTable): Promise<void> {
  const e = encodeGpt(t);
  await h.write(e.head, 0, e.head.length, 0);
  await h.write(e.tail, 0, e.tail.length, e.tailOffset);
}

// ---------------------------------------------------------------------------------------------------
// Reading

export interface GptReadResult {
  table: GptTable;
  /** Which copy the table came from. */
  source: 'primary' | 'backup';
  /** Everything found wrong, one line each (empty for a healthy disk). */
  problems: string[];
  /** Size of the file or device read. */
  fileSize: number;
}

interface ParsedHeader {
  ok: boolean;
  problem?: string;
  current: bigint;
  backup: bigint;
  firstUsable: bigint;
  lastUsable: bigint;
  diskGuid: string;
  entriesLba: bigint;
  entryCount: number;
  entrySize: number;
  entriesCrc: number;
}

function parseHeader(b: Buffer, lba: bigint, what: string): ParsedHeader {
  const bad = (problem: string): ParsedHeader => ({
    ok: false,
    problem: `${what} GPT header at LBA ${lba}: ${problem}`,
    current: 0n,
    backup: 0n,
    firstUsable: 0n,
    lastUsable: 0n,
    diskGuid: '',
    entriesLba: 0n,
    entryCount: 0,
    entrySize: 0,
    entriesCrc: 0,
  });
  if (b.length < HEADER_SIZE) return bad('missing (file too short)');
  if (b.toString('latin1', 0, 8) !== GPT_SIGNATURE) return bad('no "EFI PART" signature');
  const size = b.readUInt32LE(12);
  if (size < HEADER_SIZE || size > b.length) return bad(`invalid header size ${size}`);
  const copy = Buffer.from(b.subarray(0, size));
  const stored = copy.readUInt32LE(16);
  copy.writeUInt32LE(0, 16);
  const actual = crc32(copy);
  if (stored !== actual)
    return bad(`header CRC32 is ${hex32(stored)} but the header hashes to ${hex32(actual)}`);
  const current = b.readBigUInt64LE(24);
  if (current !== lba) return bad(`says it is at LBA ${current}`);
  const entryCount = b.readUInt32LE(80);
  const entrySize = b.readUInt32LE(84);
  if (entrySize < ENTRY_SIZE || entrySize % 8 !== 0 || entryCount > 4096)
    return bad(`invalid entry array (${entryCount} entries of ${entrySize} bytes)`);
  return {
    ok: true,
    current,
    backup: b.readBigUInt64LE(32),
    firstUsable: b.readBigUInt64LE(40),
    lastUsable: b.readBigUInt64LE(48),
    diskGuid: decodeGuid(b, 56),
    entriesLba: b.readBigUInt64LE(72),
    entryCount,
    entrySize,
    entriesCrc: b.readUInt32LE(88),
  };
}

function hex32(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}

function parseEntries(buf: Buffer, hdr: ParsedHeader): GptPartition[] {
  const parts: GptPartition[] = [];
  for (let i = 0; i < hdr.entryCount; i++) {
    const at = i * hdr.entrySize;
    const typeGuid = decodeGuid(buf, at);
    if (typeGuid === '00000000-0000-0000-0000-000000000000') continue;
    const raw = buf.toString('utf16le', at + 56, at + 128);
    const nul = raw.indexOf('\0');
    parts.push({
      number: i + 1,
      typeGuid,
      uuid: decodeGuid(buf, at + 16),
      firstLba: buf.readBigUInt64LE(at + 32),
      lastLba: buf.readBigUInt64LE(at + 40),
      attributes: buf.readBigUInt64LE(at + 48),
      name: nul >= 0 ? raw.slice(0, nul) : raw,
    });
  }
  return parts;
}

async function loadCopy(
  h: FileHandle,
  ss: number,
  lba: bigint,
  what: string,
): Promise<{ header: ParsedHeader; partitions?: GptPartition[]; problem?: string }> {
  const header = parseHeader(await readAt(h, ss, Number(lba * BigInt(ss))), lba, what);
  if (!header.ok) return { header, problem: header.problem };
  const bytes = header.entryCount * header.entrySize;
  const entries = await readAt(h, bytes, Number(header.entriesLba * BigInt(ss)));
  if (entries.length < bytes)
    return {
      header,
      problem: `${what} GPT entry array at LBA ${header.entriesLba} is cut off by the end of the file`,
    };
  const actual = crc32(entries);
  if (actual !== header.entriesCrc) {
    return {
      header,
      problem: `${what} GPT entry array at LBA ${header.entriesLba}: CRC32 is ${hex32(actual)}, header says ${hex32(header.entriesCrc)}`,
    };
  }
  return { header, partitions: parseEntries(entries, header) };
}

function toTable(
  ss: number,
  fileSectors: bigint,
  hdr: ParsedHeader,
  partitions: GptPartition[],
  source: 'primary' | 'backup',
): GptTable {
  const last = source === 'primary' ? hdr.backup : hdr.current;
  return {
    sectorSize: ss,
    diskSectors: last > 0n ? last + 1n : fileSectors,
    diskGuid: hdr.diskGuid,
    firstUsableLba: hdr.firstUsable,
    lastUsableLba: hdr.lastUsable,
    entryCount: hdr.entryCount,
    partitions,
  };
}

function layoutProblems(t: GptTable): string[] {
  const problems: string[] = [];
  const sorted = [...t.partitions].sort((a, b) => (a.firstLba < b.firstLba ? -1 : 1));
  for (const p of sorted) {
    if (p.lastLba < p.firstLba)
      problems.push(`partition ${p.number} ends (LBA ${p.lastLba}) before it starts (LBA ${p.firstLba})`);
    if (p.firstLba < t.firstUsableLba || p.lastLba > t.lastUsableLba) {
      problems.push(
        `partition ${p.number} (LBA ${p.firstLba}-${p.lastLba}) lies outside the usable area ${t.firstUsableLba}-${t.lastUsableLba}`,
      );
    }
  }
  for (let i = 1; i < sorted.length; i++) {
    const a = sorted[i - 1] as GptPartition;
    const b = sorted[i] as GptPartition;
    if (b.firstLba <= a.lastLba) problems.push(`partitions ${a.number} and ${b.number} overlap`);
  }
  return problems;
}

/**
 * Read the GPT of an image or device. Both copies are checked (signature, CRC32 of header and
 * entries, location); when the primary is damaged the backup is used and the damage is reported in
 * `problems`. With `strict` (the default) any problem is a UserError instead, so commands that go on
 * to trust the table never work from a damaged or truncated disk.
 */
export async function readGptFrom(
  h: FileHandle,
  options: { strict?: boolean; where?: string } = {},
): Promise<GptReadResult> {
  const strict = options.strict ?? true;
  const where = options.where;
  const fileSize = (await h.stat()).size;
  let ss = 512;
  const lba1 = await readAt(h, 8, 512);
  if (lba1.toString('latin1') !== GPT_SIGNATURE) {
    const at4k = await readAt(h, 8, 4096);
    if (at4k.toString('latin1') === GPT_SIGNATURE) ss = 4096;
  }
  const fileSectors = BigInt(Math.floor(fileSize / ss));
  const problems: string[] = [];
  const mbr = await readAt(h, 512, 0);
  if (mbr.length < 512 || mbr.readUInt16LE(510) !== 0xaa55 || !hasProtectivePartition(mbr))
    problems.push('no protective MBR in LBA 0');

  const primary = await loadCopy(h, ss, 1n, 'primary');
  if (primary.problem) problems.push(primary.problem);
  const backupLba = primary.header.ok ? primary.header.backup : fileSectors - 1n;
  if (primary.header.ok && backupLba >= fileSectors) {
    const msg = `image is truncated: the GPT describes ${(backupLba + 1n) * BigInt(ss)} bytes but the file has ${fileSize}`;
    if (strict) throw new UserError('LAMA_E_IMAGE_TRUNCATED', msg, { where });
    problems.push(msg);
  }
  const backup =
    backupLba < fileSectors && backupLba > 1n ? await loadCopy(h, ss, backupLba, 'backup') : undefined;
  if (backup?.problem) problems.push(backup.problem);

  let result: GptReadResult | undefined;
  if (primary.partitions) {
    result = {
      table: toTable(ss, fileSectors, primary.header, primary.partitions, 'primary'),
      source: 'primary',
      problems,
      fileSize,
    };
    if (
      backup?.partitions &&
      (backup.header.diskGuid !== primary.header.diskGuid ||
        backup.header.entriesCrc !== primary.header.entriesCrc)
    ) {
      problems.push('primary and backup GPT differ');
    }
  } else if (backup?.partitions) {
    result = {
      table: toTable(ss, fileSectors, backup.header, backup.partitions, 'backup'),
      source: 'backup',
      problems,
      fileSize,
    };
  }
  if (!result) {
    throw new UserError('LAMA_E_GPT_CORRUPT', `no valid GPT: ${problems.join('; ')}`, { where });
  }
  problems.push(...layoutProblems(result.table));
  if (strict && problems.length > 0) {
    const hint =
      result.source === 'backup'
        ? ' (the backup GPT is intact: `lamadist gpt repair` restores the primary)'
        : '';
    throw new UserError('LAMA_E_GPT_CORRUPT', `${problems[0] as string}${hint}`, { where });
  }
  return result;
}

function hasProtectivePartition(mbr: Buffer): boolean {
  for (let i = 0; i < 4; i++) if (mbr.readUInt8(446 + i * 16 + 4) === 0xee) return true;
  return false;
}
