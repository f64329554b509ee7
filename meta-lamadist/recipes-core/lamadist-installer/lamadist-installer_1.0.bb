SUMMARY = "LamaDist installer: seals and installs a fleet host from a provisioning stick"
DESCRIPTION = "lamadist-install runs in the release's own root when lamadist-init boots an installer \
stick (`lamadist provision --installer`): it partitions the target, creates the LUKS2 containers \
with keys made on the device, writes slot A, escrows the recovery key to the fleet's recovery \
certificate and enrolls the fleet's Secure Boot keys with lamadist-secureboot-enroll. The -wic \
package holds the debug installer's service (lama-image-installer, lamadist-debug only)."
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = " \
    file://lamadist-install \
    file://lamadist-install.service \
    file://lamadist-secureboot-enroll \
"
S = "${WORKDIR}"

inherit allarch systemd

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -D -m 0755 ${S}/lamadist-install ${D}${sbindir}/lamadist-install
    install -D -m 0755 ${S}/lamadist-secureboot-enroll ${D}${sbindir}/lamadist-secureboot-enroll
    install -D -m 0644 ${S}/lamadist-install.service ${D}${systemd_system_unitdir}/lamadist-install.service
}

PACKAGES =+ "${PN}-wic"
FILES:${PN}-wic = "${systemd_system_unitdir}/lamadist-install.service"
SYSTEMD_PACKAGES = "${PN}-wic"
SYSTEMD_SERVICE:${PN}-wic = "lamadist-install.service"

# What lamadist-install calls: sfdisk and partx, cryptsetup and veritysetup, GNU dd (iflag=count_bytes),
# openssl cms for the escrow, efibootmgr for the boot entry; the -wic path adds zstd.
RDEPENDS:${PN} = "util-linux-sfdisk util-linux-partx util-linux-lsblk util-linux-blockdev util-linux-findmnt \
    util-linux-mount cryptsetup coreutils gawk sed grep openssl-bin efibootmgr"
RDEPENDS:${PN}-wic = "${PN} zstd"
