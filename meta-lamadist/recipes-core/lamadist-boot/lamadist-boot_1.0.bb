SUMMARY = "LamaDist initramfs logic: LUKS2/TPM2 unlock, first-boot enrollment, dm-verity root, /etc overlay"
DESCRIPTION = "The /init of lamadist-initramfs. It unlocks the slot and /var LUKS2 containers with \
the TPM2 (or, on first boot, the one-time provisioning key on the ESP, which it replaces with a \
TPM2 enrollment), opens dm-verity with the roothash= of the UKI command line, mounts the EROFS root \
read-only, /var and the /etc overlay, and switches to systemd."
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = " \
    file://lamadist-init \
    file://lamadist-enroll \
"
S = "${WORKDIR}"

inherit allarch

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -D -m 0755 ${S}/lamadist-init ${D}/init
    install -D -m 0755 ${S}/lamadist-enroll ${D}${libdir}/lamadist/lamadist-enroll
}

# Busybox provides the shell and the small tools; the rest is the unlock and verity chain.
# systemd-crypt carries systemd-cryptenroll and the systemd-tpm2 token plugin of libcryptsetup;
# tpm2-tools sets the TPM2's dictionary-attack policy at enrollment.
# keyctl loads the root's IMA certificate into the kernel before switching root; getfattr and
# setfattr (attr) copy the image's SELinux labels of /var and /etc onto what lamadist-init makes.
# cryptsetup and keyutils come from meta-oe, which every LamaDist build has; naming them only when
# that layer is present keeps `bitbake world` with OE-Core alone (yocto-check-layer) resolvable.
RDEPENDS:${PN} = " \
    busybox \
    attr \
    ${@bb.utils.contains('BBFILE_COLLECTIONS', 'openembedded-layer', 'cryptsetup keyutils', '', d)} \
    e2fsprogs-e2fsck \
    e2fsprogs-mke2fs \
    kmod \
    util-linux-blkid \
    util-linux-findmnt \
    util-linux-mount \
    util-linux-switch-root \
    ${@bb.utils.contains('DISTRO_FEATURES', 'tpm2', 'systemd-crypt tpm2-tools', '', d)} \
"
FILES:${PN} = "/init ${libdir}/lamadist"
