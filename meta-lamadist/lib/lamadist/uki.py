# SPDX-License-Identifier: Apache-2.0
"""Unified Kernel Image assembly on top of systemd-boot's EFI stub (linux<arch>.efi.stub).

The UKI is the stub PE with extra sections (.osrel, .cmdline, .splash, .dtb, .uname, .initrd,
.linux) that the stub finds by name at run time. The sections are appended to the PE here, with
the same placement rules as the toolkit's src/pe and src/uki, so that a Yocto build and `lamadist`
lay out a UKI identically from the same inputs. `.cmdline` always occupies a fixed CMDLINE_AREA,
whatever the command line's length: the sections after it keep their offsets, and two UKIs of one
release that differ in the command line (one per host) differ only in that area and a few header
fields, which is what a release's per-host patches rely on (lamadist.release). `.osrel` and
`.uname` have fixed areas too (OSREL_AREA, UNAME_AREA), so a release that changes only the version
keeps `.initrd` and `.linux` where the last one had them, and the bundle hook copies their blocks
from the UKI already on the ESP instead of downloading them. Usable from
BitBake (lamadist-uki.bbclass) and as a command line tool for tests: python3 -m lamadist.uki --help.
"""

import argparse
import array
import os
import struct
import sys

# File order. `.linux` goes last, as ukify places it: newer stubs load the kernel in place, and
# only the last section can grow to the kernel's own image size.
SECTION_ORDER = (".osrel", ".cmdline", ".splash", ".dtb", ".uname", ".initrd", ".linux")

# More than the kernel's COMMAND_LINE_SIZE (2048 on x86-64 and arm64); the toolkit's CMDLINE_AREA.
CMDLINE_AREA = 4096
# The toolkit's OSREL_AREA (a larger os-release takes whole multiples of it) and UNAME_AREA.
OSREL_AREA = 4096
UNAME_AREA = 256

# IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ
SCN_READONLY_DATA = 0x40000040
SECTION_HEADER = 40
# Appended sections start on a page whatever the stub's SectionAlignment, as the toolkit does.
VA_ALIGNMENT = 4096


class UkiError(Exception):
    """A stub or input that cannot make a valid UKI."""


def _align(value, alignment):
    return (value + alignment - 1) // alignment * alignment


def parse_pe(pe):
    """The PE32+ header fields and section table of an image given as bytes."""
    if len(pe) < 0x40 or pe[:2] != b"MZ":
        raise UkiError("stub is not a PE file (no MZ header)")
    off = struct.unpack_from("<I", pe, 0x3C)[0]
    if pe[off:off + 4] != b"PE\0\0":
        raise UkiError("stub is not a PE file (no PE signature at 0x%x)" % off)
    coff = off + 4
    nsections, = struct.unpack_from("<H", pe, coff + 2)
    opt_size, = struct.unpack_from("<H", pe, coff + 16)
    opt = coff + 20
    magic, = struct.unpack_from("<H", pe, opt)
    if magic != 0x20B:
        raise UkiError("stub is not PE32+ (optional header magic 0x%x)" % magic)
    table = opt + opt_size
    if table + nsections * SECTION_HEADER > len(pe):
        raise UkiError("truncated PE section table")
    sections = []
    for i in range(nsections):
        h = table + i * SECTION_HEADER
        vsize, vaddr, raw, ptr = struct.unpack_from("<IIII", pe, h + 8)
        sections.append({"name": pe[h:h + 8].rstrip(b"\0").decode("latin-1"), "virtual_size": vsize,
                         "virtual_address": vaddr, "raw_size": raw, "raw_pointer": ptr, "header": h})
    cert = opt + 112 + 4 * 8
    return {
        "coff": coff,
        "optional": opt,
        "section_table": table,
        "section_alignment": struct.unpack_from("<I", pe, opt + 32)[0],
        "file_alignment": struct.unpack_from("<I", pe, opt + 36)[0],
        "size_of_headers": struct.unpack_from("<I", pe, opt + 60)[0],
        "checksum_offset": opt + 64,
        "subsystem": struct.unpack_from("<H", pe, opt + 68)[0],
        "cert_table": struct.unpack_from("<II", pe, cert),
        "sections": sections,
    }


def pe_checksum(pe, checksum_offset):
    """imagehlp's CheckSumMappedFile: 16-bit words with the checksum field as zero, carries folded
    back in (a ones' complement sum), plus the file length."""
    body = bytearray(pe)
    body[checksum_offset:checksum_offset + 4] = b"\0\0\0\0"
    if len(body) % 2:
        body.append(0)
    words = array.array("H")
    words.frombytes(body)
    if sys.byteorder == "big":
        words.byteswap()
    total = sum(words)
    folded = total % 0xFFFF
    if folded == 0 and total:
        folded = 0xFFFF
    return (folded + len(pe)) & 0xFFFFFFFF


def _update_checksum(pe):
    off = parse_pe(pe)["checksum_offset"]
    struct.pack_into("<I", pe, off, pe_checksum(pe, off))


def kernel_version(kernel):
    """The release string of an x86 bzImage: the setup header (magic "HdrS" at 0x202) holds at
    0x20e a pointer, relative to 0x200, to a NUL-terminated version string."""
    if len(kernel) < 0x210 or kernel[0x202:0x206] != b"HdrS":
        return None
    ptr, = struct.unpack_from("<H", kernel, 0x20E)
    if ptr == 0:
        return None
    start = ptr + 0x200
    end = kernel.find(b"\0", start)
    if end < 0:
        return None
    return kernel[start:end].decode("latin-1").split(" ")[0] or None


def plan_sections(layout, sizes):
    """Where each new section goes: [(name, virtual_address, virtual_size, raw_pointer, raw_size)]
    in SECTION_ORDER, the SizeOfImage and the file length.

    layout is parse_pe of the stub plus "file_length" (the stub without its COFF symbol table);
    sizes maps section name to byte size. `.cmdline`, `.osrel` and `.uname` span their fixed areas
    in the file and in memory while their VirtualSize stays their contents' length.
    """
    unknown = sorted(set(sizes) - set(SECTION_ORDER))
    if unknown:
        raise UkiError("unknown UKI section(s): %s" % ", ".join(unknown))
    if ".linux" not in sizes:
        raise UkiError("a UKI needs a .linux section")
    clash = sorted(set(sizes) & {s["name"] for s in layout["sections"]})
    if clash:
        raise UkiError("the stub already has section(s) %s" % ", ".join(clash))
    if sizes.get(".cmdline", 0) > CMDLINE_AREA:
        raise UkiError("kernel command line is %d bytes, more than the %d a UKI sets aside"
                       % (sizes[".cmdline"], CMDLINE_AREA))
    if sizes.get(".uname", 0) > UNAME_AREA:
        raise UkiError("kernel release is %d bytes, more than the %d a UKI sets aside"
                       % (sizes[".uname"], UNAME_AREA))
    names = [n for n in SECTION_ORDER if n in sizes]
    sections = layout["sections"]
    table_end = layout["section_table"] + (len(sections) + len(names)) * SECTION_HEADER
    first_raw = min([layout["size_of_headers"]] + [s["raw_pointer"] for s in sections if s["raw_size"]])
    if table_end > first_raw:
        raise UkiError("the stub's PE header has no room for %d more section headers" % len(names))
    salign, falign = layout["section_alignment"], layout["file_alignment"]
    va_align = _align(max(VA_ALIGNMENT, salign), salign)
    next_va = _align(max(s["virtual_address"] + max(s["virtual_size"], s["raw_size"]) for s in sections), va_align)
    next_raw = _align(max([layout["file_length"]] + [s["raw_pointer"] + s["raw_size"] for s in sections]), falign)
    out = []
    end = next_va
    for name in names:
        size = sizes[name]
        span = size
        if name == ".cmdline":
            span = CMDLINE_AREA
        elif name == ".osrel":
            span = _align(max(size, 1), OSREL_AREA)
        elif name == ".uname":
            span = UNAME_AREA
        raw = _align(span, falign)
        out.append((name, next_va, size, next_raw, raw))
        end = next_va + max(span, 1)
        next_va = _align(end, va_align)
        next_raw += raw
    return out, _align(end, salign), next_raw


def _loaded_length(pe, layout):
    # A COFF symbol table after the sections (the stub's linker leaves one) is never loaded: drop
    # it, as strip does, instead of leaving a hole between the stub's sections and ours.
    ends = [layout["size_of_headers"]] + [s["raw_pointer"] + s["raw_size"] for s in layout["sections"]]
    symbols, = struct.unpack_from("<I", pe, layout["coff"] + 8)
    return max(ends) if symbols >= max(ends) else len(pe)


def assemble(stub, parts):
    """The unsigned UKI (bytes) of a stub and {section name: bytes}."""
    layout = parse_pe(stub)
    if layout["subsystem"] != 10:
        raise UkiError("stub is not an EFI application (PE subsystem is not 10)")
    if any(s["name"] == ".linux" for s in layout["sections"]):
        raise UkiError("stub is already a UKI (has a .linux section); pass the bare systemd stub")
    if layout["cert_table"][1]:
        raise UkiError("stub is signed; sections cannot be added to a signed PE (sign after assembling)")
    layout["file_length"] = _loaded_length(stub, layout)
    plan, size_of_image, file_length = plan_sections(layout, {n: len(d) for n, d in parts.items()})
    out = bytearray(file_length)
    out[:layout["file_length"]] = stub[:layout["file_length"]]
    opt = layout["optional"]
    initialized, = struct.unpack_from("<I", out, opt + 8)
    first = layout["section_table"] + len(layout["sections"]) * SECTION_HEADER
    for i, (name, va, vsize, ptr, raw) in enumerate(plan):
        h = first + i * SECTION_HEADER
        out[h:h + SECTION_HEADER] = struct.pack("<8sIIIIIIHHI", name.encode("latin-1"), vsize, va, raw, ptr,
                                                0, 0, 0, 0, SCN_READONLY_DATA)
        out[ptr:ptr + vsize] = parts[name]
        initialized += raw
    coff = layout["coff"]
    struct.pack_into("<H", out, coff + 2, len(layout["sections"]) + len(plan))
    struct.pack_into("<II", out, coff + 8, 0, 0)
    struct.pack_into("<I", out, opt + 56, size_of_image)
    struct.pack_into("<I", out, opt + 8, initialized & 0xFFFFFFFF)
    _update_checksum(out)
    return bytes(out)


def _check_cmdline(cmdline):
    if "\n" in cmdline or "\0" in cmdline:
        raise UkiError("kernel command line must be a single line without NUL bytes")
    return cmdline.encode("utf-8")


def set_cmdline(pe, cmdline):
    """The same unsigned UKI with another command line: the fixed .cmdline area rewritten
    (zero-filled past the line), its VirtualSize and the checksum updated. Byte-identical to
    assembling the UKI again with that command line."""
    layout = parse_pe(pe)
    if layout["cert_table"][1]:
        raise UkiError("cannot change the command line of a signed UKI (sign after changing it)")
    s = next((x for x in layout["sections"] if x["name"] == ".cmdline"), None)
    if s is None:
        raise UkiError("UKI has no .cmdline section")
    data = _check_cmdline(cmdline)
    if len(data) > s["raw_size"]:
        raise UkiError("kernel command line is %d bytes; this UKI sets aside %d" % (len(data), s["raw_size"]))
    out = bytearray(pe)
    start = s["raw_pointer"]
    out[start:start + s["raw_size"]] = data + bytes(s["raw_size"] - len(data))
    struct.pack_into("<I", out, s["header"] + 8, len(data))
    _update_checksum(out)
    return bytes(out)


def cmdline_of(pe):
    """The command line of a UKI (its .cmdline section, VirtualSize bytes)."""
    layout = parse_pe(pe)
    s = next((x for x in layout["sections"] if x["name"] == ".cmdline"), None)
    if s is None:
        raise UkiError("UKI has no .cmdline section")
    size = min(s["virtual_size"] or s["raw_size"], s["raw_size"])
    return pe[s["raw_pointer"]:s["raw_pointer"] + size].rstrip(b"\0").decode("utf-8")


def _read(name, path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UkiError("%s input %s does not exist" % (name, path))


def build(stub_path, out_path, linux, cmdline, initrd=None, osrel=None, uname=None, dtb=None,
          splash=None):
    """Write the unsigned UKI to out_path (through a temporary file renamed into place)."""
    parts = {".linux": _read(".linux", linux), ".cmdline": _check_cmdline(cmdline.strip())}
    if not parts[".linux"]:
        raise UkiError("kernel image %s is empty" % linux)
    for name, path in ((".initrd", initrd), (".osrel", osrel), (".dtb", dtb), (".splash", splash)):
        if path:
            parts[name] = _read(name, path)
    # An empty initramfs is no initramfs (the toolkit leaves the section out too).
    if parts.get(".initrd") == b"":
        del parts[".initrd"]
    uname = uname.strip() if uname else kernel_version(parts[".linux"])
    if uname:
        parts[".uname"] = uname.encode("utf-8")
    uki = assemble(_read("stub", stub_path), parts)
    tmp = out_path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(uki)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m lamadist.uki", description=__doc__.splitlines()[0])
    p.add_argument("--stub", required=True)
    p.add_argument("--linux", required=True)
    p.add_argument("--initrd")
    p.add_argument("--cmdline", default="")
    p.add_argument("--osrel")
    p.add_argument("--uname")
    p.add_argument("--dtb")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        build(a.stub, a.out, a.linux, a.cmdline, initrd=a.initrd, osrel=a.osrel, uname=a.uname, dtb=a.dtb)
    except (UkiError, OSError) as err:
        print("lamadist.uki: error: %s" % err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
