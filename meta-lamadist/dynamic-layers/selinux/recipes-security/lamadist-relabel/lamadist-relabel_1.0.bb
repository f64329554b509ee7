SUMMARY = "LamaDist: SELinux labels for /var and the /etc overlay's writable layer"
DESCRIPTION = "A oneshot unit before sysinit.target that relabels /var (and, through /etc, the \
overlay's writable layer) with restorecon once per policy: lamadist-init makes them before \
systemd loads the policy. The read-only root is labelled when the image is built."
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = " \
    file://lamadist-relabel \
    file://lamadist-relabel.service \
"
S = "${WORKDIR}"

inherit allarch systemd features_check
REQUIRED_DISTRO_FEATURES = "selinux systemd"

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -D -m 0755 ${S}/lamadist-relabel ${D}${libexecdir}/lamadist/lamadist-relabel
    install -D -m 0644 ${S}/lamadist-relabel.service ${D}${systemd_system_unitdir}/lamadist-relabel.service
}

SYSTEMD_SERVICE:${PN} = "lamadist-relabel.service"
FILES:${PN} = "${libexecdir}/lamadist ${systemd_system_unitdir}"
RDEPENDS:${PN} = "policycoreutils-setfiles coreutils"
