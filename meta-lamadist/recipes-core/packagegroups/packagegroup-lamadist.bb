SUMMARY = "LamaDist package groups"
LICENSE = "MIT"

PACKAGE_ARCH = "${MACHINE_ARCH}"
inherit packagegroup

PACKAGES = " \
    ${PN}-base \
    ${PN}-security \
    ${PN}-update \
    ${PN}-k3s \
"

# Packages from layers other than OE-Core are named through this helper so that the group still
# parses (and yocto-check-layer can test the layer) with OE-Core alone.
def lamadist_if_layer(d, collection, packages):
    return packages if collection in (d.getVar('BBFILE_COLLECTIONS') or '').split() else ''

SUMMARY:${PN}-base = "Base system: systemd services, networking, time, SSH, kernel modules"
# systemd itself is named only under a systemd distro (lamadist always is), so that world builds
# of other distros, as yocto-check-layer runs them, still resolve.
RDEPENDS:${PN}-base = " \
    ${@bb.utils.contains('DISTRO_FEATURES', 'systemd', 'systemd systemd-conf', '', d)} \
    ca-certificates \
    e2fsprogs-e2fsck \
    e2fsprogs-resize2fs \
    lamadist-grow-var \
    util-linux-findmnt \
    util-linux-lsblk \
    kernel-modules \
    ${@'efibootmgr' if d.getVar('LAMADIST_BOOT') == 'uki' else 'libubootenv-bin'} \
"

SUMMARY:${PN}-security = "SELinux (targeted), IMA/EVM, LUKS2 and TPM2 tooling, audit"
# The list is distro policy (lamadist-security.inc); other distros get the group without it.
LAMADIST_SECURITY_PACKAGES ??= ""
RDEPENDS:${PN}-security = " \
    ${LAMADIST_SECURITY_PACKAGES} \
    ${@lamadist_if_layer(d, 'openembedded-layer', 'audit')} \
    ${@lamadist_if_layer(d, 'selinux', 'lamadist-selinux lamadist-system-selinux lamadist-relabel')} \
    ${@lamadist_if_layer(d, 'integrity-layer', 'packagegroup-ima')} \
    ${@lamadist_if_layer(d, 'integrity-layer', bb.utils.contains('DISTRO_FEATURES', 'ima', 'lamadist-ima-policy', '', d))} \
"

SUMMARY:${PN}-update = "RAUC A/B updates with the post-boot health check, and the fleet installer"
# lamadist-installer is in every image: an installer stick boots the release itself and runs the
# release's own lamadist-install.
# The bundle hook builds the new slot from the blocks the device has: veritysetup hashes and
# reads trees, cmp compares block hashes, truncate sizes the UKI (the bundle carries only the script).
RDEPENDS:${PN}-update = " \
    ${@lamadist_if_layer(d, 'rauc', 'rauc lamadist-health')} \
    lamadist-installer \
    lamadist-attest \
    cryptsetup diffutils coreutils \
"

SUMMARY:${PN}-k3s = "k3s (server) confined by SELinux"
RDEPENDS:${PN}-k3s = " \
    ${@lamadist_if_layer(d, 'virtualization-layer', 'k3s-server lamadist-k3s-config')} \
    ${@lamadist_if_layer(d, 'selinux', lamadist_if_layer(d, 'virtualization-layer', 'lamadist-k3s-selinux'))} \
"
