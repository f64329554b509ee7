/**
 * Unified Kernel Images: a systemd EFI stub with the kernel, initrd, command line and metadata added
 * as PE sections (UAPI UKI specification). Assembly is pure TypeScript over src/pe; signing is
 * src/secureboot's signPe.
 *
 * Public API:
 * - `planUki(opts)` → the ordered section list (pure)
 * - `buildUki({ stub, kernel, initrd, cmdline, osrel?, uname?, splash? })` → Buffer (unsigned PE)
 * - `inspectUki(pe)` → sections, command line, os-release, uname
 * - `setUkiCmdline(pe, cmdline)` → the same unsigned UKI with another command line
 * - `kernelVersion(bzImage)` → the version string embedded in an x86 bzImage, if any
 * - `defaultOsRelease(initrds)` → the os-release `.osrel` gets without one given: the initrd's, else the host's
 */
import { promises as fs } from 'node:fs';
import { UserError, isErrno } from '../errors.js';
import { appendSections, parsePe, sectionData, updateChecksum, type NewSection, type PeInfo } from '../pe/index.js';

export { defaultOsRelease, type OsReleaseSource } from './initrd.js';

/** A file path or its contents. */
export type Input = string | Buffer;

export interface UkiOptions {
  /** systemd EFI stub (linuxx64.efi.stub). */
  stub: Input;
  kernel: Input;
  initrd?: Input | Input[];
  cmdline: string;
  /** os-release contents (file or text buffer). */
  osrel?: Input;
  /** Kernel release; read from the bzImage header when omitted. */
  uname?: string;
  /** BMP splash image. */
  splash?: Input;
}

/** Sections a UKI may carry that this assembler writes, in file order. */
/** Where Debian's systemd-boot-efi puts the EFI stub of each architecture (BSP `arch` names). */
export const EFI_STUBS: Readonly<Record<string, string>> = {
  'x86-64': '/usr/lib/systemd/boot/efi/linuxx64.efi.stub',
  arm64: '/usr/lib/systemd/boot/efi/linuxaa64.efi.stub',
};

export const UKI_SECTIONS = ['.osrel', '.cmdline', '.splash', '.uname', '.initrd', '.linux'] as const;

/**
 * Bytes set aside for `.cmdline` in every UKI: more than the kernel's COMMAND_LINE_SIZE (2048 on
 * x86-64 and arm64), so no command line is refused by it. Because the area is fixed, the UKIs of
 * one release for different hosts differ only inside it and in a few header fields, which is what
 * lets a release carry one UKI per slot plus a small patch per host (src/release).
 */
export const CMDLINE_AREA = 4096;

/**
 * Bytes set aside for `.osrel` and `.uname`. With these areas fixed, a release that changes only
 * the version keeps `.initrd` and `.linux` at the file offsets of the last one, so an update copies
 * them block for block from the UKI already on the ESP (meta-lamadist's bundle hook) instead of
 * downloading them again. A larger os-release takes whole 4 KiB blocks.
 */
export const OSREL_AREA = 4096;
export const UNAME_AREA = 256;

async function load(input: Input, what: string, code: `LAMA_E_${string}` = 'LAMA_E_NOT_FOUND'): Promise<Buffer> {
  if (Buffer.isBuffer(input)) return input;
  try {
    return await fs.readFile(input);
  } catch (err) {
    if (isErrno(err, 'ENOENT') || isErrno(err, 'EISDIR')) throw new UserError(code, `${what} ${input} does not exist`);
    throw err;
  }
}

/**
 * The kernel release string of an x86 bzImage: the boot protocol's setup header (magic "HdrS" at
 * 0x202) holds at 0x20e a pointer, relative to 0x200, to a NUL-terminated version string.
 */
export function kernelVersion(kernel: Buffer): string | undefined {
  if (kernel.length < 0x210 || kernel.toString('latin1', 0x202, 0x206) !== 'HdrS') return undefined;
  const ptr = kernel.readUInt16LE(0x20e);
  if (ptr === 0) return undefined;
  const start = ptr + 0x200;
  const end = kernel.indexOf(0, start);
  if (end < 0) return undefined;
  const full = kernel.toString('latin1', start, end);
  return full.split(' ')[0] || undefined;
}

/**
 * The sections of a UKI in file order. `.linux` goes last, as ukify places it: newer stubs load the
 * kernel in place, and only the last section can grow to the kernel's own image size.
 */
export function planUki(parts: { kernel: Buffer; initrd?: Buffer; cmdline: string; osrel?: Buffer; uname?: string; splash?: Buffer }): NewSection[] {
  if (/[\0\n]/.test(parts.cmdline)) throw new UserError('LAMA_E_CMDLINE', 'kernel command line must be a single line without NUL bytes');
  const out: NewSection[] = [];
  if (parts.osrel) out.push({ name: '.osrel', data: parts.osrel, reserve: Math.ceil(Math.max(parts.osrel.length, 1) / OSREL_AREA) * OSREL_AREA });
  const cmdline = Buffer.from(parts.cmdline, 'utf8');
  if (cmdline.length > CMDLINE_AREA) throw new UserError('LAMA_E_CMDLINE', `kernel command line is ${cmdline.length} bytes, more than the ${CMDLINE_AREA} a UKI sets aside`);
  out.push({ name: '.cmdline', data: cmdline, reserve: CMDLINE_AREA });
  if (parts.splash) out.push({ name: '.splash', data: parts.splash });
  const uname = parts.uname ?? kernelVersion(parts.kernel);
  if (uname) {
    const data = Buffer.from(uname, 'utf8');
    if (data.length > UNAME_AREA) throw new UserError('LAMA_E_UKI_UNAME', `kernel release '${uname}' is ${data.length} bytes, more than the ${UNAME_AREA} a UKI sets aside`);
    out.push({ name: '.uname', data, reserve: UNAME_AREA });
  }
  if (parts.initrd && parts.initrd.length > 0) out.push({ name: '.initrd', data: parts.initrd });
  out.push({ name: '.linux', data: parts.kernel });
  return out;
}

function assertStub(stub: Buffer, where: string): PeInfo {
  const info = parsePe(stub, where);
  if (info.subsystem !== 10) throw new UserError('LAMA_E_NOT_STUB', 'not an EFI application (PE subsystem is not 10)', { where });
  const linux = info.sections.find((s) => s.name === '.linux');
  if (linux) throw new UserError('LAMA_E_NOT_STUB', 'already a UKI (has a .linux section); pass the bare systemd stub', { where });
  return info;
}

/** Assemble an (unsigned) UKI from the stub and its parts. Every input is checked before assembly. */
export async function buildUki(opts: UkiOptions): Promise<Buffer> {
  const stub = await load(opts.stub, 'EFI stub', 'LAMA_E_NO_STUB');
  assertStub(stub, typeof opts.stub === 'string' ? opts.stub : 'stub');
  const kernel = await load(opts.kernel, 'kernel');
  if (kernel.length === 0) throw new UserError('LAMA_E_KERNEL', 'kernel image is empty', { where: typeof opts.kernel === 'string' ? opts.kernel : undefined });
  const initrds = opts.initrd === undefined ? [] : Array.isArray(opts.initrd) ? opts.initrd : [opts.initrd];
  const initrd = Buffer.concat(await Promise.all(initrds.map((i) => load(i, 'initrd'))));
  const sections = planUki({
    kernel,
    initrd,
    cmdline: opts.cmdline,
    osrel: opts.osrel === undefined ? undefined : await load(opts.osrel, 'os-release'),
    uname: opts.uname,
    splash: opts.splash === undefined ? undefined : await load(opts.splash, 'splash'),
  });
  return appendSections(stub, sections);
}

/**
 * The same UKI with another command line: the `.cmdline` area rewritten (zero-filled past the new
 * line), its VirtualSize and the checksum updated. Byte-identical to `buildUki` with that command
 * line, without assembling the kernel and initrd again. The input must be unsigned.
 */
export function setUkiCmdline(pe: Buffer, cmdline: string, where?: string): Buffer {
  const info = parsePe(pe, where);
  if (info.certTable.size > 0) throw new UserError('LAMA_E_PE_SIGNED', 'cannot change the command line of a signed UKI (sign after changing it)', where ? { where } : undefined);
  const s = info.sections.find((x) => x.name === '.cmdline');
  if (!s) throw new UserError('LAMA_E_NOT_UKI', 'UKI has no .cmdline section', where ? { where } : undefined);
  if (/[\0\n]/.test(cmdline)) throw new UserError('LAMA_E_CMDLINE', 'kernel command line must be a single line without NUL bytes');
  const data = Buffer.from(cmdline, 'utf8');
  if (data.length > s.sizeOfRawData) throw new UserError('LAMA_E_CMDLINE', `kernel command line is ${data.length} bytes; this UKI sets aside ${s.sizeOfRawData}`, where ? { where } : undefined);
  const out = Buffer.from(pe);
  out.fill(0, s.pointerToRawData, s.pointerToRawData + s.sizeOfRawData);
  data.copy(out, s.pointerToRawData);
  out.writeUInt32LE(data.length, s.headerOffset + 8);
  updateChecksum(out);
  return out;
}

/** What `lamadist uki inspect` shows (signature state is added by the command from src/secureboot). */
export interface UkiInfo {
  sections: { name: string; virtualAddress: number; virtualSize: number; fileOffset: number; rawSize: number }[];
  cmdline?: string;
  osrel?: Record<string, string>;
  uname?: string;
  /** The stub's version from its .sdmagic section ("systemd-stub 252.39-1~deb12u2"). */
  stub?: string;
}

/** Parse an os-release file into key/value pairs (shell-quoted values unquoted). */
export function parseOsRelease(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^([A-Z0-9_]+)=(.*)$/.exec(line.trim());
    if (!m || !m[1]) continue;
    let v = m[2] ?? '';
    if (/^(["']).*\1$/.test(v)) v = v.slice(1, -1).replace(/\\(["\\$`])/g, '$1');
    out[m[1]] = v;
  }
  return out;
}

/** The systemd stub version embedded in the `.sdmagic` section, e.g. "252.39-1~deb12u2". */
export function stubVersion(pe: Buffer, info = parsePe(pe)): string | undefined {
  const magic = sectionData(pe, info, '.sdmagic')?.toString('latin1');
  const m = magic ? /systemd-stub ([^\s#]+)/.exec(magic) : null;
  return m?.[1];
}

/** Read a UKI's sections and metadata. */
export function inspectUki(pe: Buffer, where?: string): UkiInfo {
  const info = parsePe(pe, where);
  const text = (name: string): string | undefined => sectionData(pe, info, name)?.toString('utf8').replace(/\0+$/, '');
  const osrel = text('.osrel');
  return {
    sections: info.sections.map((s) => ({
      name: s.name,
      virtualAddress: s.virtualAddress,
      virtualSize: s.virtualSize,
      fileOffset: s.pointerToRawData,
      rawSize: s.sizeOfRawData,
    })),
    cmdline: text('.cmdline'),
    osrel: osrel === undefined ? undefined : parseOsRelease(osrel),
    uname: text('.uname'),
    stub: stubVersion(pe, info),
  };
}
