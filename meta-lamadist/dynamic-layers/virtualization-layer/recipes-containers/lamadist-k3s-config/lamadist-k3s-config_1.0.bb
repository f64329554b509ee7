SUMMARY = "k3s server configuration of LamaDist: SELinux, encrypted secrets, hardened kubelet"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = "file://config.yaml file://90-lamadist-k3s.conf"
S = "${WORKDIR}"

inherit allarch

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -D -m 0600 ${S}/config.yaml ${D}${sysconfdir}/rancher/k3s/config.yaml
    install -D -m 0644 ${S}/90-lamadist-k3s.conf ${D}${sysconfdir}/sysctl.d/90-lamadist-k3s.conf
}

CONFFILES:${PN} = "${sysconfdir}/rancher/k3s/config.yaml"
RDEPENDS:${PN} = "k3s-server"
