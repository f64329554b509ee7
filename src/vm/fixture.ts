import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { UserError, isErrno } from '../errors.js';
import { run } from '../util/proc.js';
import { buildInitramfs } from './initramfs.js';
import { cacheRoot, debianKernel, type DebianKernel } from './kernel.js';
import { compilePolicyModules, policySources } from './policy.js';
import { streamingRauc } from './rauc.js';

/**
 * The test root file system fixture: Debian bookworm from debootstrap with what a LamaDist device
 * runs (systemd, RAUC, cryptsetup, tpm2-tools, efibootmgr, curl), Debian's kernel modules, and
 * every LamaDist-specific on-target file copied from meta-lamadist at build time. It stands in for
 * a Yocto rootfs when no build host is at hand; it is a test fixture, not a product image.
 */

/** Packages debootstrap installs on top of minbase. */
export const FIXTURE_PACKAGES = [
  'systemd', 'systemd-sysv', 'udev', 'dbus', 'kmod', 'rauc', 'rauc-service', 'cryptsetup-bin', 'tpm2-tools', 'efibootmgr',
  'curl', 'ca-certificates', 'jq', 'dmsetup', 'e2fsprogs', 'dosfstools', 'util-linux', 'iproute2', 'procps',
  // lamadist-install (the fleet installer runs in the release's own root): sfdisk and openssl cms.
  'fdisk', 'openssl',
  'libtss2-esys-3.0.2-0', 'libtss2-rc0', 'libtss2-mu0', 'libtss2-tcti-device0',
  // The streaming rauc (streamingRauc(), Debian's source with --enable-streaming) talks NBD over generic netlink.
  'libnl-genl-3-200',
  // keyctl, which lamadist-init runs from the initramfs to load the root's IMA certificate.
  'keyutils',
  // SELinux, enforcing: Debian's refpolicy, restorecon for lamadist-relabel, getenforce, and auditd,
  // whose log the tests count AVC denials in.
  'selinux-policy-default', 'policycoreutils', 'selinux-utils', 'auditd',
] as const;

/** Bumped when the fixture's own configuration below changes, so cached trees are rebuilt. */
const FIXTURE_REVISION = '1';

/** The repository root (src/vm/ or dist/vm/ → two levels up). */
export function repoRoot(): string {
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
}

/**
 * Where each on-target file of meta-lamadist goes, as its recipe's do_install puts it (libexecdir
 * /usr/libexec, systemd_system_unitdir /usr/lib/systemd/system, sysconfdir /etc).
 */
export const ON_TARGET_FILES: readonly { from: string; to: string; mode: number }[] = [
  { from: 'meta-lamadist/recipes-core/lamadist-health/files/lamadist-health', to: '/usr/libexec/lamadist/lamadist-health', mode: 0o755 },
  { from: 'meta-lamadist/recipes-core/lamadist-health/files/lamadist-health.service', to: '/usr/lib/systemd/system/lamadist-health.service', mode: 0o644 },
  { from: 'meta-lamadist/recipes-core/lamadist-health/files/health.conf', to: '/etc/lamadist/health.conf', mode: 0o644 },
  { from: 'meta-lamadist/recipes-core/lamadist-health/files/lamadist-boot-entries', to: '/usr/libexec/lamadist/lamadist-boot-entries', mode: 0o755 },
  { from: 'meta-lamadist/recipes-core/lamadist-health/files/lamadist-boot-entries.service', to: '/usr/lib/systemd/system/lamadist-boot-entries.service', mode: 0o644 },
  { from: 'meta-lamadist/recipes-core/lamadist-boot/files/lamadist-enroll', to: '/usr/lib/lamadist/lamadist-enroll', mode: 0o755 },
  { from: 'meta-lamadist/recipes-core/rauc/files/efi/system.conf', to: '/etc/rauc/system.conf', mode: 0o644 },
  { from: 'meta-lamadist/recipes-core/rauc/files/lamadist-verity.conf', to: '/usr/lib/tmpfiles.d/lamadist-verity.conf', mode: 0o644 },
  { from: 'meta-lamadist/recipes-core/rauc/files/lamadist-verity-modprobe.conf', to: '/usr/lib/modprobe.d/lamadist-verity.conf', mode: 0o644 },
  { from: 'meta-lamadist/recipes-core/rauc/files/lamadist-rauc-stream.rules', to: '/usr/lib/udev/rules.d/59-lamadist-rauc-stream.rules', mode: 0o644 },
  { from: 'meta-lamadist/recipes-core/lamadist-installer/files/lamadist-install', to: '/usr/sbin/lamadist-install', mode: 0o755 },
  { from: 'meta-lamadist/recipes-core/lamadist-installer/files/lamadist-secureboot-enroll', to: '/usr/sbin/lamadist-secureboot-enroll', mode: 0o755 },
  { from: 'meta-lamadist/recipes-core/lamadist-attest/files/lamadist-attest', to: '/usr/libexec/lamadist/lamadist-attest', mode: 0o755 },
  { from: 'meta-lamadist/recipes-core/lamadist-attest/files/lamadist-attest.service', to: '/usr/lib/systemd/system/lamadist-attest.service', mode: 0o644 },
  { from: 'meta-lamadist/recipes-core/lamadist-attest/files/lamadist-attest.timer', to: '/usr/lib/systemd/system/lamadist-attest.timer', mode: 0o644 },
  { from: 'meta-lamadist/recipes-core/lamadist-attest/files/lamadist-attest-ask.service', to: '/usr/lib/systemd/system/lamadist-attest-ask.service', mode: 0o644 },
  { from: 'meta-lamadist/recipes-core/lamadist-attest/files/lamadist-attest-ask.timer', to: '/usr/lib/systemd/system/lamadist-attest-ask.timer', mode: 0o644 },
  { from: 'meta-lamadist/recipes-core/lamadist-ima/files/ima-policy', to: '/etc/ima/ima-policy', mode: 0o644 },
  { from: 'meta-lamadist/dynamic-layers/selinux/recipes-security/lamadist-relabel/files/lamadist-relabel', to: '/usr/libexec/lamadist/lamadist-relabel', mode: 0o755 },
  { from: 'meta-lamadist/dynamic-layers/selinux/recipes-security/lamadist-relabel/files/lamadist-relabel.service', to: '/usr/lib/systemd/system/lamadist-relabel.service', mode: 0o644 },
];

/**
 * Fixture-only programs kept as files beside this module's source (src/vm/fixture/): the DDI
 * client standing in for rauc-hawkbit-updater, which Debian does not package.
 */
export const FIXTURE_PROGRAMS: readonly { from: string; to: string; mode: number }[] = [
  { from: 'src/vm/fixture/lamadist-ddi-client', to: '/usr/libexec/lamadist/lamadist-ddi-client', mode: 0o755 },
  { from: 'src/vm/fixture/lamadist-ddi-client.service', to: '/usr/lib/systemd/system/lamadist-ddi-client.service', mode: 0o644 },
];

const MASKED_GENERATORS = ['systemd-veritysetup-generator', 'systemd-getty-generator'];

/** Units the fixture enables (what the recipes' SYSTEMD_SERVICE enables in a Yocto image). */
const FIXTURE_UNITS = [
  'lamadist-health.service', 'lamadist-boot-entries.service', 'lamadist-fixture-report.service', 'lamadist-fixture-slots.service',
  'lamadist-ddi-client.service', 'lamadist-attest.timer', 'lamadist-attest-ask.timer',
];

/**
 * Debian units the fixture enables as a Yocto image has them: networkd and its generator (a host's
 * static ip=), RAUC's service, and /tmp on tmpfs (Debian keeps tmp.mount in /usr/share/systemd; a
 * Yocto image mounts it, and the root is read-only).
 */
const SYSTEM_UNITS = ['systemd-networkd.service', 'systemd-network-generator.service', 'rauc.service', 'tmp.mount', 'lamadist-relabel.service'];

/**
 * What the distribution's UKI command line (LAMADIST_UKI_CMDLINE) adds for SELinux, which the
 * fixture's hosts carry as kernel arguments: Debian's kernel makes AppArmor the major LSM unless
 * lsm= says otherwise. audit=1 with a large backlog keeps the records of early boot until auditd
 * writes them, so the tests count every AVC denial.
 */
export const FIXTURE_KERNEL_ARGS = ['lsm=landlock,lockdown,yama,integrity,selinux,bpf', 'selinux=1', 'enforcing=1', 'audit=1', 'audit_backlog_limit=8192'];

/** The version a fixture root file system reports (IMAGE_VERSION in os-release) unless a variant says otherwise. */
export const FIXTURE_VERSION = '1';

/** The initramfs /init and its helper, from meta-lamadist's lamadist-boot recipe. */
export const INIT_FILE = 'meta-lamadist/recipes-core/lamadist-boot/files/lamadist-init';

/** A oneshot unit of the fixture printing a report; `order` holds its ordering lines. */
function reportUnit(what: string, order: string[], exec: string): { data: string; mode: number } {
  const data = [
    '[Unit]',
    `Description=LamaDist test fixture: ${what}`,
    ...order,
    '',
    '[Service]',
    'Type=oneshot',
    `ExecStart=${exec}`,
    '# Through the journal (forwarded to ttyS0): a direct tty writer dies when the serial getty hangs the line up.',
    'StandardOutput=journal',
    '',
    '[Install]',
    'WantedBy=multi-user.target',
    '',
  ];
  return { data: data.join('\n'), mode: 0o644 };
}

/**
 * Fixture-only configuration (what a Yocto image sets through its recipes and that Debian lacks):
 * DHCP on the virtio NIC, an empty machine-id so systemd takes systemd.machine_id= from the
 * command line, no fstab (lamadist-init mounts everything), and a console report of the state the
 * acceptance tests check. SELinux enforces Debian's refpolicy, and the health check requires it.
 */
const FIXTURE_FILES: Record<string, { data: string; mode: number }> = {
  // After the files systemd-network-generator writes from a static ip= (systemd 252: 90-<if>.network,
  // 91-default.network), so a host's static address wins over DHCP.
  '/etc/systemd/network/95-wired.network': { data: '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n', mode: 0o644 },
  '/etc/fstab': { data: '# lamadist-init mounts /, /var, /etc and /boot\n', mode: 0o644 },
  // The journal on the serial console: systemd stops its own status lines once the serial getty
  // owns the console, and a failed test is read from this log.
  '/etc/systemd/journald.conf.d/50-lamadist-fixture-console.conf': {
    data: '[Journal]\nForwardToConsole=yes\nTTYPath=/dev/ttyS0\nMaxLevelConsole=info\n',
    mode: 0o644,
  },
  '/etc/lamadist/health.d/.keep': { data: '', mode: 0o644 },
  // Debian's refpolicy ("default"), enforcing; the kernel gets selinux=1 enforcing=1 (FIXTURE_KERNEL_ARGS).
  '/etc/selinux/config': { data: 'SELINUX=enforcing\nSELINUXTYPE=default\n', mode: 0o644 },
  // auditd's log directory: the package ships it in the image's /var, which the device's /var hides.
  '/usr/lib/tmpfiles.d/lamadist-fixture-audit.conf': { data: 'd /var/log/audit 0700 root root -\n', mode: 0o644 },
  // RAUC streams bundles through an NBD device (a Yocto image sets KERNEL_MODULE_AUTOLOAD).
  '/etc/modules-load.d/lamadist-fixture-nbd.conf': { data: 'nbd\n', mode: 0o644 },
  '/usr/lib/systemd/system/lamadist-fixture-report.service': reportUnit('report the booted state on the console', [
    '# basic.target: everything the report reads (mounts, hostname, machine-id, LUKS2) is set by',
    '# then, and it must not wait for units that need the network.',
    'After=basic.target',
  ], '/usr/libexec/lamadist/lamadist-fixture-report'),
  '/usr/lib/systemd/system/lamadist-fixture-slots.service': reportUnit('report the A/B slot state on the console after the health check', [
    'After=multi-user.target lamadist-health.service lamadist-boot-entries.service rauc.service',
  ], '/usr/libexec/lamadist/lamadist-fixture-slots'),
  '/usr/libexec/lamadist/lamadist-fixture-slots': {
    data: [
      '#!/bin/sh',
      '# Test fixture: health result, running version, RAUC slot states and UEFI boot entries, between markers.',
      'r() { echo "LAMADIST-SLOTS $1=$2"; }',
      'echo LAMADIST-SLOTS-BEGIN',
      'r health "$(systemctl show -p Result --value lamadist-health.service)"',
      'r version "$(. /usr/lib/os-release && echo "$IMAGE_VERSION")"',
      'r booted "$(sed -n "s/.*rauc\\.slot=\\([AB]\\).*/\\1/p" /proc/cmdline)"',
      'rauc status --detailed --output-format=shell 2>/dev/null | sed -n "s/^RAUC_\\(SLOT_\\(STATE\\|CLASS\\|BOOTNAME\\|BOOT_STATUS\\|STATUS_BUNDLE_VERSION\\)_[0-9]*\\|BOOT_PRIMARY\\)=/LAMADIST-SLOTS \\1=/p"',
      'efibootmgr 2>&1 | sed "s/^/LAMADIST-SLOTS efi /"',
      'r var_marker "$(cat /var/lamadist-fixture-marker 2>/dev/null)"',
      '# SELinux: the mode, and the AVC denials auditd has logged since the policy was loaded (audit=1',
      '# keeps the records of early boot for it), each also on its own line.',
      'r selinux "$(getenforce 2>/dev/null)"',
      'l() { r "label_$1" "$(stat -c %C "$2" 2>/dev/null)"; }',
      'l root /; l rauc /usr/bin/rauc; l var /var; l bundle_key /var/lib/rauc/encryption/device.key.pem; l etc /etc; l machine_id /etc/machine-id',
      '# A confined domain: the update client\'s, which lamadist-fixture-probe enters, reads the device\'s',
      '# token but not the bundle key (only RAUC does). That denial is expected, and counted apart: the',
      '# probe opens the file itself, so its records carry its own comm (the name\'s first 15 characters).',
      'p() { e=$(/usr/libexec/lamadist/lamadist-fixture-probe "$2" 2>&1); r "probe_$1" "${e:-read}"; }',
      'p token /var/lib/lamadist/hawkbit.conf; p bundle_key /var/lib/rauc/encryption/device.key.pem',
      'probed=\'comm="lamadist-fixtur" .*scontext=system_u:system_r:lamadist_update_t:s0 tcontext=system_u:object_r:lamadist_bundle_key_t:s0\'',
      '# A power cut can leave a run of NUL bytes in audit.log (blocks allocated, data never written),',
      '# which makes grep call the file binary and print no line: -a reads it as text. The count is reported.',
      'a=/var/log/audit/audit.log',
      'r audit_log_nul_bytes "$(tr -dc \'\\000\' <$a 2>/dev/null | wc -c)"',
      'r probe_denials "$(grep -a \'avc: *denied\' $a 2>/dev/null | grep -c "$probed")"',
      'r avc_denials "$(grep -a \'avc: *denied\' $a 2>/dev/null | grep -vc "$probed")"',
      '# lamadist_k3s in the loaded policy: its file contexts, and its types valid to the kernel.',
      'r k3s_storage "$(matchpathcon -n /var/lib/rancher/k3s/storage 2>&1)"',
      'k=/run/lamadist-fixture-k3s; mkdir -p $k; r k3s_label "$(chcon -t container_file_t $k 2>&1 && stat -c %C $k)"',
      'grep -a \'avc: *denied\' $a 2>/dev/null | sed -n \'s/.*denied *{ \\([^}]*\\)}.*comm=\\("[^"]*"\\) *\\(name=[^ ]*\\)\\{0,1\\}.*scontext=\\([^ ]*\\) tcontext=\\([^ ]*\\) tclass=\\([^ ]*\\).*/\\2 \\3 {\\1} \\4 \\5 \\6/p\' | sort | uniq -c | head -n 60 | sed "s/^/LAMADIST-AVC /"',
      'r hostname "$(hostname)"',
      'r machine_id "$(cat /etc/machine-id)"',
      'r ipv4 "$(ip -4 -o addr show scope global | awk \'{ print $4 }\' | tr \'\\n\' \' \')"',
      '# Secure Boot as the firmware holds it: mode bytes, and the SHA-256 of each enrolled signature list',
      '# (efivarfs files cannot seek: each is read whole through cat).',
      'v=/sys/firmware/efi/efivars; g=8be4df61-93ca-11d2-aa0d-00e098032b8c',
      'r secure_boot "$(cat $v/SecureBoot-$g 2>/dev/null | tail -c 1 | od -An -tu1 | tr -d \' \')"',
      'r setup_mode "$(cat $v/SetupMode-$g 2>/dev/null | tail -c 1 | od -An -tu1 | tr -d \' \')"',
      'for n in PK-$g KEK-$g db-d719b2cb-3d3a-4596-a3bc-dad00e67656f; do r "esl_${n%%-*}" "$(cat $v/$n 2>/dev/null | tail -c +5 | sha256sum | cut -c1-64)"; done',
      '# What the booted slot holds, to compare with the release byte for byte: the root image (as many',
      '# blocks as its tree covers), the tree (superblock block and every level) and the UKI.',
      's=$(sed -n "s/.*lamadist\\.slot=\\([ab]\\).*/\\1/p" /proc/cmdline); vd=/dev/disk/by-partlabel/verity_$s',
      'n=$(veritysetup dump $vd 2>/dev/null | sed -n "s/^Data blocks:[[:space:]]*//p"); n=${n:-0}',
      't=0; l=$(((n + 127) / 128)); while [ $l -gt 1 ]; do t=$((t + l)); l=$(((l + 127) / 128)); done; t=$((t + l + 1))',
      'r slot_rootfs_sha256 "$(head -c $((n * 4096)) /dev/mapper/rootfs_$s | sha256sum | cut -c1-64)"',
      'r slot_verity_sha256 "$(head -c $((t * 4096)) $vd | sha256sum | cut -c1-64)"',
      'r slot_uki_sha256 "$(sha256sum /boot/EFI/Linux/lamadist-$s.efi | cut -c1-64)"',
      'echo LAMADIST-SLOTS-END',
      '',
    ].join('\n'),
    mode: 0o755,
  },
  // The slot report's probe of the update client's domain (src/vm/fixture/lamadist_fixture.te).
  '/usr/libexec/lamadist/lamadist-fixture-probe': {
    data: '#!/bin/sh\n# Opens FILE for reading in the domain this program enters, with the shell\'s own open: a denial\n# names this program. Only the shell\'s error reaches the caller.\nexec <"$1"\n',
    mode: 0o755,
  },
  '/usr/libexec/lamadist/lamadist-fixture-report': {
    data: [
      '#!/bin/sh',
      '# Test fixture: one key=value line per fact the acceptance tests check, between markers.',
      'r() { echo "LAMADIST-REPORT $1=$2"; }',
      'echo LAMADIST-REPORT-BEGIN',
      'r root "$(findmnt -n -o SOURCE,FSTYPE,OPTIONS /)"',
      'r root_dm "$(dmsetup table root 2>/dev/null | cut -d" " -f3)"',
      'r var "$(findmnt -n -o SOURCE,FSTYPE /var)"',
      'r var_luks "$(cryptsetup status var 2>/dev/null | sed -n "s/^ *type: *//p")"',
      'r etc "$(findmnt -n -o FSTYPE,OPTIONS /etc)"',
      'r hostname "$(hostname)"',
      'r machine_id "$(cat /etc/machine-id)"',
      'r slot "$(sed -n "s/.*lamadist\\.slot=\\([ab]\\).*/\\1/p" /proc/cmdline)"',
      'r health "$(systemctl show -p ActiveState,Result --value lamadist-health.service | tr "\\n" " ")"',
      'r persist "$(cat /etc/lamadist-fixture-persist 2>/dev/null)"',
      'r var_marker "$(cat /var/lamadist-fixture-marker 2>/dev/null)"',
      'r version "$(. /usr/lib/os-release && echo "$IMAGE_VERSION")"',
      '# IMA appraisal under the root\'s own policy: a program copied into /var without its signature',
      '# must not run (126: the kernel says EACCES), the same program copied with its security.ima must.',
      'rm -f /var/lamadist-ima-unsigned /var/lamadist-ima-signed',
      'cp /usr/bin/true /var/lamadist-ima-unsigned; /var/lamadist-ima-unsigned 2>/dev/null; r ima_unsigned_exec $?',
      'cp --preserve=xattr /usr/bin/true /var/lamadist-ima-signed; /var/lamadist-ima-signed; r ima_signed_exec $?',
      'r ima_entries "$(wc -l </sys/kernel/security/ima/ascii_runtime_measurements)"',
      '# first boot leaves a marker in /etc (overlay) and /var for the next boot to report',
      'if [ ! -s /etc/lamadist-fixture-persist ]; then',
      '  m="boot-$(cat /proc/sys/kernel/random/boot_id)"',
      '  echo "$m" >/etc/lamadist-fixture-persist; echo "$m" >/var/lamadist-fixture-marker',
      'fi',
      'sync',
      'echo LAMADIST-REPORT-END',
      '',
    ].join('\n'),
    mode: 0o755,
  },
};

/**
 * Module directories (under lib/modules/<version>/kernel) the fixture leaves out: hardware a VM
 * lacks and file systems it never mounts. Every byte of the tree is compressed, hashed, bundled and
 * copied by RAUC several times per VM test.
 */
const PRUNED_MODULE_DIRS = [
  'sound', 'drivers/gpu', 'drivers/media', 'drivers/net/wireless', 'drivers/net/ethernet', 'drivers/infiniband',
  'drivers/staging', 'drivers/iio', 'drivers/bluetooth', 'drivers/isdn', 'drivers/input', 'drivers/hid', 'drivers/usb',
  'drivers/scsi', 'drivers/net/can', 'net/wireless', 'net/mac80211', 'net/bluetooth',
  'drivers/comedi', 'drivers/mtd', 'drivers/target', 'drivers/hwmon', 'drivers/thunderbolt', 'drivers/atm', 'drivers/mmc',
  'drivers/ufs', 'drivers/nvdimm', 'drivers/message', 'drivers/edac', 'drivers/video', 'drivers/platform', 'drivers/ata',
  'drivers/nvme', 'drivers/crypto', 'drivers/i2c', 'drivers/net/wwan', 'drivers/net/usb',
  'fs/xfs', 'fs/btrfs', 'fs/nfs', 'fs/nfsd', 'fs/ocfs2', 'fs/smb', 'fs/f2fs', 'fs/ceph', 'fs/gfs2', 'fs/jfs', 'fs/nilfs2',
  'fs/ubifs', 'fs/afs', 'fs/orangefs', 'fs/dlm', 'net/sunrpc', 'net/ceph',
];

/** Parts of the Debian tree nothing on the device reads: apt's package lists, documentation, translations. */
const PRUNED_PATHS = ['var/lib/apt/lists', 'usr/share/doc', 'usr/share/man', 'usr/share/info', 'usr/share/locale'];

/** Kernel modules the fixture initramfs carries (lamadist-init loads those it finds). */
export const INITRAMFS_MODULES = [
  'virtio_pci', 'virtio_blk', 'dm_mod', 'dm_crypt', 'dm_verity', 'erofs', 'overlay', 'ext4', 'vfat',
  'nls_cp437', 'nls_iso8859_1', 'nls_utf8', 'nls_ascii', 'efivarfs', 'tpm_crb',
  'xts', 'ecb', 'aesni_intel', 'algif_skcipher', 'algif_hash', 'crc32c_generic',
];

/** Host programs and shared objects the fixture initramfs carries for lamadist-init and lamadist-enroll. */
export const INITRAMFS_BINARIES = [
  'cryptsetup', 'veritysetup', 'blkid', 'mountpoint', 'mkfs.ext4', 'e2fsck', 'systemd-cryptenroll', '/usr/lib/systemd/systemd-cryptsetup',
  'tpm2_dictionarylockout', 'keyctl', 'getfattr', 'setfattr',
  '/usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so',
  '/usr/lib/x86_64-linux-gnu/libtss2-esys.so.0', '/usr/lib/x86_64-linux-gnu/libtss2-rc.so.0',
  '/usr/lib/x86_64-linux-gnu/libtss2-mu.so.0', '/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0',
];

function sha(parts: (string | Buffer)[]): string {
  const h = createHash('sha256');
  for (const p of parts) h.update(p).update('\0');
  return h.digest('hex').slice(0, 16);
}

/** The Debian mirror apt uses on this host (deb822 or one-line sources), else deb.debian.org. */
async function debianMirror(): Promise<string> {
  const files = ['/etc/apt/sources.list.d/debian.sources', '/etc/apt/sources.list'];
  for (const f of files) {
    const text = await fs.readFile(f, 'utf8').catch(() => '');
    const m = /^URIs:\s*(\S+\/debian)\/?\s*$/m.exec(text) ?? /^deb\s+(?:\[[^\]]*\]\s+)?(\S+\/debian)\/?\s+bookworm\s/m.exec(text);
    if (m?.[1]) return m[1];
  }
  return 'http://deb.debian.org/debian';
}

/**
 * Remove a half-built tree. debootstrap mounts /proc and /sys (and may bind /dev) inside the
 * target; a failed run can leave them mounted, and a recursive delete must never descend into them.
 */
async function removeTree(dir: string): Promise<void> {
  const mounts = (await fs.readFile('/proc/self/mounts', 'utf8'))
    .split('\n')
    .map((l) => l.split(' ')[1]?.replace(/\\040/g, ' ') ?? '')
    .filter((m) => m === dir || m.startsWith(`${dir}/`))
    .sort((a, b) => b.length - a.length);
  for (const m of mounts) await run('umount', ['-l', m], { allowFailure: true });
  const still = (await fs.readFile('/proc/self/mounts', 'utf8')).includes(` ${dir}/`);
  if (still) throw new Error(`cannot remove ${dir}: file systems are still mounted inside it`);
  await fs.rm(dir, { recursive: true, force: true });
}

async function renameInto(tmp: string, final: string): Promise<void> {
  try {
    await fs.rename(tmp, final);
  } catch (err) {
    // A concurrent build finished the same tree first; keep theirs.
    if (!isErrno(err, 'ENOTEMPTY') && !isErrno(err, 'EEXIST')) throw err;
    await fs.rm(tmp, { recursive: true, force: true });
  }
}

async function exists(p: string): Promise<boolean> {
  return fs.access(p).then(
    () => true,
    () => false,
  );
}

/** Cached trees of each kind kept under ~/.cache/lamadist/rootfs/ beyond those used in the last hour. */
const KEEP_TREES: Record<string, number> = { base: 2, fixture: 4, variant: 8 };
const TREE_IN_USE_MS = 60 * 60_000;

/**
 * Whether the complete cached tree `dir` exists; a hit is marked as used now. Every test PKI makes
 * its own fixture tree (the RAUC keyring is inside), so without `pruneTrees` the cache grows by
 * hundreds of MiB per test run.
 */
export async function cachedTree(dir: string): Promise<boolean> {
  const marker = path.join(dir, '.lamadist-complete');
  if (!(await exists(marker))) return false;
  const now = new Date();
  await fs.utimes(marker, now, now).catch(() => undefined);
  return true;
}

/**
 * Drop the least recently used cached trees of `kind` (base, fixture or variant) beyond the newest
 * few. A tree used within the last hour is kept whatever the count: another test run on this
 * machine may be building an image from it right now.
 */
export async function pruneTrees(kind: keyof typeof KEEP_TREES): Promise<string[]> {
  const root = path.join(cacheRoot(), 'rootfs');
  const names = (await fs.readdir(root).catch(() => [] as string[])).filter((n) => n.startsWith(`${kind}-`) && !n.includes('.tmp-'));
  const trees = await Promise.all(
    names.map(async (n) => ({ dir: path.join(root, n), used: (await fs.stat(path.join(root, n, '.lamadist-complete')).catch(() => undefined))?.mtimeMs })),
  );
  const complete = trees.filter((t): t is { dir: string; used: number } => t.used !== undefined).sort((a, b) => b.used - a.used);
  const stale = complete.slice(KEEP_TREES[kind]).filter((t) => Date.now() - t.used > TREE_IN_USE_MS);
  for (const t of stale) await removeTree(t.dir);
  return stale.map((t) => t.dir);
}

/** Stage 1: debootstrap + Debian's kernel modules, cached by package list and kernel version. */
async function baseTree(kernel: DebianKernel, log: (m: string) => void): Promise<string> {
  const root = path.join(cacheRoot(), 'rootfs');
  const key = sha([FIXTURE_REVISION, ...FIXTURE_PACKAGES, kernel.version, kernel.debVersion]);
  const final = path.join(root, `base-${key}`);
  if (await cachedTree(final)) return final;
  await fs.mkdir(root, { recursive: true });
  const tmp = await fs.mkdtemp(path.join(root, '.base-'));
  try {
    const mirror = await debianMirror();
    log(`debootstrap bookworm from ${mirror} (minbase + ${FIXTURE_PACKAGES.length} packages)`);
    await run('debootstrap', ['--variant=minbase', `--include=${FIXTURE_PACKAGES.join(',')}`, 'bookworm', tmp, mirror], {
      userErrorCode: 'LAMA_E_FIXTURE',
      env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
    });
    const mods = path.join(tmp, 'usr/lib/modules', kernel.version);
    await fs.mkdir(path.dirname(mods), { recursive: true });
    await run('cp', ['-a', kernel.modulesDir, mods]);
    await run('chroot', [tmp, 'depmod', kernel.version]);
    await fs.rm(path.join(tmp, 'var/cache/apt/archives'), { recursive: true, force: true });
    await fs.mkdir(path.join(tmp, 'var/cache/apt/archives/partial'), { recursive: true });
    await fs.writeFile(path.join(tmp, '.lamadist-complete'), '');
    await renameInto(tmp, final);
  } catch (err) {
    await removeTree(tmp);
    throw err;
  }
  await pruneTrees('base');
  return final;
}

async function enable(rootfs: string, unit: string): Promise<void> {
  const wants = path.join(rootfs, 'etc/systemd/system/multi-user.target.wants');
  await fs.mkdir(wants, { recursive: true });
  await fs.rm(path.join(wants, unit), { force: true });
  await fs.symlink(`/usr/lib/systemd/system/${unit}`, path.join(wants, unit));
}

/** A fixture root file system ready for `buildImage({ rootfs })`, and the kernel matching its modules. */
export interface FixtureRootfs {
  dir: string;
  kernel: DebianKernel;
}

/**
 * Build (or reuse) the fixture root file system: stage 1 is debootstrap, cached by the package
 * list; stage 2 copies it and installs meta-lamadist's on-target files, the RAUC keyring and the
 * fixture's own configuration, cached by a hash of all of those. Trees live under
 * ~/.cache/lamadist/rootfs/ and are renamed into place only when complete.
 */
export async function fixtureRootfs(opts: { keyring?: string; log?: (m: string) => void } = {}): Promise<FixtureRootfs> {
  const log = opts.log ?? (() => undefined);
  const kernel = await debianKernel();
  const base = await baseTree(kernel, log);
  const repo = repoRoot();
  const files = [...ON_TARGET_FILES, ...FIXTURE_PROGRAMS];
  const contents = await Promise.all(
    files.map((f) =>
      fs.readFile(path.join(repo, f.from)).catch(() => {
        throw new UserError('LAMA_E_FIXTURE', `on-target file ${f.from} is missing from ${repo}`);
      }),
    ),
  );
  const policy = await policySources(repo);
  const keyring = opts.keyring ? await fs.readFile(opts.keyring) : undefined;
  const rauc = await streamingRauc({ log });
  const raucBinary = await fs.readFile(rauc.binary);
  const key = sha([path.basename(base), ...MASKED_GENERATORS, 'root-0755', raucBinary, FIXTURE_VERSION, ...FIXTURE_UNITS, ...SYSTEM_UNITS, JSON.stringify(FIXTURE_FILES), ...PRUNED_MODULE_DIRS, ...PRUNED_PATHS, ...contents, ...[...policy.values()].flatMap((m) => [...m].flat()), keyring ?? '']);
  const final = path.join(cacheRoot(), 'rootfs', `fixture-${key}`);
  if (await cachedTree(final)) return { dir: final, kernel };

  const tmp = await fs.mkdtemp(path.join(cacheRoot(), 'rootfs', '.fixture-'));
  try {
    await fs.rmdir(tmp);
    await run('cp', ['-a', '--reflink=auto', base, tmp]);
    await fs.rm(path.join(tmp, '.lamadist-complete'));
    // The tree's top directory came from mkdtemp (0700) and becomes the image's /: unprivileged
    // services (dbus-daemon as messagebus) could not even reach /usr.
    await fs.chmod(tmp, 0o755);
    // A VM has no GPU, sound, Wi-Fi or physical NICs: dropping their modules halves the root image.
    const kmods = path.join(tmp, 'usr/lib/modules', kernel.version, 'kernel');
    for (const d of PRUNED_MODULE_DIRS) await fs.rm(path.join(kmods, d), { recursive: true, force: true });
    // Left as empty directories: packages' maintainer scripts and tmpfiles.d expect them to exist.
    for (const p of PRUNED_PATHS) {
      await fs.rm(path.join(tmp, p), { recursive: true, force: true });
      await fs.mkdir(path.join(tmp, p), { recursive: true });
    }
    await run('chroot', [tmp, 'depmod', kernel.version]);
    const put = async (to: string, data: Buffer | string, mode: number): Promise<void> => {
      const dest = path.join(tmp, to);
      await fs.mkdir(path.dirname(dest), { recursive: true });
      await fs.writeFile(dest, data);
      await fs.chmod(dest, mode);
    };
    for (const [i, f] of files.entries()) await put(f.to, contents[i] as Buffer, f.mode);
    await fs.appendFile(path.join(tmp, 'usr/lib/os-release'), `IMAGE_ID=lamadist-fixture\nIMAGE_VERSION=${FIXTURE_VERSION}\n`);
    for (const [to, f] of Object.entries(FIXTURE_FILES)) await put(to, f.data, f.mode);
    if (keyring) await put('/etc/rauc/keyring.pem', keyring, 0o644);
    // Debian's rauc has no streaming; the same release built with it replaces the binary.
    await put('/usr/bin/rauc', raucBinary, 0o755);
    // Masked generators (links to /dev/null). lamadist-init opens dm-verity itself; systemd's
    // generator would see roothash= and wait 90 s for a verity data device of its own, and a Yocto
    // image leaves it out. No test logs in on the serial console, and a getty there hangs the line
    // up as it starts: a journal line forwarded to ttyS0 at that moment is lost, report lines with it.
    const generators = path.join(tmp, 'etc/systemd/system-generators');
    await fs.mkdir(generators, { recursive: true });
    for (const g of MASKED_GENERATORS) await fs.symlink('/dev/null', path.join(generators, g));
    await fs.writeFile(path.join(tmp, 'etc/machine-id'), '');
    await fs.writeFile(path.join(tmp, 'etc/hostname'), 'lamadist\n');
    for (const u of FIXTURE_UNITS) await enable(tmp, u);
    await fs.copyFile(path.join(tmp, 'usr/share/systemd/tmp.mount'), path.join(tmp, 'etc/systemd/system/tmp.mount'));
    await run('chroot', [tmp, 'systemctl', 'enable', ...SYSTEM_UNITS], { allowFailure: true });
    // Linked into the tree's policy store with its own semodule, as the Yocto image links them at rootfs time.
    const work = path.join(tmp, 'tmp/lamadist-policy');
    const packages = await compilePolicyModules(work, policy);
    await run('chroot', [tmp, 'semodule', '-i', ...packages.map((p) => `/${path.relative(tmp, p)}`)], { userErrorCode: 'LAMA_E_FIXTURE' });
    await fs.rm(work, { recursive: true, force: true });
    await fs.writeFile(path.join(tmp, '.lamadist-complete'), '');
    await renameInto(tmp, final);
  } catch (err) {
    await fs.rm(tmp, { recursive: true, force: true });
    throw err;
  }
  await pruneTrees('fixture');
  return { dir: final, kernel };
}

/** `length` bytes determined by `seed` (SHA-256 in counter mode): incompressible, like packed data. Pure. */
export function seededBytes(seed: string, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i * 32 < length; i++) createHash('sha256').update(`${seed}\0${i}`).digest().copy(out, i * 32);
  return out;
}

/**
 * The fixture's initramfs: meta-lamadist's lamadist-init as /init, lamadist-enroll, and the
 * cryptsetup/veritysetup/systemd-cryptenroll/TPM2 pieces and kernel modules they call. `build`
 * names another build of it.
 */
export async function fixtureInitramfs(kernel: DebianKernel, out: string, build?: string): Promise<string> {
  const repo = repoRoot();
  const init = await fs.readFile(path.join(repo, INIT_FILE), 'utf8');
  const enroll = await fs.readFile(path.join(repo, 'meta-lamadist/recipes-core/lamadist-boot/files/lamadist-enroll'));
  return buildInitramfs({
    init,
    binaries: INITRAMFS_BINARIES,
    modules: INITRAMFS_MODULES,
    modulesDir: kernel.modulesDir,
    files: {
      '/usr/lib/lamadist/lamadist-enroll': { data: enroll, mode: 0o755 },
      // Another build of the initramfs (an update that changes it): first in the archive, so the
      // whole compressed stream differs, as a rebuilt one does, and 3,000 incompressible bytes
      // longer, so the kernel behind it in a UKI moves too, as a new kernel's bytes would all differ.
      ...(build !== undefined && { '/.lamadist-initramfs-build': { data: Buffer.concat([Buffer.from(`${build}\n`), seededBytes(build, 3000)]), mode: 0o644 } }),
    },
    out,
  });
}
