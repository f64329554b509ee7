SUMMARY = "LamaDist IMA policy: measure what runs, run only code signed with the fleet's IMA key"
DESCRIPTION = "/etc/ima/ima-policy, which systemd loads at startup. lamadist-init loads the root \
image's IMA certificate before switching root and keeps the /etc overlay from replacing the policy."
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = "file://ima-policy"
S = "${WORKDIR}"

inherit allarch features_check
REQUIRED_DISTRO_FEATURES = "ima"

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -D -m 0644 ${S}/ima-policy ${D}${sysconfdir}/ima/ima-policy
}

# Appraisal needs the signatures and the certificate that lamadist-image.bbclass puts in the root
# (ima-evm-rootfs, /etc/keys/x509_ima.der).
FILES:${PN} = "${sysconfdir}/ima"
