SUMMARY = "LamaDist remote attestation agent: TPM2 quotes of PCRs 7, 10, 11 to the update server"
DESCRIPTION = "Creates a TPM2 attestation key under the endorsement hierarchy, registers it with the \
update server (trust on first use) and sends it a quote with the UEFI event log and the IMA list \
after boot, every poll interval and, checked every minute, when the server asks for one (the DDI \
extension of docs/attestation.md)."
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = " \
    file://lamadist-attest \
    file://lamadist-attest.service \
    file://lamadist-attest.timer \
    file://lamadist-attest-ask.service \
    file://lamadist-attest-ask.timer \
"
S = "${WORKDIR}"

inherit allarch systemd

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -D -m 0755 ${S}/lamadist-attest ${D}${libexecdir}/lamadist/lamadist-attest
    install -D -m 0644 ${S}/lamadist-attest.service ${D}${systemd_system_unitdir}/lamadist-attest.service
    install -D -m 0644 ${S}/lamadist-attest.timer ${D}${systemd_system_unitdir}/lamadist-attest.timer
    install -D -m 0644 ${S}/lamadist-attest-ask.service ${D}${systemd_system_unitdir}/lamadist-attest-ask.service
    install -D -m 0644 ${S}/lamadist-attest-ask.timer ${D}${systemd_system_unitdir}/lamadist-attest-ask.timer
    sed -i -e 's#/usr/libexec#${libexecdir}#' ${D}${systemd_system_unitdir}/lamadist-attest.service \
        ${D}${systemd_system_unitdir}/lamadist-attest-ask.service
}

# The timers start the services; the services themselves are not enabled.
SYSTEMD_SERVICE:${PN} = "lamadist-attest.timer lamadist-attest-ask.timer"
FILES:${PN} += "${libexecdir}/lamadist ${systemd_system_unitdir}/lamadist-attest.service ${systemd_system_unitdir}/lamadist-attest-ask.service"
# tpm2-tools comes from meta-security's meta-tpm, named only under the tpm2 distro feature (as
# lamadist-boot does) so that `bitbake world` with OE-Core alone still resolves. coreutils: base64,
# od, mktemp; util-linux-flock: one run at a time.
RDEPENDS:${PN} = "curl coreutils util-linux-flock ${@bb.utils.contains('DISTRO_FEATURES', 'tpm2', 'tpm2-tools', '', d)}"
