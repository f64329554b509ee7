SUMMARY = "LamaDist installer: writes the A/B disk to the internal drive of a new node"
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

SYSTEMD_SERVICE:${PN} = "lamadist-install.service"
RDEPENDS:${PN} = "zstd gptfdisk util-linux-lsblk util-linux-blkid util-linux-blockdev util-linux-findmnt coreutils gawk efibootmgr"
