# SPDX-License-Identifier: Apache-2.0
"""Per-host boot files of a fleet release, as the toolkit's src/release writes them.

A release bundle carries one unsigned template UKI per slot (the efi image, a tar of
lamadist-a.efi and lamadist-b.efi) and, for every host of the inventory (hosts.yaml), under
hosts/<machine-id>/:
  cmdline-<slot>   the host's command line: the template's plus its identity, network and own
                   kernel arguments (what the bundle hook's install check compares)
  uki-<slot>.map   a patch (text) that turns the template into the host's signed UKI
  uki-<slot>.bin   the patch's data
and under uki-blocks/ lamadist-<slot>.blocks, the SHA-256 of each 16 KiB block of the slot's
template (the last one zero-padded): the hook copies every block the running UKI already has.
The host's UKI is the template with its command line written into the fixed .cmdline area
(lamadist.uki.set_cmdline), signed with the Secure Boot db key by sbsign. The patch format is the
toolkit's (src/release/patch.ts); the device applies it with dd (lamadist-bundle-hook).
Usable from BitBake (lamadist-bundle) and as a command line tool: python3 -m lamadist.release --help.
"""

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

from lamadist import uki

SLOTS = ("a", "b")
HOSTS_DIR = "hosts"
UKI_BLOCKS_DIR = "uki-blocks"
# The toolkit's UKI_BLOCK: the bundle's squashfs block size (BUNDLE_ARGS in lamadist-bundle.bb).
UKI_BLOCK = 16384
PATCH_MAGIC = "lamadist-uki-patch 1"
# Equal runs shorter than this between two differences are written anyway: fewer dd calls.
MERGE_GAP = 64
# A larger patch is not a host patch but a different UKI (bounds what a device reads).
MAX_PATCH_BYTES = 1 << 20
# smbios-uuid and mac identify the machine to the installer stick; they are not boot arguments.
HOST_KEYS = ("machine-id", "bsp", "ip", "kernel-args", "smbios-uuid", "mac")
AUTOCONF = ("off", "none", "on", "any", "dhcp", "bootp", "rarp", "both")
IP_FIELDS = ("client-ip", "server-ip", "gw-ip", "netmask", "hostname", "device", "autoconf",
             "dns0-ip", "dns1-ip", "ntp0-ip")


class ReleaseError(Exception):
    """Input that cannot make a release (message names the file and place)."""


# --- hosts.yaml -------------------------------------------------------------------------------

# The toolkit reads hosts.yaml as YAML 1.2 (core schema). PyYAML resolves plain scalars by YAML
# 1.1, where `ip: off` is false and 0o17 a string; so plain scalars are resolved here by 1.2's
# rules and everything else in the file is taken as written.
_NULL = re.compile(r"^(~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(true|True|TRUE|false|False|FALSE)$")
_NUMBER = re.compile(r"^([-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+|[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?"
                     r"|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN))$")


class _Number:
    """A YAML number: only its type matters here (no field of hosts.yaml is a number)."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


class _Value:
    """A YAML value with the place it was written (file:line:col)."""

    def __init__(self, value, where):
        self.value = value
        self.where = where


def _convert(node, path, yaml):
    where = "%s:%d:%d" % (path, node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out = {}
        for k, v in node.value:
            key = _convert(k, path, yaml)
            if not isinstance(key.value, str):
                raise ReleaseError("%s: mapping keys must be strings" % key.where)
            if key.value in out:
                raise ReleaseError("%s: duplicate key '%s'" % (key.where, key.value))
            out[key.value] = (key, _convert(v, path, yaml))
        return _Value(out, where)
    if isinstance(node, yaml.SequenceNode):
        return _Value([_convert(v, path, yaml) for v in node.value], where)
    if node.style is not None:
        return _Value(node.value, where)
    text = node.value
    if _NULL.match(text):
        return _Value(None, where)
    if _BOOL.match(text):
        return _Value(text.lower() == "true", where)
    if _NUMBER.match(text):
        return _Value(_Number(text), where)
    return _Value(text, where)


def _is_ipv4(s):
    parts = s.split(".")
    return len(parts) == 4 and all(re.match(r"^\d{1,3}$", p) and int(p) <= 255 for p in parts)


def _is_netmask(s):
    if not _is_ipv4(s):
        return False
    n = 0
    for p in s.split("."):
        n = n * 256 + int(p)
    inv = ~n & 0xFFFFFFFF
    return ((inv + 1) & inv) == 0 and n != 0


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?"


def _is_hostname(s):
    return len(s) <= 64 and re.match(r"^%s(\.%s)*$" % (_LABEL, _LABEL), s) is not None


def parse_ip_arg(value, where):
    """Validate and split an `ip=` value (the kernel's nfsroot syntax) into its ten fields."""
    def bad(message):
        raise ReleaseError("%s: invalid ip=%s: %s" % (where, value, message))
    fields = dict.fromkeys(IP_FIELDS, "")
    if ":" not in value:
        if value not in AUTOCONF:
            bad("expected one of %s or the colon-separated form" % "|".join(AUTOCONF))
        fields["autoconf"] = value
        return fields
    parts = value.split(":")
    if len(parts) > 10:
        bad("%d fields, at most 10 (%s)" % (len(parts), ":".join(IP_FIELDS)))
    fields.update(zip(IP_FIELDS, parts))
    for label in IP_FIELDS:
        v = fields[label]
        if not v:
            continue
        if label.endswith("-ip") and not _is_ipv4(v):
            bad("<%s> '%s' is not an IPv4 address" % (label, v))
        if label == "netmask" and not _is_netmask(v):
            bad("<netmask> '%s' is not a contiguous IPv4 netmask" % v)
        if label == "hostname" and not _is_hostname(v):
            bad("<hostname> '%s' is not a valid host name" % v)
        if label == "device" and not (1 <= len(v) <= 15 and not re.search(r"[/:\s]", v)):
            bad("<device> '%s' is not a network interface name" % v)
        if label == "autoconf" and v not in AUTOCONF:
            bad("<autoconf> '%s' is not one of %s" % (v, "|".join(AUTOCONF)))
    static = fields["autoconf"] in ("", "off", "none")
    if static and not fields["client-ip"]:
        bad("static configuration (autoconf off/none/empty) needs <client-ip>")
    if static and not fields["netmask"]:
        bad("static configuration needs <netmask>")
    return fields


def format_ip_arg(fields):
    """Join the fields back into an `ip=` value, dropping empty trailing fields."""
    if all(not fields[k] for k in IP_FIELDS if k != "autoconf"):
        return fields["autoconf"]
    parts = [fields[k] for k in IP_FIELDS]
    while len(parts) > 1 and parts[-1] == "":
        parts.pop()
    return ":".join(parts)


def ip_from_spec(name, spec):
    """The `ip=` value of a host's `ip:` entry: an autoconf word, a raw value or a static block."""
    if isinstance(spec.value, str):
        return format_ip_arg(parse_ip_arg(spec.value, spec.where))
    if not isinstance(spec.value, dict):
        raise ReleaseError("%s: host %s: ip must be dhcp, a static block or an ip= value" % (spec.where, name))
    block = {}
    for k, (_, v) in spec.value.items():
        if k == "dns":
            items = [] if v.value is None else v.value if isinstance(v.value, list) else [None]
            if any(not isinstance(x, _Value) or not isinstance(x.value, str) for x in items):
                raise ReleaseError("%s: host %s: ip dns must be a list of addresses" % (v.where, name))
            block[k] = [x.value for x in items]
        elif v.value is None or isinstance(v.value, str):
            block[k] = v.value
        else:
            raise ReleaseError("%s: host %s: ip %s must be a string" % (v.where, name, k))
    m = re.match(r"^([\d.]+)/(\d{1,2})$", block.get("address") or "")
    if not m or int(m.group(2)) > 32:
        raise ReleaseError("%s: address '%s' must be IPv4/prefix, e.g. 192.168.1.10/24" % (spec.where, block.get("address")))
    dns = block.get("dns") or []
    if len(dns) > 2:
        raise ReleaseError("%s: the kernel's ip= carries at most 2 DNS servers, %d given" % (spec.where, len(dns)))
    dns = dns + ["", ""]
    prefix = int(m.group(2))
    mask = 0 if prefix == 0 else (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    fields = dict(zip(IP_FIELDS, (m.group(1), "", block.get("gateway") or "",
                                  ".".join(str((mask >> s) & 0xFF) for s in (24, 16, 8, 0)), name,
                                  block.get("interface") or "", "none", dns[0], dns[1], block.get("ntp") or "")))
    value = format_ip_arg(fields)
    parse_ip_arg(value, spec.where)
    return value


def load_hosts(path):
    """[(name, machine_id, [command-line arguments])] of hosts.yaml, in file order.

    The arguments are what a host's command line adds to its release's: systemd.hostname=,
    systemd.machine_id=, ip= when set, then the host's kernel-args (the toolkit's hostArgs).
    """
    try:
        import yaml
    except ImportError:
        raise ReleaseError("reading %s needs PyYAML (python3-yaml; kas depends on it), which this Python (%s) lacks"
                           % (path, sys.executable))
    try:
        with open(path, encoding="utf-8") as f:
            node = yaml.compose(f, Loader=yaml.SafeLoader)
    except FileNotFoundError:
        raise ReleaseError("host inventory %s does not exist (create it with 'lamadist host add NAME')" % path)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        raise ReleaseError("%s:%d:%d: %s" % (path, mark.line + 1, mark.column + 1, err.problem or err.context))
    root = _convert(node, path, yaml) if node is not None else _Value(None, "%s:1:1" % path)
    if root.value is None:
        hosts = {}
    elif not isinstance(root.value, dict):
        raise ReleaseError('%s: expected a mapping with a "hosts" key' % root.where)
    else:
        entry = root.value.get("hosts")
        hosts = {} if entry is None or entry[1].value is None else entry[1].value
        if not isinstance(hosts, dict):
            raise ReleaseError('%s: "hosts" must be a mapping of host name to settings' % entry[1].where)
    out = []
    seen = {}
    for name, (key, raw) in hosts.items():
        if not _is_hostname(name) or "." in name:
            raise ReleaseError("%s: host name '%s' is not a valid host name" % (key.where, name))
        if not isinstance(raw.value, dict):
            raise ReleaseError("%s: host %s: expected a mapping" % (key.where, name))
        h = raw.value
        for k, (kn, _) in h.items():
            if k not in HOST_KEYS:
                raise ReleaseError("%s: host %s: unknown key '%s' (known: %s)" % (kn.where, name, k, ", ".join(HOST_KEYS)))
        mid = h.get("machine-id", (None, _Value(None, key.where)))[1]
        if not isinstance(mid.value, str) or not re.match(r"^[0-9a-f]{32}$", mid.value) or not mid.value.strip("0"):
            raise ReleaseError("%s: host %s: machine-id must be 32 lowercase hex digits, not all zero" % (mid.where, name))
        if mid.value in seen:
            raise ReleaseError("%s: host %s has the same machine-id as host %s" % (mid.where, name, seen[mid.value]))
        seen[mid.value] = name
        args = ["systemd.hostname=%s" % name, "systemd.machine_id=%s" % mid.value]
        if "ip" in h:
            args.append("ip=%s" % ip_from_spec(name, h["ip"][1]))
        extra = h.get("kernel-args", (None, _Value([], key.where)))[1]
        if extra.value is None:
            extra = _Value([], extra.where)
        if not isinstance(extra.value, list) or any(
                not isinstance(a.value, str) or not a.value or re.search(r"\s", a.value) for a in extra.value):
            raise ReleaseError("%s: host %s: kernel-args must be a list of single arguments" % (extra.where, name))
        for a in extra.value:
            m = re.match(r"^(systemd\.hostname|systemd\.machine_id|roothash|lamadist\.slot|ip)=", a.value)
            if m:
                raise ReleaseError("%s: host %s: kernel-args must not set %s= (it comes from the inventory and the slot)"
                                   % (a.where, name, m.group(1)))
            args.append(a.value)
        out.append((name, mid.value, args))
    if not out:
        raise ReleaseError("%s lists no hosts: a release without hosts would be refused by every device" % path)
    return out


# --- patches ----------------------------------------------------------------------------------

def _next_diff(a, b, pos, end):
    """The first index >= pos (below end) where a and b differ, or end."""
    chunk = 4096
    while pos < end:
        stop = min(pos + chunk, end)
        if a[pos:stop] != b[pos:stop]:
            while a[pos] == b[pos]:
                pos += 1
            return pos
        pos = stop
    return end


def diff(template, result):
    """[(offset, bytes)] that turn template into result (not shorter), as the toolkit's diffUki."""
    if len(result) < len(template):
        raise ReleaseError("patch result (%d bytes) is shorter than its template (%d)" % (len(result), len(template)))
    n = len(template)
    writes = []
    i = _next_diff(template, result, 0, n)
    while i < n:
        end = i + 1
        while True:
            j = _next_diff(template, result, end, min(n, end + MERGE_GAP))
            if j >= min(n, end + MERGE_GAP):
                break
            end = j + 1
        writes.append((i, result[i:end]))
        i = _next_diff(template, result, end, n)
    if len(result) > n:
        writes.append((n, result[n:]))
    size = sum(len(d) for _, d in writes)
    if size > MAX_PATCH_BYTES:
        raise ReleaseError("a host's UKI differs from the release's in %d bytes; only the command line and signature may differ" % size)
    return writes


def render_patch(template, result, writes):
    """The map text and data of a patch (src/release/patch.ts's format)."""
    lines = [PATCH_MAGIC,
             "template %s %d" % (hashlib.sha256(template).hexdigest(), len(template)),
             "result %s %d" % (hashlib.sha256(result).hexdigest(), len(result))]
    lines += ["write %d %d" % (off, len(data)) for off, data in writes]
    return "\n".join(lines) + "\n", b"".join(data for _, data in writes)


# --- the release ------------------------------------------------------------------------------

def read_templates(tar_path):
    """{slot: template UKI bytes} from the efi image (a tar holding lamadist-a.efi, lamadist-b.efi)."""
    try:
        with tarfile.open(tar_path) as tar:
            out = {}
            for slot in SLOTS:
                name = "lamadist-%s.efi" % slot
                try:
                    member = tar.extractfile(name)
                except KeyError:
                    member = None
                if member is None:
                    raise ReleaseError("%s has no file %s (the efi image must hold both template UKIs)" % (tar_path, name))
                out[slot] = member.read()
            return out
    except (OSError, tarfile.TarError) as err:
        raise ReleaseError("cannot read the efi image %s: %s" % (tar_path, err))


TAR_HEADER = 512
# Padding members (efi image) and files (bundle payload) begin so: no other name of either does.
ALIGN_PREFIX = ".lamadist-align-"


def efi_tar_members(sizes):
    """[(name, size)] of the efi image in order (the toolkit's efiTarMembers): before each template
    UKI a zero-filled padding member putting its first byte on a UKI_BLOCK boundary of the tar, so
    that a UKI block is exactly one squashfs block of the (verbatim, aligned) bundle."""
    members, at = [], 0
    for slot in SLOTS:
        pad = (UKI_BLOCK - (at + 2 * TAR_HEADER) % UKI_BLOCK) % UKI_BLOCK
        members += [(ALIGN_PREFIX + slot, pad), ("lamadist-%s.efi" % slot, sizes[slot])]
        at += 2 * TAR_HEADER + pad + -(-sizes[slot] // TAR_HEADER) * TAR_HEADER
    return members


def write_templates(tar_path, templates, epoch):
    """Write the efi image: templates is {slot: UKI bytes}; members as efi_tar_members, plain ustar."""
    import io
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, size in efi_tar_members({slot: len(templates[slot]) for slot in SLOTS}):
            slot = next((x for x in SLOTS if name == "lamadist-%s.efi" % x), None)
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, epoch, 0o644
            tar.addfile(info, io.BytesIO(templates[slot] if slot else bytes(size)))


# mksquashfs: file data starts after the 96-byte superblock; these keep a file's bytes verbatim
# and contiguous (the toolkit's SQUASHFS_DATA_START and ALIGNED_SQUASHFS_ARGS).
SQUASHFS_DATA_START = 96
ALIGNED_SQUASHFS_ARGS = ("-noD", "-no-fragments", "-no-duplicates", "-no-sparse")
BUNDLE_BLOCK = 4096


def align_bundle(bundle_dir, images, sort_path):
    """Make `rauc bundle --mksquashfs-args="<ALIGNED_SQUASHFS_ARGS> -sort <sort_path>"` put each
    file of images (names in bundle_dir, in order) on a 4 KiB boundary of the bundle: writes the
    zero-filled padding files into bundle_dir and the sort file (the toolkit's alignPayload).
    Returns [(name, offset)]."""
    order, placed, at = [], [], SQUASHFS_DATA_START
    for name in images:
        pad = (BUNDLE_BLOCK - at % BUNDLE_BLOCK) % BUNDLE_BLOCK
        if pad:
            pad_name = "%s%d" % (ALIGN_PREFIX, sum(1 for n in order if n.startswith(ALIGN_PREFIX)))
            with open(os.path.join(bundle_dir, pad_name), "wb") as f:
                f.write(bytes(pad))
            order.append(pad_name)
            at += pad
        placed.append((name, at))
        order.append(name)
        at += os.path.getsize(os.path.join(bundle_dir, name))
    with open(sort_path, "w") as f:
        f.write("".join("%s %d\n" % (name, 32767 - i) for i, name in enumerate(order)))
    return placed


def sign(pe, db_key, db_cert, sbsign, workdir):
    """pe signed for Secure Boot with the db key (sbsign)."""
    src = os.path.join(workdir, "unsigned.efi")
    dst = os.path.join(workdir, "signed.efi")
    with open(src, "wb") as f:
        f.write(pe)
    r = subprocess.run([sbsign, "--key", db_key, "--cert", db_cert, "--output", dst, src],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise ReleaseError("sbsign failed: %s" % r.stdout.decode("utf-8", "replace").strip())
    with open(dst, "rb") as f:
        return f.read()


def block_index(data):
    """SHA-256 of each UKI_BLOCK block of data, the last one zero-padded (the toolkit's blockIndex)."""
    return b"".join(hashlib.sha256(data[i:i + UKI_BLOCK].ljust(UKI_BLOCK, b"\0")).digest()
                    for i in range(0, len(data), UKI_BLOCK))


def write_release(efi_image, hosts_yaml, db_key, db_cert, out, sbsign="sbsign", ukis=None):
    """Write out/hosts/<machine-id>/{cmdline,uki}-<slot>* for every host of hosts_yaml, from the
    templates of efi_image (read_templates), and out/uki-blocks/lamadist-<slot>.blocks; with ukis,
    also every host's signed UKIs as
    ukis/<host>/lamadist-<slot>.efi. Returns [(name, machine-id, patch bytes)]. Nothing is left
    behind on failure; an existing out/hosts is replaced."""
    for f in (db_key, db_cert):
        if not os.path.isfile(f):
            raise ReleaseError("Secure Boot db key file %s does not exist" % f)
    hosts = load_hosts(hosts_yaml)
    templates = read_templates(efi_image)
    base = {}
    for slot in SLOTS:
        try:
            base[slot] = uki.cmdline_of(templates[slot])
        except uki.UkiError as err:
            raise ReleaseError("template UKI of slot %s: %s" % (slot, err))
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".lamadist-release-", dir=out)
    report = []
    try:
        staged = os.path.join(work, HOSTS_DIR)
        for name, mid, args in hosts:
            d = os.path.join(staged, mid)
            os.makedirs(d)
            patch_bytes = 0
            for slot in SLOTS:
                line = " ".join([base[slot]] + args)
                try:
                    unsigned = uki.set_cmdline(templates[slot], line)
                except uki.UkiError as err:
                    raise ReleaseError("host %s, slot %s: %s" % (name, slot, err))
                signed = sign(unsigned, db_key, db_cert, sbsign, work)
                text, data = render_patch(templates[slot], signed, diff(templates[slot], signed))
                for fname, content in (("cmdline-%s" % slot, (line + "\n").encode("utf-8")),
                                       ("uki-%s.map" % slot, text.encode("ascii")), ("uki-%s.bin" % slot, data)):
                    with open(os.path.join(d, fname), "wb") as f:
                        f.write(content)
                patch_bytes += len(data)
                if ukis:
                    os.makedirs(os.path.join(work, "ukis", name), exist_ok=True)
                    with open(os.path.join(work, "ukis", name, "lamadist-%s.efi" % slot), "wb") as f:
                        f.write(signed)
            report.append((name, mid, patch_bytes))
        for f in ("unsigned.efi", "signed.efi"):
            os.unlink(os.path.join(work, f))
        os.makedirs(os.path.join(work, UKI_BLOCKS_DIR))
        for slot in SLOTS:
            with open(os.path.join(work, UKI_BLOCKS_DIR, "lamadist-%s.blocks" % slot), "wb") as f:
                f.write(block_index(templates[slot]))
        for name in (HOSTS_DIR, UKI_BLOCKS_DIR):
            target = os.path.join(out, name)
            if os.path.lexists(target):
                shutil.rmtree(target)
            os.rename(os.path.join(work, name), target)
        if ukis:
            if os.path.lexists(ukis):
                shutil.rmtree(ukis)
            shutil.move(os.path.join(work, "ukis"), ukis)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m lamadist.release", description=__doc__.splitlines()[0])
    p.add_argument("--templates", required=True, help="the efi image: a tar of lamadist-a.efi and lamadist-b.efi")
    p.add_argument("--hosts", required=True, help="the host inventory (hosts.yaml)")
    p.add_argument("--db-key", required=True)
    p.add_argument("--db-cert", required=True)
    p.add_argument("--sbsign", default="sbsign")
    p.add_argument("--ukis", help="also write every host's signed UKIs here (<host>/lamadist-<slot>.efi)")
    p.add_argument("--out", required=True, help="directory that receives hosts/")
    a = p.parse_args(argv)
    try:
        for name, mid, size in write_release(a.templates, a.hosts, a.db_key, a.db_cert, a.out,
                                             sbsign=a.sbsign, ukis=a.ukis):
            print("%s %s %d" % (name, mid, size))
    except (ReleaseError, OSError) as err:
        print("lamadist.release: error: %s" % err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
