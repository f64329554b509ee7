# SPDX-License-Identifier: Apache-2.0
"""Unified Kernel Image assembly on top of systemd-boot's EFI stub (linux<arch>.efi.stub).

The UKI is the stub PE with extra sections (.osrel, .cmdline, .uname, .dtb, .linux, .initrd) that
the stub finds by name at run time. Each section must sit above the stub's own image in virtual
memory and on the stub's section alignment, so the layout is computed from the stub's PE header
(plan) and then handed to objcopy (apply). Usable from BitBake (lamadist-uki.bbclass) and as a
command line tool for tests: python3 -m lamadist.uki --help.
"""

import argparse
import os
import struct
import subprocess
import sys

# Order as systemd's ukify writes them: small metadata first, the kernel and initrd last.
SECTION_ORDER = (".osrel", ".cmdline", ".uname", ".splash", ".dtb", ".linux", ".initrd")


class UkiError(Exception):
    """A stub or input that cannot make a valid UKI."""


def _align(value, alignment):
    return (value + alignment - 1) // alignment * alignment


def read_pe_layout(stub):
    """Image base, section alignment and first free RVA of a PE32+ file given as bytes."""
    if len(stub) < 0x40 or stub[:2] != b"MZ":
        raise UkiError("stub is not a PE file (no MZ header)")
    pe = struct.unpack_from("<I", stub, 0x3C)[0]
    if stub[pe:pe + 4] != b"PE\0\0":
        raise UkiError("stub is not a PE file (no PE signature at 0x%x)" % pe)
    nsections, = struct.unpack_from("<H", stub, pe + 6)
    opt_size, = struct.unpack_from("<H", stub, pe + 20)
    opt = pe + 24
    magic, = struct.unpack_from("<H", stub, opt)
    if magic != 0x20B:
        raise UkiError("stub is not PE32+ (optional header magic 0x%x)" % magic)
    image_base, = struct.unpack_from("<Q", stub, opt + 24)
    section_alignment, = struct.unpack_from("<I", stub, opt + 32)
    end = 0
    names = []
    for i in range(nsections):
        off = opt + opt_size + 40 * i
        name = stub[off:off + 8].rstrip(b"\0").decode("ascii", "replace")
        vsize, vaddr = struct.unpack_from("<II", stub, off + 8)
        names.append(name)
        end = max(end, vaddr + vsize)
    return {
        "image_base": image_base,
        "section_alignment": section_alignment,
        "first_free_rva": _align(end, section_alignment),
        "sections": names,
    }


def plan_sections(layout, sizes):
    """Virtual addresses for the new sections: {name: vma}, in SECTION_ORDER.

    sizes maps section name to byte size; sections not in SECTION_ORDER are refused, and one the
    stub already has would be ambiguous at run time.
    """
    unknown = sorted(set(sizes) - set(SECTION_ORDER))
    if unknown:
        raise UkiError("unknown UKI section(s): %s" % ", ".join(unknown))
    for name in ("linux",):
        if "." + name not in sizes:
            raise UkiError("a UKI needs a .%s section" % name)
    clash = sorted(set(sizes) & set(layout["sections"]))
    if clash:
        raise UkiError("the stub already has section(s) %s" % ", ".join(clash))
    rva = layout["first_free_rva"]
    out = {}
    for name in SECTION_ORDER:
        if name not in sizes:
            continue
        out[name] = layout["image_base"] + rva
        rva = _align(rva + max(sizes[name], 1), layout["section_alignment"])
    return out


def objcopy_args(objcopy, stub_path, out_path, files, vmas):
    """argv that adds every section file at its planned address."""
    argv = [objcopy]
    for name in SECTION_ORDER:
        if name not in files:
            continue
        argv += ["--add-section", "%s=%s" % (name, files[name]),
                 "--set-section-flags", "%s=data,readonly" % name,
                 "--change-section-vma", "%s=0x%x" % (name, vmas[name])]
    argv += [stub_path, out_path]
    return argv


def build(stub_path, out_path, linux, cmdline, initrd=None, osrel=None, uname=None, dtb=None,
          splash=None, objcopy="objcopy", workdir=None):
    """Write the UKI to out_path (through a temporary file renamed into place) and return it."""
    workdir = workdir or os.path.dirname(os.path.abspath(out_path))
    files = {".linux": linux}
    for name, path in ((".initrd", initrd), (".osrel", osrel), (".dtb", dtb), (".splash", splash)):
        if path:
            files[name] = path
    for name, text in ((".cmdline", cmdline), (".uname", uname)):
        if text:
            path = os.path.join(workdir, "uki%s.%d" % (name, os.getpid()))
            with open(path, "w") as f:
                f.write(text.strip() + "\n" if name == ".cmdline" else text.strip())
            files[name] = path
    for name, path in files.items():
        if not os.path.isfile(path):
            raise UkiError("%s input %s does not exist" % (name, path))
    with open(stub_path, "rb") as f:
        layout = read_pe_layout(f.read())
    vmas = plan_sections(layout, {n: os.path.getsize(p) for n, p in files.items()})
    tmp = out_path + ".tmp"
    try:
        subprocess.run(objcopy_args(objcopy, stub_path, tmp, files, vmas), check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except subprocess.CalledProcessError as err:
        raise UkiError("objcopy failed: %s" % err.stdout.decode("utf-8", "replace").strip())
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        for name in (".cmdline", ".uname"):
            if name in files and files[name].startswith(os.path.join(workdir, "uki")):
                os.unlink(files[name])
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
    p.add_argument("--objcopy", default="objcopy")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        build(a.stub, a.out, a.linux, a.cmdline, initrd=a.initrd, osrel=a.osrel, uname=a.uname,
              dtb=a.dtb, objcopy=a.objcopy)
    except (UkiError, OSError) as err:
        print("lamadist.uki: error: %s" % err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
