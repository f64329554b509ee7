/**
 * A minimal arm64 UEFI application for the U-Boot boot test, written byte by byte: one .text section
 * whose code prints `message` with the firmware's ConOut->OutputString and then idles forever (as a
 * kernel that took over would never return to the boot script). Position-independent and without
 * relocations, so any load address works. No toolchain for arm64 PE exists on this machine; the
 * instruction words were checked with `llvm-mc --triple=aarch64 -show-encoding`.
 */

const FILE_ALIGNMENT = 0x200;
const SECTION_ALIGNMENT = 0x1000;
const TEXT_RVA = 0x1000;

// x0 = ImageHandle, x1 = EFI_SYSTEM_TABLE*. ConOut is at offset 64 of the system table and
// OutputString at offset 8 of the simple text output protocol.
const CODE = [
  0xa9bf7bfd, // stp x29, x30, [sp, #-16]!
  0x910003fd, // mov x29, sp
  0xf9402020, // ldr x0, [x1, #64]     ConOut
  0xf9400402, // ldr x2, [x0, #8]      ConOut->OutputString
  0x10000081, // adr x1, #16           the UTF-16 message right after this code
  0xd63f0040, // blr x2
  0xd503207f, // wfi
  0x17ffffff, // b #-4                 back to wfi, forever
];

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** A valid PE32+ EFI application for AArch64 (machine 0xAA64, subsystem 10) printing `message`. */
export function arm64EfiApp(message: string): Buffer {
  const code = Buffer.alloc(CODE.length * 4);
  CODE.forEach((w, i) => code.writeUInt32LE(w, i * 4));
  const text = Buffer.concat([code, Buffer.from(`${message}\0`, 'utf16le')]);
  const rawSize = alignUp(text.length, FILE_ALIGNMENT);
  const headersSize = FILE_ALIGNMENT;
  const out = Buffer.alloc(headersSize + rawSize);

  out.write('MZ', 0, 'latin1');
  out.writeUInt32LE(0x40, 0x3c); // e_lfanew
  out.write('PE\0\0', 0x40, 'latin1');
  const coff = 0x44;
  out.writeUInt16LE(0xaa64, coff); // IMAGE_FILE_MACHINE_ARM64
  out.writeUInt16LE(1, coff + 2); // one section
  out.writeUInt16LE(240, coff + 16); // PE32+ optional header with 16 data directories
  out.writeUInt16LE(0x0206, coff + 18); // executable, line numbers and debug info stripped
  const opt = coff + 20;
  out.writeUInt16LE(0x20b, opt); // PE32+
  out.writeUInt32LE(rawSize, opt + 4); // SizeOfCode
  out.writeUInt32LE(TEXT_RVA, opt + 16); // AddressOfEntryPoint
  out.writeUInt32LE(TEXT_RVA, opt + 20); // BaseOfCode
  out.writeUInt32LE(SECTION_ALIGNMENT, opt + 32);
  out.writeUInt32LE(FILE_ALIGNMENT, opt + 36);
  out.writeUInt32LE(TEXT_RVA + alignUp(text.length, SECTION_ALIGNMENT), opt + 56); // SizeOfImage
  out.writeUInt32LE(headersSize, opt + 60);
  out.writeUInt16LE(10, opt + 68); // IMAGE_SUBSYSTEM_EFI_APPLICATION
  out.writeUInt32LE(16, opt + 108); // NumberOfRvaAndSizes
  const sec = opt + 240;
  out.write('.text', sec, 'latin1');
  out.writeUInt32LE(text.length, sec + 8); // VirtualSize
  out.writeUInt32LE(TEXT_RVA, sec + 12);
  out.writeUInt32LE(rawSize, sec + 16);
  out.writeUInt32LE(headersSize, sec + 20); // PointerToRawData
  out.writeUInt32LE(0x60000020, sec + 36); // code, execute, read
  text.copy(out, headersSize);
  return out;
}
