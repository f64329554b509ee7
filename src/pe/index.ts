/**
 * Portable Executable (PE/COFF) reading and the few edits a UKI and an Authenticode signature need:
 * section table, image checksum, certificate table. Everything works on Buffers; nothing here
 * touches the disk, so the rules (alignment, checksum, hashed ranges) are unit-testable.
 */
import { createHash } from 'node:crypto';
import { UserError } from '../errors.js';

/** IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ: what UKI payload sections are. */
export const SCN_READONLY_DATA = 0x40000040;

const SECTION_HEADER_SIZE = 40;
const SECURITY_DIRECTORY = 4;
/** Largest SizeOfImage accepted: UKIs are tens of MiB; firmware has to allocate all of it at once. */
const MAX_IMAGE_SIZE = 1024 * 1024 * 1024;

/** One row of the section table. */
export interface PeSection {
  name: string;
  virtualSize: number;
  virtualAddress: number;
  sizeOfRawData: number;
  pointerToRawData: number;
  characteristics: number;
  /** File offset of this section's 40-byte header. */
  headerOffset: number;
}

/** The parsed headers plus the file offsets of the fields that signing and UKI assembly rewrite. */
export interface PeInfo {
  machine: number;
  pe32plus: boolean;
  subsystem: number;
  sectionAlignment: number;
  fileAlignment: number;
  sizeOfImage: number;
  sizeOfHeaders: number;
  checksum: number;
  sections: PeSection[];
  /** File offsets of header fields. */
  offsets: {
    coff: number;
    optional: number;
    checksum: number;
    sizeOfImage: number;
    sizeOfInitializedData: number;
    /** The security (certificate table) data-directory entry: 4-byte file offset + 4-byte size. */
    certDirectory: number;
    sectionTable: number;
  };
  /** Certificate table location (file offset and size), zero when unsigned. */
  certTable: { offset: number; size: number };
}

function fail(where: string | undefined, message: string): never {
  throw new UserError('LAMA_E_NOT_PE', message, where ? { where } : undefined);
}

/**
 * Parse a PE image's headers. Anything that is not a well-formed PE (no MZ, no PE signature, a
 * section or certificate table pointing past the end) is a UserError naming the problem.
 */
export function parsePe(buf: Buffer, where?: string): PeInfo {
  if (buf.length < 0x40 || buf.readUInt16LE(0) !== 0x5a4d) fail(where, 'not a PE image (no MZ header)');
  const peOff = buf.readUInt32LE(0x3c);
  if (peOff + 24 > buf.length || buf.readUInt32LE(peOff) !== 0x00004550) fail(where, 'not a PE image (no PE signature)');
  const coff = peOff + 4;
  const machine = buf.readUInt16LE(coff);
  const nsections = buf.readUInt16LE(coff + 2);
  const sizeOfOptional = buf.readUInt16LE(coff + 16);
  const opt = coff + 20;
  if (opt + sizeOfOptional > buf.length || sizeOfOptional < 96) fail(where, 'truncated PE optional header');
  const magic = buf.readUInt16LE(opt);
  if (magic !== 0x10b && magic !== 0x20b) fail(where, `unknown PE optional header magic 0x${magic.toString(16)}`);
  const pe32plus = magic === 0x20b;
  const dirs = opt + (pe32plus ? 112 : 96);
  const ndirs = buf.readUInt32LE(opt + (pe32plus ? 108 : 92));
  if (ndirs <= SECURITY_DIRECTORY || dirs + ndirs * 8 > opt + sizeOfOptional) fail(where, 'PE image has no certificate table directory');
  const certDirectory = dirs + SECURITY_DIRECTORY * 8;
  const sectionTable = opt + sizeOfOptional;
  const sizeOfImage = buf.readUInt32LE(opt + 56);
  if (sizeOfImage > MAX_IMAGE_SIZE) fail(where, `SizeOfImage 0x${sizeOfImage.toString(16)} is above 1 GiB; no EFI image is loaded that large`);
  if (sectionTable + nsections * SECTION_HEADER_SIZE > buf.length) fail(where, 'truncated PE section table');
  const sections: PeSection[] = [];
  for (let i = 0; i < nsections; i++) {
    const h = sectionTable + i * SECTION_HEADER_SIZE;
    const s: PeSection = {
      name: buf.subarray(h, h + 8).toString('latin1').replace(/\0+$/, ''),
      virtualSize: buf.readUInt32LE(h + 8),
      virtualAddress: buf.readUInt32LE(h + 12),
      sizeOfRawData: buf.readUInt32LE(h + 16),
      pointerToRawData: buf.readUInt32LE(h + 20),
      characteristics: buf.readUInt32LE(h + 36),
      headerOffset: h,
    };
    if (s.sizeOfRawData > 0 && s.pointerToRawData + s.sizeOfRawData > buf.length) {
      fail(where, `section ${s.name} extends past the end of the file (truncated image?)`);
    }
    // The loader maps every section inside SizeOfImage; measuring a section zero-fills it to its
    // VirtualSize, so a VirtualSize beyond the image would make us hash gigabytes of nothing.
    if (s.virtualAddress + s.virtualSize > sizeOfImage) {
      fail(where, `section ${s.name} (${s.virtualSize} bytes at RVA 0x${s.virtualAddress.toString(16)}) lies outside SizeOfImage 0x${sizeOfImage.toString(16)}`);
    }
    sections.push(s);
  }
  const certTable = { offset: buf.readUInt32LE(certDirectory), size: buf.readUInt32LE(certDirectory + 4) };
  if (certTable.size > 0 && certTable.offset + certTable.size > buf.length) fail(where, 'certificate table extends past the end of the file');
  return {
    machine,
    pe32plus,
    subsystem: buf.readUInt16LE(opt + 68),
    sectionAlignment: buf.readUInt32LE(opt + 32),
    fileAlignment: buf.readUInt32LE(opt + 36),
    sizeOfImage,
    sizeOfHeaders: buf.readUInt32LE(opt + 60),
    checksum: buf.readUInt32LE(opt + 64),
    sections,
    offsets: {
      coff,
      optional: opt,
      checksum: opt + 64,
      sizeOfImage: opt + 56,
      sizeOfInitializedData: opt + 8,
      certDirectory,
      sectionTable,
    },
    certTable,
  };
}

/** Round `n` up to a multiple of `a` (a power of two or any positive integer). */
export function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/**
 * The PE image checksum (the algorithm of imagehlp's CheckSumMappedFile): the file summed as 16-bit
 * little-endian words with the checksum field counted as zero, carries folded back in (a ones'
 * complement sum), plus the file length. Because 0x10000 ≡ 1 (mod 0xffff), a 32-bit word adds the
 * same as its two halves modulo 0xffff, so whole 32-bit words are summed and reduced per chunk; a
 * nonzero sum that reduces to 0 is 0xffff in ones' complement.
 */
export function peChecksum(buf: Buffer, checksumOffset: number): number {
  if (checksumOffset % 4 !== 0) {
    // Never seen in practice; a zeroed copy keeps the fast path simple.
    const copy = Buffer.from(buf);
    copy.fill(0, checksumOffset, Math.min(copy.length, checksumOffset + 4));
    return (onesComplementSum(copy, -1) + buf.length) >>> 0;
  }
  return (onesComplementSum(buf, checksumOffset >>> 2) + buf.length) >>> 0;
}

/** Ones' complement sum of 16-bit little-endian words, leaving out the 32-bit word at index `skip`. */
function onesComplementSum(buf: Buffer, skip: number): number {
  const words32 = buf.length >>> 2;
  const aligned = buf.byteOffset % 4 === 0 ? new Uint32Array(buf.buffer, buf.byteOffset, words32) : undefined;
  // 2^20 words of at most 2^32 each stay below 2^53, exact in a double.
  const CHUNK = 1 << 20;
  let total = 0;
  let nonzero = false;
  for (let start = 0; start < words32; start += CHUNK) {
    const end = Math.min(words32, start + CHUNK);
    let acc = 0;
    if (aligned) {
      for (let i = start; i < end; i++) acc += aligned[i] as number;
    } else {
      for (let i = start; i < end; i++) acc += buf.readUInt32LE(i * 4);
    }
    if (skip >= start && skip < end) acc -= buf.readUInt32LE(skip * 4);
    if (acc > 0) nonzero = true;
    total = (total + (acc % 0xffff)) % 0xffff;
  }
  for (let i = words32 * 4; i < buf.length; i += 2) {
    const v = i + 1 < buf.length ? buf.readUInt16LE(i) : (buf[i] ?? 0);
    if (v > 0) nonzero = true;
    total = (total + v) % 0xffff;
  }
  return total === 0 && nonzero ? 0xffff : total;
}

/** Recompute and store the checksum in place. */
export function updateChecksum(buf: Buffer): void {
  const info = parsePe(buf);
  buf.writeUInt32LE(peChecksum(buf, info.offsets.checksum), info.offsets.checksum);
}

/**
 * The Authenticode image digest: headers without the checksum and the certificate-table directory
 * entry, then each section's raw data in file order, then any trailing bytes except the certificate
 * table itself. The same ranges UEFI firmware hashes when it checks a signature against db.
 */
export function authenticodeDigest(buf: Buffer, algorithm: 'sha256' | 'sha384' | 'sha512' | 'sha1' = 'sha256', info = parsePe(buf)): Buffer {
  const h = createHash(algorithm);
  h.update(buf.subarray(0, info.offsets.checksum));
  h.update(buf.subarray(info.offsets.checksum + 4, info.offsets.certDirectory));
  h.update(buf.subarray(info.offsets.certDirectory + 8, info.sizeOfHeaders));
  let hashed = info.sizeOfHeaders;
  const ordered = info.sections.filter((s) => s.sizeOfRawData > 0).sort((a, b) => a.pointerToRawData - b.pointerToRawData);
  for (const s of ordered) {
    h.update(buf.subarray(s.pointerToRawData, s.pointerToRawData + s.sizeOfRawData));
    hashed += s.sizeOfRawData;
  }
  const end = buf.length - info.certTable.size;
  if (end > hashed) h.update(buf.subarray(hashed, end));
  return h.digest();
}

/** The raw bytes of a named section (VirtualSize long, the loaded size), or undefined. */
export function sectionData(buf: Buffer, info: PeInfo, name: string): Buffer | undefined {
  const s = info.sections.find((x) => x.name === name);
  if (!s) return undefined;
  const len = Math.min(s.virtualSize || s.sizeOfRawData, s.sizeOfRawData);
  return buf.subarray(s.pointerToRawData, s.pointerToRawData + len);
}

/** A section to append: name (at most 8 bytes) and contents. */
export interface NewSection {
  name: string;
  data: Buffer;
  /**
   * Bytes of file and address space to set aside for this section whatever its contents' length
   * (VirtualSize stays the contents' length): the sections after it then keep their offsets when
   * the contents change, so two images differing only here differ in a few header bytes and this area.
   */
  reserve?: number;
}

/** Where appended sections land; computed before any byte is written so it can be tested as data. */
export interface SectionPlan {
  name: string;
  virtualAddress: number;
  virtualSize: number;
  pointerToRawData: number;
  sizeOfRawData: number;
}

/**
 * Plan appending sections after the image's last section: virtual addresses aligned to
 * `vaAlignment` (a multiple of SectionAlignment; 4096 keeps them page-aligned), raw data aligned to
 * FileAlignment. Fails when the header area has no room for the new section headers.
 */
export function planAppendSections(info: PeInfo, fileLength: number, sections: readonly { name: string; size: number; reserve?: number }[], vaAlignment = 4096): {
  sections: SectionPlan[];
  sizeOfImage: number;
  fileLength: number;
} {
  if (info.certTable.size > 0) throw new UserError('LAMA_E_PE_SIGNED', 'cannot add sections to a signed PE image (sign after assembling)');
  const va = alignUp(Math.max(vaAlignment, info.sectionAlignment), info.sectionAlignment);
  const tableEnd = info.offsets.sectionTable + (info.sections.length + sections.length) * SECTION_HEADER_SIZE;
  const firstRaw = Math.min(info.sizeOfHeaders, ...info.sections.filter((s) => s.sizeOfRawData > 0).map((s) => s.pointerToRawData));
  if (tableEnd > firstRaw) {
    throw new UserError('LAMA_E_PE_NO_ROOM', `PE header has room for ${Math.floor((firstRaw - info.offsets.sectionTable) / SECTION_HEADER_SIZE) - info.sections.length} more section(s), ${sections.length} needed`);
  }
  let nextVa = alignUp(Math.max(...info.sections.map((s) => s.virtualAddress + Math.max(s.virtualSize, s.sizeOfRawData))), va);
  let nextRaw = alignUp(Math.max(fileLength, ...info.sections.map((s) => s.pointerToRawData + s.sizeOfRawData)), info.fileAlignment);
  const out: SectionPlan[] = [];
  let end = nextVa;
  for (const s of sections) {
    if (Buffer.byteLength(s.name, 'latin1') > 8) throw new Error(`section name ${s.name} is longer than 8 bytes`);
    if (s.reserve !== undefined && s.size > s.reserve) throw new UserError('LAMA_E_PE_SECTION_SIZE', `section ${s.name} holds ${s.size} bytes, more than the ${s.reserve} set aside for it`);
    const span = Math.max(s.size, s.reserve ?? 0);
    const raw = alignUp(span, info.fileAlignment);
    out.push({ name: s.name, virtualAddress: nextVa, virtualSize: s.size, pointerToRawData: nextRaw, sizeOfRawData: raw });
    end = nextVa + Math.max(span, 1);
    nextVa = alignUp(end, va);
    nextRaw += raw;
  }
  return { sections: out, sizeOfImage: alignUp(end, info.sectionAlignment), fileLength: nextRaw };
}

/**
 * Where appended data may start: the end of the last section, unless other bytes follow it. A COFF
 * symbol table after the sections (the stub's linker leaves one) is never loaded, so it is dropped,
 * as strip does, instead of leaving a hole between the stub's sections and ours.
 */
function loadedLength(pe: Buffer, info: PeInfo): number {
  const sectionsEnd = Math.max(info.sizeOfHeaders, ...info.sections.map((s) => s.pointerToRawData + s.sizeOfRawData));
  const symbols = pe.readUInt32LE(info.offsets.coff + 8);
  return symbols >= sectionsEnd ? sectionsEnd : pe.length;
}

/**
 * Append sections to a PE image (planAppendSections, then the bytes): section headers, data,
 * NumberOfSections, SizeOfImage, SizeOfInitializedData and the checksum all updated consistently.
 */
export function appendSections(pe: Buffer, sections: readonly NewSection[], vaAlignment = 4096): Buffer {
  const info = parsePe(pe);
  const length = loadedLength(pe, info);
  const plan = planAppendSections(info, length, sections.map((s) => ({ name: s.name, size: s.data.length, ...(s.reserve !== undefined && { reserve: s.reserve }) })), vaAlignment);
  const out = Buffer.alloc(plan.fileLength);
  pe.copy(out, 0, 0, length);
  let initialized = out.readUInt32LE(info.offsets.sizeOfInitializedData);
  plan.sections.forEach((p, i) => {
    const data = sections[i]?.data ?? Buffer.alloc(0);
    const h = info.offsets.sectionTable + (info.sections.length + i) * SECTION_HEADER_SIZE;
    out.fill(0, h, h + SECTION_HEADER_SIZE);
    out.write(p.name, h, 8, 'latin1');
    out.writeUInt32LE(p.virtualSize, h + 8);
    out.writeUInt32LE(p.virtualAddress, h + 12);
    out.writeUInt32LE(p.sizeOfRawData, h + 16);
    out.writeUInt32LE(p.pointerToRawData, h + 20);
    out.writeUInt32LE(SCN_READONLY_DATA, h + 36);
    data.copy(out, p.pointerToRawData);
    initialized += p.sizeOfRawData;
  });
  out.writeUInt16LE(info.sections.length + plan.sections.length, info.offsets.coff + 2);
  out.writeUInt32LE(0, info.offsets.coff + 8);
  out.writeUInt32LE(0, info.offsets.coff + 12);
  out.writeUInt32LE(plan.sizeOfImage, info.offsets.sizeOfImage);
  out.writeUInt32LE(initialized >>> 0, info.offsets.sizeOfInitializedData);
  updateChecksum(out);
  return out;
}
