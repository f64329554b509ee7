SUMMARY = "Grow the LUKS2 /var and its ext4 to the size of the var partition"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = "file://lamadist-grow-var file://lamadist-grow-var.service"
S = "${WORKDIR}"

inherit allarch systemd

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -D -m 0755 ${S}/lamadist-grow-var ${D}${libexecdir}/lamadist/lamadist-grow-var
    install -D -m 0644 ${S}/lamadist-grow-var.service ${D}${systemd_system_unitdir}/lamadist-grow-var.service
    sed -i -e 's#/usr/libexec#${libexecdir}#' ${D}${systemd_system_unitdir}/lamadist-grow-var.service
}

SYSTEMD_SERVICE:${PN} = "lamadist-grow-var.service"
FILES:${PN} += "${libexecdir}/lamadist"
# cryptsetup is in meta-oe (see lamadist-boot for why it is named conditionally).
RDEPENDS:${PN} = "e2fsprogs-resize2fs gawk ${@bb.utils.contains('BBFILE_COLLECTIONS', 'openembedded-layer', 'cryptsetup', '', d)}"
