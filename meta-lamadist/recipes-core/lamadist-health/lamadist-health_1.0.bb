SUMMARY = "LamaDist post-boot health check that marks the RAUC slot good or lets the bootloader fall back"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = " \
    file://lamadist-health \
    file://lamadist-health.service \
    file://health.conf \
    file://lamadist-boot-entries \
    file://lamadist-boot-entries.service \
"
S = "${WORKDIR}"

inherit allarch systemd

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -D -m 0755 ${S}/lamadist-health ${D}${libexecdir}/lamadist/lamadist-health
    install -D -m 0644 ${S}/lamadist-health.service ${D}${systemd_system_unitdir}/lamadist-health.service
    install -D -m 0644 ${S}/health.conf ${D}${sysconfdir}/lamadist/health.conf
    install -d ${D}${sysconfdir}/lamadist/health.d
    install -D -m 0755 ${S}/lamadist-boot-entries ${D}${libexecdir}/lamadist/lamadist-boot-entries
    install -D -m 0644 ${S}/lamadist-boot-entries.service ${D}${systemd_system_unitdir}/lamadist-boot-entries.service
    sed -i -e 's#/usr/libexec#${libexecdir}#' ${D}${systemd_system_unitdir}/lamadist-health.service \
        ${D}${systemd_system_unitdir}/lamadist-boot-entries.service
}

# lamadist-boot-entries creates the UEFI entries A and B RAUC's efi backend needs; on U-Boot
# machines its unit's conditions (no efivars) keep it from running.
SYSTEMD_SERVICE:${PN} = "lamadist-health.service lamadist-boot-entries.service"
CONFFILES:${PN} = "${sysconfdir}/lamadist/health.conf"
FILES:${PN} += "${libexecdir}/lamadist ${sysconfdir}/lamadist"
RDEPENDS:${PN} = "util-linux-findmnt coreutils gawk ${@bb.utils.contains("BBFILE_COLLECTIONS", "rauc", "rauc", "", d)}"
